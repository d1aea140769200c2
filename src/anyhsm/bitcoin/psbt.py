"""Partially Signed Bitcoin Transactions: BIP174 (v0), BIP370 (v2), BIP371 (taproot fields),
BIP373 (MuSig2 fields), and BIP322's PSBT_GLOBAL_GENERIC_SIGNED_MESSAGE.

``Psbt.parse`` takes raw bytes, base64 or hex and either returns a fully validated,
typed PSBT or raises :class:`PsbtError` naming the field that is wrong; no other
exception escapes it. ``serialize`` writes every map in Bitcoin Core's order (see
:mod:`anyhsm.bitcoin.psbt_maps`) and keeps unknown and proprietary pairs byte for byte,
so a PSBT Bitcoin Core wrote round-trips exactly, and signing, combining or rebuilding a
PSBT gives the bytes Core would write, whatever order the fields were added in.

Both versions share one model: the transaction is held in the per-input and per-output
maps (previous txid, index, sequence; amount, script) plus the global transaction
version and lock time. A v0 PSBT writes them as PSBT_GLOBAL_UNSIGNED_TX, a v2 PSBT as
its own fields, which makes ``to_v0`` / ``to_v2`` a change of ``version`` only.
"""

from __future__ import annotations

import base64
import binascii
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import TypeVar

from anyhsm.bitcoin.bip32 import KeyOrigin
from anyhsm.bitcoin.encoding import compact_size, read_compact_size, read_exact, var_bytes
from anyhsm.bitcoin.psbt_fields import (
    MAGIC,
    V2_ONLY_GLOBAL,
    GlobalType,
    InputType,
    LeafScript,
    MuSig2Key,
    OutputType,
    ProprietaryField,
    TapKeyOrigin,
    TapTreeLeaf,
    UnknownField,
    check_pubkey,
    decode_origin,
    encode_origin,
    exact_compact_size,
    global_name,
    input_name,
    parse_proprietary,
    u32,
)
from anyhsm.bitcoin.psbt_maps import (
    PsbtInput,
    PsbtOutput,
    Record,
    field_context,
    iter_fields,
    no_key_data,
    tail_records,
)
from anyhsm.bitcoin.tx import Transaction, TxIn, TxOut
from anyhsm.errors import (
    BitcoinError,
    EncodingError,
    PsbtError,
    PsbtLimitExceeded,
    TransactionError,
)

__all__ = [
    "GlobalType",
    "InputType",
    "LeafScript",
    "MuSig2Key",
    "OutputType",
    "ProprietaryField",
    "Psbt",
    "PsbtGlobals",
    "PsbtInput",
    "PsbtOutput",
    "TapKeyOrigin",
    "TapTreeLeaf",
    "UnknownField",
]

_MAX_VALUE = 4_000_000 * 4  # larger than any transaction a PSBT can carry
_TX_MODIFIABLE_INPUTS = 0x01
_TX_MODIFIABLE_OUTPUTS = 0x02
_TX_HAS_SIGHASH_SINGLE = 0x04


_M = TypeVar("_M", "PsbtGlobals", PsbtInput, PsbtOutput)
_IMMUTABLE = frozenset({type(None), bytes, int, bool, str, tuple})


def _copy_map(m: _M) -> _M:
    """A copy of one PSBT map with fresh containers (see :meth:`Psbt.copy`)."""
    cls = type(m)
    new = cls.__new__(cls)
    fields = m.__dict__.copy()
    for name, value in fields.items():  # replaces values only: safe while iterating
        kind = type(value)
        if kind in _IMMUTABLE:
            continue
        if kind is dict or kind is list:
            fields[name] = value.copy()
        elif kind is TxOut:
            fields[name] = TxOut(value.value, value.script_pubkey)
        elif kind is Transaction:  # PSBT_IN_NON_WITNESS_UTXO: deepcopy cost 100 us a tx
            fields[name] = _copy_tx(value)
        else:  # a type a caller put there: copied in full
            fields[name] = copy.deepcopy(value)
    new.__dict__ = fields
    return new


