"""Signing with key material held in this process (software keystore, simulator).

Shared by the providers whose secrets live in process memory, so that both
sign, derive and tweak in exactly one way: through libsecp256k1, with every
intermediate secret in a buffer that is wiped before returning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import InvalidKeyMaterial, UnsupportedOperation
from anyhsm.provider import check_path
from anyhsm.types import Capabilities, DerivedPublicKey, KeyType, SignParams, SigScheme

SecretView = bytearray | memoryview

LOCAL_KEY_TYPES = frozenset({KeyType.SECP256K1, KeyType.BIP32, KeyType.BIP32_NODE})
HD_KEY_TYPES = frozenset({KeyType.BIP32, KeyType.BIP32_NODE})


def local_capabilities(*, persistent: bool) -> Capabilities:
    """What in-process providers can do: every scheme, derivation, tweaks, nonce control."""
    return Capabilities(
        key_types=LOCAL_KEY_TYPES,
        schemes=frozenset({SigScheme.ECDSA, SigScheme.SCHNORR}),
        can_import=True,
        can_export=True,
        can_derive=True,
        can_tweak=True,
        controls_nonce=True,
        persistent=persistent,
        can_batch=True,
        in_process=True,
    )


def hd_master(key_type: KeyType, secret: SecretView) -> tuple[bytearray, bytes]:
    """(master private key, chain code) of HD material; the caller wipes the key.

    A seed goes through BIP32's HMAC; an imported master node is stored as
    chain code || key and used as is."""
    if key_type is KeyType.BIP32_NODE:
        if len(secret) != 64:
            raise InvalidKeyMaterial("a BIP32 node must be 64 bytes (chain code || key)")
        key = bytearray(secret[32:])
        if not curve.valid_secret(key):
            key[:] = bytes(32)
            raise InvalidKeyMaterial("the BIP32 node's private key is out of range")
        return key, bytes(secret[:32])
    return curve.bip32_master(secret)


def new_secret(key_type: KeyType, extra_entropy: bytes | None = None) -> bytearray:
    """Fresh key material: 32-byte scalar, or 64-byte BIP32 seed. Optional extra
    entropy (e.g. from a TPM RNG) is XOR-ed in, which can only add entropy."""
    size = 64 if key_type is KeyType.BIP32 else 32
    while True:
        buf = bytearray(os.urandom(size))
        if extra_entropy:
            for i in range(min(size, len(extra_entropy))):
                buf[i] ^= extra_entropy[i]
        if key_type is KeyType.BIP32:
            try:
                master, _ = curve.bip32_master(buf)
            except curve.CurveError:
                buf[:] = bytes(size)
                continue
            master[:] = bytes(32)
            return buf
        if curve.valid_secret(buf):
            return buf
        buf[:] = bytes(size)


def check_material(key_type: KeyType, secret: SecretView) -> None:
    """Reject out-of-range scalars and malformed seeds before storing them."""
    if key_type is KeyType.SECP256K1:
        if not curve.valid_secret(secret):
            raise InvalidKeyMaterial(
                "a secp256k1 private key must be 32 bytes, non-zero and below the curve order"
            )
    elif key_type in HD_KEY_TYPES:
        if key_type is KeyType.BIP32 and not 16 <= len(secret) <= 64:
            raise InvalidKeyMaterial("a BIP32 seed must be 16 to 64 bytes")
        try:
            master, _ = hd_master(key_type, secret)
        except curve.CurveError as e:
            raise InvalidKeyMaterial(str(e)) from None
        master[:] = bytes(32)
    else:
        raise InvalidKeyMaterial(f"key type {key_type.value} is not supported here")


def vet_material(
    provider: str, key_type: KeyType, secret: SecretView
) -> tuple[bytes, bytes | None]:
    """Check material to be stored; return its (public key, chain code or None)."""
    if key_type not in LOCAL_KEY_TYPES:
        raise UnsupportedOperation(provider, f"key type {key_type.value}")
    check_material(key_type, secret)
    return public_facts(key_type, secret)


def fresh_material(
    provider: str, key_type: KeyType, extra_entropy: bytes | None = None
) -> bytearray:
    """New key material of ``key_type`` (checked before any work); the caller wipes it."""
    if key_type not in LOCAL_KEY_TYPES:
        raise UnsupportedOperation(provider, f"key type {key_type.value}")
    return new_secret(key_type, extra_entropy)


def public_facts(key_type: KeyType, secret: SecretView) -> tuple[bytes, bytes | None]:
    """(compressed public key, chain code or None) of stored material."""
    if key_type in HD_KEY_TYPES:
        master, chain = hd_master(key_type, secret)
        try:
            return curve.public_key(master), chain
        finally:
            master[:] = bytes(32)
    return curve.public_key(secret), None


def sign(
    provider: str,
    key_type: KeyType,
    secret: SecretView,
    digest: bytes,
    scheme: SigScheme,
    params: SignParams,
) -> bytes:
    """Sign with stored material (deriving the BIP32 child at ``params.path`` first)."""
    if key_type is KeyType.BIP32 or key_type is KeyType.BIP32_NODE:  # HD_KEY_TYPES, unhashed
        master, chain = hd_master(key_type, secret)
        try:
            child = curve.bip32_derive_secret(master, chain, params.path)
        finally:
            master[:] = bytes(32)
        try:
            return _sign_scalar(child, digest, scheme, params)
        finally:
            child[:] = bytes(32)
    if params.path:
        raise UnsupportedOperation(
            provider,
            "BIP32 derivation on a single (non-HD) key",
            hint="sign without a path, or use a key of type bip32",
        )
    if scheme is SigScheme.ECDSA:  # _sign_scalar, one call less on the hot path
        return curve.ecdsa_sign(secret, digest, grind_low_r=params.grind_low_r)
    return curve.schnorr_sign(secret, digest, params.aux_rand, params.tweak)


def _sign_scalar(secret: SecretView, digest: bytes, scheme: SigScheme, params: SignParams) -> bytes:
    if scheme is SigScheme.ECDSA:
        return curve.ecdsa_sign(secret, digest, grind_low_r=params.grind_low_r)
    return curve.schnorr_sign(secret, digest, params.aux_rand, params.tweak)


def derive_public(
    provider: str, key_type: KeyType, secret: SecretView, path: tuple[int, ...]
) -> DerivedPublicKey:
    if key_type not in HD_KEY_TYPES:
        raise UnsupportedOperation(provider, "BIP32 derivation on a single (non-HD) key")
    check_path(path)
    master, chain = hd_master(key_type, secret)
    try:
        master_fp = curve.hash160(curve.public_key(master))[:4]
        child, child_chain, parent_pub, pub = curve.bip32_derive_priv(master, chain, path)
        child[:] = bytes(32)
    finally:
        master[:] = bytes(32)
    return DerivedPublicKey(
        public_key=pub,
        chain_code=child_chain,
        depth=len(path),
        parent_fingerprint=curve.hash160(parent_pub)[:4] if path else bytes(4),
        child_number=path[-1] if path else 0,
        master_fingerprint=master_fp,
    )


class _DerivationCache:
    """BIP32 nodes derived during one batch, keyed by path, so siblings share their
    parents' derivation (and the parent's public key). Wiped when the batch ends."""

    def __init__(self, key_type: KeyType, secret: SecretView) -> None:
        master, chain = hd_master(key_type, secret)
        self._nodes: dict[tuple[int, ...], tuple[bytearray, bytes]] = {(): (master, chain)}
        self._pubs: dict[tuple[int, ...], bytes] = {}

    def node(self, path: tuple[int, ...]) -> bytearray:
        """The private key at ``path`` (owned by the cache; do not wipe)."""
        hit = self._nodes.get(path)
        if hit is not None:
            return hit[0]
        known = len(path) - 1  # the deepest cached ancestor (the master, at worst)
        while known > 0 and path[:known] not in self._nodes:
            known -= 1
        for depth in range(known + 1, len(path) + 1):  # a loop: paths may be long
            parent_path = path[: depth - 1]
            parent_key, parent_chain = self._nodes[parent_path]
            index = path[depth - 1]
            pub = None
            if index < curve.HARDENED:
                pub = self._pubs.get(parent_path)
                if pub is None:
                    pub = self._pubs[parent_path] = curve.public_key(parent_key)
            self._nodes[path[:depth]] = curve.bip32_ckd_priv(parent_key, parent_chain, index, pub)
        return self._nodes[path][0]

    def wipe(self) -> None:
        for key, _ in self._nodes.values():
            key[:] = bytes(len(key))
        self._nodes.clear()
        self._pubs.clear()


def sign_batch(
    provider: str,
    key_type: KeyType,
    secret: SecretView,
    requests: Sequence[tuple[bytes, SigScheme, SignParams]],
) -> list[bytes]:
    """Sign many digests with one stored key; BIP32 parents are derived once."""
    if key_type not in HD_KEY_TYPES:
        return [sign(provider, key_type, secret, d, s, p) for d, s, p in requests]
    cache = _DerivationCache(key_type, secret)
    try:
        return [_sign_scalar(cache.node(p.path), d, s, p) for d, s, p in requests]
    finally:
        cache.wipe()
