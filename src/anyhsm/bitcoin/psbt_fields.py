"""PSBT field types, their names, and the small typed values PSBT fields carry.

Covers BIP174 (v0), BIP370 (v2), BIP371 (taproot) and BIP373 (MuSig2 participant keys,
public nonces and partial signatures). The value decoders here
raise :class:`PsbtError` without a field name; the map parser adds the field
name and the map's position, so every message says which field is wrong.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from io import BytesIO

from anyhsm.bitcoin.bip32 import KeyOrigin
from anyhsm.bitcoin.encoding import compact_size, read_compact_size, read_exact, var_bytes
from anyhsm.crypto.secp256k1 import CURVE_ORDER, valid_public_key
from anyhsm.errors import EncodingError, PsbtError

MAGIC = b"psbt\xff"

# BIP341: a control block is 33 bytes plus 32 per Merkle path node, at most 128 nodes.
CONTROL_BLOCK_BASE = 33
CONTROL_BLOCK_NODE = 32
TAPROOT_MAX_DEPTH = 128
LOCKTIME_THRESHOLD = 500_000_000
# BIP373 / BIP327: compressed keys, a public nonce of two compressed points, a 32-byte
# partial signature; the nonce and signature keys end with a tapleaf hash or nothing.
COMPRESSED_KEY = 33
MUSIG2_PUBNONCE = 2 * COMPRESSED_KEY
MUSIG2_PARTIAL_SIG = 32


class GlobalType(IntEnum):
    UNSIGNED_TX = 0x00
    XPUB = 0x01
    TX_VERSION = 0x02
    FALLBACK_LOCKTIME = 0x03
    INPUT_COUNT = 0x04
    OUTPUT_COUNT = 0x05
    TX_MODIFIABLE = 0x06
    GENERIC_SIGNED_MESSAGE = 0x09  # BIP322: the message a BIP322 to_sign PSBT signs
    VERSION = 0xFB
    PROPRIETARY = 0xFC


class InputType(IntEnum):
    NON_WITNESS_UTXO = 0x00
    WITNESS_UTXO = 0x01
    PARTIAL_SIG = 0x02
    SIGHASH_TYPE = 0x03
    REDEEM_SCRIPT = 0x04
    WITNESS_SCRIPT = 0x05
    BIP32_DERIVATION = 0x06
    FINAL_SCRIPTSIG = 0x07
    FINAL_SCRIPTWITNESS = 0x08
    POR_COMMITMENT = 0x09
    RIPEMD160 = 0x0A
    SHA256 = 0x0B
    HASH160 = 0x0C
    HASH256 = 0x0D
    PREVIOUS_TXID = 0x0E
    OUTPUT_INDEX = 0x0F
    SEQUENCE = 0x10
    REQUIRED_TIME_LOCKTIME = 0x11
    REQUIRED_HEIGHT_LOCKTIME = 0x12
    TAP_KEY_SIG = 0x13
    TAP_SCRIPT_SIG = 0x14
    TAP_LEAF_SCRIPT = 0x15
    TAP_BIP32_DERIVATION = 0x16
    TAP_INTERNAL_KEY = 0x17
    TAP_MERKLE_ROOT = 0x18
    MUSIG2_PARTICIPANT_PUBKEYS = 0x1A
    MUSIG2_PUB_NONCE = 0x1B
    MUSIG2_PARTIAL_SIG = 0x1C
    PROPRIETARY = 0xFC


class OutputType(IntEnum):
    REDEEM_SCRIPT = 0x00
    WITNESS_SCRIPT = 0x01
    BIP32_DERIVATION = 0x02
    AMOUNT = 0x03
    SCRIPT = 0x04
    TAP_INTERNAL_KEY = 0x05
    TAP_TREE = 0x06
    TAP_BIP32_DERIVATION = 0x07
    MUSIG2_PARTICIPANT_PUBKEYS = 0x08
    PROPRIETARY = 0xFC


# Fields that exist only in PSBT version 2 (BIP370), per map.
V2_ONLY_GLOBAL = frozenset(
    {
        GlobalType.TX_VERSION,
        GlobalType.FALLBACK_LOCKTIME,
        GlobalType.INPUT_COUNT,
        GlobalType.OUTPUT_COUNT,
        GlobalType.TX_MODIFIABLE,
    }
)
V2_ONLY_INPUT = frozenset(
    {
        InputType.PREVIOUS_TXID,
        InputType.OUTPUT_INDEX,
        InputType.SEQUENCE,
        InputType.REQUIRED_TIME_LOCKTIME,
        InputType.REQUIRED_HEIGHT_LOCKTIME,
    }
)
V2_ONLY_OUTPUT = frozenset({OutputType.AMOUNT, OutputType.SCRIPT})


_NAMES: dict[type[IntEnum], dict[int, str]] = {
    enum: {int(t): f"{prefix}_{t.name}" for t in enum}
    for enum, prefix in (
        (GlobalType, "PSBT_GLOBAL"),
        (InputType, "PSBT_IN"),
        (OutputType, "PSBT_OUT"),
    )
}  # the field names, made once (every field of every PSBT read is named)


def global_name(key_type: int) -> str:
    name = _NAMES[GlobalType].get(key_type)
    return name if name is not None else f"PSBT_GLOBAL unknown type 0x{key_type:02x}"


def input_name(key_type: int) -> str:
    name = _NAMES[InputType].get(key_type)
    return name if name is not None else f"PSBT_IN unknown type 0x{key_type:02x}"


def output_name(key_type: int) -> str:
    name = _NAMES[OutputType].get(key_type)
    return name if name is not None else f"PSBT_OUT unknown type 0x{key_type:02x}"


# --- small typed values -------------------------------------------------------------------


@dataclass(frozen=True)
class TapKeyOrigin:
    """Value of PSBT_IN/OUT_TAP_BIP32_DERIVATION: the leaves a key signs in, and its origin."""

    leaf_hashes: tuple[bytes, ...]
    origin: KeyOrigin


@dataclass(frozen=True)
class LeafScript:
    """Value of PSBT_IN_TAP_LEAF_SCRIPT: a leaf script and its leaf version."""

    script: bytes
    leaf_version: int


@dataclass(frozen=True)
class TapTreeLeaf:
    """One leaf of PSBT_OUT_TAP_TREE with its depth, in depth-first order (the tree's
    serialised form; :class:`anyhsm.bitcoin.taproot.TapLeaf` is the leaf itself)."""

    depth: int
    leaf_version: int
    script: bytes


@dataclass(frozen=True)
class MuSig2Key:
    """Key data of PSBT_IN_MUSIG2_PUB_NONCE and PSBT_IN_MUSIG2_PARTIAL_SIG (BIP373): the
    participant's and the aggregate's compressed public keys, and the tapleaf hash of the
    leaf being signed (None when the aggregate key is the internal or the output key)."""

    participant: bytes
    aggregate: bytes
    leaf_hash: bytes | None = None

    @property
    def key_data(self) -> bytes:
        return self.participant + self.aggregate + (self.leaf_hash or b"")

    def core_order(self) -> tuple[bytes, bytes, bytes]:
        """Bitcoin Core's map order: aggregate key, leaf hash (absent = zeros), participant."""
        return (self.aggregate, self.leaf_hash or bytes(32), self.participant)


