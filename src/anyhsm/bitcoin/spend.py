"""What a PSBT input spends, worked out from public data only.

:func:`describe_input` classifies an input from its UTXO fields and scripts and runs
BIP174's signer checks (is the NON_WITNESS_UTXO the transaction spent, does the
WITNESS_UTXO match it, do the redeem and witness scripts hash to what the output
commits to); the signer, the policy, the size estimate and the finalizer all start
from its answer (Bitcoin Core's ``SignatureData`` plays this part there).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from anyhsm.bitcoin.encoding import hash160, sha256
from anyhsm.bitcoin.psbt import PsbtInput
from anyhsm.bitcoin.script import OP_1, ScriptType, classify, iter_ops, p2pkh
from anyhsm.bitcoin.sighash import SIGHASH_DEFAULT
from anyhsm.bitcoin.tx import TxOut
from anyhsm.errors import ScriptError


class SpendKind(enum.Enum):
    """How an input is spent, as far as signing and finalizing care."""

    P2PKH = "p2pkh"
    P2PK = "p2pk"
    P2SH = "p2sh"  # legacy P2SH: the redeem script runs without segwit
    P2SH_P2WPKH = "p2sh-p2wpkh"
    P2WPKH = "p2wpkh"
    P2WSH = "p2wsh"
    P2SH_P2WSH = "p2sh-p2wsh"
    P2TR = "p2tr"
    BARE = "bare"  # bare multisig or another legacy script
    UNKNOWN = "unknown"  # no previous output, a future witness version, or non-standard

    @property
    def segwit_v0(self) -> bool:
        return self in _SEGWIT_V0

    @property
    def legacy(self) -> bool:
        return self in _LEGACY


_SEGWIT_V0 = frozenset(
    {SpendKind.P2WPKH, SpendKind.P2SH_P2WPKH, SpendKind.P2WSH, SpendKind.P2SH_P2WSH}
)
_LEGACY = frozenset({SpendKind.P2PKH, SpendKind.P2PK, SpendKind.P2SH, SpendKind.BARE})


@dataclass(frozen=True)
class SpendInfo:
    """What one input spends.

    ``script_code`` is the script whose signature check the sighash commits to
    (without length prefix): the scriptPubKey (P2PKH, P2PK, bare), the redeem script
    (legacy P2SH), the witness script (P2WSH) or the P2PKH script of the key hash
    (P2WPKH, BIP143). ``problem`` is an inconsistency that makes the input unsafe to
    sign (a BIP174 signer check failed); ``unsignable`` says why the input cannot be
    signed although nothing is wrong with it (a redeem script not given yet...).
    """

    kind: SpendKind
    spent: TxOut | None
    script_code: bytes | None = None
    redeem_script: bytes | None = None
    witness_script: bytes | None = None
    problem: str | None = None
    unsignable: str | None = None

    @property
    def amount(self) -> int | None:
        return None if self.spent is None else self.spent.value


def describe_input(inp: PsbtInput) -> SpendInfo:
    """Classify an input from its UTXO fields and scripts; run BIP174's signer checks."""
    nwu = inp.non_witness_utxo
    if nwu is not None:
        if nwu.txid() != inp.previous_txid:
            return SpendInfo(
                SpendKind.UNKNOWN,
                None,
                problem="PSBT_IN_NON_WITNESS_UTXO is not the transaction the input spends "
                "(its txid differs)",
            )
        if inp.output_index >= len(nwu.outputs):
            return SpendInfo(
                SpendKind.UNKNOWN,
                None,
                problem=f"PSBT_IN_NON_WITNESS_UTXO has no output {inp.output_index}",
            )
        spent: TxOut | None = nwu.outputs[inp.output_index]
        if inp.witness_utxo is not None and inp.witness_utxo != spent:
            return SpendInfo(
                SpendKind.UNKNOWN,
                spent,
                problem="PSBT_IN_WITNESS_UTXO does not match the spent output in "
                "PSBT_IN_NON_WITNESS_UTXO (amount or script differ)",
            )
    else:
        spent = inp.witness_utxo
    if spent is None:
        return SpendInfo(
            SpendKind.UNKNOWN,
            None,
            problem="previous output not provided (no PSBT_IN_NON_WITNESS_UTXO or "
            "PSBT_IN_WITNESS_UTXO)",
        )
    info = _classify_spend(inp, spent)
    if info.problem is None and info.unsignable is None and info.kind.legacy and nwu is None:
        return SpendInfo(
            info.kind,
            spent,
            info.script_code,
            info.redeem_script,
            problem="a PSBT_IN_WITNESS_UTXO is given for a non-segwit input; its amount "
            "cannot be verified without PSBT_IN_NON_WITNESS_UTXO",
        )
    return info


