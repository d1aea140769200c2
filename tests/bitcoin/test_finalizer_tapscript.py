"""Taproot script-path finalizing beyond ``<x> OP_CHECKSIG`` (issue 11): multi_a k-of-n
leaves and timelocked single-key leaves, signed by anyhsm keys through the handle and
checked by Bitcoin Core's own interpreter (tests/bitcoin/kernel.py); other leaf scripts
are named as unknown to the finalizer."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from tests.bitcoin.kernel import assert_final_spends, spends, spent_outputs
from tests.bitcoin.test_signer import Wallet, add_wallet

from anyhsm.bitcoin import Psbt, finalize_psbt
from anyhsm.bitcoin.bip32 import KeyOrigin
from anyhsm.bitcoin.encoding import sha256
from anyhsm.bitcoin.psbt import LeafScript, TapKeyOrigin
from anyhsm.bitcoin.script import (
    OP_CHECKLOCKTIMEVERIFY,
    OP_CHECKSEQUENCEVERIFY,
    OP_CHECKSIG,
    OP_DROP,
    OP_EQUALVERIFY,
    OP_SHA256,
    OP_VERIFY,
    TapscriptTemplate,
    multi_a,
    p2tr,
    p2wpkh,
    parse_tapscript,
    push_bytes,
    push_int,
    tapscript_leaf,
)
from anyhsm.bitcoin.size import estimate_vsize
from anyhsm.bitcoin.taproot import TapLeaf, TapTree, control_block, merkle_root, taproot_output_key
from anyhsm.bitcoin.tx import OutPoint, Transaction, TxIn, TxOut
from anyhsm.errors import ScriptError
from anyhsm.hsm import Hsm
from anyhsm.ops.psbt import sign_psbt
from anyhsm.types import KeyType

# BIP341's unspendable NUMS point: the output has no key path, only its leaves
NUMS = bytes.fromhex("50929b74c1a04954b78b4b6035e97a5e078a5a0f28ec96d547bfee9ace803ac0")
X = [bytes([2 + i]) * 32 for i in range(4)]  # x-only keys for the parser tests


# --- the templates ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (tapscript_leaf([X[0]]), TapscriptTemplate((X[0],), 1)),
        (multi_a(2, X[:3]), TapscriptTemplate(tuple(X[:3]), 2, multi=True)),
        (multi_a(1, X[:1]), TapscriptTemplate((X[0],), 1, multi=True)),
        (tapscript_leaf([X[0]], older=144), TapscriptTemplate((X[0],), 1, older=144)),
        (tapscript_leaf([X[0]], after=800_000), TapscriptTemplate((X[0],), 1, after=800_000)),
        (
            tapscript_leaf(X[:3], 2, older=0x400010),  # 16 x 512 s, BIP68 time-based
            TapscriptTemplate(tuple(X[:3]), 2, multi=True, older=0x400010),
        ),
        (  # and_v(v:older(n),pk(X))
            push_int(10) + bytes([OP_CHECKSEQUENCEVERIFY, OP_VERIFY]) + tapscript_leaf([X[1]]),
            TapscriptTemplate((X[1],), 1, older=10),
        ),
        (  # the hand-written form: <n> OP_CLTV OP_DROP <X> OP_CHECKSIG
            push_int(1_700_000_000)
            + bytes([OP_CHECKLOCKTIMEVERIFY, OP_DROP])
            + tapscript_leaf([X[1]]),
            TapscriptTemplate((X[1],), 1, after=1_700_000_000),
        ),
    ],
)
def test_known_leaf_shapes_are_parsed(script: bytes, expected: TapscriptTemplate) -> None:
    assert parse_tapscript(script) == expected


def test_multi_a_is_miniscripts_encoding() -> None:
    """multi_a(2,A,B,C): <A> CHECKSIG <B> CHECKSIGADD <C> CHECKSIGADD 2 NUMEQUAL (BIP387)."""
    a, b, c = X[:3]
    assert multi_a(2, [a, b, c]).hex() == (
        # OP_CHECKSIG, OP_CHECKSIGADD, OP_CHECKSIGADD, OP_2, OP_NUMEQUAL
        f"20{a.hex()}ac20{b.hex()}ba20{c.hex()}ba529c"
    )
    assert tapscript_leaf([a], older=144).hex() == f"20{a.hex()}ad029000b2"
    with pytest.raises(ScriptError):
        multi_a(4, X[:3])
    with pytest.raises(ScriptError):
        tapscript_leaf([a], older=0)
    with pytest.raises(ScriptError):
        tapscript_leaf([a], older=1, after=1)


@pytest.mark.parametrize(
    "script",
    [
        bytes([OP_SHA256])
        + push_bytes(bytes(32))
        + bytes([OP_EQUALVERIFY])
        + tapscript_leaf(X[:1]),
        tapscript_leaf(X[:1]) + push_int(5) + bytes([OP_CHECKSEQUENCEVERIFY]),  # no VERIFY
        push_bytes(X[0]) + bytes([0xAD]),  # <X> OP_CHECKSIGVERIFY: leaves nothing true
        multi_a(2, X[:3])[:-2] + push_int(4) + bytes([0x9C]),  # k > n
        multi_a(2, X[:3])[:-2] + bytes([0x01, 0x02, 0x9C]),  # k not minimally pushed
        push_bytes(X[0]) + bytes([OP_CHECKSIG]) + push_int(0) + bytes([0xB2]),
        bytes([0x00, OP_CHECKSEQUENCEVERIFY, OP_DROP]) + tapscript_leaf(X[:1]),  # older(0)
        bytes([0x05, 0, 0, 0, 0x80, 0, OP_CHECKSEQUENCEVERIFY, OP_DROP]) + tapscript_leaf(X[:1]),
        push_bytes(b"\x02" + X[0]) + bytes([OP_CHECKSIG]),  # a 33-byte key is not tapscript's
        b"\x51",
        b"",
        b"\x4c",  # truncated push
    ],
)
def test_other_scripts_are_not_templates(script: bytes) -> None:
    assert parse_tapscript(script) is None


# --- building and signing ---------------------------------------------------------------------


def _tree(leaves: Sequence[TapLeaf]) -> TapTree:
    """A tree of the leaves: one leaf, a pair, or ((a, b), (c, ...))."""
    if len(leaves) == 1:
        return leaves[0]
    half = (len(leaves) + 1) // 2
    return (_tree(leaves[:half]), _tree(leaves[half:]))


def leaf_psbt(
    scripts: Sequence[bytes],
    keys: Sequence[tuple[bytes, KeyOrigin]],
    *,
    sequence: int = 0xFFFFFFFD,
    locktime: int = 0,
    version: int = 2,
    inputs: int = 1,
) -> Psbt:
    """``inputs`` inputs, each spending its own taproot output committing to ``scripts``
    (no key path), with derivations naming ``keys`` (33-byte keys and origins) in the
    leaves whose scripts hold them."""
    leaves = [TapLeaf(s) for s in scripts]
    tree = _tree(leaves)
    root = merkle_root(tree)
    assert root is not None
    q, _ = taproot_output_key(NUMS, root)
    rng = random.Random(len(scripts) * 1000 + inputs)
    prevs = [
        Transaction(2, [TxIn(OutPoint(rng.randbytes(32), 0))], [TxOut(60_000, p2tr(q))], 0)
        for _ in range(inputs)
    ]
    tx = Transaction(
        version,
        [TxIn(OutPoint(p.txid(), 0), b"", sequence) for p in prevs],
        [TxOut(59_000 * inputs, p2wpkh(rng.randbytes(20)))],
        locktime,
    )
    psbt = Psbt.from_unsigned_tx(tx)
    for inp, prev in zip(psbt.inputs, prevs, strict=True):
        inp.witness_utxo = prev.outputs[0]
        inp.tap_internal_key = NUMS
        inp.tap_merkle_root = root
        for leaf in leaves:
            inp.tap_leaf_scripts[control_block(NUMS, tree, leaf)] = LeafScript(leaf.script, 0xC0)
        for pub, origin in keys:
            mine = tuple(leaf.hash for leaf in leaves if pub[1:] in leaf.script)
            inp.tap_bip32_derivations[pub[1:]] = TapKeyOrigin(mine, origin)
    return psbt


def _keys(w: Wallet, n: int, first: int = 0) -> list[tuple[bytes, KeyOrigin]]:
    return [w.key(f"m/86'/1'/0'/0/{first + i}") for i in range(n)]


def _xonly(keys: Sequence[tuple[bytes, KeyOrigin]]) -> list[bytes]:
    return [pub[1:] for pub, _ in keys]


# --- multi_a ----------------------------------------------------------------------------------


def test_2_of_3_multi_a_with_three_keys_of_one_hd_key(hsm: Hsm, wallet: Wallet) -> None:
    keys = _keys(wallet, 3)
    script = multi_a(2, _xonly(keys))
    signed = sign_psbt(hsm, leaf_psbt([script], keys), "w")
    assert signed.signatures == 3  # every key it holds signs
    final = finalize_psbt(signed.psbt)
    tx = assert_final_spends(final)
    witness = tx.inputs[0].witness
    assert witness[-2] == script and len(witness) == 3 + 2
    # exactly two signatures (OP_NUMEQUAL wants k, not more), the first keys', top first
    assert [len(w) for w in witness[:3]] == [0, 64, 64]


def test_vsize_estimate_of_a_multi_a_spend_counts_k_signatures(hsm: Hsm, wallet: Wallet) -> None:
    """Three signatures present, two used: the estimate is the finalized size, not more
    (an estimate above it would understate the fee rate the policy limits)."""
    keys = _keys(wallet, 3)
    script = multi_a(2, _xonly(keys))
    signed = sign_psbt(hsm, leaf_psbt([script], keys), "w").psbt
    assert len(signed.inputs[0].tap_script_sigs) == 3
    tx = assert_final_spends(finalize_psbt(signed))
    spent = [i.witness_utxo.script_pubkey for i in signed.inputs if i.witness_utxo]
    vsize, notes = estimate_vsize(signed, spent, {0: {TapLeaf(script).hash}})
    assert (vsize, notes) == (tx.vsize(), [])


def test_2_of_3_multi_a_with_keys_of_several_anyhsm_keys(tmp_path: Path, hsm: Hsm) -> None:
    """Keys of three HD keys in the handle, one signing per call: incomplete until two
    have signed, then valid under consensus."""
    wallets = [add_wallet(hsm, f"w{i}", bytes([i + 1]) * 32) for i in range(3)]
    keys = [w.key("m/86'/1'/0'/0/0") for w in wallets]
    script = multi_a(2, _xonly(keys))
    psbt = leaf_psbt([script], keys)
    one = sign_psbt(hsm, psbt, "w2").psbt
    res = finalize_psbt(one)
    assert not res.complete
    assert "2-of-3 multi_a has 1 valid signature(s)" in res.inputs[0].reason
    two = sign_psbt(hsm, one, "w0").psbt
    tx = assert_final_spends(finalize_psbt(two))
    assert [len(w) for w in tx.inputs[0].witness[:3]] == [64, 0, 64]  # w2's and w0's


def test_multi_a_with_a_single_key_and_an_hd_key(hsm: Hsm, wallet: Wallet) -> None:
    single = hsm.generate_key("solo", KeyType.SECP256K1)
    hd = wallet.key("m/86'/1'/0'/0/3")
    script = multi_a(2, [single.public_key[1:], hd[0][1:]])
    psbt = leaf_psbt([script], [hd])
    signed = sign_psbt(hsm, psbt)  # every key of the handle
    assert {s.key for r in signed.inputs for s in r.signatures} == {"solo", "w"}
    assert_final_spends(finalize_psbt(signed.psbt))


def test_an_invalid_signature_in_multi_a_is_left_out(hsm: Hsm, wallet: Wallet) -> None:
    keys = _keys(wallet, 3)
    signed = sign_psbt(hsm, leaf_psbt([multi_a(2, _xonly(keys))], keys), "w").psbt
    sigs = signed.inputs[0].tap_script_sigs
    first = sorted(sigs)[0]
    sigs[first] = bytes(64)  # a non-empty invalid signature would fail the whole script
    tx = assert_final_spends(finalize_psbt(signed))
    assert bytes(64) not in tx.inputs[0].witness
    del sigs[sorted(sigs)[1]]
    res = finalize_psbt(signed)
    assert not res.complete
    assert "2-of-3 multi_a has 1 valid signature(s)" in res.inputs[0].reason
    assert "do not verify were left out" in res.inputs[0].reason


def test_the_smallest_satisfiable_leaf_is_used(hsm: Hsm, wallet: Wallet) -> None:
    keys = _keys(wallet, 3)
    big = multi_a(2, _xonly(keys))
    small = tapscript_leaf(_xonly(keys[2:]))
    tx = assert_final_spends(finalize_psbt(sign_psbt(hsm, leaf_psbt([big, small], keys)).psbt))
    assert tx.inputs[0].witness[1] == small


def test_many_inputs_of_multi_a(hsm: Hsm, wallet: Wallet) -> None:
    keys = _keys(wallet, 5)
    script = multi_a(3, _xonly(keys))
    tx = assert_final_spends(
        finalize_psbt(sign_psbt(hsm, leaf_psbt([script], keys, inputs=4)).psbt)
    )
    assert len(tx.inputs) == 4


# --- timelocks --------------------------------------------------------------------------------


# (lock, n, nSequence, nLockTime, tx version)
MET = [
    ("older", 144, 144, 0, 2),
    ("older", 144, 1000, 0, 2),
    ("older", 0x400010, 0x400010, 0, 2),  # 16 x 512 s
    ("older", 0x400010, 0x400020, 0, 2),
    ("older", 10, 10, 0, -1),  # Core reads the version as unsigned: 0xffffffff >= 2
    ("after", 800_000, 0xFFFFFFFE, 800_000, 2),
    ("after", 800_000, 0, 800_100, 2),
    ("after", 1_700_000_000, 0xFFFFFFFD, 1_700_000_500, 2),
]
NOT_MET = [  # ... and what the reason says
    ("older", 144, 143, 0, 2, "nSequence is 0x0000008f"),
    ("older", 144, 0xFFFFFFFD, 0, 2, "nSequence is 0xfffffffd"),  # the disable flag is set
    ("older", 144, 0x400090, 0, 2, "in blocks"),  # time-based sequence, height-based lock
    ("older", 0x400010, 16, 0, 2, "512-second units"),
    ("older", 144, 144, 0, 1, "the transaction is version 1"),
    ("after", 800_000, 0xFFFFFFFE, 799_999, 2, "the nLockTime is 799999"),
    ("after", 800_000, 0xFFFFFFFE, 1_700_000_000, 2, "block height"),  # a time for a height
    ("after", 1_700_000_000, 0xFFFFFFFE, 800_000, 2, "a time of at least"),
    ("after", 800_000, 0xFFFFFFFF, 800_000, 2, "nSequence is final"),
]


def _timelocked(
    w: Wallet, lock: str, n: int, sequence: int, locktime: int, version: int
) -> tuple[bytes, Psbt]:
    keys = _keys(w, 1)
    older, after = (n, None) if lock == "older" else (None, n)
    script = tapscript_leaf(_xonly(keys), older=older, after=after)
    return script, leaf_psbt([script], keys, sequence=sequence, locktime=locktime, version=version)


@pytest.mark.parametrize(("lock", "n", "sequence", "locktime", "version"), MET)
def test_timelocked_leaf(
    hsm: Hsm, wallet: Wallet, lock: str, n: int, sequence: int, locktime: int, version: int
) -> None:
    script, psbt = _timelocked(wallet, lock, n, sequence, locktime, version)
    tx = assert_final_spends(finalize_psbt(sign_psbt(hsm, psbt, "w").psbt))
    assert tx.inputs[0].witness[1] == script


@pytest.mark.parametrize(("lock", "n", "sequence", "locktime", "version", "says"), NOT_MET)
def test_timelock_not_met_is_incomplete_as_core_judges(
    hsm: Hsm,
    wallet: Wallet,
    lock: str,
    n: int,
    sequence: int,
    locktime: int,
    version: int,
    says: str,
) -> None:
    script, psbt = _timelocked(wallet, lock, n, sequence, locktime, version)
    signed = sign_psbt(hsm, psbt, "w")
    res = finalize_psbt(signed.psbt)
    assert not res.complete and f"{lock}({n})" in res.inputs[0].reason
    assert says in res.inputs[0].reason
    _core_rejects_the_witness_anyway(signed.psbt, script)


def _core_rejects_the_witness_anyway(signed: Psbt, script: bytes) -> None:
    """The witness the finalizer declined to build is indeed invalid: Core says so."""
    inp = signed.inputs[0]
    ((cb, _),) = [(cb, ls) for cb, ls in inp.tap_leaf_scripts.items() if ls.script == script]
    (sig,) = inp.tap_script_sigs.values()
    tx = signed.unsigned_tx()
    tx.inputs[0].witness = [sig, script, cb]
    assert inp.witness_utxo is not None
    assert not spends(tx, [inp.witness_utxo], 0)


@pytest.mark.parametrize(
    "make",
    [
        lambda x: push_int(6) + bytes([OP_CHECKSEQUENCEVERIFY, OP_VERIFY]) + tapscript_leaf([x]),
        lambda x: push_int(6) + bytes([OP_CHECKSEQUENCEVERIFY, OP_DROP]) + tapscript_leaf([x]),
        lambda x: tapscript_leaf([x, X[0]], 1, older=6),  # and_v(v:multi_a(1,x,X0),older(6))
    ],
)
def test_other_timelock_forms(hsm: Hsm, wallet: Wallet, make: object) -> None:
    keys = _keys(wallet, 1)
    script = make(_xonly(keys)[0])  # type: ignore[operator]
    assert parse_tapscript(script) is not None
    psbt = leaf_psbt([script], keys, sequence=6)
    assert_final_spends(finalize_psbt(sign_psbt(hsm, psbt, "w").psbt))


# --- scripts the finalizer does not know ------------------------------------------------------


def test_an_unknown_leaf_script_is_named_as_such(hsm: Hsm, wallet: Wallet) -> None:
    """A hash lock: the signer signs its key's part, the finalizer cannot know the preimage."""
    keys = _keys(wallet, 1)
    script = (
        bytes([OP_SHA256])
        + push_bytes(sha256(b"secret"))
        + bytes([OP_EQUALVERIFY])
        + tapscript_leaf(_xonly(keys))
    )
    signed = sign_psbt(hsm, leaf_psbt([script], keys), "w")
    assert signed.signatures == 1
    res = finalize_psbt(signed.psbt)
    assert not res.complete
    reason = res.inputs[0].reason
    assert "its script is not one the finalizer knows" in reason
    assert "no taproot signature" not in reason
    # the script is right, only its satisfaction is unknown to the finalizer: with the
    # preimage, Core accepts the same signature
    inp = signed.psbt.inputs[0]
    ((cb, _),) = inp.tap_leaf_scripts.items()
    (sig,) = inp.tap_script_sigs.values()
    tx = signed.psbt.unsigned_tx()
    tx.inputs[0].witness = [sig, b"secret", script, cb]
    assert inp.witness_utxo is not None
    assert spends(tx, [inp.witness_utxo], 0)


def test_nothing_signed_says_so(wallet: Wallet) -> None:
    keys = _keys(wallet, 3)
    res = finalize_psbt(leaf_psbt([multi_a(2, _xonly(keys))], keys))
    assert not res.complete
    assert res.inputs[0].reason == (
        "no taproot signature: none for the key path and none for any leaf script"
    )


def test_the_oracle_rejects_a_broken_signature(hsm: Hsm, wallet: Wallet) -> None:
    keys = _keys(wallet, 1)
    final = finalize_psbt(sign_psbt(hsm, leaf_psbt([tapscript_leaf(_xonly(keys))], keys)).psbt)
    tx = assert_final_spends(final)
    sig = bytearray(tx.inputs[0].witness[0])
    sig[5] ^= 1
    tx.inputs[0].witness[0] = bytes(sig)
    assert not spends(tx, spent_outputs(final), 0)
    assert tapscript_leaf(_xonly(keys))[-1] == OP_CHECKSIG
