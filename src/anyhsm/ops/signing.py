"""Signing and verifying a 32-byte digest with a key of the handle."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anyhsm.errors import HsmError, InvalidDigest
from anyhsm.ops.data import Data
from anyhsm.types import KeyRef, SignParams, SigScheme

if TYPE_CHECKING:
    from anyhsm.hsm import Hsm

DIGEST_BYTES = 32


@dataclass(frozen=True)
class DigestSignature(Data):
    """A signature: strict DER low-S ECDSA, or a 64-byte BIP340 signature (hex in JSON)."""

    signature: bytes
    scheme: SigScheme
    key: KeyRef  # as the caller named it


@dataclass(frozen=True)
class Verification(Data):
    valid: bool


def sign_digest(
    hsm: Hsm,
    key: KeyRef,
    digest: bytes,
    scheme: SigScheme = SigScheme.ECDSA,
    *,
    path: Sequence[int] = (),
    tweak: bytes | None = None,
) -> DigestSignature:
    """One signature of a 32-byte digest, by the key itself or (HD keys) its child at
    ``path``; ``tweak``: a 32-byte BIP341 tweak applied to the key first (Schnorr).
    Under an active spending policy that covers the key, refused unless its rules allow
    raw digests (a digest may be any transaction's sighash:
    :func:`anyhsm.policy.guard_digest`)."""
    from anyhsm.policy import guard_digest

    guard_digest(hsm, key)
    params = SignParams(path=tuple(path), tweak=tweak) if path or tweak is not None else None
    return DigestSignature(hsm.sign(key, digest, scheme, params=params), scheme, key)


def verify_digest(
    hsm: Hsm,
    key: KeyRef,
    digest: bytes,
    signature: bytes,
    scheme: SigScheme = SigScheme.ECDSA,
    *,
    path: Sequence[int] = (),
    tweak: bytes | None = None,
) -> Verification:
    """Whether ``signature`` verifies under the key (or its child at ``path``, tweaked by
    ``tweak``); no private operation."""
    return Verification(hsm.verify(key, digest, signature, scheme, path=tuple(path), tweak=tweak))


@dataclass(frozen=True)
class BatchItem:
    """One digest of a batch, in request order: its signature, or the error that item
    alone failed with (a malformed digest), as the error's JSON object."""

    index: int
    signature: bytes | None = None
    error: HsmError | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "signature": None if self.signature is None else self.signature.hex(),
            "error": None if self.error is None else self.error.to_dict(),
        }


@dataclass(frozen=True)
class BatchSignatures(Data):
    """Ordered per-item results (Vault transit's ``batch_input`` shape)."""

    key: KeyRef
    scheme: SigScheme
    results: tuple[BatchItem, ...]


def sign_digests(
    hsm: Hsm,
    key: KeyRef,
    digests: Sequence[bytes],
    scheme: SigScheme = SigScheme.ECDSA,
    *,
    path: Sequence[int] = (),
    tweak: bytes | None = None,
) -> BatchSignatures:
    """Sign several digests with one key (or, HD keys, its child at ``path``; ``tweak``:
    a BIP341 tweak applied first, Schnorr), as :func:`sign_digest` signs one: each digest
    is checked first (a malformed one fails alone, as its item's error), then every valid
    one is signed in ONE call of :meth:`Hsm.sign_many` (one audit entry for the batch).
    A failure of the signing itself (the key, the provider, the policy; the spending
    policy's raw-digest rule, as :func:`sign_digest`) is raised for the whole batch."""
    from anyhsm.policy import guard_digest

    guard_digest(hsm, key)
    items: list[BatchItem | None] = []
    valid: list[tuple[int, bytes]] = []
    for n, digest in enumerate(digests):
        if isinstance(digest, bytes | bytearray) and len(digest) == DIGEST_BYTES:
            valid.append((n, bytes(digest)))
            items.append(None)
        else:
            items.append(
                BatchItem(
                    n,
                    error=InvalidDigest(
                        f"item {n}: a digest must be exactly {DIGEST_BYTES} bytes",
                        hint="hash the message first (for Bitcoin, the sighash)",
                    ),
                )
            )
    params = SignParams(path=tuple(path), tweak=tweak) if path or tweak is not None else None
    if valid:
        sigs = hsm.sign_many(key, [(d, scheme, params) for _, d in valid])
        for (n, _), sig in zip(valid, sigs, strict=True):
            items[n] = BatchItem(n, signature=sig)
    return BatchSignatures(key, scheme, tuple(i for i in items if i is not None))
