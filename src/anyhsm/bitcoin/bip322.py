"""BIP322 generic signed messages: simple, full and proof-of-funds signatures (BIP322 2.0.0).

A BIP322 signature is a spend of the virtual ``to_spend`` output, which commits to the
message and to the address's scriptPubKey (the "challenge"), by the virtual ``to_sign``
transaction. The three formats, each a prefix and base64:

- ``smp`` simple: the witness of ``to_sign``'s only input (native segwit addresses, with
  version, lock time and sequence 0);
- ``ful`` full: the whole signed ``to_sign`` transaction (any address; time locks allowed);
- ``pof`` proof of funds: a finalized PSBT of ``to_sign`` that also spends other outputs the
  signer wants to show control of, each with its previous output in the PSBT.

Verification (:func:`verify_bip322`) answers one of BIP322's three states in a
:class:`Bip322Result`: *valid* (with the lock time T and age S it needs), *invalid* (some
check failed: wrong message, key, address, signature, sighash type, script...), or
*inconclusive* (the signature uses something BIP322 reserves for upgrades, or a script
this verifier does not interpret). A signature that cannot even be decoded (not base64,
not a witness/transaction/PSBT, unknown prefix) raises :class:`MessageError`.

The scripts are run by a small interpreter written for this purpose from Bitcoin Core's
``interpreter.cpp`` (legacy, P2SH, segwit v0 and tapscript, including CHECKMULTISIG,
CHECKSIGADD, CLTV/CSV and the arithmetic, stack, hash and flow-control opcodes) with
BIP322's required rules: SIGHASH_ALL only (or SIGHASH_DEFAULT in taproot), no
OP_CODESEPARATOR and no FindAndDelete, LOW_S, STRICTENC, NULLFAIL, NULLDUMMY,
MINIMALDATA, MINIMALIF and CLEANSTACK. Upgradeable rules (NOP1/NOP4-10, OP_SUCCESSx,
unknown leaf versions, unknown public key types, witness versions above 1, a
to_sign version other than 0 or 2) make the answer inconclusive, as BIP322 says. The
tests check every verdict against Bitcoin Core's own interpreter (libbitcoinkernel).

Signing (:func:`sign_bip322`) builds ``to_sign`` as a PSBT, signs each input with the
keys given (each a public key and a function that signs a 32-byte digest, so every key
may live in another store), finalizes it with :mod:`anyhsm.bitcoin.finalizer` (P2PKH,
P2WPKH, P2SH-P2WPKH, taproot key path, multisig in P2WSH, P2SH-P2WSH and P2SH) and checks
the result with :func:`verify_bip322` before returning it.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from anyhsm.bitcoin.address import script_from_address
from anyhsm.bitcoin.encoding import (
    hash160,
    sha256,
    sha256d,
    tagged_hash,
)
from anyhsm.bitcoin.psbt import Psbt, PsbtInput
from anyhsm.bitcoin.psbt_fields import decode_witness as _decode_witness
from anyhsm.bitcoin.psbt_fields import encode_witness
from anyhsm.bitcoin.script import (
    OP_1,
    OP_1NEGATE,
    OP_16,
    OP_CHECKMULTISIG,
    OP_CHECKMULTISIGVERIFY,
    OP_CHECKSIG,
    OP_CHECKSIGADD,
    OP_CHECKSIGVERIFY,
    OP_CODESEPARATOR,
    OP_PUSHDATA4,
    ScriptOp,
    ScriptType,
    classify,
    encode_op,
    is_minimal_push,
    iter_ops,
    p2pkh,
    p2sh,
    p2tr,
    p2wpkh,
    push_bytes,
    script_num,
    witness_program,
)
from anyhsm.bitcoin.sighash import SIGHASH_ALL, SIGHASH_DEFAULT, SighashCache
from anyhsm.bitcoin.taproot import (
    TAPROOT_LEAF_MASK,
    TAPROOT_LEAF_TAPSCRIPT,
    leaf_hash,
    taproot_output_key,
    taproot_tweak,
    verify_control_block,
)
from anyhsm.bitcoin.tx import OutPoint, Transaction, TxIn, TxOut
from anyhsm.crypto import secp256k1 as ec
from anyhsm.errors import HsmError, MessageError, PsbtError, ScriptError
from anyhsm.types import Network

SignDigest = Callable[[bytes], bytes]
"""Signs a 32-byte digest: returns a DER ECDSA signature."""
SchnorrSign = Callable[[bytes, bytes | None], bytes]
"""Signs a 32-byte digest with BIP340 for the key tweaked by the 32-byte tweak (or untweaked
for None): returns the 64-byte signature."""

MAX_MESSAGE = 1 << 20  # 1 MiB: larger "messages" are a misuse (commit to a hash instead)
MAX_SIGNATURE_TEXT = 300_000  # characters; a standard transaction is at most 100 kB + witness
MAX_PROOF_INPUTS = 256  # to_sign inputs of a proof of funds (the first included)


class Bip322Format(enum.StrEnum):
    """The three BIP322 signature formats, by the name of their prefix."""

    SIMPLE = "simple"
    FULL = "full"
    PROOF_OF_FUNDS = "proof-of-funds"

    @property
    def prefix(self) -> str:
        return _PREFIXES[self]


_PREFIXES = {
    Bip322Format.SIMPLE: "smp",
    Bip322Format.FULL: "ful",
    Bip322Format.PROOF_OF_FUNDS: "pof",
}
_BY_PREFIX = {v: k for k, v in _PREFIXES.items()}


class Bip322State(enum.StrEnum):
    """BIP322's three verification states."""

    VALID = "valid"
    INVALID = "invalid"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class ProvenInput:
    """A previous output a proof of funds shows control of (to_sign's inputs 1..n)."""

    outpoint: OutPoint
    amount: int
    script_pubkey: bytes
    sequence: int


@dataclass(frozen=True)
class Bip322Result:
    """The verdict of :func:`verify_bip322`.

    ``valid`` is True only in the *valid* state; then ``locktime`` (T) and ``sequence``
    (S, of the first input) say from when the signature is valid, ``version`` is
    to_sign's, and for a proof of funds ``proven`` lists the outputs it spends (whether
    they exist and are unspent is a question for the chain, not for this check).
    ``reason`` says what failed (invalid) or what was not understood (inconclusive)."""

    state: Bip322State
    format: Bip322Format
    reason: str | None = None
    version: int = 0
    locktime: int = 0
    sequence: int = 0
    proven: tuple[ProvenInput, ...] = ()

    @property
    def valid(self) -> bool:
        return self.state is Bip322State.VALID


# --- virtual transactions ---------------------------------------------------------------------


def message_bytes(message: bytes | str) -> bytes:
    data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    if len(data) > MAX_MESSAGE:
        raise MessageError(f"message of {len(data)} bytes is too long (limit 1 MiB)")
    return data


def bip322_message_hash(message: bytes | str) -> bytes:
    """BIP322 message hash: the BIP340 tagged hash "BIP0322-signed-message" of the message."""
    return tagged_hash("BIP0322-signed-message", message_bytes(message))


def bip322_to_spend(message: bytes | str, script_pubkey: bytes) -> Transaction:
    """The virtual ``to_spend`` transaction committing to the message and the challenge."""
    script_sig = b"\x00\x20" + bip322_message_hash(message)
    return Transaction(
        version=0,
        inputs=[TxIn(OutPoint(bytes(32), 0xFFFFFFFF), script_sig, 0)],
        outputs=[TxOut(0, bytes(script_pubkey))],
        locktime=0,
    )


