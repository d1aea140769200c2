"""anyhsm: one API for Bitcoin keys held in HSMs, TPMs and an encrypted software keystore.

Importing this package loads no optional backend (python-pkcs11, tpm2-pytss);
providers are imported only when a configured chain names them.
"""

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
