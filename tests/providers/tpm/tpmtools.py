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


def define_nv(
    tcti: str,
    index: int,
    attributes: int,
    size: int,
    *,
    data: bytes | None = None,
    auth: bytes | None = None,
) -> None:
    """Define an NV index with the owner hierarchy (as another program on the host would),
    then write ``data`` (ordinary index) or increment it once (counter, data=None
    and counter attributes) so that it reads."""
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    public = TPM2B_NV_PUBLIC(
        nvPublic=TPMS_NV_PUBLIC(
            nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=attributes, dataSize=size
        )
    )
    with ESAPI(tcti) as esys:
        handle = esys.nv_define_space(auth, public, auth_handle=ESYS_TR.OWNER)
        if data is not None:
            esys.nv_write(handle, data, auth_handle=ESYS_TR.OWNER)
        elif (attributes >> 4) & 0xF == 1:  # TPM_NT_COUNTER
            esys.nv_increment(handle, auth_handle=ESYS_TR.OWNER)


def undefine_nv(tcti: str, index: int) -> None:
    """Remove an NV index with the owner hierarchy (raw, no anyhsm checks)."""
    from tpm2_pytss import ESAPI, ESYS_TR

    with ESAPI(tcti) as esys:
        esys.nv_undefine_space(esys.tr_from_tpmpublic(index), auth_handle=ESYS_TR.OWNER)


def nv_attributes(tcti: str, index: int) -> int | None:
    """The TPMA_NV attributes of an NV index, or None if it is not defined."""
    from tpm2_pytss import ESAPI, TSS2_Exception

    with ESAPI(tcti) as esys:
        try:
            handle = esys.tr_from_tpmpublic(index)
        except TSS2_Exception:
            return None
        public, _ = esys.nv_read_public(handle)
        return int(public.nvPublic.attributes)


def nv_indices(tcti: str) -> list[int]:
    """Every NV index defined in the TPM."""
    from tpm2_pytss import ESAPI, TPM2_CAP, TPM2_HC

    with ESAPI(tcti) as esys:
        _, cap = esys.get_capability(TPM2_CAP.HANDLES, TPM2_HC.NV_INDEX_FIRST, 256)
        return [int(h) for h in cap.data.handles]


def set_owner_password(tcti: str, password: bytes) -> None:
    """Give the owner hierarchy an authorisation value (tpm2_changeauth -c owner)."""
    from tpm2_pytss import ESAPI, ESYS_TR

    with ESAPI(tcti) as esys:
        esys.hierarchy_change_auth(ESYS_TR.OWNER, password)
