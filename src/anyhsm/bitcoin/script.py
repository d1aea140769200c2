"""Bitcoin scripts: opcodes, minimal pushes, output templates, parsing and classification.

Classification follows Bitcoin Core's ``Solver`` (script/solver.cpp) so that
"what kind of output is this?" gets the same answer here as in the node. The
parsers never raise anything but :class:`anyhsm.errors.ScriptError`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from anyhsm.errors import ScriptError

# --- opcodes ---------------------------------------------------------------------------

OP_0 = 0x00
OP_FALSE = OP_0
OP_PUSHDATA1 = 0x4C
OP_PUSHDATA2 = 0x4D
OP_PUSHDATA4 = 0x4E
OP_1NEGATE = 0x4F
OP_RESERVED = 0x50
OP_1 = 0x51
OP_TRUE = OP_1
OP_16 = 0x60
OP_NOP = 0x61
OP_IF = 0x63
OP_NOTIF = 0x64
OP_ELSE = 0x67
OP_ENDIF = 0x68
OP_VERIFY = 0x69
OP_RETURN = 0x6A
OP_TOALTSTACK = 0x6B
OP_FROMALTSTACK = 0x6C
OP_IFDUP = 0x73
OP_DEPTH = 0x74
OP_DROP = 0x75
OP_DUP = 0x76
OP_NIP = 0x77
OP_OVER = 0x78
OP_PICK = 0x79
OP_ROLL = 0x7A
OP_ROT = 0x7B
OP_SWAP = 0x7C
OP_TUCK = 0x7D
OP_SIZE = 0x82
OP_EQUAL = 0x87
OP_EQUALVERIFY = 0x88
OP_1ADD = 0x8B
OP_1SUB = 0x8C
OP_NEGATE = 0x8F
OP_ABS = 0x90
OP_NOT = 0x91
OP_0NOTEQUAL = 0x92
OP_ADD = 0x93
OP_SUB = 0x94
OP_BOOLAND = 0x9A
OP_BOOLOR = 0x9B
OP_NUMEQUAL = 0x9C
OP_NUMEQUALVERIFY = 0x9D
OP_LESSTHAN = 0x9F
OP_GREATERTHAN = 0xA0
OP_MIN = 0xA3
OP_MAX = 0xA4
OP_WITHIN = 0xA5
OP_RIPEMD160 = 0xA6
OP_SHA1 = 0xA7
OP_SHA256 = 0xA8
OP_HASH160 = 0xA9
OP_HASH256 = 0xAA
OP_CODESEPARATOR = 0xAB
OP_CHECKSIG = 0xAC
OP_CHECKSIGVERIFY = 0xAD
OP_CHECKMULTISIG = 0xAE
OP_CHECKMULTISIGVERIFY = 0xAF
OP_NOP1 = 0xB0
OP_CHECKLOCKTIMEVERIFY = 0xB1
OP_CHECKSEQUENCEVERIFY = 0xB2
OP_CHECKSIGADD = 0xBA
OP_INVALIDOPCODE = 0xFF

_NAMES: dict[int, str] = {
    0x00: "OP_0",
    0x4C: "OP_PUSHDATA1",
    0x4D: "OP_PUSHDATA2",
    0x4E: "OP_PUSHDATA4",
    0x4F: "OP_1NEGATE",
    0x50: "OP_RESERVED",
    **{0x50 + i: f"OP_{i}" for i in range(1, 17)},
    **dict(
        enumerate(
            [
                "OP_NOP",
                "OP_VER",
                "OP_IF",
                "OP_NOTIF",
                "OP_VERIF",
                "OP_VERNOTIF",
                "OP_ELSE",
                "OP_ENDIF",
                "OP_VERIFY",
                "OP_RETURN",
                "OP_TOALTSTACK",
                "OP_FROMALTSTACK",
                "OP_2DROP",
                "OP_2DUP",
                "OP_3DUP",
                "OP_2OVER",
                "OP_2ROT",
                "OP_2SWAP",
                "OP_IFDUP",
                "OP_DEPTH",
                "OP_DROP",
                "OP_DUP",
                "OP_NIP",
                "OP_OVER",
                "OP_PICK",
                "OP_ROLL",
                "OP_ROT",
                "OP_SWAP",
                "OP_TUCK",
                "OP_CAT",
                "OP_SUBSTR",
                "OP_LEFT",
                "OP_RIGHT",
                "OP_SIZE",
                "OP_INVERT",
                "OP_AND",
                "OP_OR",
                "OP_XOR",
                "OP_EQUAL",
                "OP_EQUALVERIFY",
                "OP_RESERVED1",
                "OP_RESERVED2",
                "OP_1ADD",
                "OP_1SUB",
                "OP_2MUL",
                "OP_2DIV",
                "OP_NEGATE",
                "OP_ABS",
                "OP_NOT",
                "OP_0NOTEQUAL",
                "OP_ADD",
                "OP_SUB",
                "OP_MUL",
                "OP_DIV",
                "OP_MOD",
                "OP_LSHIFT",
                "OP_RSHIFT",
                "OP_BOOLAND",
                "OP_BOOLOR",
                "OP_NUMEQUAL",
                "OP_NUMEQUALVERIFY",
                "OP_NUMNOTEQUAL",
                "OP_LESSTHAN",
                "OP_GREATERTHAN",
                "OP_LESSTHANOREQUAL",
                "OP_GREATERTHANOREQUAL",
                "OP_MIN",
                "OP_MAX",
                "OP_WITHIN",
                "OP_RIPEMD160",
                "OP_SHA1",
                "OP_SHA256",
                "OP_HASH160",
                "OP_HASH256",
                "OP_CODESEPARATOR",
                "OP_CHECKSIG",
                "OP_CHECKSIGVERIFY",
                "OP_CHECKMULTISIG",
                "OP_CHECKMULTISIGVERIFY",
                "OP_NOP1",
                "OP_CHECKLOCKTIMEVERIFY",
                "OP_CHECKSEQUENCEVERIFY",
                "OP_NOP4",
                "OP_NOP5",
                "OP_NOP6",
                "OP_NOP7",
                "OP_NOP8",
                "OP_NOP9",
                "OP_NOP10",
                "OP_CHECKSIGADD",
            ],
            start=0x61,
        )
    ),
}


def opcode_name(opcode: int) -> str:
    """Bitcoin Core's name for an opcode (``OP_UNKNOWN`` for unassigned ones)."""
    if 0x01 <= opcode <= 0x4B:
        return f"OP_PUSHBYTES_{opcode}"
    return _NAMES.get(opcode, "OP_UNKNOWN" if opcode != OP_INVALIDOPCODE else "OP_INVALIDOPCODE")


