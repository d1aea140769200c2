"""Signature hashes: legacy (pre-segwit), BIP143 (segwit v0) and BIP341 (taproot).

The digest computed here is the one boundary between the Bitcoin layer and the
providers: a provider only ever signs these 32 bytes.

:class:`SighashCache` computes the per-transaction hashes (prevouts, sequences,
outputs, amounts, scriptPubKeys) once, so signing every input of a large
transaction is linear, not quadratic, for BIP143 and BIP341. (Legacy sighashes
are inherently linear per input; the cache keeps their pieces serialised.)
The cache reads the transaction lazily: do not change its version, locktime,
prevouts, sequences or outputs after first use (scriptSigs and witnesses may
change; no sighash commits to them).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

from anyhsm.bitcoin.encoding import compact_size, sha256, sha256d, tagged_hash, var_bytes
from anyhsm.bitcoin.script import (
    OP_CODESEPARATOR,
    OP_PUSHDATA1,
    OP_PUSHDATA2,
    OP_PUSHDATA4,
    p2pkh,
)
from anyhsm.bitcoin.tx import MAX_MONEY, Transaction, TxOut
from anyhsm.errors import TransactionError

SIGHASH_DEFAULT = 0x00
SIGHASH_ALL = 0x01
SIGHASH_NONE = 0x02
SIGHASH_SINGLE = 0x03
SIGHASH_ANYONECANPAY = 0x80

STANDARD_SIGHASH_TYPES = frozenset({0x01, 0x02, 0x03, 0x81, 0x82, 0x83})
"""Hash types accepted for ECDSA signatures by standardness (STRICTENC)."""
TAPROOT_SIGHASH_TYPES = frozenset({0x00, *STANDARD_SIGHASH_TYPES})
"""The only hash types valid in taproot (BIP341); SIGHASH_DEFAULT is taproot-only."""

_ZERO32 = bytes(32)
# uint256::ONE as Bitcoin Core stores it: the byte 0x01 followed by 31 zero bytes.
SIGHASH_SINGLE_BUG_HASH = b"\x01" + bytes(31)
# CTxOut() as Bitcoin Core serialises it for blanked SIGHASH_SINGLE outputs: value -1, no script.
_BLANK_OUTPUT = b"\xff" * 8 + b"\x00"


class SighashError(TransactionError):
    """A signature hash cannot be computed for the requested input and hash type."""

    code = "sighash_error"


class InvalidSighashType(SighashError):
    """The hash type is not valid for this kind of signature."""

    code = "invalid_sighash_type"


class SighashSingleWithoutOutput(SighashError):
    """Taproot SIGHASH_SINGLE on an input that has no output with the same index."""

    code = "sighash_single_without_output"


def sighash_name(hash_type: int) -> str:
    """Human name such as ``"ALL|ANYONECANPAY"`` (``"0x41"`` for unknown values)."""
    base = {0: "DEFAULT", 1: "ALL", 2: "NONE", 3: "SINGLE"}.get(hash_type & 0x7F)
    if base is None or hash_type > 0xFF or hash_type == SIGHASH_ANYONECANPAY:
        return f"{hash_type:#04x}"
    return base + ("|ANYONECANPAY" if hash_type & SIGHASH_ANYONECANPAY else "")


def bip143_script_code_p2wpkh(pubkey_hash: bytes) -> bytes:
    """The BIP143 scriptCode of a P2WPKH input: the P2PKH script of the same key hash
    (without the length prefix; the sighash functions add it)."""
    return p2pkh(pubkey_hash)


def _check_ecdsa_type(hash_type: int, strict: bool) -> None:
    if strict:
        if hash_type not in STANDARD_SIGHASH_TYPES:
            raise InvalidSighashType(
                f"sighash type {hash_type:#x} is not standard for ECDSA signatures",
                hint="use ALL, NONE or SINGLE, optionally with ANYONECANPAY",
            )
    elif not 0 <= hash_type <= 0xFFFFFFFF:
        raise InvalidSighashType(f"sighash type {hash_type} does not fit in 32 bits")


def _legacy_script_code(script: bytes) -> bytes:
    """The scriptCode as Bitcoin Core's ``CTransactionSignatureSerializer`` writes it:
    every OP_CODESEPARATOR removed, length prefix = size minus separators.

    Reproduces Core byte for byte on malformed scripts too: parsing stops at a
    truncated push, whose remaining bytes are then not written.
    """
    n = len(script)
    pieces: list[bytes] = []
    begin = 0
    pc = 0
    separators = 0
    while pc < n:
        opcode = script[pc]
        pc += 1
        if opcode <= OP_PUSHDATA4:
            width = {OP_PUSHDATA1: 1, OP_PUSHDATA2: 2, OP_PUSHDATA4: 4}.get(opcode, 0)
            if width:
                if n - pc < width:
                    break
                size = int.from_bytes(script[pc : pc + width], "little")
                pc += width
            else:
                size = opcode
            if n - pc < size:
                break
            pc += size
        elif opcode == OP_CODESEPARATOR:
            separators += 1
            pieces.append(script[begin : pc - 1])
            begin = pc
    if begin != n:
        pieces.append(script[begin:pc])
    return compact_size(n - separators) + b"".join(pieces)


class SighashCache:
    """Per-transaction precomputed hashes for fast signing of many inputs.

    ``spent_outputs`` (one :class:`TxOut` per input, in input order) is needed
    only for BIP341; an entry may be None when that output is unknown, which is
    enough for SIGHASH_ANYONECANPAY on other inputs.
    """

    def __init__(
        self, tx: Transaction, spent_outputs: Sequence[TxOut | None] | None = None
    ) -> None:
        self.tx = tx
        self._spent: list[TxOut | None] | None = None
        if spent_outputs is not None:
            if len(spent_outputs) != len(tx.inputs):
                raise TransactionError(
                    f"{len(spent_outputs)} spent outputs given for {len(tx.inputs)} inputs",
                    hint="give one spent output per input, in input order",
                )
            self._spent = list(spent_outputs)

    # -- per-transaction pieces (single SHA256, BIP341 names) --

    @cached_property
    def _prevouts(self) -> list[bytes]:
        return [i.prevout.serialize() for i in self.tx.inputs]

    @cached_property
    def _sequences(self) -> list[bytes]:
        return [i.sequence.to_bytes(4, "little") for i in self.tx.inputs]

    @cached_property
    def _outputs(self) -> list[bytes]:
        return [o.serialize() for o in self.tx.outputs]

    @cached_property
    def _version(self) -> bytes:
        return self.tx.version.to_bytes(4, "little", signed=True)

    @cached_property
    def _locktime(self) -> bytes:
        return self.tx.locktime.to_bytes(4, "little")

    @cached_property
    def sha_prevouts(self) -> bytes:
        return sha256(b"".join(self._prevouts))

    @cached_property
    def sha_sequences(self) -> bytes:
        return sha256(b"".join(self._sequences))

    @cached_property
    def sha_outputs(self) -> bytes:
        return sha256(b"".join(self._outputs))

    def _all_spent(self) -> list[TxOut]:
        if self._spent is None or any(o is None for o in self._spent):
            raise SighashError(
                "a taproot signature hash commits to every spent output, and some are unknown",
                hint="provide the spent output (witness UTXO) of every input",
            )
        return [o for o in self._spent if o is not None]

    @cached_property
    def sha_amounts(self) -> bytes:
        return sha256(b"".join(o.value.to_bytes(8, "little") for o in self._all_spent()))

    @cached_property
    def sha_scriptpubkeys(self) -> bytes:
        return sha256(b"".join(var_bytes(o.script_pubkey) for o in self._all_spent()))

    # -- BIP143 pieces (double SHA256) --

    @cached_property
    def hash_prevouts(self) -> bytes:
        return sha256(self.sha_prevouts)

    @cached_property
    def hash_sequence(self) -> bytes:
        return sha256(self.sha_sequences)

    @cached_property
    def hash_outputs(self) -> bytes:
        return sha256(self.sha_outputs)

    def _check_index(self, input_index: int) -> None:
        if not 0 <= input_index < len(self.tx.inputs):
            raise TransactionError(
                f"input index {input_index} is out of range: the transaction has "
                f"{len(self.tx.inputs)} inputs"
            )

    # -- legacy --

    def legacy(
        self, input_index: int, script_code: bytes, hash_type: int, *, strict: bool = True
    ) -> bytes:
        """Pre-segwit signature hash, as Bitcoin Core's ``SignatureHash`` (SigVersion::BASE).

        ``script_code`` is the script being executed (scriptPubKey, or the redeem
        script for P2SH); OP_CODESEPARATORs in it are removed here. FindAndDelete
        of the signature is not done (it never matters for signatures we create).
        SIGHASH_SINGLE without a matching output gives the historic "one" hash.
        ``strict=False`` accepts any 32-bit hash type with consensus semantics.
        """
        _check_ecdsa_type(hash_type, strict)
        self._check_index(input_index)
        tx = self.tx
        base = hash_type & 0x1F
        anyone = bool(hash_type & SIGHASH_ANYONECANPAY)
        single = base == SIGHASH_SINGLE
        none = base == SIGHASH_NONE
        if single and input_index >= len(tx.outputs):
            return SIGHASH_SINGLE_BUG_HASH
        parts = [self._version]
        code = _legacy_script_code(bytes(script_code))
        if anyone:
            parts += [b"\x01", self._prevouts[input_index], code, self._sequences[input_index]]
        else:
            parts.append(compact_size(len(tx.inputs)))
            zero_seq = single or none
            for i, prevout in enumerate(self._prevouts):
                parts.append(prevout)
                if i == input_index:
                    parts += [code, self._sequences[i]]
                else:
                    parts += [b"\x00", b"\x00\x00\x00\x00" if zero_seq else self._sequences[i]]
        if none:
            parts.append(b"\x00")
        elif single:
            parts.append(compact_size(input_index + 1))
            parts.append(_BLANK_OUTPUT * input_index)
            parts.append(self._outputs[input_index])
        else:
            parts.append(compact_size(len(self._outputs)))
            parts += self._outputs
        parts.append(self._locktime)
        parts.append(hash_type.to_bytes(4, "little"))
        return sha256d(b"".join(parts))

    # -- BIP143 --

    def bip143_preimage(
        self,
        input_index: int,
        script_code: bytes,
        amount: int,
        hash_type: int,
        *,
        strict: bool = True,
    ) -> bytes:
        """The BIP143 serialisation that is double-SHA256 hashed."""
        _check_ecdsa_type(hash_type, strict)
        self._check_index(input_index)
        if not 0 <= amount <= MAX_MONEY:
            raise TransactionError(f"spent amount {amount} is out of range")
        base = hash_type & 0x1F
        anyone = bool(hash_type & SIGHASH_ANYONECANPAY)
        hash_prevouts = _ZERO32 if anyone else self.hash_prevouts
        if anyone or base in (SIGHASH_SINGLE, SIGHASH_NONE):
            hash_sequence = _ZERO32
        else:
            hash_sequence = self.hash_sequence
        if base not in (SIGHASH_SINGLE, SIGHASH_NONE):
            hash_outputs = self.hash_outputs
        elif base == SIGHASH_SINGLE and input_index < len(self._outputs):
            hash_outputs = sha256d(self._outputs[input_index])
        else:
            hash_outputs = _ZERO32
        return b"".join(
            (
                self._version,
                hash_prevouts,
                hash_sequence,
                self._prevouts[input_index],
                var_bytes(bytes(script_code)),
                amount.to_bytes(8, "little"),
                self._sequences[input_index],
                hash_outputs,
                self._locktime,
                hash_type.to_bytes(4, "little"),
            )
        )

    def bip143(
        self,
        input_index: int,
        script_code: bytes,
        amount: int,
        hash_type: int,
        *,
        strict: bool = True,
    ) -> bytes:
        """Segwit v0 signature hash (BIP143).

        ``script_code`` is the witness script (P2WSH, from the last executed
        OP_CODESEPARATOR on) or :func:`bip143_script_code_p2wpkh` (P2WPKH),
        without a length prefix. ``amount`` is the spent output's value.
        """
        return sha256d(
            self.bip143_preimage(input_index, script_code, amount, hash_type, strict=strict)
        )

    # -- BIP341 --

    def bip341_sigmsg(
        self,
        input_index: int,
        hash_type: int,
        *,
        leaf_hash: bytes | None = None,
        annex: bytes | None = None,
        codesep_pos: int = 0xFFFFFFFF,
    ) -> bytes:
        """The BIP341 message, starting with the epoch byte 0x00 (what TapSighash hashes)."""
        if hash_type not in TAPROOT_SIGHASH_TYPES:
            raise InvalidSighashType(
                f"sighash type {hash_type:#x} is not valid in taproot",
                hint="use DEFAULT, ALL, NONE or SINGLE, optionally with ANYONECANPAY",
            )
        self._check_index(input_index)
        tx = self.tx
        base = SIGHASH_ALL if hash_type == SIGHASH_DEFAULT else hash_type & 0x03
        anyone = bool(hash_type & SIGHASH_ANYONECANPAY)
        if base == SIGHASH_SINGLE and input_index >= len(tx.outputs):
            raise SighashSingleWithoutOutput(
                f"SIGHASH_SINGLE on input {input_index}, but the transaction has only "
                f"{len(tx.outputs)} outputs",
                hint="taproot forbids SIGHASH_SINGLE without a matching output",
            )
        if annex is not None and (not annex or annex[0] != 0x50):
            raise SighashError("a taproot annex must start with the byte 0x50")
        if leaf_hash is not None and len(leaf_hash) != 32:
            raise SighashError("a tapleaf hash is 32 bytes")
        if not 0 <= codesep_pos <= 0xFFFFFFFF:
            raise SighashError("codesep_pos must fit in 32 bits")

        parts = [b"\x00", bytes([hash_type]), self._version, self._locktime]
        if not anyone:
            parts += [self.sha_prevouts, self.sha_amounts, self.sha_scriptpubkeys]
            parts.append(self.sha_sequences)
        if base not in (SIGHASH_NONE, SIGHASH_SINGLE):
            parts.append(self.sha_outputs)
        ext_flag = 0 if leaf_hash is None else 1
        parts.append(bytes([2 * ext_flag + (annex is not None)]))
        if anyone:
            spent = self._spent[input_index] if self._spent is not None else None
            if spent is None:
                raise SighashError(
                    f"the output spent by input {input_index} is unknown",
                    hint="provide the spent output (witness UTXO) of the input being signed",
                )
            parts += [
                self._prevouts[input_index],
                spent.value.to_bytes(8, "little"),
                var_bytes(spent.script_pubkey),
                self._sequences[input_index],
            ]
        else:
            parts.append(input_index.to_bytes(4, "little"))
        if annex is not None:
            parts.append(sha256(var_bytes(annex)))
        if base == SIGHASH_SINGLE:
            parts.append(sha256(self._outputs[input_index]))
        if leaf_hash is not None:
            parts += [leaf_hash, b"\x00", codesep_pos.to_bytes(4, "little")]
        return b"".join(parts)

    def bip341(
        self,
        input_index: int,
        hash_type: int,
        *,
        leaf_hash: bytes | None = None,
        annex: bytes | None = None,
        codesep_pos: int = 0xFFFFFFFF,
    ) -> bytes:
        """Taproot signature hash (BIP341): key path, or script path when ``leaf_hash``
        is given (ext_flag 1, key_version 0, BIP342)."""
        msg = self.bip341_sigmsg(
            input_index, hash_type, leaf_hash=leaf_hash, annex=annex, codesep_pos=codesep_pos
        )
        return tagged_hash("TapSighash", msg)


def _cache_for(
    tx: Transaction, cache: SighashCache | None, spent: Sequence[TxOut | None] | None = None
) -> SighashCache:
    if cache is None:
        return SighashCache(tx, spent)
    if cache.tx is not tx:
        raise TransactionError("the sighash cache belongs to another transaction")
    return cache


def legacy_sighash(
    tx: Transaction,
    input_index: int,
    script_code: bytes,
    hash_type: int,
    *,
    strict: bool = True,
    cache: SighashCache | None = None,
) -> bytes:
    """Pre-segwit signature hash; see :meth:`SighashCache.legacy`."""
    return _cache_for(tx, cache).legacy(input_index, script_code, hash_type, strict=strict)


def bip143_sighash(
    tx: Transaction,
    input_index: int,
    script_code: bytes,
    amount: int,
    hash_type: int,
    *,
    strict: bool = True,
    cache: SighashCache | None = None,
) -> bytes:
    """Segwit v0 signature hash; see :meth:`SighashCache.bip143`. Pass a shared
    ``cache`` when signing several inputs of one transaction."""
    return _cache_for(tx, cache).bip143(input_index, script_code, amount, hash_type, strict=strict)


def bip341_sighash(
    tx: Transaction,
    input_index: int,
    spent_outputs: Sequence[TxOut | None],
    hash_type: int,
    *,
    leaf_hash: bytes | None = None,
    annex: bytes | None = None,
    codesep_pos: int = 0xFFFFFFFF,
    cache: SighashCache | None = None,
) -> bytes:
    """Taproot signature hash; see :meth:`SighashCache.bip341`. With ``cache``,
    its spent outputs are used and ``spent_outputs`` must be the same list."""
    c = _cache_for(tx, cache, spent_outputs)
    return c.bip341(
        input_index, hash_type, leaf_hash=leaf_hash, annex=annex, codesep_pos=codesep_pos
    )


__all__ = [
    "SIGHASH_ALL",
    "SIGHASH_ANYONECANPAY",
    "SIGHASH_DEFAULT",
    "SIGHASH_NONE",
    "SIGHASH_SINGLE",
    "SIGHASH_SINGLE_BUG_HASH",
    "STANDARD_SIGHASH_TYPES",
    "TAPROOT_SIGHASH_TYPES",
    "InvalidSighashType",
    "SighashCache",
    "SighashError",
    "SighashSingleWithoutOutput",
    "bip143_script_code_p2wpkh",
    "bip143_sighash",
    "bip341_sighash",
    "legacy_sighash",
    "sighash_name",
]
