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
    from anyhsm.providers.pkcs11_wrap import unenroll

    hsm = app.hsm()
    removed = unenroll(hsm.keystore)
    hsm.record_event("pkcs11_wrap_unenroll", "ok" if removed else "noop")
    return Result({"unenrolled": removed}, ["removed" if removed else "was not enrolled"])


def register(sub: SubParsers) -> None:
    p = sub.add_parser("pkcs11", help="PKCS#11 token administration")
    ps = p.add_subparsers(dest="pkcs11_cmd", required=True)
    ps.add_parser(
        "wrap-enroll", help="wrap the keystore master key with an AES key in the token"
    ).set_defaults(func=cmd_wrap_enroll)
    ps.add_parser("wrap-unenroll", help="remove the wrapped master key").set_defaults(
        func=cmd_wrap_unenroll
    )