# --- pushes and numbers ----------------------------------------------------------------


def _push_prefix(n: int) -> bytes:
    if n < OP_PUSHDATA1:
        return bytes([n])
    if n <= 0xFF:
        return bytes([OP_PUSHDATA1, n])
    if n <= 0xFFFF:
        return bytes([OP_PUSHDATA2]) + n.to_bytes(2, "little")
    if n <= 0xFFFFFFFF:
        return bytes([OP_PUSHDATA4]) + n.to_bytes(4, "little")
    raise ScriptError("push data longer than 4 GiB cannot be encoded")


def push_data(data: bytes) -> bytes:
    """The minimal push of ``data`` (BIP62 rule 3, Bitcoin Core's ``CheckMinimalPush``).

    Empty data is OP_0, a single byte 1..16 is OP_1..OP_16, 0x81 is OP_1NEGATE,
    anything else uses the shortest direct or OP_PUSHDATA form.
    """
    n = len(data)
    if n == 0:
        return bytes([OP_0])
    if n == 1 and 1 <= data[0] <= 16:
        return bytes([OP_1 - 1 + data[0]])
    if n == 1 and data[0] == 0x81:
        return bytes([OP_1NEGATE])
    return _push_prefix(n) + bytes(data)


def push_bytes(data: bytes) -> bytes:
    """A data push that never turns into an OP_n opcode (Bitcoin Core's ``CScript << vector``).

    Used where a reader expects a data element, such as OP_RETURN payloads.
    """
    return _push_prefix(len(data)) + bytes(data)