def bip322_to_sign(
    to_spend: Transaction,
    witness: Sequence[bytes] = (),
    *,
    version: int = 0,
    locktime: int = 0,
    sequence: int = 0,
    script_sig: bytes = b"",
) -> Transaction:
    """The virtual ``to_sign`` transaction spending ``to_spend`` to OP_RETURN."""
    return Transaction(
        version=version,
        inputs=[TxIn(OutPoint(to_spend.txid(), 0), script_sig, sequence, list(witness))],
        outputs=[TxOut(0, b"\x6a")],
        locktime=locktime,
    )


def decode_witness(data: bytes) -> list[bytes]:
    """A consensus-encoded witness stack; anything else raises MessageError."""
    try:
        return _decode_witness(data)
    except PsbtError as exc:
        raise MessageError(f"the signature is not a witness stack: {exc.message}") from None


# --- decoding signatures ------------------------------------------------------------------------


def split_signature(text: str) -> tuple[Bip322Format, bytes, bool]:
    """(format, decoded bytes, whether a prefix was given) of a BIP322 signature text.

    Without a prefix the simple format is assumed, for signatures made before BIP322
    1.0.0. Raises MessageError for text that is not (prefixed) base64."""
    if not isinstance(text, str):
        raise MessageError("a signature must be base64 text")
    t = text.strip()
    if len(t) > MAX_SIGNATURE_TEXT:
        raise MessageError(
            f"signature text of {len(t)} characters is too long (limit {MAX_SIGNATURE_TEXT})"
        )
    fmt = _BY_PREFIX.get(t[:3])
    prefixed = fmt is not None
    body = t[3:] if prefixed else t
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError(
            "the signature is not valid base64"
            + ("" if prefixed else " (nor one of the prefixes smp, ful, pof followed by base64)")
        ) from None
    if not raw:
        raise MessageError("signature too short: it holds no bytes")
    return fmt or Bip322Format.SIMPLE, raw, prefixed


# --- the interpreter ------------------------------------------------------------------------------


class _Fail(Exception):
    """Internal: verification ends in a state other than valid."""

    def __init__(self, state: Bip322State, reason: str) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason


def _invalid(reason: str) -> _Fail:
    return _Fail(Bip322State.INVALID, reason)


def _inconclusive(reason: str) -> _Fail:
    return _Fail(Bip322State.INCONCLUSIVE, reason)


class _SigVersion(enum.Enum):
    BASE = "legacy"
    WITNESS_V0 = "segwit v0"
    TAPSCRIPT = "tapscript"


MAX_SCRIPT_SIZE = 10_000
MAX_ELEMENT_SIZE = 520
MAX_OPS_PER_SCRIPT = 201
MAX_STACK_SIZE = 1000
MAX_PUBKEYS_PER_MULTISIG = 20
_SIGOP_WEIGHT = 50  # BIP342 VALIDATION_WEIGHT_PER_SIGOP_PASSED
_WEIGHT_OFFSET = 50  # BIP342 VALIDATION_WEIGHT_OFFSET
_ANNEX_TAG = 0x50
_LOCKTIME_THRESHOLD = 500_000_000
_SEQUENCE_FINAL = 0xFFFFFFFF
_SEQ_DISABLE = 1 << 31
_SEQ_TYPE = 1 << 22
_SEQ_MASK = 0x0000FFFF

# Opcodes that fail a legacy/segwit v0 script even in an unexecuted branch.
_DISABLED = frozenset(
    {0x7E, 0x7F, 0x80, 0x81, 0x83, 0x84, 0x85, 0x86, 0x8D, 0x8E, 0x95, 0x96, 0x97, 0x98, 0x99}
)
_VERIF = frozenset({0x65, 0x66})  # OP_VERIF, OP_VERNOTIF: bad even when not executed
_UPGRADABLE_NOPS = frozenset({0xB0, *range(0xB3, 0xBA)})  # OP_NOP1, OP_NOP4..OP_NOP10


def _is_op_success(opcode: int) -> bool:
    """BIP342's OP_SUCCESSx opcodes (tapscript only)."""
    return (
        opcode in (0x50, 0x62, 0x89, 0x8A, 0x8D, 0x8E)
        or 0x7E <= opcode <= 0x81
        or 0x83 <= opcode <= 0x86
        or 0x95 <= opcode <= 0x99
        or 0xBB <= opcode <= 0xFE
    )


def _cast_to_bool(v: bytes) -> bool:
    for i, b in enumerate(v):
        if b:
            return not (i == len(v) - 1 and b == 0x80)  # negative zero is false
    return False


def _num(v: bytes, max_size: int = 4) -> int:
    """A minimally encoded CScriptNum (MINIMALDATA) of at most ``max_size`` bytes."""
    if len(v) > max_size:
        raise _invalid(f"script number of {len(v)} bytes is too long")
    if v and v[-1] & 0x7F == 0 and (len(v) == 1 or not v[-2] & 0x80):
        raise _invalid("script number is not minimally encoded (MINIMALDATA)")
    if not v:
        return 0
    n = int.from_bytes(v, "little")
    if v[-1] & 0x80:
        return -(n & ~(0x80 << (8 * (len(v) - 1))))
    return n


def _is_valid_signature_encoding(sig: bytes) -> bool:
    """Bitcoin Core's IsValidSignatureEncoding (BIP66 strict DER, hash type byte last)."""
    n = len(sig)
    if n < 9 or n > 73 or sig[0] != 0x30 or sig[1] != n - 3:
        return False
    len_r = sig[3]
    if 5 + len_r >= n:
        return False
    len_s = sig[5 + len_r]
    if len_r + len_s + 7 != n or sig[2] != 0x02 or len_r == 0 or sig[4] & 0x80:
        return False
    if len_r > 1 and sig[4] == 0 and not sig[5] & 0x80:
        return False
    if sig[len_r + 4] != 0x02 or len_s == 0 or sig[len_r + 6] & 0x80:
        return False
    return not (len_s > 1 and sig[len_r + 6] == 0 and not sig[len_r + 7] & 0x80)


def _check_ecdsa_sig_encoding(sig: bytes) -> None:
    """STRICTENC, DERSIG, LOW_S and BIP322's SIGHASH_ALL rule on a non-empty signature."""
    if not sig:
        return
    if not _is_valid_signature_encoding(sig):
        raise _invalid("an ECDSA signature is not strict DER")
    try:
        _, s = ec.der_decode(sig[:-1])
    except ec.CurveError:
        raise _invalid("an ECDSA signature value is out of range") from None
    if s > ec.HALF_ORDER:
        raise _invalid("an ECDSA signature has a high S value (LOW_S)")
    if sig[-1] != SIGHASH_ALL:
        raise _invalid(f"a signature uses sighash type {sig[-1]:#04x}; BIP322 requires SIGHASH_ALL")


def _check_pubkey_encoding(pub: bytes) -> None:
    """STRICTENC: a compressed or uncompressed public key (by its encoding)."""
    if not ((len(pub) == 33 and pub[0] in (2, 3)) or (len(pub) == 65 and pub[0] == 4)):
        raise _invalid("a public key is neither compressed nor uncompressed (STRICTENC)")


