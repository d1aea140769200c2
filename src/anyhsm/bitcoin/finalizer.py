"""PSBT finalizer and transaction extractor (BIP174 roles) for standard scripts.

Builds PSBT_IN_FINAL_SCRIPTSIG / PSBT_IN_FINAL_SCRIPTWITNESS for P2PKH, P2PK,
P2WPKH, P2SH-P2WPKH, multisig (also sorted multisig) in P2WSH, P2SH-P2WSH, legacy
P2SH and bare outputs, single-key P2PK/P2PKH witness scripts, and taproot: the key
path, or a script path through a leaf of a shape it knows
(:class:`~anyhsm.bitcoin.script.TapscriptTemplate`: ``pk``, ``multi_a`` k-of-n with
OP_CHECKSIGADD, and either with an ``older(n)`` or ``after(n)`` timelock, which the
transaction's nSequence / nLockTime must meet as Bitcoin Core's interpreter checks
them). Of several satisfiable leaves the smallest witness wins. For any other leaf
script the input stays incomplete and the reason says the finalizer does not know
that script. Every signature is verified against its sighash before it is used: an
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
from anyhsm.bitcoin.script import (
    LOCKTIME_THRESHOLD,
    SEQUENCE_FINAL,
    SEQUENCE_LOCKTIME_DISABLE_FLAG,
    SEQUENCE_LOCKTIME_MASK,
    SEQUENCE_LOCKTIME_TYPE_FLAG,
    ScriptType,
    TapscriptTemplate,
    classify,
    parse_tapscript,
    push_data,
)
from anyhsm.bitcoin.script_kind import ScriptKind
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
            "reason": self.reason or None,  # no value is null, never ""
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
        kind = ScriptKind.of_spend(info.kind).value
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
        lh = leaf_hash(ls.script, ls.leaf_version)
        if not any(h == lh for _, h in inp.tap_script_sigs):
            continue  # nothing signed for this leaf
        tag = f"leaf {lh.hex()[:16]}..."
        try:
            committed = verify_control_block(q, ls.script, cb)
        except HsmError:
            committed = False
        if not committed:
            notes.append(f"{tag}: the control block does not match the output")
            continue
        template = parse_tapscript(ls.script) if ls.leaf_version == TAPROOT_LEAF_TAPSCRIPT else None
        if template is None:
            notes.append(
                f"{tag}: its script is not one the finalizer knows (it knows pk, multi_a, and "
                "either with an older() or after() timelock); finalize this input with the "
                "software that built it"
            )
            continue
        try:
            items = _satisfy_leaf(cache, index, inp, template, lh)
        except _Incomplete as e:
            notes.append(f"{tag}: {e}")
            continue
        witness = [*items, ls.script, cb]
        if best is None or _size(witness) < _size(best):
            best = witness
    if best is not None:
        return best
    raise _Incomplete(
        "; ".join(notes)
        if notes
        else "no taproot signature: none for the key path and none for any leaf script"
    )


def _satisfy_leaf(
    cache: SighashCache, index: int, inp: PsbtInput, leaf: TapscriptTemplate, lh: bytes
) -> list[bytes]:
    """The witness items (before the script and control block) that satisfy a known
    leaf: ``threshold`` signatures that verify, empty elements for the other keys of a
    multi_a (a signature that does not verify fails the whole script, BIP342), in
    reverse key order (the first key's signature is checked first: it is on top)."""
    valid: dict[int, bytes] = {}
    bad = 0
    for pos, x in enumerate(leaf.keys):
        sig = inp.tap_script_sigs.get((x, lh))
        if sig is None:
            continue
        if _schnorr_valid(cache, index, x, sig, lh):
            valid[pos] = sig
        else:
            bad += 1
    left_out = f"; {bad} signature(s) that do not verify were left out" if bad else ""
    k, n = leaf.threshold, len(leaf.keys)
    if len(valid) < k:
        if leaf.multi:
            raise _Incomplete(f"{k}-of-{n} multi_a has {len(valid)} valid signature(s){left_out}")
        if bad:
            raise _Incomplete("the script-path signature does not verify")
        raise _Incomplete("no signature by the leaf's key")
    lock = _timelock_problem(cache.tx, index, leaf)
    if lock is not None:
        raise _Incomplete(lock)
    chosen = sorted(valid)[:k]  # exactly k: OP_NUMEQUAL wants k, not more
    return [valid[pos] if pos in chosen else b"" for pos in reversed(range(n))]


def _timelock_problem(tx: Transaction, index: int, leaf: TapscriptTemplate) -> str | None:
    """Why the transaction does not meet the leaf's timelock, as Bitcoin Core's
    ``CheckSequence`` / ``CheckLockTime`` judge it (None when it does). The finalizer
    checks the script, not the chain: whether the height or time has come is the
    network's question when the transaction is broadcast."""
    sequence = tx.inputs[index].sequence
    if leaf.older is not None:
        n = leaf.older
        mask = SEQUENCE_LOCKTIME_TYPE_FLAG | SEQUENCE_LOCKTIME_MASK
        want, have = n & mask, sequence & mask
        units = "512-second units" if n & SEQUENCE_LOCKTIME_TYPE_FLAG else "blocks"
        need = (
            f"its relative timelock older({n}) ({n & SEQUENCE_LOCKTIME_MASK} {units}) needs "
            f"a version 2 transaction and an nSequence of input {index} that is a relative "
            f"lock time in {units} of at least that"
        )
        if tx.version & 0xFFFFFFFF < 2:  # Core compares the version as unsigned
            return f"{need}; the transaction is version {tx.version}"
        if sequence & SEQUENCE_LOCKTIME_DISABLE_FLAG or (want < SEQUENCE_LOCKTIME_TYPE_FLAG) != (
            have < SEQUENCE_LOCKTIME_TYPE_FLAG
        ):
            return f"{need}; its nSequence is {sequence:#010x}"
        if want > have:
            return f"{need}; its nSequence is {sequence:#010x}"
    if leaf.after is not None:
        n, locktime = leaf.after, tx.locktime
        kind = "block height" if n < LOCKTIME_THRESHOLD else "time"
        need = (
            f"its absolute timelock after({n}) needs an nLockTime that is a {kind} of at "
            f"least {n} and a non-final nSequence of input {index}"
        )
        if (n < LOCKTIME_THRESHOLD) != (locktime < LOCKTIME_THRESHOLD) or n > locktime:
            return f"{need}; the nLockTime is {locktime}"
        if sequence == SEQUENCE_FINAL:
            return f"{need}; its nSequence is final ({sequence:#010x})"
    return None


def _size(items: Sequence[bytes]) -> int:
    return sum(len(i) for i in items)


__all__ = ["FinalizeInputReport", "FinalizeResult", "finalize_psbt"]
