"""Bitcoin transactions: parse and serialise (BIP144 segwit serialisation included).

Every reader takes a binary stream (``read_from``) and every writer returns
bytes (``serialize``), the pairing from which parse and serialize follow.
Hashes are kept in internal byte order; ``txid_hex`` gives the display form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO

from anyhsm.bitcoin.encoding import (
    as_stream,
    compact_size,
    read_compact_size,
    read_exact,
    read_var_bytes,
    sha256d,
    var_bytes,
)
from anyhsm.errors import EncodingError, TransactionError

MAX_MONEY = 21_000_000 * 100_000_000
_MAX_COUNT = 100_000


@dataclass(frozen=True)
class OutPoint:
    txid: bytes  # 32 bytes, internal byte order
    vout: int

    def serialize(self) -> bytes:
        return self.txid + self.vout.to_bytes(4, "little")

    @classmethod
    def read_from(cls, stream: BinaryIO) -> OutPoint:
        txid = read_exact(stream, 32, "outpoint")
        return cls(txid, int.from_bytes(read_exact(stream, 4, "outpoint"), "little"))

    def __str__(self) -> str:
        return f"{self.txid[::-1].hex()}:{self.vout}"


@dataclass
class TxIn:
    prevout: OutPoint
    script_sig: bytes = b""
    sequence: int = 0xFFFFFFFF
    witness: list[bytes] = field(default_factory=list)

    def serialize(self) -> bytes:
        return (
            self.prevout.serialize()
            + var_bytes(self.script_sig)
            + self.sequence.to_bytes(4, "little")
        )

    @classmethod
    def read_from(cls, stream: BinaryIO) -> TxIn:
        prevout = OutPoint.read_from(stream)
        script_sig = read_var_bytes(stream, "scriptSig")
        sequence = int.from_bytes(read_exact(stream, 4, "sequence"), "little")
        return cls(prevout, script_sig, sequence)


@dataclass
class TxOut:
    value: int  # satoshis
    script_pubkey: bytes

    def serialize(self) -> bytes:
        return self.value.to_bytes(8, "little") + var_bytes(self.script_pubkey)

    @classmethod
    def read_from(cls, stream: BinaryIO) -> TxOut:
        value = int.from_bytes(read_exact(stream, 8, "output amount"), "little", signed=True)
        if not 0 <= value <= MAX_MONEY:
            raise TransactionError(f"output amount {value} is out of range")
        return cls(value, read_var_bytes(stream, "scriptPubKey"))

    @classmethod
    def parse(cls, data: bytes) -> TxOut:
        n = len(data)
        if type(data) is bytes and n >= 9 and data[8] < 0xFD and n == 9 + data[8]:
            value = int.from_bytes(data[:8], "little", signed=True)
            if 0 <= value <= MAX_MONEY:  # else the reader's error
                return cls(value, data[9:])
        stream = as_stream(data)
        out = cls.read_from(stream)
        if stream.read(1):
            raise TransactionError("trailing bytes after output")
        return out


@dataclass
class Transaction:
    version: int = 2
    inputs: list[TxIn] = field(default_factory=list)
    outputs: list[TxOut] = field(default_factory=list)
    locktime: int = 0

    @property
    def has_witness(self) -> bool:
        return any(i.witness for i in self.inputs)

    def serialize(self, include_witness: bool = True) -> bytes:
        # the pieces of TxIn/TxOut.serialize inlined: a txid is computed for every
        # previous transaction a signer checks, and this halves its cost
        inputs, outputs = self.inputs, self.outputs
        witness = include_witness and self.has_witness
        parts = [self.version.to_bytes(4, "little", signed=True)]
        if witness:
            parts.append(b"\x00\x01")
        parts.append(compact_size(len(inputs)))
        for i in inputs:
            prevout, script = i.prevout, i.script_sig
            parts += (
                prevout.txid,
                prevout.vout.to_bytes(4, "little"),
                compact_size(len(script)),
                script,
                i.sequence.to_bytes(4, "little"),
            )
        parts.append(compact_size(len(outputs)))
        for o in outputs:
            script = o.script_pubkey
            parts += (o.value.to_bytes(8, "little"), compact_size(len(script)), script)
        if witness:
            for i in inputs:
                parts.append(compact_size(len(i.witness)))
                for item in i.witness:
                    parts += (compact_size(len(item)), item)
        parts.append(self.locktime.to_bytes(4, "little"))
        return b"".join(parts)

    def txid(self) -> bytes:
        """Transaction id in internal byte order."""
        return sha256d(self.serialize(include_witness=False))

    def txid_hex(self) -> str:
        return self.txid()[::-1].hex()

    def wtxid(self) -> bytes:
        return sha256d(self.serialize(include_witness=True))

    @classmethod
    def read_from(cls, stream: BinaryIO, *, allow_witness: bool = True) -> Transaction:
        try:
            version = int.from_bytes(read_exact(stream, 4, "version"), "little", signed=True)
            n_in = read_compact_size(stream, "input count")
            segwit = False
            if n_in == 0 and allow_witness:
                flag = read_exact(stream, 1, "segwit flag")[0]
                if flag != 1:
                    raise TransactionError("invalid segwit flag byte")
                segwit = True
                n_in = read_compact_size(stream, "input count")
                if n_in == 0:
                    raise TransactionError("segwit transaction with no inputs")
            if n_in > _MAX_COUNT:
                raise TransactionError("too many inputs")
            inputs = [TxIn.read_from(stream) for _ in range(n_in)]
            n_out = read_compact_size(stream, "output count")
            if n_out > _MAX_COUNT:
                raise TransactionError("too many outputs")
            outputs = [TxOut.read_from(stream) for _ in range(n_out)]
            if segwit:
                for txin in inputs:
                    n_items = read_compact_size(stream, "witness item count")
                    if n_items > _MAX_COUNT:
                        raise TransactionError("too many witness items")
                    txin.witness = [read_var_bytes(stream, "witness item") for _ in range(n_items)]
                if not any(i.witness for i in inputs):
                    raise TransactionError("segwit serialisation with empty witnesses")
            locktime = int.from_bytes(read_exact(stream, 4, "locktime"), "little")
        except EncodingError as e:
            raise TransactionError(f"malformed transaction: {e.message}") from None
        return cls(version, inputs, outputs, locktime)

    @classmethod
    def parse(cls, data: bytes | str, *, allow_witness: bool = True) -> Transaction:
        """Parse raw bytes or hex; trailing bytes are an error."""
        if isinstance(data, str):
            try:
                data = bytes.fromhex(data.strip())
            except ValueError:
                raise TransactionError("transaction hex is not valid hexadecimal") from None
        if type(data) is bytes and cls is Transaction:
            fast = _parse_fast(data, allow_witness)
            if fast is not None:
                return fast
        # anything the fast reader does not take (and every malformed transaction, so that
        # the error is the general reader's)
        stream = as_stream(data)
        tx = cls.read_from(stream, allow_witness=allow_witness)
        if stream.read(1):
            raise TransactionError("trailing bytes after transaction")
        return tx

    def copy(self) -> Transaction:
        return Transaction.parse(self.serialize())

    def vsize(self) -> int:
        base = len(self.serialize(include_witness=False))
        total = len(self.serialize(include_witness=True))
        weight = base * 3 + total
        return (weight + 3) // 4


def _parse_fast(data: bytes, allow_witness: bool) -> Transaction | None:
    """``Transaction.parse`` of well-formed data by offsets instead of a stream (a signer
    parses every input's previous transaction): the same transaction, or None for
    anything it does not take, which the general reader then parses or refuses with its
    error. It takes a subset: counts and lengths as one-byte or canonical 0xFD/0xFE
    compact sizes (at most 252 inputs, outputs and witness items), amounts in range, no
    trailing bytes, segwit only with a witness (tests/bitcoin/test_fast_paths.py compares
    it with the general reader on valid and damaged transactions)."""
    n = len(data)
    try:
        version = int.from_bytes(data[0:4], "little", signed=True)
        count = data[4]
        pos = 5
        segwit = False
        if count == 0:
            if not allow_witness or data[5] != 1:
                return None
            count, pos, segwit = data[6], 7, True
            if count == 0:
                return None
        if count >= 0xFD:
            return None
        inputs: list[TxIn] = []
        for _ in range(count):
            end = pos + 36
            size = data[end]
            pos = end + 1
            if size >= 0xFD:
                size, pos = _fast_size(data, size, pos)
            script_end = pos + size
            seq_end = script_end + 4
            if seq_end > n:
                return None
            inputs.append(
                TxIn(
                    OutPoint(
                        data[end - 36 : end - 4], int.from_bytes(data[end - 4 : end], "little")
                    ),
                    data[pos:script_end],
                    int.from_bytes(data[script_end:seq_end], "little"),
                )
            )
            pos = seq_end
        count = data[pos]
        pos += 1
        if count >= 0xFD:
            return None
        outputs: list[TxOut] = []
        for _ in range(count):
            value = int.from_bytes(data[pos : pos + 8], "little", signed=True)
            size = data[pos + 8]
            pos += 9
            if size >= 0xFD:
                size, pos = _fast_size(data, size, pos)
            end = pos + size
            if end > n or not 0 <= value <= MAX_MONEY:
                return None
            outputs.append(TxOut(value, data[pos:end]))
            pos = end
        if segwit:
            for txin in inputs:
                items = data[pos]
                pos += 1
                if items >= 0xFD:
                    return None
                witness = []
                for _ in range(items):
                    size = data[pos]
                    pos += 1
                    if size >= 0xFD:
                        size, pos = _fast_size(data, size, pos)
                    end = pos + size
                    if end > n:
                        return None
                    witness.append(data[pos:end])
                    pos = end
                txin.witness = witness
            if not any(i.witness for i in inputs):
                return None
        if pos + 4 != n:
            return None
        return Transaction(version, inputs, outputs, int.from_bytes(data[pos:], "little"))
    except (IndexError, _NotFast):
        return None


class _NotFast(Exception):
    """A compact size the fast reader leaves to the general one."""


def _fast_size(data: bytes, first: int, pos: int) -> tuple[int, int]:
    """A 0xFD or 0xFE compact size at ``pos`` (after its first byte), canonical only."""
    if first == 0xFD:
        end, minimum = pos + 2, 0xFD
    elif first == 0xFE:
        end, minimum = pos + 4, 0x10000
    else:
        raise _NotFast
    if end > len(data):
        raise _NotFast
    value = int.from_bytes(data[pos:end], "little")
    if value < minimum or value > 4_000_000:  # read_var_bytes's limit
        raise _NotFast
    return value, end