def _copy_tx(tx: Transaction) -> Transaction:
    """A full copy of a transaction (outpoints are frozen; scripts and witnesses bytes)."""
    if type(tx) is not Transaction or any(
        type(i) is not TxIn or type(i.witness) is not list for i in tx.inputs
    ):
        return copy.deepcopy(tx)
    return Transaction(
        tx.version,
        [TxIn(i.prevout, i.script_sig, i.sequence, list(i.witness)) for i in tx.inputs],
        [TxOut(o.value, o.script_pubkey) for o in tx.outputs],
        tx.locktime,
    )


@dataclass
class PsbtGlobals:
    """The global map, less the transaction itself (held by the input and output maps).

    ``version_field`` is PSBT_GLOBAL_VERSION as written (None when absent, which means 0).
    ``fallback_locktime`` is PSBT_GLOBAL_FALLBACK_LOCKTIME in v2 and the unsigned
    transaction's nLockTime in v0.
    """

    tx_version: int = 2
    fallback_locktime: int | None = None
    tx_modifiable: int | None = None
    version_field: int | None = None
    xpubs: dict[bytes, KeyOrigin] = field(default_factory=dict)  # 78-byte xpub -> origin
    generic_signed_message: bytes | None = None  # BIP322 PSBT_GLOBAL_GENERIC_SIGNED_MESSAGE
    proprietary: list[ProprietaryField] = field(default_factory=list)
    unknown: list[UnknownField] = field(default_factory=list)


