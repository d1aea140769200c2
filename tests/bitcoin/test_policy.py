"""Signing policy: every rule of anyhsm.bitcoin.policy, through sign_psbt on a real keystore."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tests.bitcoin.test_signer import (
    BIP174,
    Spend,
    Wallet,
    _import_master,
    add_wallet,
    build_psbt,
    software_hsm,
)

from anyhsm.bitcoin import NothingSigned, Psbt, SigningPolicyError, finalize_psbt
from anyhsm.bitcoin.bip32 import ExtendedKey
from anyhsm.bitcoin.encoding import hash160
from anyhsm.bitcoin.policy import estimate_vsize
from anyhsm.bitcoin.psbt import PsbtOutput, TapKeyOrigin
from anyhsm.bitcoin.psbt_fields import TapTreeLeaf
from anyhsm.bitcoin.script import multisig, op_return, p2pkh, p2sh, p2tr, p2wpkh
from anyhsm.bitcoin.spend import SpendKind, describe_input
from anyhsm.bitcoin.taproot import TapLeaf, depth_first_merkle_root, merkle_root, taproot_output_key
from anyhsm.bitcoin.tx import TxOut
from anyhsm.hsm import Hsm
from anyhsm.ops.psbt import sign_psbt
from anyhsm.types import Network


def _refusal(err: SigningPolicyError) -> list[tuple[str, str]]:
    return [(str(d["where"]), str(d["rule"])) for d in err.details]


def _p2wpkh(w: Wallet, i: int = 0, **kw: object) -> Spend:
    return Spend("p2wpkh", [w.key(f"m/84'/1'/0'/0/{i}")], **kw)  # type: ignore[arg-type]


# --- previous outputs -------------------------------------------------------------------------


def test_input_without_previous_output_is_refused(hsm: Hsm, wallet: Wallet) -> None:
    psbt = build_psbt([_p2wpkh(wallet)])
    psbt.inputs[0].witness_utxo = psbt.inputs[0].non_witness_utxo = None
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(hsm, psbt, "w")
    assert _refusal(e.value) == [("input 0", "missing-utxo")]
    assert "input 0: previous output not provided" in e.value.message
    assert e.value.exit_code == 7


def test_foreign_input_without_previous_output_is_refused_too(hsm: Hsm, wallet: Wallet) -> None:
    """The fee needs every input's amount, ours or not."""
    stranger = Wallet("x", b"\x07" * 32)
    psbt = build_psbt([_p2wpkh(wallet), _p2wpkh(stranger)])
    psbt.inputs[1].witness_utxo = psbt.inputs[1].non_witness_utxo = None
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(hsm, psbt, "w")
    assert _refusal(e.value) == [("input 1", "missing-utxo")]


def test_witness_utxo_must_match_non_witness_utxo(hsm: Hsm, wallet: Wallet) -> None:
    psbt = build_psbt([_p2wpkh(wallet, non_witness=True)])
    inp = psbt.inputs[0]
    assert inp.witness_utxo is not None
    inp.witness_utxo = TxOut(inp.witness_utxo.value + 1, inp.witness_utxo.script_pubkey)
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(hsm, psbt, "w")
    assert _refusal(e.value) == [("input 0", "inconsistent-input")]
    assert "does not match the spent output" in e.value.message
    # a serialised PSBT with that mismatch does not even parse
    from anyhsm.errors import PsbtError

    with pytest.raises(PsbtError, match="PSBT_IN_WITNESS_UTXO"):
        Psbt.parse(psbt.serialize())


def test_only_witness_utxo_is_refused_for_segwit_v0_only(hsm: Hsm, wallet: Wallet) -> None:
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(hsm, build_psbt([_p2wpkh(wallet, non_witness=False)]), "w")
    assert _refusal(e.value) == [("input 0", "missing-previous-tx")]
    res = sign_psbt(hsm, build_psbt([_p2wpkh(wallet, non_witness=True)]), "w")
    assert not any("WITNESS_UTXO" in w for w in res.warnings)
    taproot = Spend("p2tr", [wallet.key("m/86'/1'/0'/0/0")])
    res = sign_psbt(hsm, build_psbt([taproot]), "w")  # BIP341 commits to every amount
    assert not any("WITNESS_UTXO" in w for w in res.warnings)


def test_only_witness_utxo_is_a_warning_when_the_policy_relaxes_it(tmp_path: Path) -> None:
    with software_hsm(tmp_path / "d", require_previous_tx_segwit_v0=False) as h:
        w = add_wallet(h, "w", bytes(range(32)))
        res = sign_psbt(h, build_psbt([_p2wpkh(w, non_witness=False)]), "w")
        assert any("input 0: only PSBT_IN_WITNESS_UTXO" in x for x in res.warnings)


