"""TPM 2.0 support: seal the software keystore's master key to a TPM.

TPMs implement no secp256k1, so anyhsm does what disk-encryption tools do: the
TPM seals the keystore's 32-byte master key (optionally bound to PCRs), the
keystore then opens without a passphrase on this machine, and the recovery
passphrase still opens it anywhere. See docs/tpm.md.

Importing this package does not import tpm2-pytss; the first TPM call does.
"""

from anyhsm.tpm.blob import SealedBlob
from anyhsm.tpm.connection import INSTALL_HINT, pytss_available
from anyhsm.tpm.counter import TpmCounter
from anyhsm.tpm.device import pcr_values, tpm_info, tpm_random
from anyhsm.tpm.enrollment import SIDE_FILE, enroll, read_blob, status, unenroll
from anyhsm.tpm.errors import (
    TpmBlobInvalid,
    TpmCommandFailed,
    TpmForeignBlob,
    TpmLockout,
    TpmNotEnrolled,
    TpmPolicyMismatch,
)
from anyhsm.tpm.sealing import seal, unseal
from anyhsm.tpm.settings import TpmSettings

__all__ = [
    "INSTALL_HINT",
    "SIDE_FILE",
    "SealedBlob",
    "TpmBlobInvalid",
    "TpmCommandFailed",
    "TpmCounter",
    "TpmForeignBlob",
    "TpmLockout",
    "TpmNotEnrolled",
    "TpmPolicyMismatch",
    "TpmSettings",
    "enroll",
    "pcr_values",
    "pytss_available",
    "read_blob",
    "seal",
    "status",
    "tpm_info",
    "tpm_random",
    "unenroll",
    "unseal",
]
