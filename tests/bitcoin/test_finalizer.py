"""PSBT finalizer and extractor: BIP174 vector, every supported script, signature checks,
the fields a finalizer clears, incomplete inputs."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.bitcoin.kernel import assert_final_spends
from tests.bitcoin.test_signer import (
    BIP174,
    Spend,
    Wallet,
    _tap_tree_psbt,
    build_psbt,
    software_hsm,
)

from anyhsm.bitcoin import Psbt, Transaction, finalize_psbt
from anyhsm.bitcoin.encoding import sha256
from anyhsm.bitcoin.psbt import ProprietaryField, UnknownField
from anyhsm.bitcoin.script import (
    OP_0,
    multisig,
    p2pk,
    p2wsh,
    parse_ops,
    push_data,
)
from anyhsm.bitcoin.tx import OutPoint, TxIn, TxOut
from anyhsm.crypto import secp256k1 as ec
from anyhsm.hsm import Hsm
from anyhsm.ops.psbt import sign_psbt


@pytest.fixture
def hsm(tmp_path: Path) -> Iterator[Hsm]:
    h = software_hsm(tmp_path / "dep", allowed_sighash_types=(0, 1, 0x83))
    yield h
    h.close()


def _keys(w: Wallet, n: int, rng: random.Random) -> list[tuple[bytes, object]]:
    ours = [w.key(f"m/48'/1'/0'/2'/0/{i}") for i in range(2)]
    return [*ours, *[(ec.public_key(bytearray(rng.randbytes(32))), None)] * (n - 2)]


# --- BIP174 -----------------------------------------------------------------------------------


def test_bip174_finalizer_and_extractor_vectors() -> None:
    wf = BIP174["workflow"]
    assert wf["finalizer"]["input"] == "combiner.result"
    combined = Psbt.parse(wf["combiner"]["result"]["base64"])
    res = finalize_psbt(combined)
    assert_final_spends(res)  # Bitcoin Core's interpreter accepts the vector's transaction
    assert res.tx is not None
    assert res.psbt.to_base64() == wf["finalizer"]["result"]["base64"]
    assert res.tx.serialize().hex() == wf["extractor"]["result_tx_hex"]
    assert [r.status for r in res.inputs] == ["finalized", "finalized"]
    assert combined.to_base64() == wf["combiner"]["result"]["base64"]  # input untouched
    again = finalize_psbt(res.psbt)
    assert [r.status for r in again.inputs] == ["already-final", "already-final"]
    assert again.tx is not None and again.tx.serialize() == res.tx.serialize()
    data = res.to_dict()
    assert data["complete"] is True and data["tx"] == wf["extractor"]["result_tx_hex"]
    assert data["txid"] == res.tx.txid_hex()


def test_bip174_single_signer_is_incomplete() -> None:
    wf = BIP174["workflow"]
    res = finalize_psbt(Psbt.parse(wf["signer_1"]["result"]["base64"]))
    assert not res.complete and res.tx is None
    assert [r.status for r in res.inputs] == ["incomplete", "incomplete"]
    assert "2-of-2 multisig has 1 valid signature(s)" in res.inputs[0].reason
    assert "tx" not in res.to_dict()


# --- every kind -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "script_sig_items", "witness_items"),
    [
        ("p2pkh", 2, 0),
        ("p2sh-p2wpkh", 1, 2),
        ("p2wpkh", 0, 2),
        ("p2tr", 0, 1),
    ],
)
def test_single_sig_final_scripts(
    hsm: Hsm, wallet: Wallet, kind: str, script_sig_items: int, witness_items: int
) -> None:
    spend = Spend(kind, [wallet.key("m/84'/1'/0'/0/0")])
    res = finalize_psbt(sign_psbt(hsm, build_psbt([spend]), "w").psbt)
    assert_final_spends(res)
    assert res.tx is not None
    txin = res.tx.inputs[0]
    assert len(parse_ops(txin.script_sig)) == script_sig_items
    assert len(txin.witness) == witness_items
    assert res.psbt.inputs[0].is_finalized
    if kind == "p2sh-p2wpkh":
        assert txin.script_sig == push_data(spend_redeem(spend))
    if kind == "p2tr":
        assert len(txin.witness[0]) == 64


def spend_redeem(spend: Spend) -> bytes:
    from tests.bitcoin.test_signer import spend_scripts

    rs = spend_scripts(spend)[1]
    assert rs is not None
    return rs


@pytest.mark.parametrize("kind", ["p2wsh", "p2sh-p2wsh", "p2sh"])
def test_multisig_final_scripts_in_key_order(hsm: Hsm, wallet: Wallet, kind: str) -> None:
    rng = random.Random(kind)
    keys = _keys(wallet, 3, rng)
    spend = Spend(kind, keys, m=2)  # type: ignore[arg-type]
    signed = sign_psbt(hsm, build_psbt([spend]), "w").psbt
    res = finalize_psbt(signed)
    assert_final_spends(res)
    assert res.tx is not None
    script = multisig(2, [k for k, _ in keys])  # sorted (BIP67)
    sorted_keys = sorted(k for k, _ in keys)
    sigs = [
        signed.inputs[0].partial_sigs[k] for k in sorted_keys if k in signed.inputs[0].partial_sigs
    ]
    txin = res.tx.inputs[0]
    if kind == "p2sh":
        assert txin.script_sig == b"".join(push_data(x) for x in [b"", *sigs, script])
        assert txin.witness == []
    else:
        assert txin.witness == [b"", *sigs, script]
        if kind == "p2sh-p2wsh":
            assert txin.script_sig == push_data(p2wsh(sha256(script)))
        else:
            assert txin.script_sig == b""


def test_bare_multisig_and_p2pk(hsm: Hsm, wallet: Wallet) -> None:
    """Legacy outputs without address: the previous transaction carries the scripts."""
    pub0, origin0 = wallet.key("m/0/0")
    pub1, _ = wallet.key("m/0/1")
    scripts = [p2pk(pub0), multisig(1, [pub0, pub1])]
    prev = Transaction(2, [TxIn(OutPoint(bytes(32), 0))], [TxOut(50_000, s) for s in scripts], 0)
    tx = Transaction(
        2,
        [TxIn(OutPoint(prev.txid(), i), b"", 0xFFFFFFFD) for i in range(2)],
        [TxOut(99_000, bytes([0, 20]) + bytes(20))],
        0,
    )
    psbt = Psbt.from_unsigned_tx(tx)
    for inp in psbt.inputs:
        inp.non_witness_utxo = prev
        inp.bip32_derivations[pub0] = origin0
    res = finalize_psbt(sign_psbt(hsm, psbt, "w").psbt)
    assert_final_spends(res)
    assert res.tx is not None
    p2pk_ops = parse_ops(res.tx.inputs[0].script_sig)
    assert len(p2pk_ops) == 1 and p2pk_ops[0].data is not None and p2pk_ops[0].data[-1] == 1
    bare_ops = parse_ops(res.tx.inputs[1].script_sig)
    assert bare_ops[0].opcode == OP_0 and len(bare_ops) == 2


def test_taproot_script_path_final_witness(hsm: Hsm, wallet: Wallet) -> None:
    psbt, _, leaf = _tap_tree_psbt(wallet, internal_ours=False)
    res = finalize_psbt(sign_psbt(hsm, psbt, "w").psbt)
    assert_final_spends(res)
    assert res.tx is not None
    sig, script, cb = res.tx.inputs[0].witness
    assert len(sig) == 64 and script == leaf.script and (len(cb) - 33) % 32 == 0


def test_sighash_byte_of_each_signature_is_used(hsm: Hsm, wallet: Wallet) -> None:
    spend = Spend("p2wpkh", [wallet.key("m/84'/1'/0'/0/0")], sighash=0x83)
    res = finalize_psbt(sign_psbt(hsm, build_psbt([spend]), "w").psbt)
    assert_final_spends(res)
    assert res.tx is not None
    assert res.tx.inputs[0].witness[0][-1] == 0x83


def test_v2_psbt_finalizes_to_the_same_transaction(hsm: Hsm, wallet: Wallet) -> None:
    spends = [Spend("p2wpkh", [wallet.key(f"m/84'/1'/0'/0/{i}")]) for i in range(2)]
    signed = sign_psbt(hsm, build_psbt(spends), "w").psbt
    v0, v2 = finalize_psbt(signed), finalize_psbt(signed.to_v2())
    assert_final_spends(v0)
    assert v0.tx is not None and v2.tx is not None
    assert v2.psbt.version == 2
    assert v0.tx.serialize() == v2.tx.serialize()


# --- what a finalizer keeps and clears --------------------------------------------------------


def test_finalized_input_keeps_only_what_bip174_allows(hsm: Hsm, wallet: Wallet) -> None:
    spend = Spend("p2wpkh", [wallet.key("m/84'/1'/0'/0/0")], non_witness=True, sighash=1)
    signed = sign_psbt(hsm, build_psbt([spend]), "w").psbt
    inp = signed.inputs[0]
    inp.proprietary.append(ProprietaryField(b"anyhsm", 1, b"k", b"v"))
    inp.unknown.append(UnknownField(b"\xf0\x01", b"\x02"))
    final = finalize_psbt(signed).psbt.inputs[0]
    assert final.final_scriptwitness is not None and final.final_scriptsig is None
    assert not final.partial_sigs and not final.bip32_derivations
    assert final.sighash_type is None and final.redeem_script is None
    assert final.non_witness_utxo == inp.non_witness_utxo
    assert final.witness_utxo == inp.witness_utxo
    assert final.proprietary == inp.proprietary and final.unknown == inp.unknown
    assert Psbt.parse(finalize_psbt(signed).psbt.serialize()).inputs[0] == final


# --- incomplete inputs ------------------------------------------------------------------------


def test_invalid_signatures_are_left_out(hsm: Hsm, wallet: Wallet) -> None:
    rng = random.Random(9)
    keys = _keys(wallet, 3, rng)
    signed = sign_psbt(hsm, build_psbt([Spend("p2wsh", keys, m=1)]), "w").psbt  # type: ignore[arg-type]
    sigs = signed.inputs[0].partial_sigs
    first, second = sorted(sigs)
    bad = bytearray(sigs[first])
    bad[10] ^= 1
    sigs[first] = bytes(bad)
    res = finalize_psbt(signed)  # 1-of-3: the second, valid signature is enough
    assert_final_spends(res)
    assert res.tx is not None
    assert res.tx.inputs[0].witness[1] == sigs[second]
    del sigs[second]
    res = finalize_psbt(signed)
    assert not res.complete
    assert "do not verify" in res.inputs[0].reason


def test_single_sig_with_wrong_signature_is_incomplete(hsm: Hsm, wallet: Wallet) -> None:
    for kind in ("p2wpkh", "p2pkh", "p2tr"):
        spend = Spend(kind, [wallet.key("m/84'/1'/0'/0/0")])
        psbt = build_psbt([spend])
        signed = sign_psbt(hsm, psbt, "w").psbt
        inp = signed.inputs[0]
        if kind == "p2tr":
            assert inp.tap_key_sig is not None
            inp.tap_key_sig = bytes(reversed(inp.tap_key_sig))
        else:
            (pub,) = inp.partial_sigs
            other = sign_psbt(hsm, build_psbt([spend], fee=999), "w").psbt.inputs[0]
            inp.partial_sigs[pub] = other.partial_sigs[pub]  # valid for another transaction
        res = finalize_psbt(signed)
        assert not res.complete and res.inputs[0].status == "incomplete", kind
        assert "verif" in res.inputs[0].reason or "valid" in res.inputs[0].reason


def test_missing_pieces_are_reported(wallet: Wallet) -> None:
    psbt = build_psbt([Spend("p2wpkh", [wallet.key("m/84'/1'/0'/0/0")])])
    res = finalize_psbt(psbt)
    assert "no valid signature" in res.inputs[0].reason
    psbt.inputs[0].witness_utxo = psbt.inputs[0].non_witness_utxo = None
    assert "previous output not provided" in finalize_psbt(psbt).inputs[0].reason
    odd = build_psbt([Spend("p2wsh", [wallet.key("m/0")] * 1, m=1)])
    odd.inputs[0].witness_script = b"\x51"  # does not hash to the program
    assert "does not hash" in finalize_psbt(odd).inputs[0].reason


def test_non_standard_witness_script_is_left_to_its_builder(wallet: Wallet) -> None:
    script = b"\x51"  # OP_TRUE
    prev = Transaction(2, [TxIn(OutPoint(bytes(32), 0))], [TxOut(10_000, p2wsh(sha256(script)))], 0)
    psbt = Psbt.from_unsigned_tx(
        Transaction(2, [TxIn(OutPoint(prev.txid(), 0))], [TxOut(9_000, b"\x6a")], 0)
    )
    psbt.inputs[0].witness_utxo = prev.outputs[0]
    psbt.inputs[0].witness_script = script
    res = finalize_psbt(psbt)
    assert not res.complete and "does not handle" in res.inputs[0].reason
