"""Errors particular to the TPM layer, each a kind of provider failure.

All of them except :class:`TpmCommandFailed` derive from
:class:`~anyhsm.errors.ProviderUnavailable`: the TPM path cannot open the
keystore, so the factory moves on (the recovery passphrase still opens it).
"""

from __future__ import annotations

from anyhsm.errors import ProviderError, ProviderUnavailable

RECOVERY_HINT = (
    "open the keystore with the recovery passphrase (ANYHSM_PASSPHRASE or --passphrase-file), "
    "then run 'anyhsm tpm enroll' again to seal it to this TPM's current state"
)


class TpmNotEnrolled(ProviderUnavailable):
    """No sealed master key beside the keystore."""

    code = "tpm_not_enrolled"


class TpmPolicyMismatch(ProviderUnavailable):
    """The PCRs the master key is sealed to hold other values now; the TPM refuses to unseal."""

    code = "tpm_policy_mismatch"

    def __init__(
        self, message: str, *, changed_pcrs: tuple[int, ...] = (), hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint or RECOVERY_HINT)
        self.changed_pcrs = changed_pcrs


class TpmBlobInvalid(ProviderUnavailable):
    """The sealed blob is damaged, edited or of an unknown format; the TPM will not load it."""

    code = "tpm_blob_invalid"


class TpmForeignBlob(ProviderUnavailable):
    """The blob was sealed by another TPM, or this TPM was cleared since (new owner seed)."""

    code = "tpm_blob_foreign"


class TpmLockout(ProviderUnavailable):
    """The TPM is in dictionary-attack lockout and refuses authorisations for now."""

    code = "tpm_lockout"


class TpmCommandFailed(ProviderError):
    """The TPM or the TSS returned an error not covered by a more specific class."""

    code = "tpm_command_failed"

    def __init__(self, message: str, *, rc: int = 0, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.rc = rc