@dataclass
class Psbt:
    """A PSBT of version 0 or 2. Build one with :meth:`parse`, :meth:`from_unsigned_tx` or
    :meth:`create_v2`."""

    global_map: PsbtGlobals = field(default_factory=PsbtGlobals)
    inputs: list[PsbtInput] = field(default_factory=list)
    outputs: list[PsbtOutput] = field(default_factory=list)
    # bytes of the raw PSBT this one was parsed from (None if built in code): lets the
    # signer's size limit (anyhsm.bitcoin.limits) judge submitted data without
    # serialising it again; not part of the value
    parsed_size: int | None = field(default=None, compare=False, repr=False)

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_unsigned_tx(cls, tx: Transaction) -> Psbt:
        """BIP174 Creator: a v0 PSBT around a transaction with empty scriptSigs and witnesses."""
        name = global_name(GlobalType.UNSIGNED_TX)
        for i, txin in enumerate(tx.inputs):
            if txin.script_sig or txin.witness:
                raise PsbtError(
                    f"{name}: input {i} has a scriptSig or witness; the unsigned "
                    "transaction must have neither",
                    field=name,
                )
        return cls(
            PsbtGlobals(tx_version=tx.version, fallback_locktime=tx.locktime),
            [PsbtInput.from_outpoint(i.prevout, i.sequence) for i in tx.inputs],
            [PsbtOutput.from_txout(o) for o in tx.outputs],
        )

    @classmethod
    def create_v2(
        cls,
        inputs: Sequence[PsbtInput] = (),
        outputs: Sequence[PsbtOutput] = (),
        *,
        tx_version: int = 2,
        fallback_locktime: int | None = None,
        tx_modifiable: int | None = None,
    ) -> Psbt:
        """BIP370 Creator (and Constructor, when inputs and outputs are given)."""
        if tx_modifiable is not None and not 0 <= tx_modifiable <= 0xFF:
            raise PsbtError("PSBT_GLOBAL_TX_MODIFIABLE: flags must fit in one byte")
        g = PsbtGlobals(
            tx_version=tx_version,
            fallback_locktime=fallback_locktime,
            tx_modifiable=tx_modifiable,
            version_field=2,
        )
        return cls(g, list(inputs), list(outputs))

    def add_input(self, inp: PsbtInput) -> None:
        """BIP370 Constructor: append an input if PSBT_GLOBAL_TX_MODIFIABLE allows it."""
        self._check_modifiable(_TX_MODIFIABLE_INPUTS, "inputs")
        self.inputs.append(inp)

    def add_output(self, out: PsbtOutput) -> None:
        """BIP370 Constructor: append an output if PSBT_GLOBAL_TX_MODIFIABLE allows it."""
        self._check_modifiable(_TX_MODIFIABLE_OUTPUTS, "outputs")
        self.outputs.append(out)

    def _check_modifiable(self, flag: int, what: str) -> None:
        name = global_name(GlobalType.TX_MODIFIABLE)
        if self.version != 2:
            raise PsbtError(f"{what} can only be added to a version 2 PSBT", field=name)
        if not (self.global_map.tx_modifiable or 0) & flag:
            raise PsbtError(f"{name}: the {what} modifiable flag is not set", field=name)

    # --- the transaction ------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The PSBT version: 0 or 2."""
        return self.global_map.version_field or 0

    def locktime(self) -> int:
        """nLockTime: v0 takes the unsigned transaction's; v2 runs BIP370's algorithm."""
        fallback = self.global_map.fallback_locktime or 0
        heights = [i.required_height_locktime for i in self.inputs]
        times = [i.required_time_locktime for i in self.inputs]
        constrained = [
            (h, t) for h, t in zip(heights, times, strict=True) if (h, t) != (None, None)
        ]
        if not constrained:
            return fallback
        if all(h is not None for h, _ in constrained):
            return max(h for h, _ in constrained if h is not None)
        if all(t is not None for _, t in constrained):
            return max(t for _, t in constrained if t is not None)
        name = input_name(InputType.REQUIRED_TIME_LOCKTIME)
        raise PsbtError(
            f"{name}: the inputs require both a time-based and a height-based lock time "
            "and no one lock time type satisfies all of them",
            field=name,
        )

    def unsigned_tx(self) -> Transaction:
        """The transaction being signed (empty scriptSigs and witnesses), for either version."""
        return Transaction(
            self.global_map.tx_version,
            [TxIn(i.prevout, b"", i.sequence) for i in self.inputs],
            [o.txout() for o in self.outputs],
            self.locktime(),
        )

    def unique_id(self) -> bytes:
        """The PSBT's identity (internal byte order): the unsigned txid in v0; in v2 the txid
        with every sequence set to 0, as BIP370 defines it."""
        tx = self.unsigned_tx()
        if self.version == 2:
            for txin in tx.inputs:
                txin.sequence = 0
        return tx.txid()

    def spent_outputs(self) -> list[TxOut] | None:
        """The outputs every input spends, or None if any input lacks its UTXO."""
        spent = [i.spent_output() for i in self.inputs]
        if any(s is None for s in spent):
            return None
        return [s for s in spent if s is not None]

    def fee(self) -> int | None:
        spent = self.spent_outputs()
        if spent is None:
            return None
        return sum(s.value for s in spent) - sum(o.amount for o in self.outputs)

    # --- roles ----------------------------------------------------------------------------

    def copy(self) -> Psbt:
        """An independent copy: no map, container or record is shared with this PSBT.

        Field values are bytes, numbers, tuples and frozen records, held directly or in
        dicts and lists, so copying the containers (and the few mutable records: TxOut,
        Transaction) is a full copy of a parsed PSBT, several times faster than
        ``copy.deepcopy``, which dominated signing PSBTs with many inputs. A field value
        of another type (a caller's OrderedDict, bytearray...) is deep-copied; mutable
        values a caller put inside a dict or list stay shared."""
        return Psbt(
            _copy_map(self.global_map),
            [_copy_map(i) for i in self.inputs],
            [_copy_map(o) for o in self.outputs],
        )  # not parsed_size: a copy is a new value, free to change

    def to_v0(self) -> Psbt:
        """The same transaction as a version 0 PSBT (lock time and sequences made explicit)."""
        new = self.copy()
        if self.version == 0:
            return new
        g = new.global_map
        g.fallback_locktime = self.locktime()
        g.tx_modifiable = None
        g.version_field = None
        for inp in new.inputs:
            inp.sequence_number = inp.sequence
            inp.required_time_locktime = inp.required_height_locktime = None
        return new

    def to_v2(self) -> Psbt:
        """The same transaction as a version 2 PSBT (the v0 lock time becomes the fallback)."""
        new = self.copy()
        if self.version == 0:
            new.global_map.fallback_locktime = self.locktime()
            new.global_map.version_field = 2
        return new

    def combine(self, other: Psbt) -> Psbt:
        """BIP174 Combiner: a new PSBT with every key-value pair of both (ours on a clash),
        merged as Bitcoin Core's ``PartiallySignedTransaction::Merge`` does (for v2, the
        modifiable flags are ANDed and "has SIGHASH_SINGLE" ORed). Serialised, the result
        is in Core's order whichever PSBT comes first."""
        if self.version != other.version:
            raise PsbtError(
                f"cannot combine a version {self.version} PSBT with a version {other.version} one",
                field="PSBT_GLOBAL_VERSION",
            )
        if (
            len(self.inputs) != len(other.inputs)
            or len(self.outputs) != len(other.outputs)
            or self.unique_id() != other.unique_id()
        ):
            raise PsbtError(
                "cannot combine PSBTs for different transactions", field="PSBT_GLOBAL_UNSIGNED_TX"
            )
        new, theirs = self.copy(), other.copy()
        g, h = new.global_map, theirs.global_map
        if g.fallback_locktime is None:
            g.fallback_locktime = h.fallback_locktime
        if g.tx_modifiable is not None or h.tx_modifiable is not None:
            # as Bitcoin Core: a modification both allow stays allowed (AND), and the
            # "has SIGHASH_SINGLE" flag of either is kept (OR)
            ours, theirs_flags = g.tx_modifiable or 0, h.tx_modifiable or 0
            g.tx_modifiable = (ours & theirs_flags & ~_TX_HAS_SIGHASH_SINGLE) | (
                (ours | theirs_flags) & _TX_HAS_SIGHASH_SINGLE
            )
        for k, v in h.xpubs.items():
            g.xpubs.setdefault(k, v)
        if g.generic_signed_message is None:
            g.generic_signed_message = h.generic_signed_message
        keys = {p.key for p in g.proprietary}
        g.proprietary += [p for p in h.proprietary if p.key not in keys]
        g.proprietary.sort(key=lambda p: p.key)
        keys = {u.key for u in g.unknown}
        g.unknown += [u for u in h.unknown if u.key not in keys]
        g.unknown.sort(key=lambda u: u.key)
        for a, b in zip(new.inputs, theirs.inputs, strict=True):
            a.merge(b)
        for c, d in zip(new.outputs, theirs.outputs, strict=True):
            c.merge(d)
        return new

    def is_finalized(self) -> bool:
        return all(i.is_finalized for i in self.inputs)

    def extract_transaction(self) -> Transaction:
        """BIP174 Transaction Extractor: the network transaction, once every input is final."""
        tx = self.unsigned_tx()
        for n, (inp, txin) in enumerate(zip(self.inputs, tx.inputs, strict=True)):
            if not inp.is_finalized:
                raise PsbtError(
                    f"input {n} is not finalized (no PSBT_IN_FINAL_SCRIPTSIG or "
                    "PSBT_IN_FINAL_SCRIPTWITNESS)",
                    field="PSBT_IN_FINAL_SCRIPTSIG",
                    hint="run a finalizer before extracting",
                )
            txin.script_sig = inp.final_scriptsig or b""
            txin.witness = list(inp.final_scriptwitness or [])
        return tx

    # --- serialisation --------------------------------------------------------------------

    def _global_records(self) -> list[Record]:
        """The global map in Bitcoin Core's order: the unsigned transaction (v0), the xpubs
        (by origin, then key and chain code, as Core's map of sets), the v2 fields, the
        version, then proprietary and unknown pairs sorted by key."""
        g = self.global_map
        T = GlobalType
        out: list[Record] = []
        if self.version == 0:
            if g.tx_modifiable is not None or any(
                i.required_time_locktime is not None or i.required_height_locktime is not None
                for i in self.inputs
            ):
                raise PsbtError(
                    "a version 0 PSBT cannot hold PSBT_GLOBAL_TX_MODIFIABLE or required lock "
                    "times; convert with to_v0() first",
                    field="PSBT_GLOBAL_VERSION",
                )
            out.append((b"\x00", self.unsigned_tx().serialize(False)))
        xpubs = sorted(g.xpubs.items(), key=lambda kv: _xpub_order(kv[0], kv[1]))
        out += [(b"\x01" + k, encode_origin(v)) for k, v in xpubs]
        if self.version == 2:
            out.append((b"\x02", g.tx_version.to_bytes(4, "little", signed=True)))
            if g.fallback_locktime is not None:
                out.append((b"\x03", g.fallback_locktime.to_bytes(4, "little")))
            out.append((b"\x04", compact_size(len(self.inputs))))
            out.append((b"\x05", compact_size(len(self.outputs))))
            if g.tx_modifiable is not None:
                out.append((b"\x06", bytes([g.tx_modifiable])))
        if g.version_field is not None:
            out.append((bytes([T.VERSION]), g.version_field.to_bytes(4, "little")))
        proprietary, unknown = tail_records(g.proprietary, g.unknown)
        if g.generic_signed_message is not None:  # BIP322's; unknown to Core: sorted with those
            key = bytes([T.GENERIC_SIGNED_MESSAGE])
            unknown = sorted([*unknown, (key, g.generic_signed_message)])
        return out + proprietary + unknown

    def serialize(self) -> bytes:
        """The binary PSBT. Raises PsbtError if a field was set to a value it cannot hold."""
        if self.version not in (0, 2):
            raise PsbtError(
                f"PSBT_GLOBAL_VERSION: cannot write PSBT version {self.version}",
                field="PSBT_GLOBAL_VERSION",
            )
        for n, inp in enumerate(self.inputs):
            if len(inp.previous_txid) != 32:
                name = input_name(InputType.PREVIOUS_TXID)
                raise PsbtError(f"{name}: must be 32 bytes (input {n})", field=name)
        try:
            return self._serialize()
        except (OverflowError, ValueError) as e:
            raise PsbtError(
                f"cannot serialise: a field holds an out-of-range value ({e})"
            ) from None

    def _serialize(self) -> bytes:
        parts = [MAGIC]

        def write_map(records: list[Record]) -> None:
            parts.extend(var_bytes(k) + var_bytes(v) for k, v in records)
            parts.append(b"\x00")

        write_map(self._global_records())
        for inp in self.inputs:
            write_map(inp.records(self.version))
        for out in self.outputs:
            write_map(out.records(self.version))
        return b"".join(parts)

    def to_base64(self) -> str:
        return base64.b64encode(self.serialize()).decode("ascii")

    def to_hex(self) -> str:
        return self.serialize().hex()

    # --- parsing --------------------------------------------------------------------------

    @classmethod
    def parse(
        cls, data: bytes | bytearray | memoryview | str, *, max_bytes: int | None = None
    ) -> Psbt:
        """Parse raw bytes, base64 text or hex text. Raises only :class:`PsbtError`.

        ``max_bytes`` (such as ``policy.max_psbt_bytes``) refuses a larger PSBT with
        :class:`PsbtLimitExceeded` before decoding it (text may be up to twice as long:
        hex)."""
        if max_bytes is not None and len(data) > 2 * max_bytes:
            raise _too_large(len(data), max_bytes)
        try:
            raw = _decode_container(data)
            if max_bytes is not None and len(raw) > max_bytes:
                raise _too_large(len(raw), max_bytes)
            return cls._parse_raw(raw)
        except PsbtError:
            raise
        except (BitcoinError, ValueError, IndexError, KeyError, OverflowError, TypeError) as e:
            detail = e.message if isinstance(e, BitcoinError) else str(e)
            raise PsbtError(f"malformed PSBT: {detail}") from None

    @classmethod
    def _parse_raw(cls, raw: bytes) -> Psbt:
        stream = BytesIO(raw)
        if stream.read(len(MAGIC)) != MAGIC:
            raise PsbtError(
                "not a PSBT: the data does not start with the magic bytes 'psbt\\xff'",
                field="magic",
            )
        size = len(raw)

        def read_map(where: str) -> list[Record]:
            # by offsets; the stream reader for what the fast one does not take (and for
            # every malformed map, so that the error is its own)
            at = stream.tell()
            found = _read_map_fast(raw, at)
            if found is None:
                return _read_map(stream, size, where)
            stream.seek(found[1])
            return found[0]

        global_records = read_map("global map")
        g, unsigned_tx, counts = _parse_globals(global_records)
        version = g.version_field or 0
        if unsigned_tx is not None:
            n_in, n_out = len(unsigned_tx.inputs), len(unsigned_tx.outputs)
        else:
            n_in, n_out = counts
        inputs = []
        for i in range(n_in):
            records = read_map(f"input {i}")
            tx_in = unsigned_tx.inputs[i] if unsigned_tx is not None else None
            inputs.append(PsbtInput.from_records(records, version=version, index=i, tx_in=tx_in))
        outputs = []
        for i in range(n_out):
            records = read_map(f"output {i}")
            tx_out = unsigned_tx.outputs[i] if unsigned_tx is not None else None
            outputs.append(
                PsbtOutput.from_records(records, version=version, index=i, tx_out=tx_out)
            )
        rest = stream.read()
        if rest:
            raise PsbtError(
                f"{len(rest)} bytes of trailing data after the last output map",
                field="trailing data",
            )
        if unsigned_tx is not None:
            g.tx_version = unsigned_tx.version
            g.fallback_locktime = unsigned_tx.locktime
        return cls(g, inputs, outputs, len(raw))

    def __str__(self) -> str:
        return f"Psbt(v{self.version}, {len(self.inputs)} inputs, {len(self.outputs)} outputs)"


