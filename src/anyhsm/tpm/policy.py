"""PCR policy digests computed offline, as the TPM computes them.

The TPM is the authority (the sealed object's authPolicy comes from a trial
policy session); this copy lets unseal check, before asking the TPM, that a
blob's recorded PCR selection and values are the ones its policy was built
from, and then tell exactly which PCRs changed.
"""

from __future__ import annotations

import hashlib

from anyhsm.tpm.settings import PCR_BANKS, PCR_COUNT

TPM2_CC_POLICY_PCR = 0x0000017F
PCR_SELECT_BYTES = 3  # sizeofSelect for 24 PCRs


def pcr_selection(bank: str, pcrs: tuple[int, ...]) -> bytes:
    """A marshalled TPML_PCR_SELECTION of ``pcrs`` in one bank."""
    alg, _ = PCR_BANKS[bank]
    bitmap = bytearray(PCR_SELECT_BYTES)
    for p in pcrs:
        if not 0 <= p < PCR_COUNT:
            raise ValueError(f"PCR {p} is out of range")
        bitmap[p // 8] |= 1 << (p % 8)
    return (
        (1).to_bytes(4, "big") + alg.to_bytes(2, "big") + bytes([PCR_SELECT_BYTES]) + bytes(bitmap)
    )


def pcr_values_digest(values: tuple[bytes, ...]) -> bytes:
    """The pcrDigest PolicyPCR compares: SHA-256 (the session hash) of the values in order."""
    return hashlib.sha256(b"".join(values)).digest()


def policy_pcr_digest(bank: str, pcrs: tuple[int, ...], values: tuple[bytes, ...]) -> bytes:
    """policyDigest after one TPM2_PolicyPCR in a fresh SHA-256 session."""
    return hashlib.sha256(
        bytes(32)
        + TPM2_CC_POLICY_PCR.to_bytes(4, "big")
        + pcr_selection(bank, pcrs)
        + pcr_values_digest(values)
    ).digest()
