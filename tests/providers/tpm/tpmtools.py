"""Raw TPM access for tests (through tpm2-pytss directly, not through anyhsm)."""

from __future__ import annotations

import hashlib


def loaded_handles(tcti: str) -> list[int]:
    """Transient objects and sessions currently loaded in the TPM (read with raw ESAPI)."""
    from tpm2_pytss import ESAPI, TPM2_CAP, TPM2_HC

    out: list[int] = []
    with ESAPI(tcti) as esys:
        for first in (TPM2_HC.TRANSIENT_FIRST, TPM2_HC.LOADED_SESSION_FIRST):
            _, cap = esys.get_capability(TPM2_CAP.HANDLES, first, 64)
            out.extend(int(h) for h in cap.data.handles)
    return out


def extend_pcr(tcti: str, pcr: int, data: bytes = b"anyhsm test measurement") -> None:
    """Extend a sha256 PCR, as a boot component's measurement would."""
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    digest = hashlib.sha256(data).digest()
    values = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))])
    with ESAPI(tcti) as esys:
        esys.pcr_extend(ESYS_TR(pcr), values)  # ESYS_TR.PCR0 + n == n
