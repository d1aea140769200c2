"""The file format of a master key wrapped by a PKCS#11 token (``pkcs11-wrapped.json``
beside the keystore): where the wrap key lives, which mechanism, and the ciphertext.

Nothing in it is secret without the token. The header (format, version, token serial,
key label and id, mechanism) is bound into the GCM tag as additional authenticated
data (:meth:`WrappedBlob.aad`), so a header edited to point at another key fails instead
of being tried. The parser is strict: any malformed field is KeystoreCorrupted.
"""

from __future__ import annotations

import base64
import enum
import json
from dataclasses import dataclass

from anyhsm.errors import KeystoreCorrupted, UnsupportedFormatVersion
from anyhsm.unlock_blobs import WRAPPED_BLOB

SIDE_FILE = WRAPPED_BLOB
BLOB_FORMAT = "anyhsm-pkcs11-wrapped-master-key"
BLOB_VERSION = 1

__all__ = ["BLOB_FORMAT", "BLOB_VERSION", "SIDE_FILE", "WrapMechanism", "WrappedBlob"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeystoreCorrupted(f"{SIDE_FILE}: {what} is missing or not a string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except ValueError:
        raise KeystoreCorrupted(f"{SIDE_FILE}: {what} is not base64") from None


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise KeystoreCorrupted(f"{SIDE_FILE}: {what} is missing or not a string")
    return value


class WrapMechanism(enum.Enum):
    """How the master key is encrypted under the token's AES key."""

    AES_GCM = "CKM_AES_GCM"
    AES_KEY_WRAP_PAD = "CKM_AES_KEY_WRAP_PAD"


@dataclass(frozen=True)
class WrappedBlob:
    """The side file's content: where the wrap key lives, how, and the ciphertext."""

    token_serial: str
    token_label: str
    key_label: str
    key_id: bytes
    mechanism: WrapMechanism
    iv: bytes
    ciphertext: bytes
    wrapped_at: str = ""

    def aad(self) -> bytes:
        """The header bound into the GCM tag (canonical JSON)."""
        header = {
            "format": BLOB_FORMAT,
            "version": BLOB_VERSION,
            "token_serial": self.token_serial,
            "key_label": self.key_label,
            "key_id": self.key_id.hex(),
            "mechanism": self.mechanism.value,
        }
        return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def to_json(self) -> bytes:
        body = {
            "format": BLOB_FORMAT,
            "version": BLOB_VERSION,
            "token_serial": self.token_serial,
            "token_label": self.token_label,
            "key_label": self.key_label,
            "key_id": self.key_id.hex(),
            "mechanism": self.mechanism.value,
            "iv": _b64(self.iv),
            "ciphertext": _b64(self.ciphertext),
            "wrapped_at": self.wrapped_at,
        }
        return json.dumps(body, sort_keys=True, indent=2).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> WrappedBlob:
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise KeystoreCorrupted(f"{SIDE_FILE} is not JSON") from None
        if not isinstance(body, dict) or body.get("format") != BLOB_FORMAT:
            raise KeystoreCorrupted(f"{SIDE_FILE} is not an anyhsm PKCS#11-wrapped master key")
        version = body.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise KeystoreCorrupted(f"{SIDE_FILE}: version is missing")
        if version != BLOB_VERSION:
            raise UnsupportedFormatVersion(
                f"{SIDE_FILE} has format version {version}; this anyhsm reads {BLOB_VERSION}",
                hint="upgrade anyhsm, or open the keystore with the recovery passphrase",
            )
        try:
            mechanism = WrapMechanism(body.get("mechanism"))
        except ValueError:
            raise KeystoreCorrupted(f"{SIDE_FILE}: unknown mechanism") from None
        try:
            key_id = bytes.fromhex(_text(body.get("key_id"), "key_id"))
        except ValueError:
            raise KeystoreCorrupted(f"{SIDE_FILE}: key_id is not hex") from None
        return cls(
            token_serial=_text(body.get("token_serial"), "token_serial"),
            token_label=_text(body.get("token_label"), "token_label"),
            key_label=_text(body.get("key_label"), "key_label"),
            key_id=key_id,
            mechanism=mechanism,
            iv=_unb64(body.get("iv"), "iv"),
            ciphertext=_unb64(body.get("ciphertext"), "ciphertext"),
            wrapped_at=str(body.get("wrapped_at", "")),
        )