def test_witness_utxo_for_a_legacy_input_is_refused(hsm: Hsm, wallet: Wallet) -> None:
    psbt = build_psbt([Spend("p2pkh", [wallet.key("m/44'/1'/0'/0/0")], non_witness=False)])
    psbt.inputs[0].witness_utxo = TxOut(100_000, p2pkh(hash160(wallet.pub("m/44'/1'/0'/0/0"))))
    with pytest.raises(SigningPolicyError, match="non-segwit input"):
        sign_psbt(hsm, psbt, "w")


def test_bip174_signer_check_vectors(hsm: Hsm) -> None:
    """The four PSBTs of BIP174 that a signer must refuse."""
    _import_master(hsm, "bip174", BIP174["workflow"]["master_tprv"])
    for case in BIP174["fails_signer_checks"]:
        psbt = Psbt.parse(case["base64"])
        problems = [describe_input(i).problem for i in psbt.inputs]
        assert any(problems), case["description"]
        if any(i.bip32_derivations for i in psbt.inputs):  # the workflow key is involved
            with pytest.raises(SigningPolicyError, match="inconsistent-input"):
                sign_psbt(hsm, psbt, "bip174")
        else:
            with pytest.raises(NothingSigned):
                sign_psbt(hsm, psbt, "bip174")


# --- sighash types ----------------------------------------------------------------------------


@pytest.mark.parametrize("hash_type", [0x02, 0x03, 0x81, 0x82, 0x83])
def test_sighash_types_other_than_all_are_refused(hsm: Hsm, wallet: Wallet, hash_type: int) -> None:
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(hsm, build_psbt([_p2wpkh(wallet, sighash=hash_type)]), "w")
    assert _refusal(e.value) == [("input 0", "sighash")]
    assert "policy.allowed_sighash_types" in e.value.message
    taproot = Spend("p2tr", [wallet.key("m/86'/1'/0'/0/0")], sighash=hash_type)
    with pytest.raises(SigningPolicyError):
        sign_psbt(hsm, build_psbt([taproot]), "w")


def test_sighash_default_is_refused_for_ecdsa(hsm: Hsm, wallet: Wallet) -> None:
    with pytest.raises(SigningPolicyError, match="not valid for an ECDSA signature"):
        sign_psbt(hsm, build_psbt([_p2wpkh(wallet, sighash=0x00)]), "w")


def test_allowed_sighash_types_come_from_the_config(tmp_path: Path) -> None:
    with software_hsm(tmp_path / "d", allowed_sighash_types=(0, 1, 0x83)) as h:
        w = add_wallet(h, "w", bytes(range(32)))
        res = sign_psbt(h, build_psbt([_p2wpkh(w, sighash=0x83)]), "w")
        (sig,) = res.psbt.inputs[0].partial_sigs.values()
        assert sig[-1] == 0x83
        assert res.inputs[0].signatures[0].sighash == 0x83
        assert finalize_psbt(res.psbt).complete
        with pytest.raises(SigningPolicyError):
            sign_psbt(h, build_psbt([_p2wpkh(w, sighash=0x02)]), "w")


def test_sighash_of_inputs_we_do_not_sign_is_not_our_business(hsm: Hsm, wallet: Wallet) -> None:
    stranger = Wallet("x", b"\x07" * 32)
    psbt = build_psbt([_p2wpkh(wallet), _p2wpkh(stranger, sighash=0x82)])
    assert sign_psbt(hsm, psbt, "w").signed_inputs == 1


# --- fee --------------------------------------------------------------------------------------


def test_fee_and_vsize_are_reported(hsm: Hsm, wallet: Wallet) -> None:
    spends = [_p2wpkh(wallet, i, amount=50_000 + i) for i in range(3)]
    spends.append(Spend("p2tr", [wallet.key("m/86'/1'/0'/0/0")], amount=70_000))
    spends.append(Spend("p2pkh", [wallet.key("m/44'/1'/0'/0/0")], amount=30_000))
    spends.append(Spend("p2sh-p2wpkh", [wallet.key("m/49'/1'/0'/0/0")], amount=20_000))
    psbt = build_psbt(spends, fee=4_321)
    res = sign_psbt(hsm, psbt, "w")
    assert res.fee == 4_321
    assert res.inputs_total == sum(s.amount for s in spends)
    assert res.outputs_total == res.inputs_total - 4_321
    final = finalize_psbt(res.psbt)
    assert final.tx is not None
    actual = final.tx.vsize()
    # estimated with 72-byte ECDSA signatures; low-R signatures are 71 (or fewer) bytes
    assert actual <= res.vsize <= actual + 2
    assert res.fee_rate == pytest.approx(4_321 / res.vsize)