@dataclass
class _Input:
    """What executing one input's scripts needs."""

    tx: Transaction
    index: int
    spent: TxOut
    cache: SighashCache
    leaf_hash: bytes | None = None
    annex: bytes | None = None
    weight_left: int = 0
    script_code: bytes = b""  # the script being run: what its signature checks commit to
    digests: dict[tuple[bytes, _SigVersion], bytes] = field(default_factory=dict)
    pushes: dict[bytes, frozenset[bytes]] = field(default_factory=dict)

    def ecdsa_digest(self, script_code: bytes, sigversion: _SigVersion) -> bytes:
        """SIGHASH_ALL only: one digest per script, however many signature checks."""
        digest = self.digests.get((script_code, sigversion))
        if digest is None:
            if sigversion is _SigVersion.BASE:
                digest = self.cache.legacy(self.index, script_code, SIGHASH_ALL)
            else:
                digest = self.cache.bip143(self.index, script_code, self.spent.value, SIGHASH_ALL)
            self.digests[(script_code, sigversion)] = digest
        return digest

    def find_and_delete_check(self, sig: bytes, script: bytes) -> None:
        """BIP322 forbids FindAndDelete (Core's CONST_SCRIPTCODE): a legacy script may not
        hold the signature checked, pushed as ``CScript() << sig`` writes it (an empty one
        is OP_0)."""
        pushes = self.pushes.get(script)
        if pushes is None:
            pushes = self.pushes[script] = frozenset(
                encode_op(op) for op in _ops(script) if op.data is not None
            )
        if push_bytes(sig) in pushes:
            raise _invalid("the script contains the signature (FindAndDelete is forbidden)")

    def schnorr_ok(self, sig: bytes, xonly: bytes) -> bool:
        """BIP340 check of a key-path or tapscript signature; a bad encoding is invalid."""
        if len(sig) == 64:
            hash_type = SIGHASH_DEFAULT
        elif len(sig) == 65 and sig[64] != 0:
            hash_type = sig[64]
        else:
            raise _invalid(f"a Schnorr signature of {len(sig)} bytes (or with hash type 0x00)")
        if hash_type not in (SIGHASH_DEFAULT, SIGHASH_ALL):
            raise _invalid(
                f"a signature uses sighash type {hash_type:#04x}; BIP322 requires "
                "SIGHASH_DEFAULT or SIGHASH_ALL"
            )
        digest = self.cache.bip341(
            self.index, hash_type, leaf_hash=self.leaf_hash, annex=self.annex
        )
        return ec.schnorr_verify(xonly, digest, sig[:64])


def _ops(script: bytes) -> list[ScriptOp]:
    try:
        return list(iter_ops(script))
    except ScriptError as e:
        raise _invalid(f"a script does not parse: {e.message}") from None


def _eval(stack: list[bytes], script: bytes, sigversion: _SigVersion, ctx: _Input) -> None:
    """Run ``script`` on ``stack`` (Bitcoin Core's EvalScript with BIP322's flags)."""
    tapscript = sigversion is _SigVersion.TAPSCRIPT
    if not tapscript and len(script) > MAX_SCRIPT_SIZE:
        raise _invalid(f"a script of {len(script)} bytes is larger than {MAX_SCRIPT_SIZE}")
    ops = _ops(script)
    if any(op.opcode == OP_CODESEPARATOR for op in ops):
        raise _invalid("OP_CODESEPARATOR is forbidden by BIP322")
    alt: list[bytes] = []
    exec_stack: list[bool] = []
    op_count = 0

    def need(n: int) -> None:
        if len(stack) < n:
            raise _invalid("a script operation needs more stack items than there are")

    for op in ops:
        opcode = op.opcode
        executing = all(exec_stack)
        if op.data is not None and len(op.data) > MAX_ELEMENT_SIZE:
            raise _invalid(f"a push of {len(op.data)} bytes is larger than 520")
        if not tapscript:
            if opcode > OP_16:
                op_count += 1
                if op_count > MAX_OPS_PER_SCRIPT:
                    raise _invalid("a script executes more than 201 operations")
            if opcode in _DISABLED or opcode in _VERIF:
                raise _invalid(f"opcode {opcode:#04x} is disabled")
        if executing and opcode <= OP_PUSHDATA4:
            if not is_minimal_push(op):
                raise _invalid("a push is not minimally encoded (MINIMALDATA)")
            stack.append(op.data or b"")
        elif executing or 0x63 <= opcode <= 0x68:
            op_count += _execute(op, stack, alt, exec_stack, executing, sigversion, ctx, need)
            if not tapscript and op_count > MAX_OPS_PER_SCRIPT:  # CHECKMULTISIG's keys count
                raise _invalid("a script executes more than 201 operations")
        if len(stack) + len(alt) > MAX_STACK_SIZE:
            raise _invalid("the stack holds more than 1000 items")
    if exec_stack:
        raise _invalid("unbalanced OP_IF/OP_ENDIF")


def _execute(
    op: ScriptOp,
    stack: list[bytes],
    alt: list[bytes],
    exec_stack: list[bool],
    executing: bool,
    sigversion: _SigVersion,
    ctx: _Input,
    need: Callable[[int], None],
) -> int:
    """One non-push opcode; returns how many extra operations it counts (CHECKMULTISIG)."""
    o = op.opcode
    tapscript = sigversion is _SigVersion.TAPSCRIPT
    if o == OP_1NEGATE or OP_1 <= o <= OP_16:
        stack.append(script_num(-1 if o == OP_1NEGATE else o - OP_1 + 1))
    elif o == 0x61:  # OP_NOP
        pass
    elif o in (0x63, 0x64):  # OP_IF, OP_NOTIF
        value = False
        if executing:
            need(1)
            top = stack.pop()
            if top not in (b"", b"\x01"):
                raise _invalid("the argument of OP_IF/OP_NOTIF is not empty or 0x01 (MINIMALIF)")
            value = (top == b"\x01") == (o == 0x63)
        exec_stack.append(value)
    elif o == 0x67:  # OP_ELSE
        if not exec_stack:
            raise _invalid("OP_ELSE without OP_IF")
        exec_stack[-1] = not exec_stack[-1]
    elif o == 0x68:  # OP_ENDIF
        if not exec_stack:
            raise _invalid("OP_ENDIF without OP_IF")
        exec_stack.pop()
    elif o == 0x69:  # OP_VERIFY
        need(1)
        if not _cast_to_bool(stack.pop()):
            raise _invalid("OP_VERIFY failed")
    elif o == 0x6A:  # OP_RETURN
        raise _invalid("OP_RETURN executed")
    elif o in _UPGRADABLE_NOPS:
        raise _inconclusive(f"opcode {o:#04x} is reserved for upgrades (BIP322: inconclusive)")
    elif o == 0xB1:  # OP_CHECKLOCKTIMEVERIFY
        need(1)
        _check_locktime(_num(stack[-1], 5), ctx)
    elif o == 0xB2:  # OP_CHECKSEQUENCEVERIFY
        need(1)
        _check_sequence(_num(stack[-1], 5), ctx)
    elif 0x6B <= o <= 0x82:
        _stack_op(o, stack, alt, need)
    elif o in (0x87, 0x88):  # OP_EQUAL, OP_EQUALVERIFY
        need(2)
        equal = stack.pop() == stack.pop()
        if o == 0x88:
            if not equal:
                raise _invalid("OP_EQUALVERIFY failed")
        else:
            stack.append(b"\x01" if equal else b"")
    elif 0x8B <= o <= 0xA5:
        _arith(o, stack, need)
    elif 0xA6 <= o <= 0xAA:
        need(1)
        v = stack.pop()
        if o == 0xA6:
            h = hashlib.new("ripemd160", v).digest()
        elif o == 0xA7:
            h = hashlib.sha1(v, usedforsecurity=False).digest()
        elif o == 0xA8:
            h = sha256(v)
        elif o == 0xA9:
            h = hash160(v)
        else:
            h = sha256d(v)
        stack.append(h)
    elif o in (OP_CHECKSIG, OP_CHECKSIGVERIFY):
        need(2)
        pub, sig = stack.pop(), stack.pop()
        ok = _checksig(sig, pub, sigversion, ctx, op)
        if o == OP_CHECKSIGVERIFY:
            if not ok:
                raise _invalid("OP_CHECKSIGVERIFY failed")
        else:
            stack.append(b"\x01" if ok else b"")
    elif o == OP_CHECKSIGADD:
        if not tapscript:
            raise _invalid("OP_CHECKSIGADD outside tapscript")
        need(3)
        pub = stack.pop()
        n = _num(stack.pop())
        sig = stack.pop()
        ok = _checksig(sig, pub, sigversion, ctx, op)
        stack.append(script_num(n + (1 if ok else 0)))
    elif o in (OP_CHECKMULTISIG, OP_CHECKMULTISIGVERIFY):
        if tapscript:
            raise _invalid("OP_CHECKMULTISIG is not available in tapscript")
        return _checkmultisig(o, stack, sigversion, ctx, op)
    else:
        raise _invalid(f"opcode {o:#04x} is not a valid opcode here")
    return 0


