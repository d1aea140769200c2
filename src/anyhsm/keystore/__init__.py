"""The envelope-encrypted file keystore used by the software provider."""

from anyhsm.keystore.kdf import KdfParams
from anyhsm.keystore.store import KeyRecord, Keystore

__all__ = ["KdfParams", "KeyRecord", "Keystore"]
