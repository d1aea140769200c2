"""Size of the finished transaction, estimated from what each input's script needs.

The fee-rate limit divides the fee by this estimate, so the estimate must not be
something the submitter can inflate. A PSBT_IN_FINAL_SCRIPTWITNESS (or FINAL_SCRIPTSIG)
on an input we do not finalize is not covered by our signature and is replaced before
broadcast: a 400 kB junk witness there would make a 9,000,000 sat fee look like
90 sat/vB. So no final field is ever measured. The size of each input is its
*satisfaction* from its script, as Bitcoin Core's wallet estimates it (a DER
signature counted as 72 bytes with its sighash byte, a compressed key as 33, a BIP340
signature as 64, or 65 with a sighash byte):

- P2PKH, P2PK, P2WPKH, P2SH-P2WPKH: fixed sizes;
- bare, P2SH, P2WSH and P2SH-P2WSH multisig: m signatures (and the dummy element);
  other scripts one signature; the redeem and witness scripts from the PSBT fields,
  or from the final fields only when they hash to the scriptPubKey (the script
  itself is then committed to, whatever else the final field holds);
- P2TR: a key-path signature; for an input we sign by script path, or a finalized
  one whose leaf script and control block verify against the output key, the leaf
  script, its control block and a signature per signature check present (at least
  one; at most k for a multi_a leaf, which is finalized with exactly k), empty
  elements for the others.

An input whose size cannot be bounded from its script (no previous output, a P2SH or
P2WSH script not given, a future witness version) is counted at the smallest size it
could have: a smaller size means a higher fee rate, the safe direction for a limit on
it, and a note says so.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

from anyhsm.bitcoin.encoding import compact_size, hash160, sha256
from anyhsm.bitcoin.psbt import Psbt, PsbtInput
from anyhsm.bitcoin.script import (
    OP_1,
    OP_CHECKSIG,
    OP_CHECKSIGADD,
    OP_CHECKSIGVERIFY,
    ScriptType,
    classify,
    iter_ops,
    parse_tapscript,
    push_data,
)
from anyhsm.bitcoin.sighash import SIGHASH_DEFAULT
from anyhsm.bitcoin.taproot import leaf_hash, verify_control_block
from anyhsm.errors import ScriptError

ECDSA_SIG_SIZE = 72
PUBKEY_SIZE = 33
SCHNORR_SIG_SIZE = 64

_Size = tuple[int, int, str | None]  # (scriptSig bytes, witness bytes, note if unbounded)


def estimate_vsize(
    psbt: Psbt,
    spent_scripts: Sequence[bytes | None],
    script_leaves: Mapping[int, Collection[bytes]] | None = None,
) -> tuple[int, list[str]]:
    """Estimated virtual size of the finished transaction and notes on inputs counted at
    their smallest size. ``spent_scripts`` holds each input's spent scriptPubKey (None
    when unknown); ``script_leaves`` the leaf hashes of taproot inputs we sign by
    script path."""
    notes: list[str] = []
    leaves = script_leaves or {}
    base = 4 + 4 + len(compact_size(len(psbt.inputs))) + len(compact_size(len(psbt.outputs)))
    base += sum(len(o.txout().serialize()) for o in psbt.outputs)
    witness_bytes = 0
    any_witness = False
    for i, (inp, spk) in enumerate(zip(psbt.inputs, spent_scripts, strict=True)):
        ss, wit, note = input_size(inp, spk, leaves.get(i, ()))
        if note is not None:
            notes.append(
                f"input {i}: {note}; counted at its smallest plausible size, so the fee rate "
                "shown is an upper bound"
            )
        base += 36 + len(compact_size(ss)) + ss + 4
        if wit:
            any_witness = True
            witness_bytes += wit
        else:
            witness_bytes += 1  # an empty witness is still one count byte once any exists
    weight = base * 4 + ((witness_bytes + 2) if any_witness else 0)
    return math.ceil(weight / 4), notes


def witness_len(items: Sequence[int]) -> int:
    """Serialized size of a witness whose elements have the given lengths."""
    return len(compact_size(len(items))) + sum(len(compact_size(n)) + n for n in items)


_P2WPKH_WITNESS = witness_len([ECDSA_SIG_SIZE, PUBKEY_SIZE])


def _push_len(n: int) -> int:
    return len(push_data(b"\xff" * n))


def _multisig_m(script: bytes) -> int | None:
    info = classify(script)
    return info.required if info.type is ScriptType.MULTISIG else None


def _ecdsa_items(script: bytes) -> list[int]:
    """Stack elements (before the script itself) that satisfy a legacy/v0 script."""
    m = _multisig_m(script)
    if m is not None:
        return [0, *([ECDSA_SIG_SIZE] * m)]
    if classify(script).type is ScriptType.P2PKH:
        return [ECDSA_SIG_SIZE, PUBKEY_SIZE]
    return [ECDSA_SIG_SIZE]


def _last_push(script_sig: bytes | None) -> bytes | None:
    if not script_sig:
        return None
    try:
        ops = list(iter_ops(script_sig))
    except ScriptError:
        return None
    return ops[-1].data if ops and ops[-1].data is not None else None


def _redeem_script(inp: PsbtInput, script_hash: bytes) -> bytes | None:
    """The redeem script, from the PSBT field or the final scriptSig, if it hashes right."""
    for rs in (inp.redeem_script, _last_push(inp.final_scriptsig)):
        if rs is not None and hash160(rs) == script_hash:
            return rs
    return None


def _witness_script(inp: PsbtInput, program: bytes) -> bytes | None:
    final = inp.final_scriptwitness
    for ws in (inp.witness_script, final[-1] if final else None):
        if ws is not None and sha256(ws) == program:
            return ws
    return None


def _p2wsh(inp: PsbtInput, program: bytes, ss: int) -> _Size:
    ws = _witness_script(inp, program)
    if ws is None:
        return ss, witness_len([1]), "its witness script is not given"
    return ss, witness_len([*_ecdsa_items(ws), len(ws)]), None


def _sig_checks(script: bytes) -> int:
    try:
        return sum(
            1
            for op in iter_ops(script)
            if op.opcode in (OP_CHECKSIG, OP_CHECKSIGVERIFY, OP_CHECKSIGADD)
        )
    except ScriptError:
        return 0


def _leaf_size(inp: PsbtInput, script: bytes, cb: bytes, lh: bytes, sig: int) -> int:
    checks = _sig_checks(script)
    present = sum(1 for (_, h) in inp.tap_script_sigs if h == lh)
    known = parse_tapscript(script)
    # a multi_a leaf is finalized with exactly k signatures, however many are present
    needed = checks if known is None else known.threshold
    sigs = min(needed, max(1, present))
    return witness_len([*([sig] * sigs), *([0] * (checks - sigs)), len(script), len(cb)])


def _taproot(inp: PsbtInput, spk: bytes, wanted: Collection[bytes]) -> _Size:
    sig = SCHNORR_SIG_SIZE if inp.sighash_type in (None, SIGHASH_DEFAULT) else 65
    q = spk[2:]
    if wanted:  # we sign by script path: the smallest of the leaves we sign for
        sizes = []
        for cb, ls in inp.tap_leaf_scripts.items():
            lh = leaf_hash(ls.script, ls.leaf_version)
            if lh in wanted:
                sizes.append(_leaf_size(inp, ls.script, cb, lh, sig))
        if sizes:
            return 0, min(sizes), None
    final = inp.final_scriptwitness
    if final and len(final) >= 2:
        items = final[:-1] if final[-1][:1] == b"\x50" else final  # drop an annex
        if len(items) >= 2:
            script, cb = items[-2], items[-1]
            try:
                ok = len(cb) >= 33 and verify_control_block(q, script, cb)
                lh = leaf_hash(script, cb[0] & 0xFE) if ok else b""
            except ScriptError:
                ok = False
            if ok:
                return 0, _leaf_size(inp, script, cb, lh, sig), None
    return 0, witness_len([sig]), None


def input_size(inp: PsbtInput, spk: bytes | None, wanted: Collection[bytes] = ()) -> _Size:
    """(scriptSig length, witness bytes, note when unbounded) of the finished input,
    from its spent script and the scripts it commits to, never from final fields'
    lengths."""
    if spk is None:
        return 0, 0, "its previous output is not given"
    n = len(spk)
    if n == 22 and spk[0] == 0 and spk[1] == 20:  # P2WPKH, the common cases first
        return 0, _P2WPKH_WITNESS, None
    if n == 34 and spk[0] == OP_1 and spk[1] == 32:
        return _taproot(inp, spk, wanted)
    info = classify(spk)
    t = info.type
    if t is ScriptType.P2PKH:
        return 1 + ECDSA_SIG_SIZE + 1 + PUBKEY_SIZE, 0, None
    if t is ScriptType.P2PK:
        return 1 + ECDSA_SIG_SIZE, 0, None
    if t is ScriptType.MULTISIG:
        m = info.required or 1
        return 1 + m * (1 + ECDSA_SIG_SIZE), 0, None
    if t is ScriptType.P2WPKH:
        return 0, _P2WPKH_WITNESS, None
    if t is ScriptType.P2WSH:
        return _p2wsh(inp, info.data, 0)
    if t is ScriptType.P2TR:
        return _taproot(inp, spk, wanted)
    if t is ScriptType.P2SH:
        rs = _redeem_script(inp, info.data)
        if rs is None:
            return 2, 0, "its redeem script is not given"
        inner = classify(rs)
        if inner.type is ScriptType.P2WPKH:
            return 23, _P2WPKH_WITNESS, None
        if inner.type is ScriptType.P2WSH:
            return _p2wsh(inp, inner.data, 35)
        if inner.witness_version is not None:
            return 1 + len(rs), 0, "it spends a P2SH-wrapped future witness version"
        items = _ecdsa_items(rs)
        return sum(_push_len(n) for n in items) + _push_len(len(rs)), 0, None
    if t is ScriptType.WITNESS_UNKNOWN:
        return 0, 0, f"it spends witness version {info.witness_version}"
    if t is ScriptType.OP_RETURN:
        return 0, 0, "it spends an OP_RETURN output"
    return 1 + ECDSA_SIG_SIZE, 0, None  # another bare script: one signature


__all__ = ["estimate_vsize", "input_size", "witness_len"]