def _check_locktime(lock: int, ctx: _Input) -> None:
    tx_lock = ctx.tx.locktime
    if lock < 0:
        raise _invalid("OP_CHECKLOCKTIMEVERIFY with a negative lock time")
    if (lock < _LOCKTIME_THRESHOLD) != (tx_lock < _LOCKTIME_THRESHOLD):
        raise _invalid("OP_CHECKLOCKTIMEVERIFY: lock time types differ")
    if lock > tx_lock:
        raise _invalid(f"OP_CHECKLOCKTIMEVERIFY: {lock} is above the lock time {tx_lock}")
    if ctx.tx.inputs[ctx.index].sequence == _SEQUENCE_FINAL:
        raise _invalid("OP_CHECKLOCKTIMEVERIFY on an input with a final sequence")


def _check_sequence(seq: int, ctx: _Input) -> None:
    if seq < 0:
        raise _invalid("OP_CHECKSEQUENCEVERIFY with a negative sequence")
    if seq & _SEQ_DISABLE:
        return
    tx_seq = ctx.tx.inputs[ctx.index].sequence
    if (ctx.tx.version & 0xFFFFFFFF) < 2:
        raise _invalid("OP_CHECKSEQUENCEVERIFY needs transaction version 2 or more")
    if tx_seq & _SEQ_DISABLE:
        raise _invalid("OP_CHECKSEQUENCEVERIFY on an input whose sequence disables it")
    mask = _SEQ_TYPE | _SEQ_MASK
    a, b = tx_seq & mask, seq & mask
    if (a < _SEQ_TYPE) != (b < _SEQ_TYPE):
        raise _invalid("OP_CHECKSEQUENCEVERIFY: relative lock types differ")
    if b > a:
        raise _invalid("OP_CHECKSEQUENCEVERIFY: the input's relative lock time is too short")


def _stack_op(o: int, stack: list[bytes], alt: list[bytes], need: Callable[[int], None]) -> None:
    if o == 0x6B:  # OP_TOALTSTACK
        need(1)
        alt.append(stack.pop())
    elif o == 0x6C:  # OP_FROMALTSTACK
        if not alt:
            raise _invalid("OP_FROMALTSTACK on an empty alt stack")
        stack.append(alt.pop())
    elif o == 0x6D:  # OP_2DROP
        need(2)
        del stack[-2:]
    elif o == 0x6E:  # OP_2DUP
        need(2)
        stack += stack[-2:]
    elif o == 0x6F:  # OP_3DUP
        need(3)
        stack += stack[-3:]
    elif o == 0x70:  # OP_2OVER
        need(4)
        stack += stack[-4:-2]
    elif o == 0x71:  # OP_2ROT
        need(6)
        moved = stack[-6:-4]
        del stack[-6:-4]
        stack += moved
    elif o == 0x72:  # OP_2SWAP
        need(4)
        stack[-4:] = stack[-2:] + stack[-4:-2]
    elif o == 0x73:  # OP_IFDUP
        need(1)
        if _cast_to_bool(stack[-1]):
            stack.append(stack[-1])
    elif o == 0x74:  # OP_DEPTH
        stack.append(script_num(len(stack)))
    elif o == 0x75:  # OP_DROP
        need(1)
        stack.pop()
    elif o == 0x76:  # OP_DUP
        need(1)
        stack.append(stack[-1])
    elif o == 0x77:  # OP_NIP
        need(2)
        del stack[-2]
    elif o == 0x78:  # OP_OVER
        need(2)
        stack.append(stack[-2])
    elif o in (0x79, 0x7A):  # OP_PICK, OP_ROLL
        need(2)
        n = _num(stack.pop())
        if n < 0 or n >= len(stack):
            raise _invalid("OP_PICK/OP_ROLL beyond the stack")
        item = stack[-n - 1]
        if o == 0x7A:
            del stack[-n - 1]
        stack.append(item)
    elif o == 0x7B:  # OP_ROT
        need(3)
        stack.append(stack.pop(-3))
    elif o == 0x7C:  # OP_SWAP
        need(2)
        stack[-2], stack[-1] = stack[-1], stack[-2]
    elif o == 0x7D:  # OP_TUCK
        need(2)
        stack.insert(-2, stack[-1])
    elif o == 0x82:  # OP_SIZE
        need(1)
        stack.append(script_num(len(stack[-1])))
    else:  # OP_CAT..OP_RIGHT are disabled (caught before), nothing else is in this range
        raise _invalid(f"opcode {o:#04x} is not a valid opcode here")


def _arith(o: int, stack: list[bytes], need: Callable[[int], None]) -> None:
    unary = {0x8B, 0x8C, 0x8F, 0x90, 0x91, 0x92}
    if o in unary:
        need(1)
        a = _num(stack.pop())
        r = {
            0x8B: a + 1,
            0x8C: a - 1,
            0x8F: -a,
            0x90: abs(a),
            0x91: int(a == 0),
            0x92: int(a != 0),
        }[o]
        stack.append(script_num(r))
        return
    if o == 0xA5:  # OP_WITHIN
        need(3)
        hi, lo, x = _num(stack.pop()), _num(stack.pop()), _num(stack.pop())
        stack.append(script_num(int(lo <= x < hi)))
        return
    binary: dict[int, Callable[[int, int], int]] = {
        0x93: lambda a, b: a + b,
        0x94: lambda a, b: a - b,
        0x9A: lambda a, b: int(a != 0 and b != 0),
        0x9B: lambda a, b: int(a != 0 or b != 0),
        0x9C: lambda a, b: int(a == b),
        0x9D: lambda a, b: int(a == b),
        0x9E: lambda a, b: int(a != b),
        0x9F: lambda a, b: int(a < b),
        0xA0: lambda a, b: int(a > b),
        0xA1: lambda a, b: int(a <= b),
        0xA2: lambda a, b: int(a >= b),
        0xA3: min,
        0xA4: max,
    }
    fn = binary.get(o)
    if fn is None:
        raise _invalid(f"opcode {o:#04x} is not a valid opcode here")
    need(2)
    b, a = _num(stack.pop()), _num(stack.pop())
    r = fn(a, b)
    if o == 0x9D:  # OP_NUMEQUALVERIFY
        if not r:
            raise _invalid("OP_NUMEQUALVERIFY failed")
        return
    stack.append(script_num(r))