@dataclass(frozen=True)
class ProprietaryField:
    """A PSBT_*_PROPRIETARY pair: ``0xfc <identifier> <subtype> <key data>`` -> value."""

    identifier: bytes
    subtype: int
    key_data: bytes
    value: bytes

    @property
    def key(self) -> bytes:
        return b"\xfc" + var_bytes(self.identifier) + compact_size(self.subtype) + self.key_data


@dataclass(frozen=True)
class UnknownField:
    """A key-value pair of a type this library does not interpret, kept byte for byte."""

    key: bytes
    value: bytes

    @property
    def key_type(self) -> int:
        return split_key(self.key)[0]


# --- key/value decoders --------------------------------------------------------------------


def split_key(key: bytes) -> tuple[int, bytes]:
    """(key type, key data) of a raw key; the key type is a compact size."""
    if key and key[0] < 0xFD:  # a one-byte key type: every type BIP174 defines
        return key[0], key[1:]
    stream = BytesIO(key)
    try:
        key_type = read_compact_size(stream, "key type")
    except EncodingError as e:
        raise PsbtError(f"key type is malformed: {e.message}") from None
    return key_type, key[stream.tell() :]


def parse_proprietary(key_data: bytes, value: bytes) -> ProprietaryField:
    stream = BytesIO(key_data)
    try:
        n = read_compact_size(stream, "identifier length")
        identifier = read_exact(stream, n, "identifier")
        subtype = read_compact_size(stream, "subtype")
    except EncodingError as e:
        raise PsbtError(f"proprietary key is malformed: {e.message}") from None
    return ProprietaryField(identifier, subtype, stream.read(), value)


def check_pubkey(pub: bytes, what: str = "key") -> bytes:
    """A 33- or 65-byte SEC1 public key that lies on the curve."""
    if len(pub) not in (33, 65) or not valid_public_key(pub):
        raise PsbtError(f"{what} is not a valid public key")
    return pub


