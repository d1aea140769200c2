"""``anyhsm pkcs11 wrap-enroll|wrap-unenroll``: wrap the keystore master key with an
AES key inside the PKCS#11 token (the ``pkcs11-wrapped`` provider).

Enrolment needs the passphrase once; afterwards the keystore opens without it
wherever the token is present. The passphrase stays the recovery path.
"""

from __future__ import annotations

import argparse

from anyhsm.cli.app import App, Result, SubParsers
from anyhsm.errors import ConfigError, HsmError


def cmd_wrap_enroll(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.factory import provider_context
    from anyhsm.providers.pkcs11_wrap import enroll

    cfg = app.config()
    if "wrap_key_label" not in cfg.provider_settings("pkcs11"):
        raise ConfigError(
            "no [providers.pkcs11] wrap_key_label in the configuration",
            hint='add wrap_key_label = "anyhsm-wrap" (the AES key is created in the token)',
        )
    hsm = app.hsm()
    try:
        summary = enroll(hsm.keystore, provider_context(cfg, "pkcs11-wrapped", None))
    except HsmError as e:
        hsm.record_event("pkcs11_wrap_enroll", "error", {"error": e.code})
        raise
    hsm.record_event("pkcs11_wrap_enroll", "ok", {"mechanism": str(summary.get("mechanism", ""))})
    lines = [f"{k}: {v}" for k, v in summary.items()]
    lines.append("the passphrase still opens the keystore (recovery)")
    return Result(summary, lines)


def cmd_wrap_unenroll(args: argparse.Namespace, app: App) -> Result:
    """Revoke the token unlock path: rotate to a fresh master key without the wrapped
    blob, so a saved copy of it opens nothing."""
    from anyhsm.cli.core_cmds import rotate_dropping
    from anyhsm.providers.pkcs11_wrap import SIDE_FILE

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