def _classify_spend(inp: PsbtInput, spent: TxOut) -> SpendInfo:
    spk = spent.script_pubkey
    n = len(spk)
    if n == 22 and spk[0] == 0 and spk[1] == 20:  # the common cases first, as classify()
        return SpendInfo(SpendKind.P2WPKH, spent, p2pkh(spk[2:]))  # would find them
    if n == 34 and spk[0] == OP_1 and spk[1] == 32:
        return SpendInfo(SpendKind.P2TR, spent)
    info = classify(spk)
    t = info.type
    if t is ScriptType.P2PKH:
        return SpendInfo(SpendKind.P2PKH, spent, spk)
    if t is ScriptType.P2PK:
        return SpendInfo(SpendKind.P2PK, spent, spk)
    if t is ScriptType.MULTISIG:
        return SpendInfo(SpendKind.BARE, spent, spk)
    if t is ScriptType.P2WPKH:
        return SpendInfo(SpendKind.P2WPKH, spent, p2pkh(info.data))
    if t is ScriptType.P2WSH:
        return _witness_script(inp, spent, SpendKind.P2WSH, info.data, None)
    if t is ScriptType.P2TR:
        return SpendInfo(SpendKind.P2TR, spent)
    if t is ScriptType.P2SH:
        rs = inp.redeem_script
        if rs is None:
            return SpendInfo(
                SpendKind.P2SH, spent, unsignable="the P2SH redeem script is not given"
            )
        if hash160(rs) != info.data:
            return SpendInfo(
                SpendKind.P2SH,
                spent,
                problem="PSBT_IN_REDEEM_SCRIPT does not hash to the P2SH scriptPubKey",
            )
        inner = classify(rs)
        if inner.type is ScriptType.P2WPKH:
            return SpendInfo(SpendKind.P2SH_P2WPKH, spent, p2pkh(inner.data), rs)
        if inner.type is ScriptType.P2WSH:
            return _witness_script(inp, spent, SpendKind.P2SH_P2WSH, inner.data, rs)
        if inner.witness_version is not None:
            return SpendInfo(
                SpendKind.UNKNOWN,
                spent,
                redeem_script=rs,
                unsignable=f"P2SH-wrapped witness version {inner.witness_version} cannot be signed",
            )
        return SpendInfo(SpendKind.P2SH, spent, rs, rs)
    if t is ScriptType.WITNESS_UNKNOWN:
        return SpendInfo(
            SpendKind.UNKNOWN,
            spent,
            unsignable=f"witness version {info.witness_version} cannot be signed",
        )
    if t is ScriptType.OP_RETURN:
        return SpendInfo(SpendKind.UNKNOWN, spent, unsignable="spends an OP_RETURN output")
    return SpendInfo(SpendKind.BARE, spent, spk)


def _witness_script(
    inp: PsbtInput, spent: TxOut, kind: SpendKind, program: bytes, rs: bytes | None
) -> SpendInfo:
    ws = inp.witness_script
    if ws is None:
        return SpendInfo(kind, spent, None, rs, unsignable="the witness script is not given")
    if sha256(ws) != program:
        return SpendInfo(
            kind,
            spent,
            None,
            rs,
            problem="PSBT_IN_WITNESS_SCRIPT does not hash to the P2WSH program"
            + (" in the redeem script" if rs is not None else ""),
        )
    return SpendInfo(kind, spent, ws, rs, ws)


def script_pushes(script: bytes) -> set[bytes]:
    """Every data push of ``script`` (empty when it does not parse)."""
    try:
        return {op.data for op in iter_ops(script) if op.data}
    except ScriptError:
        return set()


def script_pushes_in_order(script: bytes) -> list[bytes]:
    """The data pushes of ``script`` in order (empty when it does not parse)."""
    try:
        return [op.data for op in iter_ops(script) if op.data]
    except ScriptError:
        return []


_KEY_HASH_KINDS = frozenset({SpendKind.P2PKH, SpendKind.P2WPKH, SpendKind.P2SH_P2WPKH})
_P2PKH_HEAD, _P2PKH_TAIL = p2pkh(bytes(20))[:3], p2pkh(bytes(20))[23:]


def key_in_script(pubkey: bytes, info: SpendInfo) -> bool:
    """Whether a signature by ``pubkey`` (33 or 65 bytes) can help spend this input."""
    if info.script_code is None:
        return False
    kind = info.kind
    if kind in _KEY_HASH_KINDS:  # the script code is the P2PKH script of the key hash
        code = info.script_code
        return (
            len(code) == 25
            and code[:3] == _P2PKH_HEAD
            and code[23:] == _P2PKH_TAIL
            and code[3:23] == hash160(pubkey)
        )
    pushes = script_pushes(info.script_code)
    return pubkey in pushes or hash160(pubkey) in pushes


def default_sighash(inp: PsbtInput, kind: SpendKind) -> int:
    """PSBT_IN_SIGHASH_TYPE, else DEFAULT for taproot and ALL for everything else."""
    if inp.sighash_type is not None:
        return inp.sighash_type
    return SIGHASH_DEFAULT if kind is SpendKind.P2TR else 0x01
