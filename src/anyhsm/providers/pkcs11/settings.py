"""The ``[providers.pkcs11]`` settings, typed, and where the PIN comes from.

The PIN is the one the caller gave (``open_hsm(..., pin=...)``: a front end's prompt, a
service's secret store; it reaches the provider through ``ProviderContext.pin``), else
the ``pin_file`` when one is configured, else the environment variable
``ANYHSM_PKCS11_PIN`` (:func:`anyhsm.credentials.resolve_pin`); never the config file
itself or a command-line argument (both end up in shell history, process listings or
backups). Outside development a PIN file that group or others may access is refused
(the same rule as every other secret file). No PIN at all is :class:`PinMissing`, an
authentication failure (exit 5).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from anyhsm import registry
from anyhsm.config import Config, Problem, keystore_path, secret_file_problems
from anyhsm.errors import ConfigError, ProviderUnavailable
from anyhsm.secret import SecretBytes
from anyhsm.types import Environment

if TYPE_CHECKING:
    from anyhsm.provider import ProviderContext

PIN_ENV = "ANYHSM_PKCS11_PIN"
DEFAULT_POOL_SIZE = 4
MAX_POOL_SIZE = 64
_FORBIDDEN_KEYS = ("pin", "user_pin", "so_pin")

log = logging.getLogger("anyhsm.pkcs11")


def _opt_str(settings: dict[str, object], key: str) -> str | None:
    value = settings.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"[providers.pkcs11] {key} must be a non-empty string", hint=f"got {value!r}"
        )
    return value


def _path(config_dir: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else config_dir / path


@dataclass(frozen=True)
class Pkcs11Settings:
    """Validated settings of the PKCS#11 provider."""

    module: Path
    token_label: str | None = None
    token_serial: str | None = None
    pool_size: int = DEFAULT_POOL_SIZE
    pin_file: Path | None = None
    threadsafe_module: bool = False
    wrap_key_label: str | None = None
    # The PIN the caller gave (the handle's copy, which it wipes on close); never shown.
    given_pin: SecretBytes | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_context(cls, context: ProviderContext) -> Pkcs11Settings:
        """Check the values (not unknown keys: that is the config validator's job)."""
        s = context.settings
        for key in _FORBIDDEN_KEYS:
            if key in s:
                raise ConfigError(
                    f"[providers.pkcs11] {key} is not accepted: PINs never live in the config",
                    hint=f"set {PIN_ENV} or point pin_file at a file readable only by you",
                )
        module = _opt_str(s, "module")
        if module is None:
            raise ConfigError(
                "[providers.pkcs11] module is required: the path of the PKCS#11 library",
                hint='e.g. module = "/usr/lib/softhsm/libsofthsm2.so"; see docs/pkcs11/',
            )
        label = s.get("token_label")
        if label is not None and not isinstance(label, str):
            raise ConfigError("[providers.pkcs11] token_label must be a string")
        serial = _opt_str(s, "token_serial")
        if label is None and serial is None:
            raise ConfigError(
                "[providers.pkcs11] needs token_label or token_serial to pick the token",
                hint="list tokens with: pkcs11-tool --module MODULE --list-slots",
            )
        pool = s.get("pool_size", DEFAULT_POOL_SIZE)
        if isinstance(pool, bool) or not isinstance(pool, int) or not 1 <= pool <= MAX_POOL_SIZE:
            raise ConfigError(
                f"[providers.pkcs11] pool_size must be an integer from 1 to {MAX_POOL_SIZE}",
                hint=f"got {pool!r}",
            )
        threadsafe = s.get("threadsafe_module", False)
        if not isinstance(threadsafe, bool):
            raise ConfigError(
                "[providers.pkcs11] threadsafe_module must be true or false",
                hint=f"got {threadsafe!r}",
            )
        pin_file = _opt_str(s, "pin_file")
        return cls(
            module=_path(context.config_dir, module),
            token_label=label,
            token_serial=serial,
            pool_size=pool,
            pin_file=_path(context.config_dir, pin_file) if pin_file else None,
            threadsafe_module=threadsafe,
            wrap_key_label=_opt_str(s, "wrap_key_label"),
            given_pin=context.pin,
        )

    def require_module(self) -> None:
        """Refuse at once when the module file is not there: the cheap check that lets a
        chain fall back from an absent PKCS#11 module before anything else is imported."""
        if not os.path.isfile(self.module):
            raise ProviderUnavailable(
                f"PKCS#11 module not found: {self.module}",
                hint="install the vendor's PKCS#11 library or fix [providers.pkcs11] module",
            )

    def describe_token(self) -> str:
        parts = []
        if self.token_label is not None:
            parts.append(f"label {self.token_label!r}")
        if self.token_serial is not None:
            parts.append(f"serial {self.token_serial!r}")
        return " and ".join(parts)


