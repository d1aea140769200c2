"""One spec per provider: the single place a provider's name, import target, security
level, extra to install, settings and role in the deployment are written down.

The factory's level and extras tables, config's provider names and settings keys, the
order the keystore is opened in, and the CLI's decisions (is this chain unattended?
does it use a token?) all derive from these specs, so a new provider is one entry here.
Nothing is imported until a chain names the provider: the provider class and its
config checks are "module:attribute" strings, imported only when they are needed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from anyhsm.types import SecurityLevel

if TYPE_CHECKING:
    from anyhsm.config import Config, Problem

ConfigCheck = Callable[["Config"], "list[Problem]"]
"""A provider's config checks: every problem its settings have under this config."""


@dataclass(frozen=True)
class ProviderSpec:
    """What anyhsm knows about a provider without importing it."""

    name: str
    target: str  # "module:Class", imported only when a chain names the provider
    level: SecurityLevel
    extra: str | None = None  # the pip extra that installs its backend
    settings: Mapping[str, tuple[type, ...]] = field(default_factory=dict)  # its config keys
    opens_keystore: bool = False  # it is a way of opening the software keystore
    unattended: bool = False  # it opens the keystore with no passphrase (sealed master key)
    uses_token: bool = False  # it needs the [providers.pkcs11] token (and its PIN)
    # "module:function" (a ConfigCheck) beside its settings parser, run by
    # 'config check' when the config involves the provider (see involved)
    config_checks: str | None = None
    # its table configures the keystore, which every keystore-opening provider opens:
    # it is involved whenever one of them is in the chain
    keystore_settings: bool = False

    def load_config_checks(self) -> ConfigCheck | None:
        """The check function, imported now (its module imports no backend library)."""
        if self.config_checks is None:
            return None
        module, _, attr = self.config_checks.partition(":")
        return cast(ConfigCheck, getattr(importlib.import_module(module), attr))


_TIMEOUT: Mapping[str, tuple[type, ...]] = {"timeout_ms": (int,)}

SPECS: tuple[ProviderSpec, ...] = (
    ProviderSpec(
        "pkcs11",
        "anyhsm.providers.pkcs11.provider:Pkcs11Provider",
        SecurityLevel.HSM,
        extra="pkcs11",
        uses_token=True,
        config_checks="anyhsm.providers.pkcs11.settings:config_problems",
        settings={
            "module": (str,),
            "token_label": (str,),
            "token_serial": (str,),
            "pool_size": (int,),
            "pin_file": (str,),
            "threadsafe_module": (bool,),
            "wrap_key_label": (str,),
            **_TIMEOUT,
        },
    ),
    ProviderSpec(
        "tpm",
        "anyhsm.providers.tpm:TpmProvider",
        SecurityLevel.TPM,
        extra="tpm",
        opens_keystore=True,
        unattended=True,
        config_checks="anyhsm.tpm.settings:config_problems",
        settings={
            "tcti": (str,),
            "pcrs": (list,),
            "pcr_bank": (str,),
            "use_rng": (bool,),
            **_TIMEOUT,
        },
    ),
    ProviderSpec(
        "pkcs11-wrapped",
        "anyhsm.providers.pkcs11.wrap:Pkcs11WrappedProvider",
        SecurityLevel.HSM_WRAPPED,
        extra="pkcs11",
        opens_keystore=True,
        unattended=True,
        uses_token=True,
        config_checks="anyhsm.providers.pkcs11.settings:wrapped_config_problems",
        settings=_TIMEOUT,
    ),
    ProviderSpec(
        "software",
        "anyhsm.providers.software:SoftwareProvider",
        SecurityLevel.SOFTWARE,
        opens_keystore=True,
        keystore_settings=True,
        config_checks="anyhsm.providers.software_settings:config_problems",
        settings={"path": (str,), "passphrase_file": (str,), "kdf": (dict,), **_TIMEOUT},
    ),
    ProviderSpec(
        "simulator",
        "anyhsm.providers.simulator:SimulatorProvider",
        SecurityLevel.SIMULATOR,
        config_checks="anyhsm.providers.simulator_settings:config_problems",
        settings={
            "latency_ms": (int, float),
            "failure_rate": (int, float),
            "offline": (bool,),
            "fail_after": (int,),
            "hang": (bool,),
            "seed": (int,),
            "corrupt_signatures": (bool,),
            **_TIMEOUT,
        },
    ),
)

BY_NAME: Mapping[str, ProviderSpec] = {s.name: s for s in SPECS}
NAMES: tuple[str, ...] = tuple(s.name for s in SPECS)
"""Every provider name, in the order the docs list them."""

KEYSTORE_OPEN_ORDER: tuple[str, ...] = ("tpm", "pkcs11-wrapped", "software")
"""How the keystore anchoring a deployment is opened: sealed master keys (TPM, token
wrap) before the passphrase."""
assert set(KEYSTORE_OPEN_ORDER) == {s.name for s in SPECS if s.opens_keystore}


def involved(s: ProviderSpec, chain: Iterable[str], tables: Iterable[str]) -> bool:
    """Whether a config with this chain and these ``[providers.*]`` tables uses ``s``:
    it is in the chain or has a table, or it holds the settings of a keystore that a
    provider in the chain opens."""
    names = set(chain)
    return (
        s.name in names or s.name in set(tables) or (s.keystore_settings and opens_keystore(names))
    )


def level(name: str) -> SecurityLevel:
    """The security level of provider ``name`` (an unknown one counts as the simulator's)."""
    s = BY_NAME.get(name)
    return SecurityLevel.SIMULATOR if s is None else s.level


def spec(name: str) -> ProviderSpec | None:
    return BY_NAME.get(name)


def uses_token(chain: Iterable[str]) -> bool:
    """Whether any of these providers needs the [providers.pkcs11] token (and its PIN)."""
    return any(s.uses_token for s in (BY_NAME.get(n) for n in chain) if s is not None)


def opens_keystore(names: Iterable[str]) -> bool:
    """Whether any of these providers is a way of opening the software keystore."""
    return any(s.opens_keystore for s in (BY_NAME.get(n) for n in names) if s is not None)


def unattended(name: str) -> bool:
    """Whether ``name`` opens the keystore with no passphrase."""
    s = BY_NAME.get(name)
    return s is not None and s.unattended
