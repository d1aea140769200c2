"""``anyhsm tpm enroll|unenroll|status``: seal the keystore's master key to a TPM.

Thin shells over :mod:`anyhsm.ops.enrol`. Enrolment needs the passphrase once. Where the
chain already opens (a development or staging deployment falling back to the passphrase
path), the normal handle is used; where it cannot reach its floor until the TPM is
enrolled (a fresh production mainnet deployment), ``enroll`` and ``status`` open the
enrolment-only handle: the keystore opened with the passphrase, audited as such, every
key operation refused. Afterwards the TPM path opens the keystore with no passphrase.
Every enrolment change is written to the audit log.
"""

from __future__ import annotations

import argparse

from anyhsm.cli.app import EXIT_OK, App, Result, SubParsers, text_value


def _tpm_configured(app: App) -> None:
    """A missing [providers.tpm] is reported before any open (no passphrase asked)."""
    from anyhsm.ops.enrol import TPM, check_configured

    check_configured(app.config(), TPM)


def cmd_enroll(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.enrol import enrol_tpm

    _tpm_configured(app)
    res = enrol_tpm(app.hsm(enrolment=True), force=args.force)
    return Result(
        res.to_dict(),
        [
            f"sealed the keystore master key to the TPM at {text_value(res.get('tcti'))}",
            f"PCR policy: {_pcrs(res.get('pcrs'))} ({text_value(res.get('pcr_bank'))})",
            f"blob: {text_value(res.get('file'))}",
            "the passphrase still opens the keystore (recovery)",
        ],
    )


def _pcrs(value: object) -> str:
    return ",".join(str(p) for p in value) if isinstance(value, list) and value else "none"


def cmd_unenroll(args: argparse.Namespace, app: App) -> Result:
    """Revoke the TPM unlock path: rotate to a fresh master key without the sealed blob,
    then drop the generation anchor (and its NV counter, when the TPM is configured)."""
    from anyhsm.cli.core_cmds import current_passphrase
    from anyhsm.ops.enrol import TPM, needs_passphrase, unenrol_tpm

    hsm = app.hsm()
    with current_passphrase(app, needs_passphrase(hsm, TPM)) as current:
        res = unenrol_tpm(hsm, current)
    if not res.unenrolled:
        return Result(res.to_dict(), ["the keystore was not enrolled"])
    return Result(
        res.to_dict(),
        [
            "removed the TPM unlock path: every key re-encrypted under a fresh master key "
            f"(epoch {text_value(res.get('epoch'))}), so a saved copy of the sealed blob "
            "opens nothing",
        ],
    )


def cmd_status(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.enrol import tpm_status
    from anyhsm.tpm.errors import TpmNotEnrolled

    _tpm_configured(app)
    res = tpm_status(app.hsm(enrolment=True))
    lines = [
        f"{k}: {_text(v)}"
        for k, v in res.data.items()
        if k not in ("settings", "tpm_error", "error")
    ]
    return Result(res.to_dict(), lines, EXIT_OK if res.ok else TpmNotEnrolled.exit_code)


def _text(value: object) -> str:
    """Text output shows values, not Python reprs (yes/no, none, nested readable)."""
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