def script_num(n: int) -> bytes:
    """CScriptNum serialisation: little-endian, sign bit in the top byte, minimal."""
    if n == 0:
        return b""
    neg = n < 0
    v = -n if neg else n
    out = bytearray()
    while v:
        out.append(v & 0xFF)
        v >>= 8
    if out[-1] & 0x80:
        out.append(0x80 if neg else 0x00)
    elif neg:
        out[-1] |= 0x80
    return bytes(out)


def decode_script_num(data: bytes, *, max_size: int = 4) -> int:
    """Parse a minimally encoded CScriptNum of at most ``max_size`` bytes."""
    if len(data) > max_size:
        raise ScriptError(f"script number longer than {max_size} bytes")
    if not data:
        return 0
    if data[-1] & 0x7F == 0 and (len(data) == 1 or not data[-2] & 0x80):
        raise ScriptError("script number is not minimally encoded")
    v = int.from_bytes(data, "little")
    if data[-1] & 0x80:
        return -(v & ~(0x80 << (8 * (len(data) - 1))))
    return v


def push_int(n: int) -> bytes:
    """Push a number the way script expects it: OP_0, OP_1NEGATE, OP_1..OP_16 or a minimal push."""
    if n == 0:
        return bytes([OP_0])
    if n == -1:
        return bytes([OP_1NEGATE])
    if 1 <= n <= 16:
        return bytes([OP_1 - 1 + n])
    return push_bytes(script_num(n))


def op_n(n: int) -> int:
    """The opcode OP_n for 0 <= n <= 16."""
    if not 0 <= n <= 16:
        raise ScriptError(f"OP_n is only defined for 0..16, not {n}")
    return OP_0 if n == 0 else OP_1 - 1 + n


def decode_op_n(opcode: int) -> int:
    """The value of OP_0 / OP_1..OP_16."""
    if opcode == OP_0:
        return 0
    if OP_1 <= opcode <= OP_16:
        return opcode - OP_1 + 1
    raise ScriptError(f"{opcode_name(opcode)} is not a small-integer opcode")


# --- parsing -----------------------------------------------------------------------------


class ScriptOp(NamedTuple):
    """One parsed operation. ``data`` is None for non-push opcodes; ``start``/``end``
    are byte offsets into the script (``end`` is the offset of the next op)."""

    opcode: int
    data: bytes | None
    start: int
    end: int


def iter_ops(script: bytes) -> Iterator[ScriptOp]:
    """Walk ``script`` op by op; a truncated push raises :class:`ScriptError`."""
    pos = 0
    n = len(script)
    while pos < n:
        start = pos
        opcode = script[pos]
        pos += 1
        if opcode > OP_PUSHDATA4:
            yield ScriptOp(opcode, None, start, pos)
            continue
        if opcode < OP_PUSHDATA1:
            size = opcode
        else:
            width = {OP_PUSHDATA1: 1, OP_PUSHDATA2: 2, OP_PUSHDATA4: 4}[opcode]
            if pos + width > n:
                raise ScriptError(f"truncated {opcode_name(opcode)} length at offset {start}")
            size = int.from_bytes(script[pos : pos + width], "little")
            pos += width
        if pos + size > n:
            raise ScriptError(
                f"truncated push at offset {start}: {size} bytes announced, {n - pos} left"
            )
        yield ScriptOp(opcode, bytes(script[pos : pos + size]), start, pos + size)
        pos += size


def parse_ops(script: bytes) -> list[ScriptOp]:
    """All ops of ``script`` (raises :class:`ScriptError` on a truncated push)."""
    return list(iter_ops(script))


def is_push_only(script: bytes) -> bool:
    """True if every op is a push or OP_1NEGATE/OP_RESERVED/OP_1..OP_16 (Core's IsPushOnly)."""
    try:
        return all(op.opcode <= OP_16 for op in iter_ops(script))
    except ScriptError:
        return False


