"""Byte-level encodings Bitcoin uses: hashes, compact sizes, Base58Check, Bech32/Bech32m."""

from __future__ import annotations

import hashlib
import hmac
from io import BytesIO
from typing import BinaryIO

from anyhsm.errors import EncodingError

# --- hashes ------------------------------------------------------------------------


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sha256d(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def hash160(data: bytes) -> bytes:
    return hashlib.new("ripemd160", hashlib.sha256(data).digest()).digest()


_TAG_CACHE: dict[str, bytes] = {}


def tagged_hash(tag: str, data: bytes) -> bytes:
    """BIP340 tagged hash: sha256(sha256(tag) || sha256(tag) || data)."""
    prefix = _TAG_CACHE.get(tag)
    if prefix is None:
        t = hashlib.sha256(tag.encode()).digest()
        prefix = _TAG_CACHE[tag] = t + t
    return hashlib.sha256(prefix + data).digest()


# --- streams and compact sizes ---------------------------------------------------------


def read_exact(stream: BinaryIO, n: int, what: str = "data") -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EncodingError(f"unexpected end of {what}: wanted {n} bytes, got {len(data)}")
    return data


def read_compact_size(stream: BinaryIO, what: str = "compact size") -> int:
    """Read a CompactSize; non-canonical (over-long) encodings are rejected."""
    first = read_exact(stream, 1, what)[0]
    if first < 0xFD:
        return first
    width = {0xFD: 2, 0xFE: 4, 0xFF: 8}[first]
    value = int.from_bytes(read_exact(stream, width, what), "little")
    minimum = {2: 0xFD, 4: 0x10000, 8: 0x100000000}[width]
    if value < minimum:
        raise EncodingError(f"non-canonical {what}")
    return value


def compact_size(n: int) -> bytes:
    if n < 0:
        raise EncodingError("compact size cannot be negative")
    if n < 0xFD:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfd" + n.to_bytes(2, "little")
    if n <= 0xFFFFFFFF:
        return b"\xfe" + n.to_bytes(4, "little")
    return b"\xff" + n.to_bytes(8, "little")


def read_var_bytes(stream: BinaryIO, what: str = "data", limit: int = 4_000_000) -> bytes:
    n = read_compact_size(stream, what)
    if n > limit:
        raise EncodingError(f"{what} length {n} exceeds the limit of {limit}")
    return read_exact(stream, n, what)


def var_bytes(data: bytes) -> bytes:
    return compact_size(len(data)) + data


def as_stream(data: bytes) -> BytesIO:
    return BytesIO(data)


# --- Base58Check ------------------------------------------------------------------------

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\x00"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        try:
            n = n * 58 + _B58_INDEX[c]
        except KeyError:
            raise EncodingError(f"invalid Base58 character {c!r}") from None
    pad = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\x00" * pad + body


def b58check_encode(payload: bytes) -> str:
    return b58encode(payload + sha256d(payload)[:4])


def b58check_decode(text: str) -> bytes:
    raw = b58decode(text)
    if len(raw) < 5:
        raise EncodingError("Base58Check string too short")
    payload, check = raw[:-4], raw[-4:]
    if not hmac.compare_digest(sha256d(payload)[:4], check):
        raise EncodingError("Base58Check checksum mismatch", hint="check for a typing error")
    return payload


# --- Bech32 / Bech32m (BIP173, BIP350) ------------------------------------------------------

_BECH32_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_CONST = 1
_BECH32M_CONST = 0x2BC830A3


_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
# BIP173's inner loop (XOR generator i when bit i of the top five bits is set) as a table
# of the 32 possible XORs: one lookup per character instead of five tests (every change
# and destination address a signer reports is encoded, every allowlisted one decoded)
_GEN_XOR = tuple(
    _GEN[0] * (t & 1)
    ^ _GEN[1] * (t >> 1 & 1)
    ^ _GEN[2] * (t >> 2 & 1)
    ^ _GEN[3] * (t >> 3 & 1)
    ^ _GEN[4] * (t >> 4 & 1)
    for t in range(32)
)


def _polymod(values: list[int]) -> int:
    chk = 1
    table = _GEN_XOR
    for v in values:
        chk = ((chk & 0x1FFFFFF) << 5 ^ v) ^ table[chk >> 25]
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(x) >> 5 for x in hrp] + [0] + [ord(x) & 31 for x in hrp]


def bech32_encode(hrp: str, data: list[int], bech32m: bool) -> str:
    const = _BECH32M_CONST if bech32m else _BECH32_CONST
    values = _hrp_expand(hrp) + data
    pm = _polymod([*values, 0, 0, 0, 0, 0, 0]) ^ const
    checksum = [(pm >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_BECH32_CHARSET[d] for d in data + checksum)


def bech32_decode(text: str) -> tuple[str, list[int], bool]:
    """Return (hrp, data, is_bech32m); raise EncodingError on any defect."""
    if any(ord(c) < 33 or ord(c) > 126 for c in text):
        raise EncodingError("Bech32 string has a character outside printable ASCII")
    if text.lower() != text and text.upper() != text:
        raise EncodingError("Bech32 string mixes upper and lower case")
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1 or pos + 7 > len(text) or len(text) > 90:
        raise EncodingError("Bech32 string has a bad separator position or length")
    hrp = text[:pos]
    try:
        data = [_BECH32_CHARSET.index(c) for c in text[pos + 1 :]]
    except ValueError:
        raise EncodingError("Bech32 string has an invalid data character") from None
    pm = _polymod(_hrp_expand(hrp) + data)
    if pm == _BECH32_CONST:
        return hrp, data[:-6], False
    if pm == _BECH32M_CONST:
        return hrp, data[:-6], True
    raise EncodingError("Bech32 checksum mismatch", hint="check for a typing error")


def convertbits(data: bytes | list[int], frombits: int, tobits: int, pad: bool) -> list[int]:
    acc = 0
    bits = 0
    ret: list[int] = []
    maxv = (1 << tobits) - 1
    for value in data:
        if value < 0 or value >> frombits:
            raise EncodingError("invalid value in bit conversion")
        acc = (acc << frombits) | value
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            ret.append((acc >> bits) & maxv)
    if pad:
        if bits:
            ret.append((acc << (tobits - bits)) & maxv)
    elif bits >= frombits or ((acc << (tobits - bits)) & maxv):
        raise EncodingError("invalid padding in Bech32 data")
    return ret


def segwit_encode(hrp: str, version: int, program: bytes) -> str:
    if not 0 <= version <= 16:
        raise EncodingError("witness version must be 0..16")
    return bech32_encode(hrp, [version, *convertbits(program, 8, 5, True)], version != 0)


def segwit_decode(hrp: str, address: str) -> tuple[int, bytes]:
    """Decode and fully validate a segwit address for ``hrp`` (BIP173/BIP350)."""
    got_hrp, data, is_m = bech32_decode(address)
    if got_hrp != hrp:
        raise EncodingError(f"address prefix {got_hrp!r} does not match {hrp!r}")
    if not data:
        raise EncodingError("segwit address has no witness version")
    version = data[0]
    if version > 16:
        raise EncodingError("invalid witness version")
    program = bytes(convertbits(data[1:], 5, 8, False))
    if not 2 <= len(program) <= 40:
        raise EncodingError("invalid witness program length")
    if version == 0 and len(program) not in (20, 32):
        raise EncodingError("invalid witness v0 program length")
    if (version == 0) == is_m:
        raise EncodingError(
            "wrong checksum variant: witness v0 uses Bech32, v1+ uses Bech32m (BIP350)"
        )
    return version, program
