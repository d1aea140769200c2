"""AES-256-GCM sealing with plaintext decrypted straight into a caller-owned,
wipeable buffer, and HKDF subkeys so one master key never serves two purposes."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from anyhsm.secret import SecretBytes, wipe

NONCE_LEN = 12
TAG_LEN = 16


class OpenFailed(Exception):
    """Authentication failed; callers map this to their own typed error."""


class AeadKey:
    """An AES-256-GCM key ready for many seal/open calls.

    ``cryptography`` keeps its own copy of the key inside the AESGCM object,
    which we cannot wipe; it is dropped on :meth:`close`.
    """

    def __init__(self, key: SecretBytes) -> None:
        self._aes: AESGCM | None = AESGCM(key.buffer)

    def _cipher(self) -> AESGCM:
        if self._aes is None:
            raise OpenFailed("key closed")
        return self._aes

    def seal(self, plaintext: bytes | bytearray | memoryview, aad: bytes) -> tuple[bytes, bytes]:
        """Encrypt; returns (nonce, ciphertext||tag). Random 96-bit nonces are
        safe for the number of records a keystore holds under one key."""
        nonce = os.urandom(NONCE_LEN)
        return nonce, self._cipher().encrypt(nonce, plaintext, aad)

    def open_into(self, nonce: bytes, sealed: bytes, aad: bytes, out: bytearray) -> int:
        """Decrypt into ``out`` (at least len(sealed)-16 bytes); returns the length.
        On failure ``out`` is wiped and OpenFailed raised."""
        n = len(sealed) - TAG_LEN
        if len(nonce) != NONCE_LEN or n < 0 or len(out) < n:
            raise OpenFailed("malformed ciphertext")
        view = memoryview(out)[:n]
        try:
            self._cipher().decrypt_into(nonce, sealed, aad, view)
        except InvalidTag:
            wipe(out)
            raise OpenFailed("authentication failed") from None
        finally:
            view.release()
        return n

    def open(self, nonce: bytes, sealed: bytes, aad: bytes) -> SecretBytes:
        """Decrypt into a new SecretBytes."""
        out = SecretBytes(max(len(sealed) - TAG_LEN, 0))
        try:
            self.open_into(nonce, sealed, aad, out.buffer)
        except OpenFailed:
            out.wipe()
            raise
        return out

    def close(self) -> None:
        self._aes = None


def seal_once(key: SecretBytes, plaintext: bytes | bytearray, aad: bytes) -> tuple[bytes, bytes]:
    return AeadKey(key).seal(plaintext, aad)


def open_once(key: SecretBytes, nonce: bytes, sealed: bytes, aad: bytes) -> SecretBytes:
    return AeadKey(key).open(nonce, sealed, aad)


def subkey(master: SecretBytes, purpose: str) -> SecretBytes:
    """A 32-byte key for one purpose, derived with HKDF-SHA256."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode())
    return SecretBytes(hkdf.derive(master.buffer))