def to_asm(script: bytes) -> str:
    """A Bitcoin Core-like disassembly; a truncated push shows as ``[error]``."""
    parts: list[str] = []
    try:
        for op in iter_ops(script):
            if op.data is None or op.opcode == OP_0:
                parts.append(opcode_name(op.opcode))
            else:
                parts.append(op.data.hex())
    except ScriptError:
        parts.append("[error]")
    return " ".join(parts)


def encode_op(op: ScriptOp) -> bytes:
    """The bytes of one op exactly as parsed (opcode, length field, data)."""
    if op.data is None:
        return bytes([op.opcode])
    width = {OP_PUSHDATA1: 1, OP_PUSHDATA2: 2, OP_PUSHDATA4: 4}.get(op.opcode, 0)
    length = len(op.data).to_bytes(width, "little") if width else b""
    return bytes([op.opcode]) + length + op.data


def is_minimal_push(op: ScriptOp) -> bool:
    """Whether a push uses its shortest form (BIP62 rule 3). Opcodes that carry no
    data (OP_1NEGATE and OP_1..OP_16 included) count as minimal."""
    if op.data is None:
        return True
    return push_data(op.data) == encode_op(op)


# --- templates -----------------------------------------------------------------------------


def _need(data: bytes, size: int, what: str) -> bytes:
    if len(data) != size:
        raise ScriptError(f"{what} must be {size} bytes, got {len(data)}")
    return bytes(data)


def p2pkh(pubkey_hash: bytes) -> bytes:
    """OP_DUP OP_HASH160 <20> OP_EQUALVERIFY OP_CHECKSIG."""
    h = _need(pubkey_hash, 20, "P2PKH public key hash")
    return bytes([OP_DUP, OP_HASH160, 20]) + h + bytes([OP_EQUALVERIFY, OP_CHECKSIG])


def p2sh(script_hash: bytes) -> bytes:
    """OP_HASH160 <20> OP_EQUAL."""
    return bytes([OP_HASH160, 20]) + _need(script_hash, 20, "P2SH script hash") + bytes([OP_EQUAL])


def witness_script_pubkey(version: int, program: bytes) -> bytes:
    """OP_version <program>: any segwit output (BIP141 program of 2..40 bytes)."""
    if not 0 <= version <= 16:
        raise ScriptError(f"witness version must be 0..16, not {version}")
    if not 2 <= len(program) <= 40:
        raise ScriptError(f"witness program must be 2..40 bytes, got {len(program)}")
    if version == 0 and len(program) not in (20, 32):
        raise ScriptError("a version 0 witness program must be 20 or 32 bytes")
    return bytes([op_n(version), len(program)]) + bytes(program)


def p2wpkh(pubkey_hash: bytes) -> bytes:
    """OP_0 <20-byte HASH160 of a compressed key>."""
    return witness_script_pubkey(0, _need(pubkey_hash, 20, "P2WPKH public key hash"))


def p2wsh(script_sha256: bytes) -> bytes:
    """OP_0 <32-byte SHA256 of the witness script>."""
    return witness_script_pubkey(0, _need(script_sha256, 32, "P2WSH script hash"))


def p2tr(xonly_key: bytes) -> bytes:
    """OP_1 <32-byte x-only output key>."""
    return witness_script_pubkey(1, _need(xonly_key, 32, "taproot output key"))


def p2pk(pubkey: bytes) -> bytes:
    """<pubkey> OP_CHECKSIG."""
    if not _valid_pubkey_size(pubkey):
        raise ScriptError("P2PK needs a 33-byte compressed or 65-byte uncompressed public key")
    return push_bytes(pubkey) + bytes([OP_CHECKSIG])


def op_return(data: bytes) -> bytes:
    """OP_RETURN <data>: a provably unspendable data-carrier output.

    The payload is pushed as data (``push_bytes``), the form Bitcoin Core's
    ``createrawtransaction`` writes, so readers always find it as a push.
    """
    return bytes([OP_RETURN]) + push_bytes(data)


