"""PSBT operations: parse, inspect (with the fee), sign, finalize, create, combine.

``inspect`` needs no keys and no handle: what an input spends
(:func:`anyhsm.bitcoin.spend.describe_input`), where each output goes
(:func:`anyhsm.bitcoin.policy.describe_output`), the estimated size and the fee. ``sign``
goes through the handle and the signing policy (:func:`anyhsm.bitcoin.signer.sign_psbt`);
``finalize`` through :func:`anyhsm.bitcoin.finalizer.finalize_psbt`. Script types are
named in the one vocabulary of :class:`anyhsm.bitcoin.script_kind.ScriptKind`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anyhsm.bitcoin.psbt import Psbt
from anyhsm.bitcoin.script_kind import ScriptKind
from anyhsm.errors import PsbtError
from anyhsm.ops.data import Data
from anyhsm.types import KeyRef, Network

if TYPE_CHECKING:
    from anyhsm.bitcoin.finalizer import FinalizeResult
    from anyhsm.bitcoin.signer import SignResult
    from anyhsm.hsm import Hsm


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Derivation(Data):
    """A key the PSBT says is involved, and where it comes from (``[fp/path]``);
    ``leaves``: for a taproot key in an input, how many script leaves it signs for."""

    pubkey: bytes
    origin: str
    leaves: int | None = None

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        if self.leaves is None:  # BIP32 derivations have no leaves member (contract)
            del out["leaves"]
        return out


@dataclass(frozen=True)
class InspectedInput(Data):
    index: int
    prevout: str  # txid:vout
    sequence: int
    script_type: ScriptKind
    amount: int | None  # satoshis; None when the previous output is not given
    script_pubkey: bytes | None
    sighash: str | None
    has_non_witness_utxo: bool
    derivations: tuple[Derivation, ...]
    partial_sigs: tuple[bytes, ...]  # the public keys that signed
    tap_key_sig: bool
    tap_script_sigs: int
    finalized: bool
    problem: str | None


@dataclass(frozen=True)
class InspectedOutput(Data):
    index: int
    amount: int
    script_type: ScriptKind
    address: str | None  # None for a script without an address (OP_RETURN...)
    script_pubkey: bytes
    change: bool  # never known without keys: False
    owner: str | None
    path: str | None
    note: str | None
    derivations: tuple[Derivation, ...]


@dataclass(frozen=True)
class PsbtInspection(Data):
    """What a PSBT holds and what it would spend. ``fee`` (and ``fee_rate``, sat/vB) are
    None when some input's previous output is not given; ``vsize`` is an estimate of the
    finished transaction, ``notes`` say where it had to guess."""

    version: int
    unsigned_txid: str
    locktime: int
    network: Network
    inputs: tuple[InspectedInput, ...]
    outputs: tuple[InspectedOutput, ...]
    fee: int | None
    vsize: int
    fee_rate: float | None
    finalized: bool
    notes: tuple[str, ...]


# --- operations ------------------------------------------------------------------------------


def parse_psbt(data: bytes | str, *, max_bytes: int | None = None, source: str = "input") -> Psbt:
    """A PSBT from raw bytes, base64 or hex; ``max_bytes`` (the policy's
    ``max_psbt_bytes``) refuses an oversized one before any decoding work. ``source``
    names where it came from in the error for an empty one."""
    if not data.strip():
        raise PsbtError(f"{source} is empty; no PSBT to read")
    return Psbt.parse(data, max_bytes=max_bytes)


def inspect_psbt(psbt: Psbt, network: Network = Network.MAINNET) -> PsbtInspection:
    """Inputs, outputs (addresses on ``network``), estimated size and fee of a PSBT."""
    from anyhsm.bitcoin.policy import describe_output, estimate_vsize
    from anyhsm.bitcoin.sighash import sighash_name
    from anyhsm.bitcoin.spend import describe_input

    infos = [describe_input(i) for i in psbt.inputs]
    inputs: list[InspectedInput] = []
    for n, (inp, info) in enumerate(zip(psbt.inputs, infos, strict=True)):
        derivations = [Derivation(k, o.to_string()) for k, o in inp.bip32_derivations.items()]
        derivations += [
            Derivation(k, t.origin.to_string(), len(t.leaf_hashes))
            for k, t in inp.tap_bip32_derivations.items()
        ]
        inputs.append(
            InspectedInput(
                index=n,
                prevout=str(inp.prevout),
                sequence=inp.sequence,
                script_type=ScriptKind.of_spend(info.kind),
                amount=info.amount,
                script_pubkey=None if info.spent is None else info.spent.script_pubkey,
                sighash=None if inp.sighash_type is None else sighash_name(inp.sighash_type),
                has_non_witness_utxo=inp.non_witness_utxo is not None,
                derivations=tuple(derivations),
                partial_sigs=tuple(inp.partial_sigs),
                tap_key_sig=inp.tap_key_sig is not None,
                tap_script_sigs=len(inp.tap_script_sigs),
                finalized=inp.is_finalized,
                problem=info.problem,
            )
        )
    outputs: list[InspectedOutput] = []
    for n, out in enumerate(psbt.outputs):
        rep = describe_output(n, out, network, lambda _p, _o: None, {})
        derivations = [Derivation(k, v.to_string()) for k, v in out.bip32_derivations.items()]
        derivations += [
            Derivation(k, t.origin.to_string()) for k, t in out.tap_bip32_derivations.items()
        ]
        outputs.append(
            InspectedOutput(
                index=n,
                amount=rep.amount,
                script_type=_output_kind(out.script),
                address=rep.address,
                script_pubkey=rep.script_pubkey,
                change=rep.change,
                owner=rep.owner,
                path=rep.path,
                note=rep.note or None,
                derivations=tuple(derivations),
            )
        )
    vsize, notes = estimate_vsize(psbt, infos)
    fee: int | None = None
    if all(i.amount is not None for i in infos):
        fee = sum(i.amount or 0 for i in infos) - sum(o.amount for o in psbt.outputs)
    return PsbtInspection(
        version=psbt.version,
        unsigned_txid=psbt.unique_id()[::-1].hex(),
        locktime=psbt.locktime(),
        network=network,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        fee=fee,
        vsize=vsize,
        fee_rate=None if fee is None else round(fee / vsize, 3),
        finalized=bool(psbt.inputs) and psbt.is_finalized(),
        notes=tuple(notes),
    )


def _output_kind(script: bytes) -> ScriptKind:
    from anyhsm.bitcoin.script import classify

    return ScriptKind.of_script(classify(script).type)


def sign_psbt(
    hsm: Hsm,
    psbt: Psbt | bytes | str,
    key: KeyRef | Sequence[KeyRef] | None = None,
    *,
    grind_low_r: bool = True,
) -> SignResult:
    """Sign every input ``key`` (one key, several, or, when None, any key of the handle)
    can sign (one policy decision and one audit entry for them all), after the
    signing policy's checks, under the handle's policy, network and environment; audited
    (``psbt_sign``). A PSBT given as data is parsed under the policy's ``max_psbt_bytes``.
    The PSBT given is not modified: the result holds a signed copy (``result.psbt``).
    ``grind_low_r=False`` only to reproduce signers that do not grind (test vectors).
    An active spending policy (:mod:`anyhsm.policy`) decides, and debits its budgets,
    after the signer's own checks and before any signature."""
    from anyhsm.bitcoin.signer import sign_psbt as sign
    from anyhsm.policy import spending_gate

    cfg = hsm.config
    if not isinstance(psbt, Psbt):
        psbt = parse_psbt(psbt, max_bytes=cfg.policy.max_psbt_bytes)
    return sign(
        hsm,
        psbt,
        key,
        policy=cfg.policy,
        network=hsm.network,
        environment=cfg.environment,
        grind_low_r=grind_low_r,
        spending=spending_gate(hsm),
    )