def _checksig(sig: bytes, pub: bytes, sigversion: _SigVersion, ctx: _Input, op: ScriptOp) -> bool:
    if sigversion is _SigVersion.TAPSCRIPT:
        success = bool(sig)
        if success:
            ctx.weight_left -= _SIGOP_WEIGHT
            if ctx.weight_left < 0:
                raise _invalid("the tapscript signature operations exceed its weight budget")
        if not pub:
            raise _invalid("an empty public key in tapscript")
        if len(pub) == 32:
            if success and not ctx.schnorr_ok(sig, pub):
                raise _invalid("a tapscript signature does not verify")
            return success
        if success:
            raise _inconclusive(
                f"a {len(pub)}-byte public key type is reserved for upgrades (inconclusive)"
            )
        return False
    _check_ecdsa_sig_encoding(sig)
    _check_pubkey_encoding(pub)
    script = ctx.script_code
    if sigversion is _SigVersion.BASE:
        ctx.find_and_delete_check(sig, script)
    ok = bool(sig) and ec.ecdsa_verify(pub, ctx.ecdsa_digest(script, sigversion), sig[:-1])
    if not ok and sig:
        raise _invalid("a signature does not verify (NULLFAIL)")
    return ok


def _checkmultisig(
    o: int, stack: list[bytes], sigversion: _SigVersion, ctx: _Input, op: ScriptOp
) -> int:
    if not stack:
        raise _invalid("OP_CHECKMULTISIG without a key count")
    n_keys = _num(stack[-1])
    if not 0 <= n_keys <= MAX_PUBKEYS_PER_MULTISIG:
        raise _invalid(f"OP_CHECKMULTISIG with {n_keys} keys")
    i = 1 + n_keys + 1
    if len(stack) < i:
        raise _invalid("OP_CHECKMULTISIG needs more stack items")
    n_sigs = _num(stack[-i])
    if not 0 <= n_sigs <= n_keys:
        raise _invalid(f"OP_CHECKMULTISIG with {n_sigs} signatures for {n_keys} keys")
    if len(stack) < i + n_sigs + 1:  # the signatures and the dummy element
        raise _invalid("OP_CHECKMULTISIG needs more stack items")
    # Core pairs them from the top of the stack: the last key and the last signature first
    keys = [stack[-2 - k] for k in range(n_keys)]
    sigs = [stack[-i - 1 - k] for k in range(n_sigs)]
    script = ctx.script_code
    if sigversion is _SigVersion.BASE:
        for sig in sigs:
            ctx.find_and_delete_check(sig, script)
    success = True
    ki = si = 0
    keys_left, sigs_left = n_keys, n_sigs
    while success and sigs_left > 0:
        sig, pub = sigs[si], keys[ki]
        _check_ecdsa_sig_encoding(sig)
        _check_pubkey_encoding(pub)
        if sig and ec.ecdsa_verify(pub, ctx.ecdsa_digest(script, sigversion), sig[:-1]):
            si += 1
            sigs_left -= 1
        ki += 1
        keys_left -= 1
        if sigs_left > keys_left:
            success = False
    if not success and any(sigs):
        raise _invalid("a multisig signature does not verify (NULLFAIL)")
    del stack[-(i + n_sigs) :]
    dummy = stack.pop()
    if dummy:
        raise _invalid("the OP_CHECKMULTISIG dummy element is not empty (NULLDUMMY)")
    if o == OP_CHECKMULTISIGVERIFY:
        if not success:
            raise _invalid("OP_CHECKMULTISIGVERIFY failed")
    else:
        stack.append(b"\x01" if success else b"")
    return n_keys


def _run(stack: list[bytes], script: bytes, sigversion: _SigVersion, ctx: _Input) -> None:
    ctx.script_code = script
    _eval(stack, script, sigversion, ctx)


def _witness_script(
    stack: list[bytes], script: bytes, sigversion: _SigVersion, ctx: _Input
) -> None:
    """Core's ExecuteWitnessScript: element sizes, tapscript pre-scan, clean stack."""
    if sigversion is _SigVersion.TAPSCRIPT:
        try:
            for op in iter_ops(script):
                if _is_op_success(op.opcode):
                    raise _inconclusive(
                        f"the tapscript uses OP_SUCCESS{op.opcode} (reserved for upgrades)"
                    )
        except ScriptError as e:
            raise _invalid(f"the tapscript does not parse: {e.message}") from None
        if len(stack) > MAX_STACK_SIZE:
            raise _invalid("the witness holds more than 1000 items")
    if any(len(item) > MAX_ELEMENT_SIZE for item in stack):
        raise _invalid("a witness item is larger than 520 bytes")
    _run(stack, script, sigversion, ctx)
    if len(stack) != 1:
        raise _invalid(f"the script leaves {len(stack)} stack items, not exactly 1 (CLEANSTACK)")
    if not _cast_to_bool(stack[0]):
        raise _invalid("the script ends with false")


def _witness_program(
    witness: list[bytes], version: int, program: bytes, ctx: _Input, wrapped: bool
) -> None:
    """Core's VerifyWitnessProgram with BIP322's rules."""
    stack = list(witness)
    if version == 0:
        if len(program) == 32:
            if not stack:
                raise _invalid("the P2WSH witness is empty")
            script = stack.pop()
            if sha256(script) != program:
                raise _invalid("the witness script does not hash to the P2WSH program")
            _witness_script(stack, script, _SigVersion.WITNESS_V0, ctx)
        elif len(program) == 20:
            if len(stack) != 2:
                raise _invalid(f"a P2WPKH witness has {len(stack)} items, not 2")
            _witness_script(stack, p2pkh(program), _SigVersion.WITNESS_V0, ctx)
        else:
            raise _invalid(f"a segwit v0 program of {len(program)} bytes")
        return
    if version == 1 and len(program) == 32 and not wrapped:
        if not stack:
            raise _invalid("the taproot witness is empty")
        if len(stack) >= 2 and stack[-1] and stack[-1][0] == _ANNEX_TAG:
            ctx.annex = stack.pop()
        if len(stack) == 1:
            if not ctx.schnorr_ok(stack[0], program):
                raise _invalid("the taproot key-path signature does not verify")
            return
        control, script = stack.pop(), stack.pop()
        n = len(control)
        if n < 33 or (n - 33) % 32 or (n - 33) // 32 > 128:
            raise _invalid(f"a taproot control block of {n} bytes")
        if not verify_control_block(program, script, control):
            raise _invalid("the control block does not commit to the script (wrong leaf or key)")
        if control[0] & TAPROOT_LEAF_MASK != TAPROOT_LEAF_TAPSCRIPT:
            raise _inconclusive(
                f"taproot leaf version {control[0] & TAPROOT_LEAF_MASK:#04x} is reserved for "
                "upgrades"
            )
        ctx.leaf_hash = leaf_hash(script, TAPROOT_LEAF_TAPSCRIPT)
        ctx.weight_left = len(encode_witness(witness)) + _WEIGHT_OFFSET
        _witness_script(stack, script, _SigVersion.TAPSCRIPT, ctx)
        return
    raise _inconclusive(
        f"witness version {version} with a {len(program)}-byte program is reserved for upgrades"
        + (" (P2SH-wrapped)" if wrapped else "")
    )