# --- parsing helpers --------------------------------------------------------------------------


def _xpub_order(xpub: bytes, origin: KeyOrigin) -> tuple[bytes, int, tuple[int, ...], bytes, bytes]:
    """Bitcoin Core's order of PSBT_GLOBAL_XPUB: its ``std::map<KeyOriginInfo,
    std::set<CExtPubKey>>`` sorts by fingerprint, path length, path, then by the extended
    key's public key and chain code."""
    return (origin.fingerprint, len(origin.path), origin.path, xpub[45:], xpub[13:45])


def _too_large(size: int, limit: int) -> PsbtLimitExceeded:
    return PsbtLimitExceeded(
        f"PSBT refused before parsing: {size} bytes, more than {limit} (policy.max_psbt_bytes)",
        field="policy.max_psbt_bytes",
        hint="split the transaction, or raise the limit if this size is expected",
    )


def _decode_container(data: bytes | bytearray | memoryview | str) -> bytes:
    """Raw PSBT bytes from raw bytes, base64 or hex (text or ASCII bytes)."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if isinstance(data, bytes):
        if data.startswith(MAGIC):
            return data
        try:
            data = data.decode("ascii")
        except UnicodeDecodeError:
            raise PsbtError(_NOT_A_PSBT, field="magic") from None
    if not isinstance(data, str):
        raise PsbtError("a PSBT must be given as bytes or text", field="magic")
    text = "".join(data.split())
    if not text.startswith(_BASE64_MAGIC) and _is_hex(text):
        return bytes.fromhex(text)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PsbtError("not a PSBT: the text is neither base64 nor hex", field="magic") from None


_NOT_A_PSBT = (
    "not a PSBT: the data is neither raw bytes starting with the magic bytes 'psbt\\xff' "
    "nor base64 or hex text of such bytes"
)
_BASE64_MAGIC = base64.b64encode(MAGIC).decode()[:6]  # "cHNidP"
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _is_hex(text: str) -> bool:
    return len(text) % 2 == 0 and all(c in _HEX_DIGITS for c in text)


def _read_map_fast(raw: bytes, pos: int) -> tuple[list[Record], int] | None:
    """The records of the map at ``pos`` and the offset after its separator, read by
    offsets; None for anything :func:`_read_map` should read instead: a map missing or
    cut short, a key or value length that is not a one-byte or canonical 0xFD/0xFE
    compact size, a value over the bound (tests/bitcoin/test_fast_paths.py compares
    the two)."""
    n = len(raw)
    records: list[Record] = []
    try:
        if pos >= n:
            return None
        while True:
            key_len = raw[pos]
            pos += 1
            if key_len == 0:
                return records, pos
            if key_len >= 0xFD:
                return None
            key_end = pos + key_len
            value_len = raw[key_end]
            value_at = key_end + 1
            if value_len >= 0xFD:
                if value_len == 0xFD:
                    value_len, floor, value_at = (
                        int.from_bytes(raw[value_at : value_at + 2], "little"),
                        0xFD,
                        value_at + 2,
                    )
                elif value_len == 0xFE:
                    value_len, floor, value_at = (
                        int.from_bytes(raw[value_at : value_at + 4], "little"),
                        0x10000,
                        value_at + 4,
                    )
                else:
                    return None
                if value_at > n or value_len < floor or value_len > _MAX_VALUE:
                    return None
            end = value_at + value_len
            if end > n:
                return None
            records.append((raw[pos:key_end], raw[value_at:end]))
            pos = end
    except IndexError:
        return None


def _read_map(stream: BytesIO, size: int, where: str) -> list[Record]:
    """The raw key-value records of one map, up to and without its 0x00 separator."""
    if not stream.read(1):
        raise PsbtError(
            f"{where} is missing: the PSBT ends before all its maps (the transaction has more "
            "inputs or outputs than the PSBT has maps)",
            field=where,
        )
    stream.seek(-1, 1)
    records: list[Record] = []
    while True:
        at_end = stream.tell() >= size
        try:
            key_len = read_compact_size(stream, "key length")
        except EncodingError as e:
            detail = "the PSBT ends before the map's 0x00 separator" if at_end else e.message
            raise PsbtError(f"{where}: {detail}", field=where) from None
        if key_len == 0:
            return records
        try:
            key = read_exact(stream, key_len, "key")
            value_len = read_compact_size(stream, "value length")
            if value_len > _MAX_VALUE:
                raise EncodingError(f"value length {value_len} is implausibly large")
            value = read_exact(stream, value_len, "value")
        except EncodingError as e:
            raise PsbtError(
                f"{where}: key-value pair {len(records)} runs past the end of the data "
                f"({e.message})",
                field=where,
            ) from None
        records.append((key, value))


def _parse_globals(
    records: list[Record],
) -> tuple[PsbtGlobals, Transaction | None, tuple[int, int]]:
    where = "global map"
    g = PsbtGlobals()
    tx: Transaction | None = None
    counts = [0, 0]
    seen: set[int] = set()
    T = GlobalType
    for key_type, name, key_data, key, value in iter_fields(
        records, global_name, "PSBT_GLOBAL", where
    ):
        with field_context(name, where):
            if key_type == T.XPUB:
                if len(key_data) != 78:
                    raise PsbtError(f"key holds {len(key_data)} bytes, an extended key is 78 bytes")
                check_pubkey(key_data[45:], "extended key's public key")
                g.xpubs[key_data] = decode_origin(value)
            elif key_type == T.PROPRIETARY:
                g.proprietary.append(parse_proprietary(key_data, value))
            elif key_type in _GLOBAL_SCALARS:
                no_key_data(key_data)
                if key_type == T.UNSIGNED_TX:
                    tx = _parse_unsigned_tx(value)
                elif key_type == T.TX_VERSION:
                    g.tx_version = int.from_bytes(_four(value), "little", signed=True)
                elif key_type == T.FALLBACK_LOCKTIME:
                    g.fallback_locktime = u32(value)
                elif key_type == T.INPUT_COUNT:
                    counts[0] = exact_compact_size(value)
                elif key_type == T.OUTPUT_COUNT:
                    counts[1] = exact_compact_size(value)
                elif key_type == T.TX_MODIFIABLE:
                    if len(value) != 1:
                        raise PsbtError(f"value is {len(value)} bytes, the flags are 1 byte")
                    g.tx_modifiable = value[0]
                elif key_type == T.GENERIC_SIGNED_MESSAGE:
                    g.generic_signed_message = value
                else:  # VERSION
                    g.version_field = u32(value)
            else:
                g.unknown.append(UnknownField(key, value))
        seen.add(key_type)
    g.proprietary.sort(key=lambda p: p.key)  # held in the order they are written
    g.unknown.sort(key=lambda u: u.key)
    version = g.version_field or 0
    if version == 0:
        if T.UNSIGNED_TX not in seen:
            name = global_name(T.UNSIGNED_TX)
            raise PsbtError(f"{name}: missing (required in PSBT version 0)", field=name)
        for key_type in sorted(seen & V2_ONLY_GLOBAL):
            name = global_name(key_type)
            raise PsbtError(f"{name}: not allowed in PSBT version 0", field=name)
    elif version == 2:
        if T.UNSIGNED_TX in seen:
            name = global_name(T.UNSIGNED_TX)
            raise PsbtError(
                f"{name}: not allowed in PSBT version 2 (PSBT_GLOBAL_VERSION is 2)", field=name
            )
        for required in (T.TX_VERSION, T.INPUT_COUNT, T.OUTPUT_COUNT):
            if required not in seen:
                name = global_name(required)
                raise PsbtError(f"{name}: missing (required in PSBT version 2)", field=name)
    else:
        name = global_name(T.VERSION)
        raise PsbtError(
            f"{name}: unsupported PSBT version {version} (this parser reads versions 0 and 2)",
            field=name,
        )
    return g, tx, (counts[0], counts[1])


_GLOBAL_SCALARS = frozenset(
    {
        GlobalType.UNSIGNED_TX,
        GlobalType.TX_VERSION,
        GlobalType.FALLBACK_LOCKTIME,
        GlobalType.INPUT_COUNT,
        GlobalType.OUTPUT_COUNT,
        GlobalType.TX_MODIFIABLE,
        GlobalType.GENERIC_SIGNED_MESSAGE,
        GlobalType.VERSION,
    }
)


def _four(value: bytes) -> bytes:
    if len(value) != 4:
        raise PsbtError(f"value is {len(value)} bytes, expected a 4-byte integer")
    return value


def _parse_unsigned_tx(value: bytes) -> Transaction:
    """PSBT_GLOBAL_UNSIGNED_TX: always the non-witness serialisation, with empty scriptSigs."""
    try:
        tx = Transaction.parse(value, allow_witness=False)
    except TransactionError as e:
        if value[4:6] == b"\x00\x01":
            raise PsbtError(
                "the transaction uses the segwit serialisation; an unsigned transaction is "
                f"always serialised without witness data ({e.message})"
            ) from None
        raise
    for i, txin in enumerate(tx.inputs):
        if txin.script_sig:
            raise PsbtError(
                f"input {i} has a non-empty scriptSig; an unsigned transaction has none"
            )
    return tx