def check_compressed_pubkey(pub: bytes, what: str = "key") -> bytes:
    """A 33-byte compressed SEC1 public key that lies on the curve (BIP373's keys)."""
    if len(pub) != COMPRESSED_KEY:
        raise PsbtError(f"{what} is {len(pub)} bytes, a compressed public key is 33 bytes")
    if pub[0] not in (2, 3) or not valid_public_key(pub):
        raise PsbtError(f"{what} is not a valid compressed public key")
    return pub


def check_xonly(pub: bytes, what: str = "key") -> bytes:
    """A 32-byte x-only public key (BIP340) whose x lies on the curve."""
    if len(pub) != 32:
        raise PsbtError(f"{what} is {len(pub)} bytes, an x-only public key is 32 bytes")
    if not valid_public_key(b"\x02" + pub):
        raise PsbtError(f"{what} is not a valid x-only public key")
    return pub


def check_schnorr_sig(sig: bytes) -> bytes:
    """A BIP340 signature, 64 bytes, or 65 with an explicit sighash type that is not 0x00."""
    if len(sig) not in (64, 65):
        raise PsbtError(f"signature is {len(sig)} bytes, a Schnorr signature is 64 or 65 bytes")
    if len(sig) == 65 and sig[64] == 0:
        raise PsbtError("65-byte Schnorr signature with sighash type 0x00 (must be 64 bytes)")
    return sig


def check_control_block(cb: bytes) -> bytes:
    n = len(cb)
    if (
        n < CONTROL_BLOCK_BASE
        or (n - CONTROL_BLOCK_BASE) % CONTROL_BLOCK_NODE
        or n > CONTROL_BLOCK_BASE + CONTROL_BLOCK_NODE * TAPROOT_MAX_DEPTH
    ):
        raise PsbtError(f"control block is {n} bytes, it must be 33 + 32*k bytes (k <= 128)")
    return cb


def encode_origin(origin: KeyOrigin) -> bytes:
    return origin.fingerprint + struct.pack(f"<{len(origin.path)}I", *origin.path)


def decode_origin(data: bytes) -> KeyOrigin:
    if len(data) < 4 or len(data) % 4:
        raise PsbtError(
            f"key origin is {len(data)} bytes, it must be a 4-byte fingerprint "
            "followed by 4 bytes per derivation step"
        )
    # a 4-byte fingerprint and unsigned 32-bit steps by construction: what KeyOrigin checks
    return KeyOrigin.unchecked(data[:4], struct.unpack(f"<{len(data) // 4 - 1}I", data[4:]))


def encode_tap_origin(value: TapKeyOrigin) -> bytes:
    return (
        compact_size(len(value.leaf_hashes))
        + b"".join(value.leaf_hashes)
        + encode_origin(value.origin)
    )


def decode_tap_origin(data: bytes) -> TapKeyOrigin:
    stream = BytesIO(data)
    try:
        n = read_compact_size(stream, "leaf hash count")
        if n * 32 > len(data):
            raise PsbtError(f"declares {n} leaf hashes but the value is only {len(data)} bytes")
        hashes = {read_exact(stream, 32, "leaf hash") for _ in range(n)}
    except EncodingError as e:
        raise PsbtError(f"value is malformed: {e.message}") from None
    # sorted and unique, as Bitcoin Core's std::set<uint256> holds (and writes) them
    return TapKeyOrigin(tuple(sorted(hashes)), decode_origin(stream.read()))


def encode_witness(items: Sequence[bytes]) -> bytes:
    return compact_size(len(items)) + b"".join(var_bytes(i) for i in items)


def decode_witness(data: bytes) -> list[bytes]:
    stream = BytesIO(data)
    try:
        n = read_compact_size(stream, "witness item count")
        if n > len(data):
            raise PsbtError(f"declares {n} witness items but the value is only {len(data)} bytes")
        items = []
        for _ in range(n):
            size = read_compact_size(stream, "witness item length")
            items.append(read_exact(stream, size, "witness item"))
    except EncodingError as e:
        raise PsbtError(f"witness stack is malformed: {e.message}") from None
    if stream.read(1):
        raise PsbtError("trailing bytes after the witness stack")
    return items


def encode_tap_tree(leaves: Sequence[TapTreeLeaf]) -> bytes:
    return b"".join(
        bytes([leaf.depth, leaf.leaf_version]) + var_bytes(leaf.script) for leaf in leaves
    )


def decode_tap_tree(data: bytes) -> tuple[TapTreeLeaf, ...]:
    if not data:
        raise PsbtError("taproot tree is empty")
    stream = BytesIO(data)
    leaves: list[TapTreeLeaf] = []
    try:
        while stream.tell() < len(data):
            depth, leaf_version = read_exact(stream, 2, "leaf header")
            size = read_compact_size(stream, "leaf script length")
            leaves.append(TapTreeLeaf(depth, leaf_version, read_exact(stream, size, "leaf script")))
    except EncodingError as e:
        raise PsbtError(f"taproot tree is malformed: {e.message}") from None
    check_tap_tree(leaves)
    return tuple(leaves)