def test_estimate_of_finalized_psbt_comes_from_the_scripts(hsm: Hsm, wallet: Wallet) -> None:
    """Final fields are never measured (see test_policy_hardening): a finalized PSBT is
    estimated from its scripts like an unsigned one, 72-byte signatures and all."""
    spends = [_p2wpkh(wallet, i) for i in range(2)] + [
        Spend("p2pkh", [wallet.key("m/44'/1'/0'/0/0")])
    ]
    signed = sign_psbt(hsm, build_psbt(spends), "w")
    final = finalize_psbt(signed.psbt)
    assert final.tx is not None
    vsize, notes = estimate_vsize(final.psbt, [describe_input(i) for i in final.psbt.inputs])
    assert final.tx.vsize() <= vsize <= final.tx.vsize() + 2 and not notes
    assert vsize == signed.vsize


def test_fee_above_the_limit_is_refused(tmp_path: Path) -> None:
    with software_hsm(tmp_path / "d", max_fee_sat=20_000) as h:
        w = add_wallet(h, "w", bytes(range(32)))
        assert sign_psbt(h, build_psbt([_p2wpkh(w)], fee=20_000), "w").fee == 20_000
        with pytest.raises(SigningPolicyError) as e:
            sign_psbt(h, build_psbt([_p2wpkh(w)], fee=20_001), "w")
        assert ("transaction", "max-fee") in _refusal(e.value)
        assert "fee 20001 sat is above the limit policy.max_fee_sat = 20000" in e.value.message


def test_fee_rate_above_the_limit_is_refused(tmp_path: Path) -> None:
    with software_hsm(tmp_path / "d", max_fee_rate_sat_vb=50.0) as h:
        w = add_wallet(h, "w", bytes(range(32)))
        ok = sign_psbt(h, build_psbt([_p2wpkh(w)], fee=5_000), "w")
        assert ok.fee_rate <= 50
        with pytest.raises(SigningPolicyError) as e:
            sign_psbt(h, build_psbt([_p2wpkh(w)], fee=8_000), "w")
        assert _refusal(e.value) == [("transaction", "max-fee-rate")]
        assert "sat/vB" in e.value.message


def test_default_limits_refuse_an_absurd_fee(hsm: Hsm, wallet: Wallet) -> None:
    spend = _p2wpkh(wallet, amount=50_000_000)
    with pytest.raises(SigningPolicyError) as e:  # 0.2 BTC fee, default limit 0.1 BTC
        sign_psbt(hsm, build_psbt([spend], fee=20_000_000), "w")
    assert {r for _, r in _refusal(e.value)} == {"max-fee", "max-fee-rate"}


def test_outputs_above_inputs_are_refused(hsm: Hsm, wallet: Wallet) -> None:
    psbt = build_psbt([_p2wpkh(wallet)], outputs=[TxOut(100_001, p2wpkh(bytes(20)))])
    with pytest.raises(SigningPolicyError, match="negative-fee"):
        sign_psbt(hsm, psbt, "w")


def test_every_refusal_is_listed(hsm: Hsm, wallet: Wallet) -> None:
    spends = [_p2wpkh(wallet, 0, sighash=2), _p2wpkh(wallet, 1, amount=30_000_000)]
    psbt = build_psbt(spends, fee=20_000_000)
    psbt.inputs[1].witness_utxo = psbt.inputs[1].non_witness_utxo = None
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(hsm, psbt, "w")
    assert _refusal(e.value) == [("input 0", "sighash"), ("input 1", "missing-utxo")]
    assert "and 1 more refusal" in e.value.message


# --- outputs ----------------------------------------------------------------------------------