def _verify_input(ctx: _Input) -> None:
    """Core's VerifyScript for input ``ctx.index`` with BIP322's flags; raises _Fail."""
    txin = ctx.tx.inputs[ctx.index]
    script_sig, spk, witness = txin.script_sig, ctx.spent.script_pubkey, list(txin.witness)
    is_p2sh = classify(spk).type is ScriptType.P2SH
    if any(op.opcode > OP_16 for op in _ops(script_sig)):
        if is_p2sh:
            raise _invalid("the scriptSig of a P2SH input is not push-only")
        raise _inconclusive("the scriptSig is not push-only (this verifier runs push-only ones)")
    stack: list[bytes] = []
    _run(stack, script_sig, _SigVersion.BASE, ctx)
    copy = list(stack)
    _run(stack, spk, _SigVersion.BASE, ctx)
    if not stack or not _cast_to_bool(stack[-1]):
        raise _invalid("the scriptPubKey evaluates to false")
    had_witness = False
    wp = witness_program(spk)
    if wp is not None:
        had_witness = True
        if script_sig:
            raise _invalid("a native segwit input has a scriptSig")
        _witness_program(witness, wp[0], wp[1], ctx, wrapped=False)
        stack = stack[:1]
    elif is_p2sh:
        stack = copy
        if not stack:
            raise _invalid("the P2SH scriptSig pushes no redeem script")
        redeem = stack.pop()
        _run(stack, redeem, _SigVersion.BASE, ctx)
        if not stack or not _cast_to_bool(stack[-1]):
            raise _invalid("the redeem script evaluates to false")
        inner = witness_program(redeem)
        if inner is not None:
            had_witness = True
            if script_sig != push_bytes(redeem):
                raise _invalid("the scriptSig of a P2SH-wrapped segwit input is not one push")
            _witness_program(witness, inner[0], inner[1], ctx, wrapped=True)
            stack = stack[:1]
    if len(stack) != 1:
        raise _invalid(f"{len(stack)} stack items remain, not exactly 1 (CLEANSTACK)")
    if not had_witness and witness:
        raise _invalid("an input that is not segwit has a witness")


# --- verification ------------------------------------------------------------------------------


def _state_of(fmt: Bip322Format, fail: _Fail) -> Bip322Result:
    return Bip322Result(fail.state, fmt, fail.reason)


def _check_to_sign(tx: Transaction, to_spend: Transaction) -> None:
    """BIP322's basic validation of a decoded to_sign (raises _Fail)."""
    if not tx.inputs:
        raise _invalid("to_sign has no input")
    if tx.inputs[0].prevout != OutPoint(to_spend.txid(), 0):
        raise _invalid(
            "to_sign's first input does not spend to_spend (another message, or another address)"
        )
    if len(tx.outputs) != 1 or tx.outputs[0] != TxOut(0, b"\x6a"):
        raise _invalid("to_sign must have exactly one output: 0 satoshis to OP_RETURN")
    prevouts = [i.prevout for i in tx.inputs]
    if len(set(prevouts)) != len(prevouts):
        raise _invalid("to_sign spends the same output twice")
    if any(p.txid == bytes(32) and p.vout == 0xFFFFFFFF for p in prevouts):
        raise _invalid("to_sign spends a null outpoint")
    if tx.version not in (0, 2):
        raise _inconclusive(f"to_sign version {tx.version} (BIP322 knows 0 and 2)")


def _verify_tx(
    tx: Transaction, spent: Sequence[TxOut], fmt: Bip322Format, proven: tuple[ProvenInput, ...]
) -> Bip322Result:
    cache = SighashCache(tx, list(spent))
    for n, out in enumerate(spent):
        try:
            _verify_input(_Input(tx, n, out, cache))
        except _Fail as f:
            where = "" if n == 0 else f" (input {n})"
            return Bip322Result(f.state, fmt, f.reason + where)
    return Bip322Result(
        Bip322State.VALID,
        fmt,
        version=tx.version,
        locktime=tx.locktime,
        sequence=tx.inputs[0].sequence,
        proven=proven,
    )


def verify_bip322(
    address: str, message: bytes | str, signature: str, network: Network
) -> Bip322Result:
    """Verify a BIP322 signature (simple, full or proof of funds) of ``message`` for
    ``address`` on ``network``.

    Returns the verdict: :attr:`Bip322Result.valid` only in the valid state. Raises
    :class:`MessageError` if the signature cannot be decoded (not base64, not a witness
    stack / transaction / PSBT as its prefix says) and an address error for an invalid
    address or one of another network."""
    challenge = script_from_address(address, network)
    return verify_bip322_script(challenge, message, signature)


def verify_bip322_script(challenge: bytes, message: bytes | str, signature: str) -> Bip322Result:
    """:func:`verify_bip322` for a scriptPubKey instead of an address."""
    fmt, raw, _ = split_signature(signature)
    to_spend = bip322_to_spend(message, challenge)
    if fmt is Bip322Format.SIMPLE:
        to_sign = bip322_to_sign(to_spend, decode_witness(raw))
        return _verify_tx(to_sign, [to_spend.outputs[0]], fmt, ())
    if fmt is Bip322Format.FULL:
        try:
            tx = Transaction.parse(raw)
        except HsmError as e:
            raise MessageError(f"the full signature is not a transaction: {e.message}") from None
        try:
            _check_to_sign(tx, to_spend)
            if len(tx.inputs) != 1:
                raise _invalid("a full signature spends only to_spend (use proof of funds)")
        except _Fail as f:
            return _state_of(fmt, f)
        return _verify_tx(tx, [to_spend.outputs[0]], fmt, ())
    return _verify_pof(raw, to_spend, message)


def _verify_pof(raw: bytes, to_spend: Transaction, message: bytes | str) -> Bip322Result:
    fmt = Bip322Format.PROOF_OF_FUNDS
    try:
        psbt = Psbt.parse(raw)
    except PsbtError as e:
        raise MessageError(f"the proof of funds is not a PSBT: {e.message}") from None
    if len(psbt.inputs) > MAX_PROOF_INPUTS:
        raise MessageError(
            f"the proof of funds spends {len(psbt.inputs)} outputs (limit {MAX_PROOF_INPUTS})"
        )
    try:
        given = psbt.global_map.generic_signed_message
        if given is not None and given != message_bytes(message):
            raise _invalid("the PSBT's PSBT_GLOBAL_GENERIC_SIGNED_MESSAGE is another message")
        if not psbt.is_finalized():
            raise _invalid("the proof of funds PSBT is not finalized")
        try:
            tx = psbt.extract_transaction()
        except PsbtError as e:
            raise _invalid(f"no transaction can be extracted: {e.message}") from None
        _check_to_sign(tx, to_spend)
        spent = _spent_outputs(psbt, to_spend)
    except _Fail as f:
        return _state_of(fmt, f)
    proven = tuple(
        ProvenInput(i.prevout, o.value, o.script_pubkey, i.sequence)
        for i, o in zip(tx.inputs[1:], spent[1:], strict=True)
    )
    return _verify_tx(tx, spent, fmt, proven)