def finalize_psbt(psbt: Psbt) -> FinalizeResult:
    """Finalize every input with enough valid signatures; the transaction when all are."""
    from anyhsm.bitcoin.finalizer import finalize_psbt as finalize

    return finalize(psbt)


@dataclass(frozen=True)
class PsbtData:
    """A PSBT an operation made (``create``, ``combine``): base64 in JSON."""

    psbt: Psbt

    def to_dict(self) -> dict[str, object]:
        return {"psbt": self.psbt.to_base64(), "unsigned_txid": self.psbt.unique_id()[::-1].hex()}


def create_psbt(
    inputs: Sequence[str],
    outputs: Sequence[str],
    network: Network,
    *,
    locktime: int = 0,
    replaceable: bool | None = None,
    tx_version: int = 2,
    psbt_version: int = 0,
) -> PsbtData:
    """An unsigned PSBT as Bitcoin Core's ``createpsbt`` builds it (no keys, no handle):
    inputs ``txid:vout[:sequence]``, outputs ``address=amount`` (BTC, or ``N sat``) or
    ``data=hex``, addresses checked against ``network``; ``replaceable`` None is Core's
    default sequence (:func:`anyhsm.bitcoin.psbt_tools.create_psbt`)."""
    from anyhsm.bitcoin.psbt_tools import create_psbt as create

    return PsbtData(
        create(
            list(inputs),
            list(outputs),
            network,
            locktime=locktime,
            replaceable=replaceable,
            tx_version=tx_version,
            psbt_version=psbt_version,
        )
    )


def combine_psbts(psbts: Sequence[Psbt]) -> PsbtData:
    """BIP174's Combiner, as Core's ``combinepsbt``: left to right, the first value kept."""
    from anyhsm.bitcoin.psbt_tools import combine_psbts as combine

    return PsbtData(combine(list(psbts)))
