"""``anyhsm tpm enroll|unenroll|status``: seal the keystore's master key to a TPM.

Enrolment needs the passphrase once. Where the chain already opens (a development or
staging deployment falling back to the passphrase path), the normal handle is used;
where it cannot reach its floor until the TPM is enrolled (a fresh production mainnet
deployment), ``enroll`` and ``status`` open the enrolment-only handle
(:func:`anyhsm.hsm.open_for_enrolment`): the keystore opened with the passphrase,
audited as such, every key operation refused. Afterwards the TPM path opens the
keystore with no passphrase. Every enrolment change is written to the audit log.
"""

from __future__ import annotations

import argparse

from anyhsm.cli.app import App, Result, SubParsers


def cmd_enroll(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.enrol import enrol_tpm, tpm_settings

    tpm_settings(app.config())  # a missing [providers.tpm] is reported before any open
    summary = enrol_tpm(app.hsm(enrolment=True), force=args.force)
    return Result(
        summary,
        [
            f"sealed the keystore master key to the TPM at {summary['tcti']}",
            f"PCR policy: {_pcrs(summary.get('pcrs'))} ({summary['pcr_bank']})",
            f"blob: {summary['file']}",
            "the passphrase still opens the keystore (recovery)",
        ],
    )


def _pcrs(value: object) -> str:
    return ",".join(str(p) for p in value) if isinstance(value, list) and value else "none"


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
    from anyhsm.enrol import tpm_settings, tpm_status

    tpm_settings(app.config())
    info = tpm_status(app.hsm(enrolment=True))
    lines = [
        f"{k}: {_text(v)}" for k, v in info.items() if k not in ("settings", "tpm_error", "error")
    ]
    ok = bool(info.get("enrolled")) and bool(info.get("opens_keystore"))
    return Result(info, lines, 0 if ok else 4)


def _text(value: object) -> str:
    """Text output shows values, not Python reprs (yes/no, none, nested readable)."""
    from anyhsm.cli.app import text_value

    return text_value(value)


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
