"""anyhsm: one API for Bitcoin keys held in HSMs, TPMs and an encrypted software keystore."""

from anyhsm.errors import HsmError
from anyhsm.types import KeyInfo, KeyType, Network, SecurityLevel, SigScheme

__all__ = ["HsmError", "KeyInfo", "KeyType", "Network", "SecurityLevel", "SigScheme"]
__version__ = "0.1.0"
