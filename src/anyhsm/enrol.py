"""Opening a handle to enrol the keystore's unlock paths (a TPM seal, a PKCS#11 token
wrap), and whether a configuration opens the keystore without its passphrase.

The enrolment itself is the handle's (:meth:`anyhsm.hsm.Hsm.enrol_tpm`,
:meth:`~anyhsm.hsm.Hsm.enrol_token_wrap`, each one audited step); the functions of the
same names here are one-line wrappers. On a fresh production mainnet deployment nothing in the
chain reaches the ``tpm`` floor until the TPM (or the token wrap) is enrolled, so
:func:`open_admin` falls back to the enrolment-only handle
(:func:`anyhsm.hsm.open_for_enrolment`): the keystore opened with the passphrase,
audited as such, and every key operation refused. The floor is lowered for nothing else.
"""

from __future__ import annotations

from anyhsm import unlock_blobs
from anyhsm.config import Config
from anyhsm.errors import AllProvidersFailed, HsmError, SecurityLevelTooLow
from anyhsm.hsm import Hsm, open_for_enrolment, open_hsm
from anyhsm.keystore import Keystore
from anyhsm.secret import SecretBytes

TPM_BLOB = unlock_blobs.TPM_BLOB
WRAP_BLOB = unlock_blobs.WRAPPED_BLOB


def open_admin(
    config: Config, passphrase: SecretBytes | None, pin: SecretBytes | None = None
) -> Hsm:
    """The normal handle; when the chain cannot reach its floor or open at all (nothing
    enrolled yet), the enrolment-only handle, which needs the passphrase. Verdicts on
    the store (rolled back, altered) are never caught: they end the open either way.
    ``pin``: the token PIN the caller gave (each handle copies it)."""
    try:
        return open_hsm(config, passphrase=_copy(passphrase), pin=pin)
    except (SecurityLevelTooLow, AllProvidersFailed):
        return open_for_enrolment(config, passphrase=_copy(passphrase), pin=pin)


def _copy(passphrase: SecretBytes | None) -> SecretBytes | None:
    """Each handle wipes the passphrase it holds when it closes; give each its own."""
    return SecretBytes(passphrase.buffer) if passphrase is not None else None


def tpm_settings(config: Config) -> object:
    """``[providers.tpm]`` parsed, or ConfigError naming the table to add."""
    from anyhsm.anchor import tpm_sealer
    from anyhsm.tpm.sealing import TpmSealer

    sealer = tpm_sealer(config)
    assert isinstance(sealer, TpmSealer)
    return sealer.settings


def enrol_tpm(hsm: Hsm, *, force: bool = False) -> dict[str, object]:
    """:meth:`Hsm.enrol_tpm`: seal the keystore's master key to the configured TPM,
    audited (``tpm_enroll``: started, then ok / refused / error)."""
    return hsm.enrol_tpm(force=force)


def tpm_status(hsm: Hsm) -> dict[str, object]:
    """:meth:`Hsm.tpm_status`: enrolment and TPM state; reports TPM trouble, never raises
    for it."""
    return hsm.tpm_status()


def enrol_token_wrap(hsm: Hsm) -> dict[str, object]:
    """:meth:`Hsm.enrol_token_wrap`: wrap the keystore's master key with the token's AES
    key ``wrap_key_label``, audited (``pkcs11_wrap_enroll``)."""
    return hsm.enrol_token_wrap()


def opens_without_passphrase(config: Config) -> bool:
    """True when the keystore has an unlock blob for a path this configuration can use
    (a TPM seal with ``[providers.tpm]`` configured or listed, a token wrap with
    ``wrap_key_label``): the CLI then does not prompt for the passphrase. A blob that
    fails to open still falls back to a given passphrase."""
    in_use = set(config.providers) | set(config.fallback.chain)
    tpm = "tpm" in in_use
    wrap = "wrap_key_label" in config.provider_settings("pkcs11")
    if not (tpm or wrap):
        return False  # no unlock path this configuration could use: no keystore read
    raw = config.provider_settings("software").get("path", "keystore")
    try:
        ks = Keystore.load(config.resolve(str(raw)))
    except HsmError:
        return False
    return (tpm and ks.read_side_file(TPM_BLOB) is not None) or (
        wrap and ks.read_side_file(WRAP_BLOB) is not None
    )


__all__ = [
    "enrol_token_wrap",
    "enrol_tpm",
    "open_admin",
    "opens_without_passphrase",
    "tpm_settings",
    "tpm_status",
]