def test_change_outputs_are_identified(hsm: Hsm, wallet: Wallet) -> None:
    stranger = Wallet("x", b"\x07" * 32)
    change_pub, change_origin = wallet.key("m/84'/1'/0'/1/3")
    tap_pub, tap_origin = wallet.key("m/86'/1'/0'/1/4")
    lie_pub, lie_origin = wallet.key("m/84'/1'/0'/1/5")
    far_pub, far_origin = stranger.key("m/84'/1'/0'/1/3")
    solo = hsm.generate_key("solo").public_key

    change = PsbtOutput(10_000, p2wpkh(hash160(change_pub)))
    change.bip32_derivations[change_pub] = change_origin
    nested = PsbtOutput(10_000, p2sh(hash160(p2wpkh(hash160(change_pub)))))
    nested.bip32_derivations[change_pub] = change_origin
    tap = PsbtOutput(10_000, p2tr(taproot_output_key(tap_pub[1:], None)[0]))
    tap.tap_internal_key = tap_pub[1:]
    tap.tap_bip32_derivations[tap_pub[1:]] = TapKeyOrigin((), tap_origin)
    lie = PsbtOutput(10_000, p2wpkh(bytes(20)))  # claims our key, pays someone else
    lie.bip32_derivations[lie_pub] = lie_origin
    foreign = PsbtOutput(10_000, p2wpkh(hash160(far_pub)))
    foreign.bip32_derivations[far_pub] = far_origin
    single = PsbtOutput(10_000, p2pkh(hash160(solo)))
    outputs = [change, nested, tap, lie, foreign, single]
    # change is under the account of an input: the taproot change needs a taproot input
    taproot = Spend("p2tr", [wallet.key("m/86'/1'/0'/0/0")], amount=30_000)
    psbt = build_psbt([_p2wpkh(wallet, amount=31_000), taproot], outputs)
    res = sign_psbt(hsm, psbt)
    assert [o.change for o in res.outputs] == [True, True, True, False, False, True]
    assert [o.owner for o in res.outputs] == ["w", "w", "w", None, None, "solo"]
    assert res.outputs[0].path == "m/84'/1'/0'/1/3"
    assert res.outputs[2].path == "m/86'/1'/0'/1/4"
    assert res.outputs[0].address is not None and res.outputs[0].address.startswith("bcrt1q")


def test_taproot_output_with_a_script_tree_is_not_change(hsm: Hsm, wallet: Wallet) -> None:
    """Our internal key, but a tree of leaves (here OP_1, OP_2, OP_3: anyone can spend
    them) beside it: not ours alone, so not change (issue 9 item 10)."""
    pub, origin = wallet.key("m/86'/1'/0'/1/0")
    leaves = [TapLeaf(b"\x51"), TapLeaf(b"\x52"), TapLeaf(b"\x53")]
    tree = (leaves[0], (leaves[1], leaves[2]))
    root = merkle_root(tree)
    psbt_leaves = (
        TapTreeLeaf(1, 0xC0, b"\x51"),
        TapTreeLeaf(2, 0xC0, b"\x52"),
        TapTreeLeaf(2, 0xC0, b"\x53"),
    )
    assert depth_first_merkle_root(psbt_leaves) == root
    out = PsbtOutput(99_000, p2tr(taproot_output_key(pub[1:], root)[0]))
    out.tap_internal_key = pub[1:]
    out.tap_tree = psbt_leaves
    out.tap_bip32_derivations[pub[1:]] = TapKeyOrigin((), origin)
    res = sign_psbt(hsm, build_psbt([Spend("p2tr", [wallet.key("m/86'/1'/0'/0/0")])], [out]), "w")
    assert not res.outputs[0].change and res.outputs[0].owner is None
    assert any("NOT CHANGE [rule change-taproot-tree]" in w for w in res.warnings)
    assert res.outputs[0].not_change == "change-taproot-tree"
    assert res.outputs[0].to_dict()["not_change"] == "change-taproot-tree"


def test_scripts_without_address_are_shown_never_refused(hsm: Hsm, wallet: Wallet) -> None:
    rng = random.Random(5)
    keys = [ExtendedKey.from_seed(rng.randbytes(32)).public_key for _ in range(2)]
    outputs = [
        TxOut(0, op_return(b"anyhsm")),
        TxOut(1_000, multisig(1, keys)),
        TxOut(1_000, bytes([0x52, 0x20]) + bytes(32)),  # witness v2: an address, with a warning
        TxOut(96_000, p2wpkh(bytes(20))),
    ]
    res = sign_psbt(hsm, build_psbt([_p2wpkh(wallet)], outputs), "w")
    op, bare, v2, normal = res.outputs
    assert op.address is None and op.note.startswith("OP_RETURN data (6 bytes)")
    assert bare.address is None and "without an address" in bare.note
    assert v2.address is not None and v2.address.startswith("bcrt1z")
    assert any("future witness version" in w for w in res.warnings)
    assert normal.address is not None and not normal.note


