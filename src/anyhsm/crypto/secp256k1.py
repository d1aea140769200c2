"""secp256k1 private-key operations, done by libsecp256k1 (through coincurve's FFI).

Every function that touches a private key takes it as a mutable buffer and
hands libsecp256k1 a pointer to it, so no immutable copy of the secret is
made in Python. Intermediate secrets (tweaked or derived keys) are written
into bytearrays the caller owns and must wipe. No curve arithmetic on secrets
is done in Python.

Public-only helpers (DER, low-S normalisation, verification) live here too,
because providers and the Bitcoin layer both need them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
from typing import Any

from coincurve._libsecp256k1 import ffi, lib
from coincurve.context import GLOBAL_CONTEXT

_CTX = GLOBAL_CONTEXT.ctx

CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_ORDER = CURVE_ORDER // 2
HARDENED = 0x80000000

SecretBuf = bytearray | memoryview


class CurveError(ValueError):
    """An invalid scalar, point or signature was given to a curve primitive."""


def _ptr(buf: SecretBuf) -> object:
    return ffi.from_buffer(buf)


def valid_secret(secret: SecretBuf | bytes) -> bool:
    return len(secret) == 32 and bool(lib.secp256k1_ec_seckey_verify(_CTX, ffi.from_buffer(secret)))


def public_key(secret: SecretBuf) -> bytes:
    """33-byte compressed public key of a 32-byte secret."""
    if len(secret) != 32:
        raise CurveError("private key must be 32 bytes")
    pub = ffi.new("secp256k1_pubkey *")
    if not lib.secp256k1_ec_pubkey_create(_CTX, pub, _ptr(secret)):
        raise CurveError("private key is zero or not below the curve order")
    return _serialize_pub(pub)


def _serialize_pub(pub: object, compressed: bool = True) -> bytes:
    size = 33 if compressed else 65
    out = ffi.new(f"unsigned char[{size}]")
    outlen = ffi.new("size_t *", size)
    flag = lib.SECP256K1_EC_COMPRESSED if compressed else lib.SECP256K1_EC_UNCOMPRESSED
    lib.secp256k1_ec_pubkey_serialize(_CTX, out, outlen, pub, flag)
    return bytes(ffi.buffer(out, size))


def _parse_pub(data: bytes) -> object:
    pub = ffi.new("secp256k1_pubkey *")
    if not lib.secp256k1_ec_pubkey_parse(_CTX, pub, data, len(data)):
        raise CurveError("not a valid secp256k1 public key")
    return pub


def valid_public_key(data: bytes) -> bool:
    try:
        _parse_pub(data)
    except CurveError:
        return False
    return True


def compress(pub: bytes) -> bytes:
    """Normalise any SEC1 encoding (33 or 65 bytes) to 33-byte compressed form."""
    return _serialize_pub(_parse_pub(pub), True)


def decompress(pub: bytes) -> bytes:
    return _serialize_pub(_parse_pub(pub), False)


# --- ECDSA --------------------------------------------------------------------------


def ecdsa_sign(secret: SecretBuf, digest: bytes, *, grind_low_r: bool = False) -> bytes:
    """RFC 6979 deterministic ECDSA, low-S, strict DER.

    With ``grind_low_r`` the nonce is re-derived with a counter as extra
    entropy until R < 2^255, exactly as Bitcoin Core's ``CKey::Sign`` does,
    so signatures match Bitcoin Core, embit and BDK byte for byte.
    """
    if len(digest) != 32:
        raise CurveError("digest must be 32 bytes")
    sig, out, outlen = _ecdsa_buffers()
    key = _ptr(secret)
    if not lib.secp256k1_ecdsa_sign(
        _CTX, sig, digest, key, lib.secp256k1_nonce_function_rfc6979, ffi.NULL
    ):
        raise CurveError("signing failed: private key invalid")
    if grind_low_r:
        compact = ffi.new("unsigned char[64]")
        lib.secp256k1_ecdsa_signature_serialize_compact(_CTX, compact, sig)
        counter = 0
        extra = ffi.new("unsigned char[32]")
        while compact[0] >= 0x80:
            counter += 1
            ffi.memmove(extra, struct.pack("<I", counter), 4)
            lib.secp256k1_ecdsa_sign(
                _CTX, sig, digest, key, lib.secp256k1_nonce_function_rfc6979, extra
            )
            lib.secp256k1_ecdsa_signature_serialize_compact(_CTX, compact, sig)
    outlen[0] = 72
    lib.secp256k1_ecdsa_signature_serialize_der(_CTX, out, outlen, sig)
    return bytes(ffi.buffer(out, outlen[0]))


_tls = threading.local()


def _ecdsa_buffers() -> tuple[Any, Any, Any]:
    """Per-thread output buffers for ECDSA (they hold only public signature bytes)."""
    bufs: tuple[Any, Any, Any] | None = getattr(_tls, "ecdsa", None)
    if bufs is None:
        bufs = _tls.ecdsa = (
            ffi.new("secp256k1_ecdsa_signature *"),
            ffi.new("unsigned char[72]"),
            ffi.new("size_t *", 72),
        )
    return bufs


def ecdsa_verify(pub: bytes, digest: bytes, der: bytes) -> bool:
    """Strict verification: DER must be canonical and S low (Bitcoin's rules)."""
    if len(digest) != 32:
        return False
    try:
        r, s = der_decode(der)
        pk = _parse_pub(pub)
    except CurveError:
        return False
    if s > HALF_ORDER:
        return False
    sig = ffi.new("secp256k1_ecdsa_signature *")
    compact = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    if not lib.secp256k1_ecdsa_signature_parse_compact(_CTX, sig, compact):
        return False
    return bool(lib.secp256k1_ecdsa_verify(_CTX, sig, digest, pk))


def der_encode(r: int, s: int) -> bytes:
    """Strict DER (BIP66) encoding of (r, s)."""

    def _int(v: int) -> bytes:
        b = v.to_bytes(32, "big").lstrip(b"\x00") or b"\x00"
        if b[0] & 0x80:
            b = b"\x00" + b
        return b"\x02" + bytes([len(b)]) + b

    body = _int(r) + _int(s)
    return b"\x30" + bytes([len(body)]) + body


def der_decode(der: bytes) -> tuple[int, int]:
    """Parse strict DER (BIP66); raise CurveError on anything non-canonical."""
    n = len(der)
    if n < 8 or n > 72 or der[0] != 0x30 or der[1] != n - 2:
        raise CurveError("signature is not strict DER")
    pos = 2
    vals = []
    for _ in range(2):
        if pos + 2 > n or der[pos] != 0x02:
            raise CurveError("signature is not strict DER")
        ln = der[pos + 1]
        pos += 2
        if ln == 0 or pos + ln > n:
            raise CurveError("signature is not strict DER")
        body = der[pos : pos + ln]
        if body[0] & 0x80:
            raise CurveError("signature is not strict DER: negative integer")
        if ln > 1 and body[0] == 0 and not body[1] & 0x80:
            raise CurveError("signature is not strict DER: padded integer")
        v = int.from_bytes(body, "big")
        if not 0 < v < CURVE_ORDER:
            raise CurveError("signature value out of range")
        vals.append(v)
        pos += ln
    if pos != n:
        raise CurveError("signature is not strict DER: trailing bytes")
    return vals[0], vals[1]


def normalize_low_s(r: int, s: int) -> tuple[int, int]:
    return (r, CURVE_ORDER - s) if s > HALF_ORDER else (r, s)


def der_from_raw(raw: bytes) -> bytes:
    """r||s (as PKCS#11 CKM_ECDSA returns it) to low-S strict DER."""
    if len(raw) != 64:
        raise CurveError("raw ECDSA signature must be 64 bytes (r||s)")
    r = int.from_bytes(raw[:32], "big")
    s = int.from_bytes(raw[32:], "big")
    if not (0 < r < CURVE_ORDER and 0 < s < CURVE_ORDER):
        raise CurveError("signature value out of range")
    return der_encode(*normalize_low_s(r, s))


def normalize_der(der: bytes) -> bytes:
    """Any strict-DER ECDSA signature to its low-S form; already-low signatures
    are returned unchanged (der_decode has checked they are canonical)."""
    r, s = der_decode(der)
    if s <= HALF_ORDER:
        return bytes(der)
    return der_encode(r, CURVE_ORDER - s)


# --- BIP340 Schnorr ------------------------------------------------------------------


def schnorr_sign(
    secret: SecretBuf, msg: bytes, aux_rand: bytes | None = None, tweak: bytes | None = None
) -> bytes:
    """BIP340 signature; with ``tweak``, signs for the x-only key P + tweak*G
    (BIP341 key-path spending), the tweak applied inside libsecp256k1."""
    if len(msg) != 32:
        raise CurveError("message must be 32 bytes")
    aux = os.urandom(32) if aux_rand is None else aux_rand
    if len(aux) != 32:
        raise CurveError("aux_rand must be 32 bytes")
    keypair = ffi.new("secp256k1_keypair *")
    try:
        if not lib.secp256k1_keypair_create(_CTX, keypair, _ptr(secret)):
            raise CurveError("private key is zero or not below the curve order")
        if tweak is not None and not lib.secp256k1_keypair_xonly_tweak_add(_CTX, keypair, tweak):
            raise CurveError("taproot tweak is out of range")
        sig = ffi.new("unsigned char[64]")
        if not lib.secp256k1_schnorrsig_sign32(_CTX, sig, msg, keypair, aux):
            raise CurveError("schnorr signing failed")
        return bytes(ffi.buffer(sig, 64))
    finally:
        ffi.memmove(
            keypair, bytes(ffi.sizeof("secp256k1_keypair")), ffi.sizeof("secp256k1_keypair")
        )


def xonly(pub33: bytes) -> bytes:
    return compress(pub33)[1:]


def schnorr_verify(xonly_pub: bytes, msg: bytes, sig: bytes) -> bool:
    if len(xonly_pub) != 32 or len(sig) != 64:
        return False
    xpk: Any = getattr(_tls, "xonly", None)
    if xpk is None:
        xpk = _tls.xonly = ffi.new("secp256k1_xonly_pubkey *")
    if not lib.secp256k1_xonly_pubkey_parse(_CTX, xpk, xonly_pub):
        return False
    return bool(lib.secp256k1_schnorrsig_verify(_CTX, sig, msg, len(msg), xpk))


def xonly_tweak_add(xonly_pub: bytes, tweak: bytes) -> tuple[bytes, int]:
    """Public BIP341 tweak: (x-only Q, parity) for Q = lift_x(P) + tweak*G."""
    xpk = ffi.new("secp256k1_xonly_pubkey *")
    if not lib.secp256k1_xonly_pubkey_parse(_CTX, xpk, xonly_pub):
        raise CurveError("not a valid x-only public key")
    out = ffi.new("secp256k1_pubkey *")
    if not lib.secp256k1_xonly_pubkey_tweak_add(_CTX, out, xpk, tweak):
        raise CurveError("taproot tweak is out of range")
    full = _serialize_pub(out)
    return full[1:], full[0] & 1


# --- BIP32 private derivation ------------------------------------------------------------


def hash160(data: bytes) -> bytes:
    return hashlib.new("ripemd160", hashlib.sha256(data).digest()).digest()


def bip32_master(seed: SecretBuf) -> tuple[bytearray, bytes]:
    """(master private key, chain code) from a seed; the caller wipes the key."""
    if not 16 <= len(seed) <= 64:
        raise CurveError("BIP32 seed must be 16 to 64 bytes")
    i = bytearray(hmac.digest(b"Bitcoin seed", seed, "sha512"))
    key = bytearray(i[:32])
    chain = bytes(i[32:])
    i[:] = bytes(64)
    if not valid_secret(key):
        raise CurveError(
            "seed gives an invalid master key (probability < 2^-127); use another seed"
        )
    return key, chain


def bip32_ckd_priv(
    key: bytearray, chain: bytes, index: int, pub: bytes | None = None
) -> tuple[bytearray, bytes]:
    """One BIP32 private child step; returns a new key buffer the caller wipes.
    ``pub`` (the parent's public key) saves a point multiplication when known."""
    if not 0 <= index <= 0xFFFFFFFF:
        raise CurveError("child index out of range")
    if index >= HARDENED:
        data = bytearray(b"\x00") + key + index.to_bytes(4, "big")
    else:
        data = bytearray((pub or public_key(key)) + index.to_bytes(4, "big"))
    i = bytearray(hmac.digest(chain, data, "sha512"))
    data[:] = bytes(len(data))
    child = bytearray(key)
    try:
        il = bytes(i[:32])
        if int.from_bytes(il, "big") >= CURVE_ORDER or not lib.secp256k1_ec_seckey_tweak_add(
            _CTX, _ptr(child), il
        ):
            raise CurveError(f"BIP32 child {index} is invalid; skip to the next index")
        return child, bytes(i[32:])
    except BaseException:
        child[:] = bytes(32)
        raise
    finally:
        i[:] = bytes(64)


def bip32_ckd_pub(pub: bytes, chain: bytes, index: int) -> tuple[bytes, bytes]:
    """One BIP32 public (non-hardened) child step."""
    if index >= HARDENED:
        raise CurveError("hardened children cannot be derived from a public key")
    i = hmac.digest(chain, pub + index.to_bytes(4, "big"), "sha512")
    if int.from_bytes(i[:32], "big") >= CURVE_ORDER:
        raise CurveError(f"BIP32 child {index} is invalid; skip to the next index")
    pk = _parse_pub(pub)
    if not lib.secp256k1_ec_pubkey_tweak_add(_CTX, pk, i[:32]):
        raise CurveError(f"BIP32 child {index} is invalid; skip to the next index")
    return _serialize_pub(pk), i[32:]


def bip32_derive_priv(
    key: bytearray, chain: bytes, path: tuple[int, ...]
) -> tuple[bytearray, bytes, bytes, bytes]:
    """Walk ``path``; returns (child key, chain code, parent pubkey, own pubkey).

    Intermediate keys are wiped; the caller wipes the returned key. A public key is
    computed (a point multiplication, as costly as the HMAC and tweak of a step) only
    where one is used: before a non-hardened step, for the parent and for the child.
    """
    cur, chain, parent_pub = _walk(key, chain, path, keep_parent=True)
    try:
        return cur, chain, parent_pub, public_key(cur)
    except BaseException:
        cur[:] = bytes(32)
        raise


def bip32_derive_secret(key: bytearray, chain: bytes, path: tuple[int, ...]) -> bytearray:
    """The child private key at ``path`` alone (the caller wipes it): what signing needs,
    without the two public keys :func:`bip32_derive_priv` also returns."""
    return _walk(key, chain, path, keep_parent=False)[0]


def _walk(
    key: bytearray, chain: bytes, path: tuple[int, ...], *, keep_parent: bool
) -> tuple[bytearray, bytes, bytes]:
    """(child key, chain code, parent pubkey or b"") of ``path``; intermediates wiped."""
    cur = bytearray(key)
    last = len(path) - 1
    parent_pub = b""
    try:
        for depth, index in enumerate(path):
            pub: bytes | None = None
            if index < HARDENED or (keep_parent and depth == last):
                pub = public_key(cur)
                if depth == last:
                    parent_pub = pub
            nxt, chain = bip32_ckd_priv(cur, chain, index, pub if index < HARDENED else None)
            cur[:] = bytes(32)
            cur = nxt
        return cur, chain, parent_pub if keep_parent else b""
    except BaseException:
        cur[:] = bytes(32)
        raise
