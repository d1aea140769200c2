"""Where the keystore passphrase and the PKCS#11 PIN come from: one resolver for each,
for the library and every front end (CLI, Bitcoin Core signer, HTTP service).

The passphrase, first found wins:

1. the one the caller gives (``open_hsm(passphrase=...)``; a service's secret store);
2. a file the caller names (the CLI's ``--passphrase-file``);
3. ``ANYHSM_PASSPHRASE``;
4. ``[providers.software] passphrase_file`` of the configuration;
5. the front end's prompt, when it supplies one (a terminal: ``getpass``).

The PKCS#11 user PIN: the one the caller gives (``open_hsm(pin=...)``), else the
configured ``pin_file``, else ``ANYHSM_PKCS11_PIN``; a front end that can prompt asks
only when none of those gives it (:func:`pin_available`), and passes what was typed as
``pin=``. It is never written to ``os.environ`` (a child process would inherit it) and
never taken from a command-line argument. No PIN at all is :class:`PinMissing` (exit 5).

Every file is read under the one rule for secret files
(:func:`anyhsm.fsutil.read_secret_file`). Reading a passphrase hardens the process first
(:func:`anyhsm.hardening.harden_process`), so it never sits in a dumpable process
outside development.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from anyhsm.errors import ConfigError, HsmError, PinMissing
from anyhsm.secret import SecretBytes
from anyhsm.types import Environment

if TYPE_CHECKING:
    from anyhsm.config import Config

PASSPHRASE_ENV = "ANYHSM_PASSPHRASE"  # noqa: S105 (the variable's name, not a secret)
PIN_ENV = "ANYHSM_PKCS11_PIN"

Prompt = Callable[[str], str | None]
"""A front end's way to ask for a secret: called with the prompt text, returns what was
typed, or None when it cannot ask (no terminal)."""


def _secret(value: SecretBytes | str | bytes) -> SecretBytes:
    if isinstance(value, SecretBytes):
        return value
    return SecretBytes(value.encode() if isinstance(value, str) else value)


def resolve_passphrase(
    config: Config | None,
    given: SecretBytes | str | bytes | None = None,
    *,
    file: Path | None = None,
    environment: Environment | None = None,
    env: Mapping[str, str] | None = None,
    prompt: Prompt | None = None,
    prompt_text: str = "Keystore passphrase: ",
    confirm: bool = False,
) -> SecretBytes | None:
    """The keystore passphrase from the first source that has one (module docstring), or
    None. ``config`` None (``init``, before there is one) skips the configured file;
    ``environment`` (default: the config's, else production's, the strictest) decides the
    secret-file rule and the hardening. ``confirm`` asks the prompt twice and refuses two
    different answers. A given :class:`SecretBytes` is returned as is (not copied)."""
    from anyhsm.fsutil import read_secret_file
    from anyhsm.hardening import harden_process

    if environment is None:
        environment = config.environment if config is not None else Environment.PRODUCTION
    harden_process(environment)
    if given is not None:
        return _secret(given)
    if file is not None:
        return read_secret_file(file, "passphrase", environment)
    value = (os.environ if env is None else env).get(PASSPHRASE_ENV)
    if value:
        return SecretBytes(value.encode())
    if config is not None:
        pf = config.provider_settings("software").get("passphrase_file")
        if isinstance(pf, str):
            return read_secret_file(config.resolve(pf), "passphrase", environment)
    if prompt is None:
        return None
    first = prompt(prompt_text)
    if first is None:
        return None
    if confirm:
        again = prompt("Repeat: ")
        if again is None or not hmac.compare_digest(first.encode(), again.encode()):
            raise HsmError("the passphrases do not match")
    return SecretBytes(first.encode())


def read_pin_file(path: Path, environment: Environment) -> SecretBytes:
    """The PIN stored in ``path`` (one trailing newline allowed), under the one rule for
    secret files; an empty file is refused."""
    from anyhsm.fsutil import read_secret_file

    pin = read_secret_file(path, "PIN", environment)
    if not len(pin):
        pin.wipe()
        raise ConfigError(f"the PIN file {path} is empty")
    return pin


def resolve_pin(
    pin_file: Path | None,
    environment: Environment,
    *,
    given: SecretBytes | None = None,
    env: Mapping[str, str] | None = None,
) -> SecretBytes:
    """The PKCS#11 user PIN, as a copy the caller owns (and wipes): ``given``, else
    ``pin_file``, else ``ANYHSM_PKCS11_PIN``; :class:`PinMissing` when none has it."""
    if given is not None:
        return SecretBytes(given.buffer)
    if pin_file is not None:
        return read_pin_file(pin_file, environment)
    value = (os.environ if env is None else env).get(PIN_ENV)
    if not value:
        raise PinMissing(
            "no PKCS#11 PIN: none was given, and neither pin_file nor ANYHSM_PKCS11_PIN is set",
            hint=f"set {PIN_ENV}, point [providers.pkcs11] pin_file at a file readable only "
            "by you (mode 600), or run on a terminal to be asked; PINs are never taken from "
            "command-line arguments",
        )
    return SecretBytes.take(bytearray(value.encode("utf-8")))


def pin_needed(config: Config) -> bool:
    """Whether opening this deployment may log in to a PKCS#11 token (its chain names a
    token provider)."""
    from anyhsm import registry

    return registry.uses_token(config.fallback.chain)


def pin_available(config: Config, env: Mapping[str, str] | None = None) -> bool:
    """Whether the token providers will find the PIN themselves (a configured
    ``pin_file``, or ``ANYHSM_PKCS11_PIN``): a front end prompts only when not."""
    if "pin_file" in config.provider_settings("pkcs11"):
        return True
    return bool((os.environ if env is None else env).get(PIN_ENV))


def prompt_pin(config: Config, prompt: Prompt | None) -> SecretBytes | None:
    """The PIN from the front end's prompt when the deployment uses a token and no other
    source gives it; None otherwise (then the providers read ``pin_file`` or
    ``ANYHSM_PKCS11_PIN`` themselves, only if the chain reaches them)."""
    if prompt is None or not pin_needed(config) or pin_available(config):
        return None
    typed = prompt("PKCS#11 token PIN: ")
    return None if typed is None else SecretBytes(typed.encode())