def test_global_xpub_of_another_network_is_refused(hsm: Hsm, wallet: Wallet) -> None:
    psbt = build_psbt([_p2wpkh(wallet)])
    mainnet = ExtendedKey.from_seed(b"\x01" * 32, Network.MAINNET).neuter()
    from anyhsm.bitcoin.bip32 import KeyOrigin

    psbt.global_map.xpubs[mainnet.serialize()] = KeyOrigin(mainnet.fingerprint)
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(hsm, psbt, "w")
    assert _refusal(e.value) == [("global xpub 0", "network")]
    assert "mainnet" in e.value.message and "regtest" in e.value.message
    testnet = ExtendedKey.from_seed(b"\x01" * 32, Network.TESTNET).neuter()
    psbt.global_map.xpubs = {testnet.serialize(): KeyOrigin(testnet.fingerprint)}
    assert sign_psbt(hsm, psbt, "w").signed_inputs == 1


def test_change_on_the_mainnet_coin_type_is_not_change(hsm: Hsm, wallet: Wallet) -> None:
    pub, origin = wallet.key("m/84'/0'/0'/1/0")
    out = PsbtOutput(99_000, p2wpkh(hash160(pub)))
    out.bip32_derivations[pub] = origin
    res = sign_psbt(hsm, build_psbt([_p2wpkh(wallet)], [out]), "w")
    assert not res.outputs[0].change
    assert any("[rule change-path]" in w and "m/84'/0'/0'/1/0" in w for w in res.warnings)
    assert res.outputs[0].not_change == "change-path"


def test_addresses_use_the_configured_network(tmp_path: Path) -> None:
    with software_hsm(tmp_path / "main", Network.MAINNET) as h:
        w = add_wallet(h, "w", bytes(range(32)))
        spend = Spend("p2wpkh", [w.key("m/84'/0'/0'/0/0")])
        res = sign_psbt(h, build_psbt([spend]), "w")
        assert res.outputs[0].address is not None
        assert res.outputs[0].address.startswith("bc1q")


def test_policy_from_the_toml_file(tmp_path: Path) -> None:
    from tests.bitcoin.test_signer import PASSPHRASE

    from anyhsm.deploy import FAST_DEV_KDF, init_deployment
    from anyhsm.hsm import open_hsm
    from anyhsm.secret import SecretBytes

    cfg = init_deployment(tmp_path / "t", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    cfg.write_text(cfg.read_text() + "\n[policy]\nmax_fee_sat = 999\n")
    with open_hsm(cfg, passphrase=PASSPHRASE) as h:
        w = add_wallet(h, "w", bytes(range(32)))
        with pytest.raises(SigningPolicyError, match="max_fee_sat = 999"):
            sign_psbt(h, build_psbt([_p2wpkh(w)], fee=1_000), "w")


def test_describe_input_kinds(wallet: Wallet) -> None:
    kinds = ["p2pkh", "p2sh-p2wpkh", "p2wpkh", "p2tr"]
    spends = [Spend(k, [wallet.key(f"m/0/{n}")]) for n, k in enumerate(kinds)]
    psbt = build_psbt(spends)
    assert [describe_input(i).kind for i in psbt.inputs] == [
        SpendKind.P2PKH,
        SpendKind.P2SH_P2WPKH,
        SpendKind.P2WPKH,
        SpendKind.P2TR,
    ]
    psbt.inputs[1].redeem_script = None
    info = describe_input(psbt.inputs[1])
    assert info.problem is None and info.unsignable == "the P2SH redeem script is not given"


def test_sighash_single_without_matching_output_is_refused(tmp_path: Path) -> None:
    """Legacy SIGHASH_SINGLE past the last output signs the constant 'one' hash (the
    SIGHASH_SINGLE bug): such a signature could be replayed; it is never made."""
    with software_hsm(tmp_path / "d", allowed_sighash_types=(0, 1, 3)) as h:
        w = add_wallet(h, "w", bytes(range(32)))
        spends = [
            Spend("p2pkh", [w.key("m/44'/1'/0'/0/0")], sighash=3),
            Spend("p2pkh", [w.key("m/44'/1'/0'/0/1")], sighash=3),
        ]
        with pytest.raises(SigningPolicyError) as e:
            sign_psbt(h, build_psbt(spends), "w")  # one output: input 1 has no partner
        assert _refusal(e.value) == [("input 1", "sighash")]
        assert "SIGHASH_SINGLE" in e.value.message
        spends[1].sighash = 1
        res = sign_psbt(h, build_psbt(spends), "w")
        assert [s.sighash for r in res.inputs for s in r.signatures] == [3, 1]