def check_tap_tree(leaves: Sequence[TapTreeLeaf]) -> None:
    """The leaves, in depth-first order, must form one complete binary tree (as Bitcoin
    Core's TaprootBuilder checks), at most 128 deep, with valid leaf versions."""
    if not leaves:
        raise PsbtError("taproot tree is empty")
    branch: list[bool] = []  # branch[d]: an unpaired node waits at depth d
    for leaf in leaves:
        if leaf.depth > TAPROOT_MAX_DEPTH:
            raise PsbtError(f"taproot tree leaf depth {leaf.depth} exceeds 128")
        if leaf.leaf_version & 1:
            raise PsbtError(f"taproot tree leaf version 0x{leaf.leaf_version:02x} is odd")
        depth = leaf.depth
        if depth + 1 < len(branch):
            raise PsbtError("taproot tree leaves are not in depth-first order")
        while len(branch) > depth and branch[depth]:
            branch.pop()
            if depth == 0:
                raise PsbtError("taproot tree has leaves after its root is complete")
            depth -= 1
        if len(branch) <= depth:
            branch.extend([False] * (depth + 1 - len(branch)))
        branch[depth] = True
    if branch != [True]:
        raise PsbtError("taproot tree is incomplete (some branch has no sibling)")


# --- BIP373 (MuSig2) ------------------------------------------------------------------------


def decode_musig2_participants(value: bytes) -> tuple[bytes, ...]:
    """PSBT_{IN,OUT}_MUSIG2_PARTICIPANT_PUBKEYS value: compressed keys, 33 bytes each, in
    the order KeyAgg takes them. An empty list is accepted, as Bitcoin Core does."""
    if len(value) % COMPRESSED_KEY:
        raise PsbtError(
            f"value is {len(value)} bytes, not a list of 33-byte compressed participant keys"
        )
    return tuple(
        check_compressed_pubkey(value[i : i + COMPRESSED_KEY], f"participant key {i // 33}")
        for i in range(0, len(value), COMPRESSED_KEY)
    )


def decode_musig2_key(key_data: bytes) -> MuSig2Key:
    """Key data of a public nonce or partial signature: participant key, aggregate key,
    then a 32-byte tapleaf hash or nothing (66 or 98 bytes)."""
    n = len(key_data)
    if n not in (2 * COMPRESSED_KEY, 2 * COMPRESSED_KEY + 32):
        raise PsbtError(
            f"key data is {n} bytes, expected a 33-byte participant key, a 33-byte aggregate "
            "key and an optional 32-byte leaf hash (66 or 98 bytes)"
        )
    participant = check_compressed_pubkey(key_data[:COMPRESSED_KEY], "participant key")
    aggregate = check_compressed_pubkey(key_data[COMPRESSED_KEY:66], "aggregate key")
    return MuSig2Key(participant, aggregate, key_data[66:] or None)


def check_musig2_pubnonce(value: bytes) -> bytes:
    """A BIP327 public nonce: two compressed points (R1, R2), each on the curve."""
    if len(value) != MUSIG2_PUBNONCE:
        raise PsbtError(f"public nonce is {len(value)} bytes, a MuSig2 public nonce is 66 bytes")
    check_compressed_pubkey(value[:COMPRESSED_KEY], "public nonce R1")
    check_compressed_pubkey(value[COMPRESSED_KEY:], "public nonce R2")
    return value


def check_musig2_partial_sig(value: bytes) -> bytes:
    """A BIP327 partial signature: a 32-byte big-endian scalar below the curve order."""
    if len(value) != MUSIG2_PARTIAL_SIG:
        raise PsbtError(
            f"partial signature is {len(value)} bytes, a MuSig2 partial signature is 32 bytes"
        )
    if int.from_bytes(value, "big") >= CURVE_ORDER:
        raise PsbtError("partial signature is not below the curve order")
    return value


def u32(value: bytes) -> int:
    if len(value) != 4:
        raise PsbtError(f"value is {len(value)} bytes, expected a 4-byte integer")
    return int.from_bytes(value, "little")


def exact_compact_size(value: bytes) -> int:
    stream = BytesIO(value)
    try:
        n = read_compact_size(stream, "count")
    except EncodingError as e:
        raise PsbtError(f"value is not a compact size: {e.message}") from None
    if stream.read(1):
        raise PsbtError("trailing bytes after the compact size")
    return n
