"""Client tokens: made at random, stored only as a salted hash, compared in constant time.

A token is 256 random bits (``ahs_`` and 43 URL-safe base64 characters). Because it is
random, a fast salted hash is enough to store it: nobody can search a 2^256 space, so the
slow password hashes (scrypt, Argon2) that protect low-entropy passwords buy nothing here
and would cost every request milliseconds. The salt (32 random bytes per client) keeps
two deployments, or two clients, from ever storing the same value, and keeps a table of
precomputed hashes useless. The stored form is ``sha256:<salt hex>:<HMAC-SHA256(salt,
token) hex>``.

Checking a presented token computes its hash under every client's salt and compares each
with :func:`hmac.compare_digest`, without stopping at the first match, so the time taken
says nothing about which client (if any) matched or how close a guess came.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from anyhsm.service.settings import ClientSpec

TOKEN_PREFIX = "ahs_"  # noqa: S105 (a prefix, not a secret)
TOKEN_BYTES = 32
MAX_TOKEN_CHARS = 256


def new_token() -> str:
    """A fresh client token (256 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def _mac(salt: bytes, token: str) -> bytes:
    return hmac.digest(salt, token.encode("utf-8", "surrogateescape"), hashlib.sha256)


def hash_token(token: str, salt: bytes | None = None) -> str:
    """The stored form of ``token``: ``sha256:<salt>:<hash>`` (a new salt unless given)."""
    salt = secrets.token_bytes(32) if salt is None else salt
    return f"sha256:{salt.hex()}:{_mac(salt, token).hex()}"


class TokenVerifier:
    """Which client a presented token belongs to."""

    def __init__(self, clients: Sequence[ClientSpec]) -> None:
        self._entries: list[tuple[ClientSpec, bytes, bytes]] = []
        for c in clients:
            _, salt, digest = c.token_hash.split(":")
            self._entries.append((c, bytes.fromhex(salt), bytes.fromhex(digest)))

    def client(self, token: str) -> ClientSpec | None:
        """The client whose token this is, or None. Constant time in the token's value."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        found: ClientSpec | None = None
        for client, salt, digest in self._entries:
            if hmac.compare_digest(_mac(salt, token), digest) and found is None:
                found = client
        return found
