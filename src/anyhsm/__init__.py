"""anyhsm: one API for Bitcoin keys held in HSMs, TPMs and an encrypted software keystore.

Importing this package loads no optional backend (python-pkcs11, tpm2-pytss);
providers are imported only when a configured chain names them.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: importing typing would cost the CLI's start-up ~10 ms
if TYPE_CHECKING:
    from anyhsm.config import Config
    from anyhsm.errors import HsmError
    from anyhsm.hsm import HealthReport, Hsm, open_hsm
    from anyhsm.types import (
        Capabilities,
        Environment,
        KeyInfo,
        KeyType,
        Network,
        SecurityLevel,
        SignParams,
        SigScheme,
    )

# The public names load on first use (PEP 562), so that "anyhsm --version" and
# "import anyhsm.errors" do not import the handle, the keystore and cryptography.
_LAZY = {
    "Config": "anyhsm.config",
    "HsmError": "anyhsm.errors",
    "HealthReport": "anyhsm.hsm",
    "Hsm": "anyhsm.hsm",
    "open_hsm": "anyhsm.hsm",
    "Capabilities": "anyhsm.types",
    "Environment": "anyhsm.types",
    "KeyInfo": "anyhsm.types",
    "KeyType": "anyhsm.types",
    "Network": "anyhsm.types",
    "SecurityLevel": "anyhsm.types",
    "SignParams": "anyhsm.types",
    "SigScheme": "anyhsm.types",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'anyhsm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Capabilities",
    "Config",
    "Environment",
    "HealthReport",
    "Hsm",
    "HsmError",
    "KeyInfo",
    "KeyType",
    "Network",
    "SecurityLevel",
    "SigScheme",
    "SignParams",
    "open_hsm",
]
__version__ = "0.1.0"
