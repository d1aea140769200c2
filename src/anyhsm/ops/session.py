"""Opening the handle the way every front end does: the passphrase and PIN rules of
:mod:`anyhsm.credentials`, and which chains never ask for a passphrase.

A front end that can ask (a terminal) passes its ``prompt``; one that cannot (the Bitcoin
Core signer, run by bitcoind with no terminal; the service) passes none, and the handle
opens from what is given, the environment and the configured files, or fails with the
credential's own error (exit 5).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from anyhsm import registry

if TYPE_CHECKING:
    from anyhsm.config import Config
    from anyhsm.credentials import Prompt
    from anyhsm.hsm import Hsm
    from anyhsm.secret import SecretBytes


def unattended(config: Config) -> bool:
    """True when the chain starts with a passphrase-less path (a TPM, a token-wrapped
    keystore), or with a token while the keystore holds an unlock blob this configuration
    can use: a passphrase is then used only if one is already given, never asked for."""
    first = config.fallback.chain[0]
    if registry.unattended(first):
        return True
    if first != "pkcs11":
        return False
    from anyhsm.enrol import opens_without_passphrase

    return opens_without_passphrase(config)


def open_handle(
    config: Config,
    *,
    passphrase: SecretBytes | None = None,
    passphrase_file: Path | None = None,
    prompt: Prompt | None = None,
    audit_recovery: str | None = None,
    verify_only: bool = False,
    enrolment: bool = False,
) -> Hsm:
    """The handle over ``config``'s chain.

    The passphrase: ``passphrase``, else ``passphrase_file``, else ANYHSM_PASSPHRASE, else
    the configured passphrase_file, else ``prompt`` (not asked on an :func:`unattended`
    chain). The token PIN: ``prompt`` is asked only when the chain uses a token and
    neither pin_file nor ANYHSM_PKCS11_PIN gives it; it is passed to the library as an
    argument. ``enrolment``: the enrolment-only handle when the chain cannot reach its
    floor yet (:func:`anyhsm.enrol.open_admin`; it needs the passphrase, so it may ask).
    The caller's ``passphrase`` is not wiped; everything read here is, once the handle
    holds its own copies."""
    from anyhsm.credentials import prompt_pin, resolve_passphrase
    from anyhsm.hsm import open_hsm

    ask = None if (not enrolment and unattended(config)) else prompt
    pin = prompt_pin(config, prompt)
    pw: SecretBytes | None = None
    try:
        pw = resolve_passphrase(config, passphrase, file=passphrase_file, prompt=ask)
        if enrolment:
            from anyhsm.enrol import open_admin

            return open_admin(config, pw, pin)
        return open_hsm(
            config,
            passphrase=pw,
            audit_recovery=audit_recovery,
            verify_only=verify_only,
            pin=pin,
        )
    finally:
        if pw is not None and pw is not passphrase:
            pw.wipe()
        if pin is not None:
            pin.wipe()
