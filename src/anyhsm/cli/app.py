"""Shared plumbing for CLI commands: config, passphrase, the HSM handle, results.

Commands are thin: they parse arguments, call the library and return a
:class:`Result` that ``main`` prints as text or as ``--json``. Secrets never
come from the command line: the passphrase comes from ``ANYHSM_PASSPHRASE``,
``--passphrase-file`` or an interactive prompt; imported keys from files, standard
input or a prompt.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from anyhsm import registry
from anyhsm.errors import ConfigError, HsmError

if TYPE_CHECKING:
    # Imported where used: a command module importing this file (and so "anyhsm
    # --help") must not load the handle, the keystore or cryptography.
    from anyhsm.config import Config
    from anyhsm.hsm import Hsm
    from anyhsm.secret import SecretBytes
    from anyhsm.types import Environment


@dataclass
class Result:
    """What a command produced: a JSON object, human text, and the exit status.

    ``lines``, when set, is printed as is in both modes instead of ``data``/``text``
    (a stream such as ``audit show``: readable lines, or JSON lines under --json)."""

    data: dict[str, object]
    text: list[str] = field(default_factory=list)
    exit_code: int = 0
    lines: list[str] | None = None


def text_value(value: object) -> str:
    """A value as text output shows it, never a Python repr: booleans ``yes``/``no``,
    ``None`` ``none``, lists comma-separated (``none`` when empty), mappings
    ``name=value`` pairs (a nested one in parentheses)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(_nested(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_nested(v)}" for k, v in value.items()) or "none"
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _nested(value: object) -> str:
    text = text_value(value)
    return f"({text})" if isinstance(value, (dict, list, tuple)) and value else text


Handler = Callable[[argparse.Namespace, "App"], Result]
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class App:
    """Per-invocation state: lazily loaded config and HSM handle."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._config: Config | None = None
        self._hsm: Hsm | None = None

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    def config_path(self) -> Path:
        """--config, else ANYHSM_CONFIG, else the first of ./anyhsm.toml,
        $XDG_CONFIG_HOME/anyhsm/anyhsm.toml, /etc/anyhsm/anyhsm.toml that exists
        (:func:`anyhsm.config.find_config`; its error names every place searched)."""
        from anyhsm.config import find_config

        return find_config(getattr(self.args, "config", None))

    def config(self) -> Config:
        if self._config is None:
            from anyhsm.config import Config

            self._config = Config.load(self.config_path())
        return self._config

    def loaded_config(self) -> Config | None:
        """The config if one is named or found and loads; None otherwise (the command
        that needs it reports the error when it opens the handle)."""
        try:
            return self.config()
        except ConfigError:
            return None

    def environment(self) -> Environment:
        """Whose rules apply to secrets read now: ``init --environment``, else the
        config's; production's (the strictest) when no config can be read."""
        from anyhsm.types import Environment

        env = getattr(self.args, "environment", None)
        if isinstance(env, str):
            return Environment(env)
        cfg = self.loaded_config()
        return cfg.environment if cfg is not None else Environment.PRODUCTION

    def passphrase(
        self,
        *,
        prompt: str = "Keystore passphrase: ",
        confirm: bool = False,
        interactive: bool = True,
    ) -> SecretBytes | None:
        """From --passphrase-file, ANYHSM_PASSPHRASE, the configured passphrase_file, or a
        prompt on a terminal.

        Files are read under the one rule for secret files (the library's
        :func:`anyhsm.fsutil.read_secret_file`, also used for the PIN file), and the
        environment and configured file are resolved by the library's own
        :func:`anyhsm.factory.resolve_passphrase`, so the CLI and ``open_hsm`` agree.
        """
        from anyhsm.factory import resolve_passphrase
        from anyhsm.fsutil import read_secret_file
        from anyhsm.hardening import harden_process
        from anyhsm.secret import SecretBytes

        environment = self.environment()
        harden_process(environment)
        pf = getattr(self.args, "passphrase_file", None)
        if pf:
            return read_secret_file(Path(pf), "passphrase", environment)
        cfg = self.loaded_config()
        if cfg is not None and not getattr(self.args, "environment", None):
            found = resolve_passphrase(cfg, None)
            if found is not None:
                return found
        else:
            env = os.environ.get("ANYHSM_PASSPHRASE")
            if env:
                return SecretBytes(env.encode())
        if interactive and sys.stdin is not None and sys.stdin.isatty():
            first = getpass.getpass(prompt)
            if confirm and getpass.getpass("Repeat: ") != first:
                raise HsmError("the passphrases do not match")
            return SecretBytes(first.encode())
        return None

    def hsm(
        self,
        *,
        audit_recovery: str | None = None,
        verify_only: bool = False,
        enrolment: bool = False,
    ) -> Hsm:
        """The handle; with ``enrolment``, the enrolment-only handle when the chain cannot
        reach its floor yet (:func:`anyhsm.enrol.open_admin`)."""
        if self._hsm is None:
            from anyhsm.hsm import open_hsm

            cfg = self.config()
            # A chain that starts with a passphrase-less path (TPM, token-wrapped, or a
            # token whose wrap opens the keystore) takes a passphrase only if one is
            # already given; it never prompts. Enrolment needs the passphrase.
            unattended = not enrolment and _unattended(cfg)
            self._prompt_pkcs11_pin(cfg)
            pw = self.passphrase(interactive=not unattended)
            if enrolment:
                from anyhsm.enrol import open_admin

                try:
                    self._hsm = open_admin(cfg, pw)
                finally:
                    if pw is not None:
                        pw.wipe()
            else:
                self._hsm = open_hsm(
                    cfg, passphrase=pw, audit_recovery=audit_recovery, verify_only=verify_only
                )
        return self._hsm

    @staticmethod
    def _prompt_pkcs11_pin(cfg: Config) -> None:
        """The token PIN from a prompt on a terminal when neither ANYHSM_PKCS11_PIN nor a
        pin_file gives it (kept in this process's environment only, never in argv)."""
        if not registry.uses_token(cfg.fallback.chain) or os.environ.get("ANYHSM_PKCS11_PIN"):
            return
        if "pin_file" in cfg.provider_settings("pkcs11"):
            return
        if sys.stdin is not None and sys.stdin.isatty():
            os.environ["ANYHSM_PKCS11_PIN"] = getpass.getpass("PKCS#11 token PIN: ")

    def close(self) -> None:
        if self._hsm is not None:
            self._hsm.close()
            self._hsm = None


def _unattended(cfg: Config) -> bool:
    """No passphrase prompt: the chain starts with a passphrase-less path, or with a token
    while the keystore holds an unlock blob this configuration can use."""
    first = cfg.fallback.chain[0]
    if registry.unattended(first):
        return True
    if first != "pkcs11":
        return False
    from anyhsm.enrol import opens_without_passphrase

    return opens_without_passphrase(cfg)
