"""PSBT finalizer and transaction extractor (BIP174 roles) for standard scripts.

Builds PSBT_IN_FINAL_SCRIPTSIG / PSBT_IN_FINAL_SCRIPTWITNESS for P2PKH, P2PK,
P2WPKH, P2SH-P2WPKH, taproot key path (and script path for single-key
``<x> OP_CHECKSIG`` leaves), and multisig (also sorted multisig) in P2WSH,
P2SH-P2WSH, legacy P2SH and bare outputs; single-key P2PK/P2PKH witness scripts
too. Every signature is verified against its sighash before it is used: an
invalid signature is left out (and reported), never put into a transaction.
A finalized input keeps only its UTXO fields, the final scripts, the transaction
fields (v2), proprietary and unknown pairs, as BIP174 requires. When every input
is final, the network transaction is extracted.

The PSBT passed in is never modified: the result holds a finalized copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from anyhsm.bitcoin.encoding import hash160
from anyhsm.bitcoin.psbt import Psbt, PsbtInput
from anyhsm.bitcoin.script import OP_CHECKSIG, ScriptType, classify, push_data
from anyhsm.bitcoin.sighash import SIGHASH_DEFAULT, STANDARD_SIGHASH_TYPES, SighashCache
from anyhsm.bitcoin.spend import SpendInfo, SpendKind, describe_input
from anyhsm.bitcoin.taproot import TAPROOT_LEAF_TAPSCRIPT, leaf_hash, verify_control_block
from anyhsm.bitcoin.tx import Transaction
from anyhsm.crypto import secp256k1 as ec
from anyhsm.errors import HsmError


@dataclass(frozen=True)
class FinalizeInputReport:
    """One input: ``status`` is "finalized", "already-final" or "incomplete"."""

    index: int
    script_type: str
    status: str
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "script_type": self.script_type,
            "status": self.status,
            "reason": self.reason,
        }


@dataclass
class FinalizeResult:
    """The finalized PSBT (a copy), whether every input is final, and the extracted tx."""

    psbt: Psbt
    complete: bool
    tx: Transaction | None
    inputs: list[FinalizeInputReport]

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "psbt": self.psbt.to_base64(),
            "complete": self.complete,
            "inputs": [r.to_dict() for r in self.inputs],
        }
        if self.tx is not None:
            out["tx"] = self.tx.serialize().hex()
            out["txid"] = self.tx.txid_hex()
            out["vsize"] = self.tx.vsize()
        return out


class _Incomplete(Exception):
    """Internal: this input cannot be finalized yet (the reason is the message)."""


def finalize_psbt(psbt: Psbt) -> FinalizeResult:
    """Finalize every input that has enough valid signatures; extract the tx if all are final."""
    work = psbt.copy()
    infos = [describe_input(inp) for inp in work.inputs]
    cache = SighashCache(work.unsigned_tx(), [i.spent for i in infos])
    reports: list[FinalizeInputReport] = []
    for index, (inp, info) in enumerate(zip(work.inputs, infos, strict=True)):
        kind = info.kind.value
        if inp.is_finalized:
            reports.append(FinalizeInputReport(index, kind, "already-final"))
            continue
        try:
            script_sig, witness = _finalize_input(cache, index, inp, info)
        except _Incomplete as e:
            reports.append(FinalizeInputReport(index, kind, "incomplete", str(e)))
            continue
        inp.finalize(script_sig, witness)
        reports.append(FinalizeInputReport(index, kind, "finalized"))
    complete = all(inp.is_finalized for inp in work.inputs)
    tx = work.extract_transaction() if complete else None
    return FinalizeResult(work, complete, tx, reports)


def _finalize_input(
    cache: SighashCache, index: int, inp: PsbtInput, info: SpendInfo
) -> tuple[bytes | None, list[bytes] | None]:
    if info.problem is not None:
        raise _Incomplete(info.problem)
    if info.unsignable is not None:
        raise _Incomplete(info.unsignable)
    k = info.kind
    if k is SpendKind.P2TR:
        return None, _taproot(cache, index, inp, info)
    assert info.spent is not None
    sigs = _EcdsaSigs(cache, index, inp, info)
    if k is SpendKind.P2WPKH or k is SpendKind.P2SH_P2WPKH:
        assert info.script_code is not None
        items = sigs.for_hash(info.script_code[3:23])
        script_sig = push_data(info.redeem_script) if info.redeem_script is not None else None
        return script_sig, items
    if k is SpendKind.P2WSH or k is SpendKind.P2SH_P2WSH:
        assert info.witness_script is not None
        items = [*sigs.satisfy(info.witness_script), info.witness_script]
        script_sig = push_data(info.redeem_script) if info.redeem_script is not None else None
        return script_sig, items
    if k is SpendKind.P2SH:
        assert info.redeem_script is not None
        items = [*sigs.satisfy(info.redeem_script), info.redeem_script]
        return b"".join(push_data(x) for x in items), None
    if k in (SpendKind.P2PKH, SpendKind.P2PK, SpendKind.BARE):
        items = sigs.satisfy(info.spent.script_pubkey)
        return b"".join(push_data(x) for x in items), None
    raise _Incomplete("the finalizer does not handle this kind of input")


class _EcdsaSigs:
    """The input's partial signatures that verify, looked up by public key."""

    def __init__(self, cache: SighashCache, index: int, inp: PsbtInput, info: SpendInfo) -> None:
        self._cache, self._index, self._inp, self._info = cache, index, inp, info
        self.invalid: list[bytes] = []

    def valid(self, pub: bytes) -> bytes | None:
        sig = self._inp.partial_sigs.get(pub)
        if sig is None:
            return None
        if len(sig) < 9 or sig[-1] not in STANDARD_SIGHASH_TYPES:
            self.invalid.append(pub)
            return None
        info = self._info
        assert info.script_code is not None and info.spent is not None
        try:
            if info.kind.segwit_v0:
                digest = self._cache.bip143(
                    self._index, info.script_code, info.spent.value, sig[-1]
                )
            else:
                digest = self._cache.legacy(self._index, info.script_code, sig[-1])
        except HsmError:
            self.invalid.append(pub)
            return None
        if not ec.ecdsa_verify(pub, digest, sig[:-1]):
            self.invalid.append(pub)
            return None
        return sig

    def _bad(self) -> str:
        if not self.invalid:
            return ""
        keys = ", ".join(p.hex()[:16] + "..." for p in self.invalid)
        return f"; signatures that do not verify were left out ({keys})"

    def for_hash(self, pubkey_hash: bytes) -> list[bytes]:
        """[signature, public key] for the key with this hash160."""
        for pub in self._inp.partial_sigs:
            if hash160(pub) == pubkey_hash:
                sig = self.valid(pub)
                if sig is not None:
                    return [sig, pub]
        raise _Incomplete("no valid signature for the input's key" + self._bad())

    def satisfy(self, script: bytes) -> list[bytes]:
        """Stack items (without the script itself) that satisfy a standard script."""
        info = classify(script)
        if info.type is ScriptType.MULTISIG:
            m, keys = info.required, info.pubkeys
            found: list[bytes] = []
            for pub in keys:  # CHECKMULTISIG wants the signatures in key order
                sig = self.valid(pub)
                if sig is not None:
                    found.append(sig)
                if len(found) == m:
                    return [b"", *found]
            raise _Incomplete(
                f"{m}-of-{len(keys)} multisig has {len(found)} valid signature(s)" + self._bad()
            )
        if info.type is ScriptType.P2PK:
            sig = self.valid(info.data)
            if sig is None:
                raise _Incomplete("no valid signature for the input's key" + self._bad())
            return [sig]
        if info.type is ScriptType.P2PKH:
            return self.for_hash(info.data)
        raise _Incomplete(
            f"the finalizer does not handle {info.type.value} scripts; finalize this input "
            "with the software that built it"
        )


