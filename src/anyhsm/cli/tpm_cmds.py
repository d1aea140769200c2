"""``anyhsm tpm enroll|unenroll|status``: seal the keystore's master key to a TPM.

Enrolment needs the passphrase once (the keystore is opened through the
configured chain, which falls back to the passphrase path while the TPM is
not enrolled); afterwards the TPM path opens the keystore with no passphrase.
Every enrolment change is written to the audit log.
"""

from __future__ import annotations

import argparse

from anyhsm.cli.app import App, Result, SubParsers
from anyhsm.errors import ConfigError, HsmError


def _settings(app: App) -> object:
    from anyhsm.tpm.settings import TpmSettings

    table = app.config().provider_settings("tpm")
    if "tcti" not in table:
        raise ConfigError(
            "no [providers.tpm] tcti in the configuration",
            hint='add tcti = "device:/dev/tpmrm0" (or a swtpm TCTI)',
        )
    return TpmSettings.from_mapping(table)


def cmd_enroll(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.tpm.enrollment import enroll
    from anyhsm.tpm.settings import TpmSettings

    settings = _settings(app)
    assert isinstance(settings, TpmSettings)
    hsm = app.hsm()
    ks = hsm.keystore
    if ks.unlocked_by != "passphrase" and not args.force:
        raise HsmError(
            f"the keystore was opened via {ks.unlocked_by}, not the passphrase",
            hint="re-enrolling normally follows a recovery with the passphrase; add --force",
        )
    try:
        summary = enroll(ks, settings)
    except HsmError as e:
        hsm.record_event("tpm_enroll", "error", {"error": e.code})
        raise
    hsm.record_event("tpm_enroll", "ok", {"tcti": settings.tcti, "pcrs": str(summary["pcrs"])})
    return Result(
        summary,
        [
            f"sealed the keystore master key to the TPM at {settings.tcti}",
            f"PCR policy: {summary['pcrs'] or 'none'} ({summary['pcr_bank']})",
            f"blob: {summary['file']}",
            "the passphrase still opens the keystore (recovery)",
        ],
    )


def cmd_unenroll(args: argparse.Namespace, app: App) -> Result:
    """Revoke the TPM unlock path: rotate to a fresh master key without the sealed blob,
    then drop the generation anchor (and its NV counter, when the TPM is configured)."""
    from anyhsm.cli.core_cmds import rotate_dropping
    from anyhsm.tpm.enrollment import SIDE_FILE, unenroll
    from anyhsm.tpm.settings import TpmSettings

    hsm = app.hsm()
    summary = rotate_dropping(app, SIDE_FILE, "tpm_unenroll")
    table = app.config().provider_settings("tpm")
    settings = TpmSettings.from_mapping(table) if "tcti" in table else None
    unenroll(hsm.keystore, settings)
    hsm.record_event("tpm_unenroll", "ok" if summary else "noop")
    if summary is None:
        return Result({"unenrolled": False}, ["the keystore was not enrolled"])
    return Result(
        {"unenrolled": True, **summary},
        [
            "removed the TPM unlock path: every key re-encrypted under a fresh master key "
            f"(epoch {summary['epoch']}), so a saved copy of the sealed blob opens nothing",
        ],
    )


def cmd_status(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.tpm.enrollment import status
    from anyhsm.tpm.settings import TpmSettings

    settings = _settings(app)
    assert isinstance(settings, TpmSettings)
    info = status(app.hsm().keystore, settings)
    lines = [f"{k}: {v}" for k, v in info.items() if k not in ("settings", "tpm_error", "error")]
    ok = bool(info.get("enrolled")) and bool(info.get("opens_keystore"))
    return Result(info, lines, 0 if ok else 4)


def register(sub: SubParsers) -> None:
    tpm = sub.add_parser("tpm", help="seal the keystore master key to a TPM 2.0")
    ts = tpm.add_subparsers(dest="tpm_cmd", required=True)
    e = ts.add_parser("enroll", help="seal the master key (needs the passphrase once)")
    e.add_argument("--force", action="store_true", help="re-enroll from a TPM-opened keystore")
    e.set_defaults(func=cmd_enroll)
    ts.add_parser("unenroll", help="remove the sealed blob").set_defaults(func=cmd_unenroll)
    ts.add_parser("status", help="enrolment, TPM reachability, unsealability").set_defaults(
        func=cmd_status
    )
