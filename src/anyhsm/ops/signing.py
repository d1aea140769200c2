"""Signing and verifying a 32-byte digest with a key of the handle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from anyhsm.ops.data import Data
from anyhsm.types import KeyRef, SigScheme

if TYPE_CHECKING:
    from anyhsm.hsm import Hsm


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
    hsm: Hsm, key: KeyRef, digest: bytes, scheme: SigScheme = SigScheme.ECDSA
) -> DigestSignature:
    return DigestSignature(hsm.sign(key, digest, scheme), scheme, key)


def verify_digest(
    hsm: Hsm, key: KeyRef, digest: bytes, signature: bytes, scheme: SigScheme = SigScheme.ECDSA
) -> Verification:
    return Verification(hsm.verify(key, digest, signature, scheme))
