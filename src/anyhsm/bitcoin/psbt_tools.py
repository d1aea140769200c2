"""PSBT Creator and Combiner as Bitcoin Core's ``createpsbt`` and ``combinepsbt`` RPCs do them.

:func:`create_psbt` builds an unsigned PSBT from inputs (``txid:vout[:sequence]``) and
outputs (``address=amount`` in BTC, ``address=N sat``, or ``data=hex``) with Core's
rules (``ConstructTransaction`` in ``rpc/rawtransaction_util.cpp``):

- sequence: given per input, else 0xfffffffd (BIP125 replaceable; Core's default since
  v24), else with ``replaceable=False`` 0xfffffffe when a lock time is set and
  0xffffffff otherwise; ``replaceable=True`` with sequences that do not signal
  replaceability is refused, as Core refuses it;
- ``data=hex`` is ``OP_RETURN <data pushed as data>`` with value 0 (at most one, as Core);
  an address may appear once;
- transaction version 1 to 3 (default 2), lock time 0 to 0xffffffff (default 0);
- a version 0 PSBT with empty maps, as Core writes it (``psbt_version=2`` for BIP370).

Stricter than Core: the same previous output twice is refused (such a transaction can
never be valid).

:func:`combine_psbts` merges PSBTs of one transaction left to right (the first wins a
conflicting value, as in Core's ``CombinePSBTs``); the result serialises in Core's order,
so it has Core's bytes whatever order the PSBTs come in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from anyhsm.bitcoin.address import script_from_address
from anyhsm.bitcoin.psbt import Psbt, PsbtInput, PsbtOutput
from anyhsm.bitcoin.script import op_return
from anyhsm.bitcoin.tx import MAX_MONEY, OutPoint, Transaction, TxIn, TxOut
from anyhsm.errors import PsbtError
from anyhsm.types import Network

SEQUENCE_FINAL = 0xFFFFFFFF
MAX_SEQUENCE_NONFINAL = 0xFFFFFFFE  # lock time enforced, not replaceable
MAX_BIP125_RBF_SEQUENCE = 0xFFFFFFFD
TX_MIN_VERSION, TX_MAX_VERSION = 1, 3  # Core's TX_MIN/MAX_STANDARD_VERSION
DEFAULT_TX_VERSION = 2
_COIN = 100_000_000
_MAX_PSBT_INPUTS = 100_000  # far beyond any standard transaction; bounds the work
_SPACE = " \t\r\n"  # what may surround a spec (str.strip() would take any Unicode space)


@dataclass(frozen=True)
class InputSpec:
    """One input to create: the previous output, and its nSequence (None: Core's default)."""

    prevout: OutPoint
    sequence: int | None = None

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """``txid:vout`` or ``txid:vout:sequence`` (txid as displayed, 64 hex digits)."""
        parts = text.strip(_SPACE).split(":")
        if len(parts) not in (2, 3):
            raise _input_error(text, "expected txid:vout or txid:vout:sequence")
        txid_hex, vout_text = parts[0], parts[1]
        if not re.fullmatch(r"[0-9a-fA-F]{64}", txid_hex):
            raise _input_error(text, "the txid must be 64 hex digits")
        vout = _uint(vout_text, "vout", text)
        sequence = _uint(parts[2], "sequence", text) if len(parts) == 3 else None
        return cls(OutPoint(bytes.fromhex(txid_hex)[::-1], vout), sequence)


@dataclass(frozen=True)
class OutputSpec:
    """One output to create: its scriptPubKey and value in satoshis; ``address`` is the
    address it was given as (None for ``data=``)."""

    script_pubkey: bytes
    amount: int
    address: str | None = None

    @classmethod
    def parse(cls, text: str, network: Network) -> OutputSpec:
        """``address=amount`` (BTC with up to 8 decimals, or ``N sat``) or ``data=hex``."""
        name, sep, value = text.strip(_SPACE).partition("=")
        name, value = name.strip(_SPACE), value.strip(_SPACE)
        if not sep or not name:
            raise _output_error(text, "expected address=amount or data=hex")
        if name == "data":
            if len(value) % 2 or not re.fullmatch(r"[0-9a-fA-F]*", value):
                raise _output_error(text, "data must be hex (an even number of digits)")
            return cls(op_return(bytes.fromhex(value)), 0)
        return cls(script_from_address(name, network), parse_amount(value), name)

    @property
    def txout(self) -> TxOut:
        return TxOut(self.amount, self.script_pubkey)


def parse_amount(text: str) -> int:
    """Satoshis from ``"0.5"`` / ``"1"`` (BTC, at most 8 decimals, as Core's
    ``AmountFromValue``) or ``"1500 sat"`` / ``"1500sat"``; 0 to 21,000,000 BTC."""
    t = text.strip(_SPACE).lower()
    m = re.fullmatch(r"([0-9]{1,16}) *(?:sat|sats)", t)
    if m:
        sats = int(m.group(1))
    else:
        m = re.fullmatch(r"([0-9]{1,8})(?:\.([0-9]{0,8}))?", t)
        if not m:
            raise PsbtError(
                f"invalid amount {text!r}",
                field="output amount",
                hint="give BTC with at most 8 decimals (0.001) or satoshis (100000 sat)",
            )
        sats = int(m.group(1)) * _COIN + int((m.group(2) or "").ljust(8, "0"))
    if not 0 <= sats <= MAX_MONEY:
        raise PsbtError(f"amount {text!r} is out of range", field="output amount")
    return sats


def create_psbt(
    inputs: Sequence[InputSpec | str],
    outputs: Sequence[OutputSpec | str],
    network: Network,
    *,
    locktime: int = 0,
    replaceable: bool | None = None,
    tx_version: int = DEFAULT_TX_VERSION,
    psbt_version: int = 0,
) -> Psbt:
    """An unsigned PSBT of the transaction Bitcoin Core's ``createpsbt`` would build.

    ``replaceable=None`` is Core's default (every input without a sequence gets
    0xfffffffd); ``False`` makes them final or lock-time enforcing; ``True`` also checks
    that the given sequences signal replaceability. Strings are parsed with
    :meth:`InputSpec.parse` and :meth:`OutputSpec.parse` (addresses on ``network``)."""
    if not 0 <= locktime <= 0xFFFFFFFF:
        raise PsbtError(f"lock time {locktime} is out of range (0 to 4294967295)", field="locktime")
    if not TX_MIN_VERSION <= tx_version <= TX_MAX_VERSION:
        raise PsbtError(
            f"transaction version {tx_version} is out of range "
            f"({TX_MIN_VERSION} to {TX_MAX_VERSION})",
            field="tx_version",
        )
    if psbt_version not in (0, 2):
        raise PsbtError(
            f"PSBT version {psbt_version} does not exist (0 or 2)", field="PSBT_GLOBAL_VERSION"
        )
    if len(inputs) > _MAX_PSBT_INPUTS or len(outputs) > _MAX_PSBT_INPUTS:
        raise PsbtError("too many inputs or outputs", field="inputs")
    ins = [i if isinstance(i, InputSpec) else InputSpec.parse(i) for i in inputs]
    outs = [o if isinstance(o, OutputSpec) else OutputSpec.parse(o, network) for o in outputs]
    seen: set[OutPoint] = set()
    for spec in ins:
        if spec.prevout in seen:
            raise PsbtError(f"input {spec.prevout} is given twice", field="inputs")
        seen.add(spec.prevout)
    _check_outputs(outs)
    if replaceable is False:
        default = MAX_SEQUENCE_NONFINAL if locktime else SEQUENCE_FINAL
    else:
        default = MAX_BIP125_RBF_SEQUENCE
    txins = [TxIn(s.prevout, b"", default if s.sequence is None else s.sequence) for s in ins]
    if replaceable is True and txins and not any(t.sequence < 0xFFFFFFFE for t in txins):
        raise PsbtError(
            "the sequence numbers contradict replaceable=True: none signals BIP125",
            field="sequence",
            hint="leave the sequences out, or give one below 0xfffffffe",
        )
    tx = Transaction(tx_version, txins, [o.txout for o in outs], locktime)
    if psbt_version == 0:
        return Psbt.from_unsigned_tx(tx)
    return Psbt.create_v2(
        [PsbtInput.from_outpoint(t.prevout, t.sequence) for t in txins],
        [PsbtOutput.from_txout(o.txout) for o in outs],
        tx_version=tx_version,
        fallback_locktime=locktime,
    )


def combine_psbts(psbts: Sequence[Psbt | bytes | str]) -> Psbt:
    """BIP174 Combiner over several PSBTs of one transaction, as Core's ``combinepsbt``:
    merged left to right, the first PSBT's value kept where two differ. The inputs are
    not modified. Raises PsbtError naming the PSBT (by position) that does not fit."""
    if not psbts:
        raise PsbtError("nothing to combine: give at least one PSBT", field="psbts")
    parsed = [p if isinstance(p, Psbt) else Psbt.parse(p) for p in psbts]
    combined = parsed[0].copy()
    for n, other in enumerate(parsed[1:], start=1):
        try:
            combined = combined.combine(other)
        except PsbtError as e:
            raise PsbtError(f"PSBT {n}: {e.message}", field=e.field, hint=e.hint) from None
    return combined


def _check_outputs(outs: Sequence[OutputSpec]) -> None:
    addresses: set[bytes] = set()
    data = 0
    for o in outs:
        if o.address is None:
            data += 1
            if data > 1:
                raise PsbtError("data is given twice (at most one OP_RETURN output)", field="data")
        elif o.script_pubkey in addresses:
            raise PsbtError(f"address {o.address} is given twice", field="outputs")
        else:
            addresses.add(o.script_pubkey)


def _uint(text: str, what: str, spec: str) -> int:
    digits = text.strip(_SPACE)
    if not re.fullmatch(r"[0-9]{1,10}", digits):  # ASCII digits only (\d takes any script's)
        raise _input_error(spec, f"the {what} must be a number")
    n = int(digits)
    if n > 0xFFFFFFFF:
        raise _input_error(spec, f"the {what} is out of range (0 to 4294967295)")
    return n


def _input_error(text: str, why: str) -> PsbtError:
    return PsbtError(f"invalid input {text!r}: {why}", field="inputs", hint="txid:vout[:sequence]")


def _output_error(text: str, why: str) -> PsbtError:
    return PsbtError(
        f"invalid output {text!r}: {why}", field="outputs", hint="address=amount or data=hex"
    )


__all__ = [
    "DEFAULT_TX_VERSION",
    "MAX_BIP125_RBF_SEQUENCE",
    "InputSpec",
    "OutputSpec",
    "combine_psbts",
    "create_psbt",
    "parse_amount",
]
