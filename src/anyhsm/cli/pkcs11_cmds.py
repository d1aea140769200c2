"""``anyhsm pkcs11 wrap-enroll|wrap-unenroll``: wrap the keystore master key with an
AES key inside the PKCS#11 token (the ``pkcs11-wrapped`` provider).

Enrolment needs the passphrase once (on a deployment whose chain cannot reach its
floor yet, through the enrolment-only handle, see ``tpm_cmds``); afterwards the
keystore opens without it wherever the token is present and ``[providers.pkcs11]``
names ``wrap_key_label``, whether the chain lists ``pkcs11`` or ``pkcs11-wrapped``.
The passphrase stays the recovery path.
"""

from __future__ import annotations

import argparse

from anyhsm.cli.app import App, Result, SubParsers, text_value
from anyhsm.errors import ConfigError


def cmd_wrap_enroll(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.enrol import enrol_token_wrap

    if "wrap_key_label" not in app.config().provider_settings("pkcs11"):
        raise ConfigError(
            "no [providers.pkcs11] wrap_key_label in the configuration",
            hint='add wrap_key_label = "anyhsm-wrap" (the AES key is created in the token)',
        )
    summary = enrol_token_wrap(app.hsm(enrolment=True))
    lines = [f"{k}: {text_value(v)}" for k, v in summary.items()]
    lines.append(
        "the keystore now opens through the token wherever [providers.pkcs11] names "
        "wrap_key_label (chain 'pkcs11' or 'pkcs11-wrapped')"
    )
    lines.append("the passphrase still opens the keystore (recovery)")
    return Result(summary, lines)


def cmd_wrap_unenroll(args: argparse.Namespace, app: App) -> Result:
    """Revoke the token unlock path: rotate to a fresh master key without the wrapped
    blob, so a saved copy of it opens nothing."""
    from anyhsm.cli.core_cmds import rotate_dropping
    from anyhsm.providers.pkcs11.wrap import SIDE_FILE

    hsm = app.hsm()
    summary = rotate_dropping(app, SIDE_FILE, "pkcs11_wrap_unenroll")
    hsm.record_event("pkcs11_wrap_unenroll", "ok" if summary else "noop")
    if summary is None:
        return Result({"unenrolled": False}, ["was not enrolled"])
    return Result(
        {"unenrolled": True, **summary},
        [
            "removed the token unlock path: every key re-encrypted under a fresh master key "
            f"(epoch {summary['epoch']}), so a saved copy of the wrapped blob opens nothing",
        ],
    )


def register(sub: SubParsers) -> None:
    p = sub.add_parser("pkcs11", help="PKCS#11 token administration")
    ps = p.add_subparsers(dest="pkcs11_cmd", required=True)
    ps.add_parser(
        "wrap-enroll", help="wrap the keystore master key with an AES key in the token"
    ).set_defaults(func=cmd_wrap_enroll)
    ps.add_parser("wrap-unenroll", help="remove the wrapped master key").set_defaults(
        func=cmd_wrap_unenroll
    )
