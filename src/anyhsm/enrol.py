"""Enrolling the keystore's unlock paths (a TPM seal, a PKCS#11 token wrap), audited.

The one library layer under ``anyhsm tpm enroll|status``, ``anyhsm pkcs11 wrap-enroll``
and ``anyhsm init --chain``. On a fresh production mainnet deployment nothing in the
chain reaches the ``tpm`` floor until the TPM (or the token wrap) is enrolled, so
:func:`open_admin` falls back to the enrolment-only handle
(:func:`anyhsm.hsm.open_for_enrolment`): the keystore opened with the passphrase,
audited as such, and every key operation refused. The floor is lowered for nothing else.
"""

from __future__ import annotations

from anyhsm.config import Config
from anyhsm.errors import AllProvidersFailed, ConfigError, HsmError, SecurityLevelTooLow
from anyhsm.hsm import Hsm, open_for_enrolment, open_hsm
from anyhsm.keystore import Keystore
from anyhsm.secret import SecretBytes

TPM_BLOB = "tpm-sealed.json"
WRAP_BLOB = "pkcs11-wrapped.json"


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
    from anyhsm.tpm.settings import TpmSettings

    table = config.provider_settings("tpm")
    if "tcti" not in table:
        raise ConfigError(
            "no [providers.tpm] tcti in the configuration",
            hint='add tcti = "device:/dev/tpmrm0" (or a swtpm TCTI)',
        )
    return TpmSettings.from_mapping(table)


def _handle_detail(hsm: Hsm) -> dict[str, str]:
    return {"handle": "enrolment" if hsm.enrolment_only else "normal"}


def enrol_tpm(hsm: Hsm, *, force: bool = False) -> dict[str, object]:
    """Seal the keystore's master key to the configured TPM: a ``started`` entry before
    anything changes, then ``ok`` or ``error``. Re-enrolling from a keystore the TPM
    itself opened needs ``force`` (it normally follows a recovery with the passphrase)."""
    from anyhsm.tpm.enrollment import enroll
    from anyhsm.tpm.settings import TpmSettings

    settings = tpm_settings(hsm.config)
    assert isinstance(settings, TpmSettings)
    ks = hsm.keystore
    if ks.unlocked_by != "passphrase" and not force:
        raise HsmError(
            f"the keystore was opened via {ks.unlocked_by}, not the passphrase",
            hint="re-enrolling normally follows a recovery with the passphrase; add --force",
        )
    detail = {"tcti": settings.tcti, **_handle_detail(hsm)}
    hsm.record_event("tpm_enroll", "started", detail)
    try:
        summary = enroll(ks, settings)
    except HsmError as e:
        hsm.record_event("tpm_enroll", "error", detail, error=e.code)
        raise
    hsm.record_event("tpm_enroll", "ok", {**detail, "pcrs": str(summary["pcrs"])})
    return summary


def tpm_status(hsm: Hsm) -> dict[str, object]:
    """Enrolment and TPM state (``anyhsm tpm status``); reports TPM trouble, never raises
    for it."""
    from anyhsm.tpm.enrollment import status
    from anyhsm.tpm.settings import TpmSettings

    settings = tpm_settings(hsm.config)
    assert isinstance(settings, TpmSettings)
    out = status(hsm.keystore, settings)
    out["handle"] = _handle_detail(hsm)["handle"]
    return out


def enrol_token_wrap(hsm: Hsm) -> dict[str, object]:
    """Wrap the keystore's master key with the AES key ``wrap_key_label`` inside the
    configured PKCS#11 token (created there when missing), audited as :func:`enrol_tpm`.
    Afterwards the keystore opens through the token whenever ``[providers.pkcs11]`` names
    the wrap key, whether the chain lists ``pkcs11`` or ``pkcs11-wrapped``."""
    from anyhsm.providers.pkcs11.wrap import enroll

    cfg = hsm.config
    if "wrap_key_label" not in cfg.provider_settings("pkcs11"):
        raise ConfigError(
            "no [providers.pkcs11] wrap_key_label in the configuration",
            hint='add wrap_key_label = "anyhsm-wrap" (the AES key is created in the token)',
        )
    detail = _handle_detail(hsm)
    hsm.record_event("pkcs11_wrap_enroll", "started", detail)
    try:
        summary = enroll(hsm.keystore, hsm.provider_context("pkcs11-wrapped"))
    except HsmError as e:
        hsm.record_event("pkcs11_wrap_enroll", "error", detail, error=e.code)
        raise
    mechanism = str(summary.get("mechanism", ""))
    hsm.record_event("pkcs11_wrap_enroll", "ok", {**detail, "mechanism": mechanism})
    return summary


def opens_without_passphrase(config: Config) -> bool:
    """True when the keystore has an unlock blob for a path this configuration can use
    (a TPM seal with ``[providers.tpm]`` configured or listed, a token wrap with
    ``wrap_key_label``): the CLI then does not prompt for the passphrase. A blob that
    fails to open still falls back to a given passphrase."""
    raw = config.provider_settings("software").get("path", "keystore")
    try:
        ks = Keystore.load(config.resolve(str(raw)))
    except HsmError:
        return False
    in_use = set(config.providers) | set(config.fallback.chain)
    tpm = "tpm" in in_use and ks.read_side_file(TPM_BLOB) is not None
    wrap = "wrap_key_label" in config.provider_settings("pkcs11")
    return tpm or (wrap and ks.read_side_file(WRAP_BLOB) is not None)


__all__ = [
    "enrol_token_wrap",
    "enrol_tpm",
    "open_admin",
    "opens_without_passphrase",
    "tpm_settings",
    "tpm_status",
]