def _valid_pubkey_size(pub: bytes) -> bool:
    """Bitcoin Core's ``CPubKey::ValidSize``: the length its header byte promises."""
    if len(pub) == 33:
        return pub[0] in (2, 3)
    if len(pub) == 65:
        return pub[0] in (4, 6, 7)
    return False


MAX_MULTISIG_KEYS = 20


def multisig(m: int, pubkeys: Sequence[bytes], sort: bool = True) -> bytes:
    """``m <pubkeys...> n OP_CHECKMULTISIG``; with ``sort`` the keys are ordered as BIP67
    (``sortedmulti``), which requires compressed keys."""
    n = len(pubkeys)
    if not 1 <= n <= MAX_MULTISIG_KEYS:
        raise ScriptError(f"multisig needs 1..{MAX_MULTISIG_KEYS} public keys, got {n}")
    if not 1 <= m <= n:
        raise ScriptError(f"multisig threshold {m} must be between 1 and {n}")
    keys = [bytes(k) for k in pubkeys]
    for k in keys:
        if not _valid_pubkey_size(k):
            raise ScriptError("multisig public keys must be 33-byte or 65-byte SEC encodings")
        if sort and len(k) != 33:
            raise ScriptError("sorted multisig (BIP67) accepts only compressed public keys")
    if sort:
        keys.sort()
    body = b"".join(push_bytes(k) for k in keys)
    return push_int(m) + body + push_int(n) + bytes([OP_CHECKMULTISIG])


def _read_count(op: ScriptOp) -> int:
    if OP_1 <= op.opcode <= OP_16:
        return op.opcode - OP_1 + 1
    if op.data is not None and op.opcode == 1 and 16 < op.data[0] <= MAX_MULTISIG_KEYS:
        return op.data[0]
    raise ScriptError("multisig counts must be OP_1..OP_16 or a minimal push of 17..20")


def parse_multisig(script: bytes) -> tuple[int, list[bytes]]:
    """(m, public keys) of ``m <keys...> n OP_CHECKMULTISIG``; raises ScriptError otherwise.

    Counts above 16 (P2WSH allows up to 20 keys) must be minimal pushes, keys
    direct pushes of 33 or 65 bytes; keys are returned in script order.
    """
    ops = parse_ops(script)
    if len(ops) < 4 or ops[-1].opcode != OP_CHECKMULTISIG or ops[-1].data is not None:
        raise ScriptError("not a multisig script: it must end with OP_CHECKMULTISIG")
    m = _read_count(ops[0])
    n = _read_count(ops[-2])
    keys: list[bytes] = []
    for op in ops[1:-2]:
        if op.data is None or op.opcode != len(op.data) or not _valid_pubkey_size(op.data):
            raise ScriptError("not a multisig script: expected a public key push")
        keys.append(op.data)
    if len(keys) != n:
        raise ScriptError(f"multisig declares {n} keys but holds {len(keys)}")
    if not 1 <= m <= n:
        raise ScriptError(f"multisig threshold {m} is not between 1 and {n}")
    return m, keys


# --- classification ------------------------------------------------------------------------


class ScriptType(enum.Enum):
    """Kinds of scriptPubKey, as Bitcoin Core's Solver names them."""

    P2PKH = "pubkeyhash"
    P2SH = "scripthash"
    P2WPKH = "witness_v0_keyhash"
    P2WSH = "witness_v0_scripthash"
    P2TR = "witness_v1_taproot"
    P2PK = "pubkey"
    MULTISIG = "multisig"  # bare multisig
    OP_RETURN = "nulldata"
    WITNESS_UNKNOWN = "witness_unknown"
    NONSTANDARD = "nonstandard"

    @property
    def is_segwit(self) -> bool:
        return self in (
            ScriptType.P2WPKH,
            ScriptType.P2WSH,
            ScriptType.P2TR,
            ScriptType.WITNESS_UNKNOWN,
        )