def read_pin_file(path: Path, environment: Environment) -> SecretBytes:
    """The PIN stored in ``path`` (:func:`anyhsm.credentials.read_pin_file`)."""
    from anyhsm.credentials import read_pin_file as read

    return read(path, environment)


def load_pin(settings: Pkcs11Settings, environment: Environment) -> SecretBytes:
    """The user PIN, a copy the caller owns: the one given, else ``pin_file``, else
    ``ANYHSM_PKCS11_PIN`` (:func:`anyhsm.credentials.resolve_pin`, the one order)."""
    from anyhsm.credentials import resolve_pin

    return resolve_pin(settings.pin_file, environment, given=settings.given_pin)


# --- config checks (named by the pkcs11 and pkcs11-wrapped registry specs) --------------


def config_problems(cfg: Config) -> list[Problem]:
    """``[providers.pkcs11]`` under this config: the PIN file, the module and the token
    when ``pkcs11`` is in the chain, and whether the keystore opens through the token."""
    out = secret_file_problems(cfg, "pkcs11", "pin_file")
    p11 = cfg.provider_settings("pkcs11")
    if "pkcs11" in cfg.fallback.chain:
        module = p11.get("module")
        if not isinstance(module, str):
            out.append(
                Problem(
                    "providers.pkcs11.module",
                    "<unset>",
                    "pkcs11 is in the chain but no module is configured",
                    "set the path of the vendor's PKCS#11 library",
                )
            )
        elif not Path(module).exists():
            out.append(
                Problem(
                    "providers.pkcs11.module",
                    module,
                    "module file does not exist on this machine",
                    "install the vendor library or fix the path",
                    "warning",
                )
            )
        if "token_label" not in p11 and "token_serial" not in p11:
            out.append(
                Problem(
                    "providers.pkcs11.token_label",
                    "<unset>",
                    "no token selected",
                    "set token_label or token_serial",
                )
            )
    return out + _token_wrap_problems(cfg)


def wrapped_config_problems(cfg: Config) -> list[Problem]:
    """``pkcs11-wrapped`` in the chain needs a wrap key to open anything."""
    if "pkcs11-wrapped" in cfg.fallback.chain and "wrap_key_label" not in (
        cfg.provider_settings("pkcs11")
    ):
        return [
            Problem(
                "providers.pkcs11.wrap_key_label",
                "<unset>",
                "pkcs11-wrapped is in the chain but no wrap key is named; it can never open",
                "set wrap_key_label = \"anyhsm-wrap\", then run 'anyhsm pkcs11 wrap-enroll'",
            )
        ]
    return []


def _token_wrap_problems(cfg: Config) -> list[Problem]:
    """The token wrap as it behaves (docs/pkcs11/README.md, "Wrap mode"): once
    ``[providers.pkcs11] wrap_key_label`` is set and ``anyhsm pkcs11 wrap-enroll`` made the
    blob, the keystore opens through the token whether the chain lists ``pkcs11`` or
    ``pkcs11-wrapped``; before that, only with the passphrase."""
    chain = cfg.fallback.chain
    if not registry.uses_token(chain) or cfg.environment is Environment.DEVELOPMENT:
        return []
    from anyhsm.errors import HsmError
    from anyhsm.keystore import Keystore

    p11 = cfg.provider_settings("pkcs11")
    wrap = "wrap_key_label" in p11
    try:
        wrapped = Keystore.load(keystore_path(cfg)).read_side_file("pkcs11-wrapped.json")
    except HsmError:
        return []  # no keystore: reported by the keystore's checks
    if wrap and wrapped is None:
        return [
            Problem(
                "providers.pkcs11.wrap_key_label",
                str(p11["wrap_key_label"]),
                "the keystore is not wrapped by the token yet: it opens only with the passphrase",
                "run 'anyhsm pkcs11 wrap-enroll' (needs the passphrase once)",
                "warning",
            )
        ]
    if not wrap and "tcti" not in cfg.provider_settings("tpm") and "pkcs11" in chain:
        return [
            Problem(
                "providers.pkcs11.wrap_key_label",
                "<unset>",
                "the keystore (audit key, key directory) opens only with the passphrase, "
                "so every open needs it beside the token PIN",
                'to open it through the token: set wrap_key_label = "anyhsm-wrap" and run '
                "'anyhsm pkcs11 wrap-enroll'; or keep the passphrase in passphrase_file",
                "warning",
            )
        ]
    return []
