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
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from anyhsm.errors import ConfigError

if TYPE_CHECKING:
    from anyhsm.cli.backend import Backend, RemoteBackend

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


EXIT_OK = 0
EXIT_NEGATIVE = 1
"""A command that ran but answers no: ``verify``/``message verify`` found the signature
invalid, ``psbt finalize`` could not finalize every input (operator guide, section 8:
the generic status, as no error was raised). Failures exit with their error's
``exit_code``."""


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


REMOTE_HANDLERS: set[Handler] = set()
"""The handlers that run against a service too (through :meth:`App.backend`)."""


def served(handler: Handler) -> Handler:
    """Mark a handler as offered against a service (``--addr``); others refuse there."""
    REMOTE_HANDLERS.add(handler)
    return handler


def command_name(handler: Handler) -> str:
    """A handler's command as typed: ``cmd_psbt_sign`` is ``psbt sign``."""
    name = getattr(handler, "__name__", "command")
    return name.removeprefix("cmd_").replace("_", " ")


class App:
    """Per-invocation state: lazily loaded config and HSM handle."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._config: Config | None = None
        self._hsm: Hsm | None = None
        self._remote: RemoteBackend | None = None

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
        prompt on a terminal: the library's one resolver
        (:func:`anyhsm.credentials.resolve_passphrase`), with this front end's file and
        prompt. ``init`` (``--environment`` given) has no configuration to read yet."""
        from anyhsm.credentials import resolve_passphrase

        pf = getattr(self.args, "passphrase_file", None)
        creating = bool(getattr(self.args, "environment", None))
        return resolve_passphrase(
            None if creating else self.loaded_config(),
            file=Path(pf) if pf else None,
            environment=self.environment(),
            prompt=terminal_prompt if interactive else None,
            prompt_text=prompt,
            confirm=confirm,
        )

    def hsm(
        self,
        *,
        audit_recovery: str | None = None,
        verify_only: bool = False,
        enrolment: bool = False,
    ) -> Hsm:
        """The handle (:func:`anyhsm.ops.session.open_handle`, with this front end's
        --passphrase-file and terminal prompt); with ``enrolment``, the enrolment-only
        handle when the chain cannot reach its floor yet."""
        if self._hsm is None:
            from anyhsm.ops.session import open_handle

            pf = getattr(self.args, "passphrase_file", None)
            self._hsm = open_handle(
                self.config(),
                passphrase_file=Path(pf) if pf else None,
                prompt=terminal_prompt,
                audit_recovery=audit_recovery,
                verify_only=verify_only,
                enrolment=enrolment,
            )
        return self._hsm

    def addr(self) -> str | None:
        """The service to talk to: --addr, else ANYHSM_ADDR; None for the local path."""
        from anyhsm.cli.backend import service_address

        return service_address(getattr(self.args, "addr", None))

    def backend(self) -> Backend:
        """Where the served commands run: a service when :meth:`addr` is set, else the
        local handle (opened on first use)."""
        from anyhsm.cli.backend import LocalBackend

        if self.addr() is None:
            return LocalBackend(self.hsm, self.loaded_config)
        if self._remote is None:
            self._remote = self._connect()
        return self._remote

    def _connect(self) -> RemoteBackend:
        """The client for :meth:`addr` (:func:`anyhsm.cli.backend.connect`, shared with
        anyhsm-signer): the token from ANYHSM_TOKEN or --token-file, never from argv."""
        from anyhsm.cli.backend import ServiceOptions, connect

        addr = self.addr()
        assert addr is not None
        options = ServiceOptions(
            addr,
            token_file=getattr(self.args, "token_file", None),
            ca_file=getattr(self.args, "ca_file", None),
            client_cert=getattr(self.args, "client_cert", None),
            client_key=getattr(self.args, "client_key", None),
        )
        return connect(options, self.environment)

    def close(self) -> None:
        if self._remote is not None:
            self._remote.close()
            self._remote = None
        if self._hsm is not None:
            self._hsm.close()
            self._hsm = None


def terminal_prompt(text: str) -> str | None:
    """Ask on the terminal without echo; None when standard input is not a terminal."""
    if sys.stdin is None or not sys.stdin.isatty():
        return None
    return getpass.getpass(text)