def _spent_outputs(psbt: Psbt, to_spend: Transaction) -> list[TxOut]:
    """The output each input of a proof of funds spends (BIP322's UTXO rules)."""
    first = psbt.inputs[0]
    if (first.witness_utxo is not None and first.witness_utxo != to_spend.outputs[0]) or (
        first.non_witness_utxo is not None and first.non_witness_utxo.txid() != to_spend.txid()
    ):
        raise _invalid("the PSBT's UTXO of the first input is not to_spend's output")
    spent = [to_spend.outputs[0]]
    full: dict[bytes, Transaction] = {}
    for n, inp in enumerate(psbt.inputs[1:], start=1):
        nwu = inp.non_witness_utxo
        if nwu is not None:  # Psbt.parse checked it is the transaction spent
            full.setdefault(inp.previous_txid, nwu)
            spent.append(nwu.outputs[inp.output_index])
            continue
        segwit = bool(inp.final_scriptwitness)
        if segwit and inp.witness_utxo is not None:
            spent.append(inp.witness_utxo)
            continue
        earlier = full.get(inp.previous_txid)
        if earlier is None:
            raise _invalid(
                f"input {n} has no previous output (a non-segwit input needs "
                "PSBT_IN_NON_WITNESS_UTXO, here or on an earlier input of the same transaction)"
            )
        if inp.output_index >= len(earlier.outputs):
            raise _invalid(f"input {n} spends an output its previous transaction does not have")
        out = earlier.outputs[inp.output_index]
        if inp.witness_utxo is not None and inp.witness_utxo != out:
            raise _invalid(f"input {n}'s PSBT_IN_WITNESS_UTXO differs from the transaction's")
        spent.append(out)
    return spent


# --- signing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bip322Key:
    """A key that can sign a BIP322 message: its public key (33-byte compressed, or
    65-byte uncompressed for P2PKH and legacy multisig) and how it signs a 32-byte digest.
    ``ecdsa`` returns DER; ``schnorr`` returns BIP340 for the key tweaked by its second
    argument (the BIP86 tweak for a key-path spend). Keys may live in different stores."""

    pubkey: bytes
    ecdsa: SignDigest | None = None
    schnorr: SchnorrSign | None = None

    def __repr__(self) -> str:
        return f"Bip322Key({self.pubkey.hex()})"


@dataclass(frozen=True)
class Bip322Utxo:
    """An output a proof of funds shows control of: the outpoint and the output it holds;
    ``prev_tx`` (the whole previous transaction) is required for non-segwit outputs;
    ``redeem_script`` / ``witness_script`` for P2SH / P2WSH ones."""

    outpoint: OutPoint
    output: TxOut
    prev_tx: Transaction | None = None
    redeem_script: bytes | None = None
    witness_script: bytes | None = None
    sequence: int = 0


def create_bip322_psbt(
    message: bytes | str,
    challenge: bytes,
    *,
    redeem_script: bytes | None = None,
    witness_script: bytes | None = None,
    proof_of_funds: Sequence[Bip322Utxo] = (),
    version: int = 0,
    locktime: int = 0,
    sequence: int = 0,
) -> Psbt:
    """BIP322's PSBT creator: the unsigned ``to_sign`` as a version 0 PSBT with
    PSBT_GLOBAL_GENERIC_SIGNED_MESSAGE, the UTXO fields of every input and the scripts
    given. Signers (:func:`sign_bip322_psbt`, or anyone's) add signatures; the
    finalizer and :func:`encode_bip322_psbt` make the signature."""
    data = message_bytes(message)
    if version not in (0, 2):
        raise MessageError(f"to_sign version {version}: BIP322 knows versions 0 and 2")
    if not 0 <= locktime <= 0xFFFFFFFF or not 0 <= sequence <= 0xFFFFFFFF:
        raise MessageError("lock time and sequence are 32-bit numbers")
    if len(proof_of_funds) + 1 > MAX_PROOF_INPUTS:
        raise MessageError(f"a proof of funds spends at most {MAX_PROOF_INPUTS - 1} outputs")
    to_spend = bip322_to_spend(data, challenge)
    to_sign = bip322_to_sign(to_spend, version=version, locktime=locktime, sequence=sequence)
    for u in proof_of_funds:
        to_sign.inputs.append(TxIn(u.outpoint, b"", u.sequence))
    psbt = Psbt.from_unsigned_tx(to_sign)
    psbt.global_map.generic_signed_message = data
    first = psbt.inputs[0]
    if witness_program(challenge) is None:
        first.non_witness_utxo = to_spend
    else:
        first.witness_utxo = to_spend.outputs[0]
    first.redeem_script, first.witness_script = redeem_script, witness_script
    for inp, u in zip(psbt.inputs[1:], proof_of_funds, strict=True):
        if u.prev_tx is not None:
            if u.prev_tx.txid() != u.outpoint.txid or u.outpoint.vout >= len(u.prev_tx.outputs):
                raise MessageError(f"the previous transaction given for {u.outpoint} is not its")
            if u.prev_tx.outputs[u.outpoint.vout] != u.output:
                raise MessageError(f"the output given for {u.outpoint} is not the transaction's")
            inp.non_witness_utxo = u.prev_tx
        segwit = witness_program(u.output.script_pubkey) is not None or (
            u.redeem_script is not None and witness_program(u.redeem_script) is not None
        )
        if segwit:
            inp.witness_utxo = u.output
        elif u.prev_tx is None:
            raise MessageError(
                f"{u.outpoint} is not a segwit output: give its previous transaction",
                hint="a non-segwit output is proven with the whole transaction that holds it",
            )
        inp.redeem_script, inp.witness_script = u.redeem_script, u.witness_script
    return psbt


def sign_bip322_psbt(psbt: Psbt, keys: Sequence[Bip322Key]) -> int:
    """Add a signature by every key given to every input of a BIP322 PSBT it can sign
    (P2PKH, P2WPKH, P2SH-P2WPKH, a key-path BIP86 taproot output, a script holding the
    key such as multisig); returns how many signatures were added. Each signature is
    verified before it is added."""
    from anyhsm.bitcoin.spend import SpendKind, describe_input, key_in_script

    tx = psbt.unsigned_tx()
    infos = [describe_input(i) for i in psbt.inputs]
    cache = SighashCache(tx, [i.spent for i in infos])
    added = 0
    for n, (inp, info) in enumerate(zip(psbt.inputs, infos, strict=True)):
        if info.problem is not None:
            raise MessageError(f"input {n} cannot be signed: {info.problem}")
        if info.kind is SpendKind.P2TR:
            added += _sign_taproot(cache, n, inp, info.spent, keys)
            continue
        if info.script_code is None:
            continue
        for key in keys:
            if key.ecdsa is None or key.pubkey in inp.partial_sigs:
                continue
            if not key_in_script(key.pubkey, info):
                continue
            if info.kind.segwit_v0:
                assert info.spent is not None
                digest = cache.bip143(n, info.script_code, info.spent.value, SIGHASH_ALL)
            else:
                digest = cache.legacy(n, info.script_code, SIGHASH_ALL)
            der = _ecdsa(key, digest)
            inp.add_partial_sig(key.pubkey, der + bytes([SIGHASH_ALL]))
            added += 1
    return added