def _schnorr_valid(
    cache: SighashCache, index: int, key: bytes, sig: bytes, leaf: bytes | None
) -> bool:
    if len(sig) not in (64, 65) or (len(sig) == 65 and sig[64] == SIGHASH_DEFAULT):
        return False
    hash_type = SIGHASH_DEFAULT if len(sig) == 64 else sig[64]
    try:
        digest = cache.bip341(index, hash_type, leaf_hash=leaf)
    except HsmError:
        return False
    return ec.schnorr_verify(key, digest, sig[:64])


def _taproot(cache: SighashCache, index: int, inp: PsbtInput, info: SpendInfo) -> list[bytes]:
    assert info.spent is not None
    q = info.spent.script_pubkey[2:]
    notes: list[str] = []
    if inp.tap_key_sig is not None:
        if _schnorr_valid(cache, index, q, inp.tap_key_sig, None):
            return [inp.tap_key_sig]
        notes.append("the key-path signature does not verify")
    best: list[bytes] | None = None
    for cb, ls in inp.tap_leaf_scripts.items():
        script = ls.script
        if (
            ls.leaf_version != TAPROOT_LEAF_TAPSCRIPT
            or len(script) != 34
            or script[0] != 32
            or script[33] != OP_CHECKSIG
        ):
            continue
        xonly = script[1:33]
        lh = leaf_hash(script, ls.leaf_version)
        sig = inp.tap_script_sigs.get((xonly, lh))
        if sig is None:
            continue
        try:
            committed = verify_control_block(q, script, cb)
        except HsmError:
            committed = False
        if not committed:
            notes.append(f"leaf {lh.hex()[:16]}...: the control block does not match the output")
            continue
        if not _schnorr_valid(cache, index, xonly, sig, lh):
            notes.append(f"leaf {lh.hex()[:16]}...: the script-path signature does not verify")
            continue
        witness = [sig, script, cb]
        if best is None or _size(witness) < _size(best):
            best = witness
    if best is not None:
        return best
    raise _Incomplete(
        "; ".join(notes) if notes else "no taproot signature (key path or single-key leaf)"
    )


def _size(items: Sequence[bytes]) -> int:
    return sum(len(i) for i in items)


__all__ = ["FinalizeInputReport", "FinalizeResult", "finalize_psbt"]