@dataclass(frozen=True)
class ScriptInfo:
    """The result of :func:`classify`.

    ``data`` holds what identifies the output: the 20-byte hash (P2PKH, P2SH,
    P2WPKH), the 32-byte program (P2WSH, P2TR), the witness program
    (WITNESS_UNKNOWN), the public key (P2PK), the bytes after OP_RETURN
    (OP_RETURN), or b"" (MULTISIG, NONSTANDARD). For MULTISIG, ``required`` and
    ``pubkeys`` are filled; for P2PK, ``pubkeys`` holds the one key.
    """

    type: ScriptType
    data: bytes = b""
    witness_version: int | None = None
    required: int = 0
    pubkeys: tuple[bytes, ...] = ()


def witness_program(script: bytes) -> tuple[int, bytes] | None:
    """(version, program) if ``script`` is a segwit output (BIP141), else None."""
    n = len(script)
    if not 4 <= n <= 42:
        return None
    first = script[0]
    if first != OP_0 and not OP_1 <= first <= OP_16:
        return None
    if script[1] + 2 != n:
        return None
    return decode_op_n(first), bytes(script[2:])


def classify(script_pubkey: bytes) -> ScriptInfo:
    """Classify a scriptPubKey as Bitcoin Core's ``Solver`` does.

    Bare multisig counts only OP_1..OP_16 forms (at most 16 keys), as in Core;
    unlike Core, its keys must be direct pushes (no wallet writes anything else).
    """
    s = bytes(script_pubkey)
    n = len(s)
    if n == 23 and s[0] == OP_HASH160 and s[1] == 20 and s[22] == OP_EQUAL:
        return ScriptInfo(ScriptType.P2SH, s[2:22])
    wp = witness_program(s)
    if wp is not None:
        version, program = wp
        if version == 0 and len(program) == 20:
            return ScriptInfo(ScriptType.P2WPKH, program, 0)
        if version == 0 and len(program) == 32:
            return ScriptInfo(ScriptType.P2WSH, program, 0)
        if version == 1 and len(program) == 32:
            return ScriptInfo(ScriptType.P2TR, program, 1)
        if version != 0:
            return ScriptInfo(ScriptType.WITNESS_UNKNOWN, program, version)
        return ScriptInfo(ScriptType.NONSTANDARD)
    if n >= 1 and s[0] == OP_RETURN and is_push_only(s[1:]):
        return ScriptInfo(ScriptType.OP_RETURN, s[1:])
    if n in (35, 67) and s[0] == n - 2 and s[-1] == OP_CHECKSIG and _valid_pubkey_size(s[1:-1]):
        return ScriptInfo(ScriptType.P2PK, s[1:-1], pubkeys=(s[1:-1],))
    if (
        n == 25
        and s[0] == OP_DUP
        and s[1] == OP_HASH160
        and s[2] == 20
        and s[23] == OP_EQUALVERIFY
        and s[24] == OP_CHECKSIG
    ):
        return ScriptInfo(ScriptType.P2PKH, s[3:23])
    if n >= 3 and s[-1] == OP_CHECKMULTISIG and OP_1 <= s[0] <= OP_16 and OP_1 <= s[-2] <= OP_16:
        try:
            m, keys = parse_multisig(s)
        except ScriptError:
            return ScriptInfo(ScriptType.NONSTANDARD)
        return ScriptInfo(ScriptType.MULTISIG, required=m, pubkeys=tuple(keys))
    return ScriptInfo(ScriptType.NONSTANDARD)


def script_type(script_pubkey: bytes) -> ScriptType:
    """Just the :class:`ScriptType` of :func:`classify`."""
    return classify(script_pubkey).type


# --- tapscript leaves (BIP342) that a finalizer can satisfy ----------------------------------