def _ecdsa(key: Bip322Key, digest: bytes) -> bytes:
    assert key.ecdsa is not None
    try:
        r, s = ec.normalize_low_s(*ec.der_decode(key.ecdsa(digest)))
    except ec.CurveError as exc:
        raise MessageError(f"the signer returned an invalid DER signature: {exc}") from None
    der = ec.der_encode(r, s)
    if not ec.ecdsa_verify(key.pubkey, digest, der):
        raise MessageError("a signature does not verify with the key it was asked of")
    return der


def _sign_taproot(
    cache: SighashCache, n: int, inp: PsbtInput, spent: TxOut | None, keys: Sequence[Bip322Key]
) -> int:
    if spent is None or inp.tap_key_sig is not None:
        return 0
    program = spent.script_pubkey[2:]
    for key in keys:
        if key.schnorr is None or len(key.pubkey) != 33:
            continue
        internal = ec.xonly(key.pubkey)
        try:
            q, _ = taproot_output_key(internal, None)
        except ScriptError:
            continue
        if q != program:
            continue
        digest = cache.bip341(n, SIGHASH_DEFAULT)
        sig = bytes(key.schnorr(digest, taproot_tweak(internal, None)))
        if len(sig) != 64 or not ec.schnorr_verify(q, digest, sig):
            raise MessageError(
                "the Schnorr signature does not verify for the taproot output key",
                hint="sign with the key tweaked by TapTweak(internal key) (BIP86)",
            )
        inp.add_tap_key_sig(sig)
        inp.tap_internal_key = internal
        return 1
    return 0


def encode_bip322_psbt(psbt: Psbt, fmt: Bip322Format | None = None) -> str:
    """The BIP322 signature of a signed BIP322 PSBT: finalizes it (the PSBT given is not
    changed) and encodes the result as ``fmt`` (None: simple when BIP322 allows it, full
    when no output besides to_spend's is spent, else proof of funds)."""
    from anyhsm.bitcoin.finalizer import finalize_psbt

    result = finalize_psbt(psbt)
    if not result.complete or result.tx is None:
        reasons = "; ".join(f"input {r.index}: {r.reason}" for r in result.inputs if r.reason)
        raise MessageError(
            "the message cannot be signed with these keys: " + (reasons or "incomplete"),
            hint="give every key the address's script needs",
        )
    tx = result.tx
    simple_ok = (
        len(tx.inputs) == 1
        and (tx.version, tx.locktime, tx.inputs[0].sequence) == (0, 0, 0)
        and not tx.inputs[0].script_sig
        and psbt.inputs[0].witness_utxo is not None
        and classify(psbt.inputs[0].witness_utxo.script_pubkey).type
        in (ScriptType.P2WPKH, ScriptType.P2WSH, ScriptType.P2TR)
    )
    if fmt is None:
        if len(tx.inputs) > 1:
            fmt = Bip322Format.PROOF_OF_FUNDS
        else:
            fmt = Bip322Format.SIMPLE if simple_ok else Bip322Format.FULL
    if fmt is Bip322Format.SIMPLE:
        if not simple_ok:
            raise MessageError(
                "the simple format is only for native segwit addresses (P2WPKH, P2WSH, P2TR) "
                "with no other input and version, lock time and sequence 0",
                hint="use the full or proof-of-funds format",
            )
        body = encode_witness(tx.inputs[0].witness)
    elif fmt is Bip322Format.FULL:
        if len(tx.inputs) != 1:
            raise MessageError(
                "a full signature spends only to_spend", hint="use the proof-of-funds format"
            )
        body = tx.serialize()
    else:
        final = result.psbt.copy()
        final.global_map.generic_signed_message = None  # the message is not repeated
        seen: set[bytes] = set()
        for inp in final.inputs:  # BIP322: a previous transaction is given once
            if inp.non_witness_utxo is not None:
                if inp.previous_txid in seen:
                    inp.non_witness_utxo = None
                seen.add(inp.previous_txid)
        body = final.serialize()
    return fmt.prefix + base64.b64encode(body).decode("ascii")


def sign_bip322(
    message: bytes | str,
    challenge: bytes,
    keys: Sequence[Bip322Key],
    *,
    fmt: Bip322Format | None = None,
    redeem_script: bytes | None = None,
    witness_script: bytes | None = None,
    proof_of_funds: Sequence[Bip322Utxo] = (),
    version: int = 0,
    locktime: int = 0,
    sequence: int = 0,
) -> str:
    """A BIP322 signature of ``message`` for the scriptPubKey ``challenge`` by ``keys``.

    ``fmt`` None picks simple when BIP322 allows it (native segwit, nothing else set),
    else full, or proof of funds when ``proof_of_funds`` outputs are given. P2SH-P2WPKH
    needs no script: it is found from the keys. P2WSH and P2SH need their
    ``witness_script`` / ``redeem_script`` (P2SH-P2WSH both, or only the witness
    script). The signature is verified before it is returned."""
    if redeem_script is None and classify(challenge).type is ScriptType.P2SH:
        if witness_script is not None:
            redeem_script = b"\x00\x20" + sha256(witness_script)
        else:
            for key in keys:
                candidate = p2wpkh(hash160(key.pubkey))
                if p2sh(hash160(candidate)) == challenge:
                    redeem_script = candidate
                    break
    psbt = create_bip322_psbt(
        message,
        challenge,
        redeem_script=redeem_script,
        witness_script=witness_script,
        proof_of_funds=proof_of_funds,
        version=version,
        locktime=locktime,
        sequence=sequence,
    )
    if not sign_bip322_psbt(psbt, keys):
        raise MessageError(
            "none of the keys given can sign for this address",
            hint="check the keys, and give the redeem or witness script of a script address",
        )
    signature = encode_bip322_psbt(psbt, fmt)
    check = verify_bip322_script(challenge, message, signature)
    if not check.valid:  # never hand out a signature that does not verify
        raise MessageError(f"the signature made does not verify: {check.reason}")
    return signature


def p2tr_bip86_script(pubkey33: bytes) -> bytes:
    """The BIP86 (key path only) P2TR scriptPubKey of a compressed key."""
    try:
        q, _ = taproot_output_key(ec.xonly(pubkey33), None)
    except (ec.CurveError, ScriptError) as exc:
        raise MessageError(f"cannot build the taproot output: {exc}") from None
    return p2tr(q)


__all__ = [
    "MAX_PROOF_INPUTS",
    "MAX_SIGNATURE_TEXT",
    "Bip322Format",
    "Bip322Key",
    "Bip322Result",
    "Bip322State",
    "Bip322Utxo",
    "ProvenInput",
    "SchnorrSign",
    "SignDigest",
    "bip322_message_hash",
    "bip322_to_sign",
    "bip322_to_spend",
    "create_bip322_psbt",
    "decode_witness",
    "encode_bip322_psbt",
    "encode_witness",
    "p2tr_bip86_script",
    "sign_bip322",
    "sign_bip322_psbt",
    "split_signature",
    "verify_bip322",
    "verify_bip322_script",
]