MAX_MULTI_A_KEYS = 999  # miniscript's MAX_PUBKEYS_PER_MULTI_A
MAX_TIMELOCK = 0x7FFFFFFF  # miniscript's older(n) / after(n): 1 <= n < 2^31
LOCKTIME_THRESHOLD = 500_000_000  # nLockTime below: a block height; at or above: a time
SEQUENCE_FINAL = 0xFFFFFFFF
SEQUENCE_LOCKTIME_DISABLE_FLAG = 1 << 31  # BIP68: the sequence is not a relative lock time
SEQUENCE_LOCKTIME_TYPE_FLAG = 1 << 22  # BIP68: units of 512 seconds rather than blocks
SEQUENCE_LOCKTIME_MASK = 0x0000FFFF


@dataclass(frozen=True)
class TapscriptTemplate:
    """A tapscript leaf of a shape the finalizer knows: ``threshold`` signatures by
    ``keys`` (x-only, in script order), and at most one timelock.

    - ``pk(X)``: ``<X> OP_CHECKSIG`` (one key, threshold 1);
    - ``multi_a(k,X1,...,Xn)``: ``<X1> OP_CHECKSIG <X2> OP_CHECKSIGADD ... <Xn>
      OP_CHECKSIGADD <k> OP_NUMEQUAL``;
    - either with a timelock, as miniscript's ``and_v(v:pk(X),older(n))`` writes it
      (``<X> OP_CHECKSIGVERIFY <n> OP_CHECKSEQUENCEVERIFY``, or ``OP_NUMEQUALVERIFY``
      for multi_a), or in front (``<n> OP_CHECKSEQUENCEVERIFY OP_VERIFY|OP_DROP``, then
      the key part: ``and_v(v:older(n),pk(X))`` and the hand-written form);
      ``OP_CHECKLOCKTIMEVERIFY`` for ``after(n)``.

    ``older`` is the relative timelock (the OP_CHECKSEQUENCEVERIFY argument, BIP68
    encoded), ``after`` the absolute one (the OP_CHECKLOCKTIMEVERIFY argument).
    """

    keys: tuple[bytes, ...]
    threshold: int
    multi: bool = False  # multi_a (even with one key), rather than pk
    older: int | None = None
    after: int | None = None


def multi_a(k: int, keys: Sequence[bytes], *, verify: bool = False) -> bytes:
    """miniscript's ``multi_a(k, keys...)`` (``v:multi_a`` with ``verify``): x-only keys
    in the order given (``sortedmulti_a`` is ``sorted(keys)``)."""
    n = len(keys)
    if not 1 <= n <= MAX_MULTI_A_KEYS:
        raise ScriptError(f"multi_a needs 1..{MAX_MULTI_A_KEYS} keys, got {n}")
    if not 1 <= k <= n:
        raise ScriptError(f"multi_a threshold {k} must be between 1 and {n}")
    parts = []
    for i, x in enumerate(keys):
        parts.append(push_bytes(_need(x, 32, "a multi_a key")))
        parts.append(bytes([OP_CHECKSIG if i == 0 else OP_CHECKSIGADD]))
    parts.append(push_int(k) + bytes([OP_NUMEQUALVERIFY if verify else OP_NUMEQUAL]))
    return b"".join(parts)


def tapscript_leaf(
    keys: Sequence[bytes],
    threshold: int = 1,
    *,
    older: int | None = None,
    after: int | None = None,
    multi: bool | None = None,
) -> bytes:
    """The miniscript form of a :class:`TapscriptTemplate`: ``pk`` for one key (unless
    ``multi``), else ``multi_a``; with a timelock, ``and_v(v:<keys>,older(n))`` or
    ``and_v(v:<keys>,after(n))``."""
    if older is not None and after is not None:
        raise ScriptError("a leaf takes one timelock, older or after, not both")
    lock = older if older is not None else after
    if lock is not None and not 1 <= lock <= MAX_TIMELOCK:
        raise ScriptError(f"a timelock must be between 1 and {MAX_TIMELOCK}, got {lock}")
    as_multi = len(keys) != 1 if multi is None else multi
    verify = lock is not None
    if as_multi:
        body = multi_a(threshold, keys, verify=verify)
    else:
        if len(keys) != 1 or threshold != 1:
            raise ScriptError("pk() takes exactly one key and a threshold of 1")
        body = push_bytes(_need(keys[0], 32, "a tapscript key"))
        body += bytes([OP_CHECKSIGVERIFY if verify else OP_CHECKSIG])
    if lock is None:
        return body
    op = OP_CHECKSEQUENCEVERIFY if older is not None else OP_CHECKLOCKTIMEVERIFY
    return body + push_int(lock) + bytes([op])


def _xonly_push(op: ScriptOp) -> bytes | None:
    return op.data if op.opcode == 32 and op.data is not None else None


def _small_number(op: ScriptOp, max_size: int) -> int | None:
    """A positive number as miniscript pushes it (OP_1..OP_16 or a minimal push), else None."""
    if OP_1 <= op.opcode <= OP_16:
        return op.opcode - OP_1 + 1
    if op.data is None or not op.data or op.opcode > OP_PUSHDATA4 or not is_minimal_push(op):
        return None
    try:
        n = decode_script_num(op.data, max_size=max_size)
    except ScriptError:
        return None
    return n if n > 0 else None


def _key_part(ops: Sequence[ScriptOp]) -> tuple[tuple[bytes, ...], int, bool, bool] | None:
    """(keys, threshold, multi, verify) of exactly ``pk``/``v:pk``/``multi_a``/``v:multi_a``."""
    if len(ops) < 2:
        return None
    first = _xonly_push(ops[0])
    if first is None:
        return None
    if len(ops) == 2 and ops[1].opcode in (OP_CHECKSIG, OP_CHECKSIGVERIFY):
        return (first,), 1, False, ops[1].opcode == OP_CHECKSIGVERIFY
    if ops[1].opcode != OP_CHECKSIG or len(ops) % 2:
        return None
    keys = [first]
    for i in range(2, len(ops) - 2, 2):
        x = _xonly_push(ops[i])
        if x is None or ops[i + 1].opcode != OP_CHECKSIGADD:
            return None
        keys.append(x)
    k = _small_number(ops[-2], 4)
    if k is None or k > len(keys) or len(keys) > MAX_MULTI_A_KEYS:
        return None
    if ops[-1].opcode not in (OP_NUMEQUAL, OP_NUMEQUALVERIFY):
        return None
    return tuple(keys), k, True, ops[-1].opcode == OP_NUMEQUALVERIFY


def _timelock(num: ScriptOp, op: ScriptOp) -> tuple[int | None, int | None] | None:
    """(older, after) of ``<n> OP_CHECKSEQUENCEVERIFY|OP_CHECKLOCKTIMEVERIFY``."""
    n = _small_number(num, 5)
    if n is None or n > MAX_TIMELOCK:
        return None
    if op.opcode == OP_CHECKSEQUENCEVERIFY:
        return n, None
    if op.opcode == OP_CHECKLOCKTIMEVERIFY:
        return None, n
    return None


def parse_tapscript(script: bytes) -> TapscriptTemplate | None:
    """The :class:`TapscriptTemplate` of a tapscript leaf, or None for any other script."""
    try:
        ops = parse_ops(script)
    except ScriptError:
        return None
    whole = _key_part(ops)
    if whole is not None:
        keys, k, multi, verify = whole
        return None if verify else TapscriptTemplate(keys, k, multi)
    lock: tuple[int | None, int | None] | None = None
    part = None
    if len(ops) >= 4:  # <keys (verify form)> <n> CSV|CLTV
        lock = _timelock(ops[-2], ops[-1])
        part = _key_part(ops[:-2]) if lock is not None else None
        if part is not None and not part[3]:
            part = None
    if part is None and len(ops) >= 5 and ops[2].opcode in (OP_VERIFY, OP_DROP):
        lock = _timelock(ops[0], ops[1])  # <n> CSV|CLTV VERIFY|DROP <keys>
        part = _key_part(ops[3:]) if lock is not None else None
        if part is not None and part[3]:
            part = None
    if part is None or lock is None:
        return None
    keys, k, multi, _ = part
    return TapscriptTemplate(keys, k, multi, older=lock[0], after=lock[1])
