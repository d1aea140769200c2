"""The PSBT attacks of issue 9 (items 10-14, and the PSBT part of item 5), each performed
against a real software keystore through ``sign_psbt`` (and the CLI), and refused.

- 10: change hijack through a taproot script tree;
- 11: the segwit v0 fee attack (two rounds, each lying about the other input's amount);
- 12: the fee-rate bypass through a junk final witness on a foreign input;
- 13: paths: change at ``m``, another account, coin type or a huge index; inputs at ``m``
  or at a testnet path on mainnet;
- 14: resource exhaustion: deep paths, many inputs, many derivations, quadratic legacy
  sighash work, all refused before the provider derives or signs anything;
- 5: every outcome of ``sign_psbt`` is an audit entry naming the rules.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tests.bitcoin.test_signer import (
    Spend,
    Wallet,
    add_wallet,
    build_psbt,
    software_hsm,
)

from anyhsm.bitcoin import NothingSigned, Psbt, SigningPolicyError, finalize_psbt
from anyhsm.bitcoin.bip32 import HARDENED, KeyOrigin
from anyhsm.bitcoin.encoding import hash160
from anyhsm.bitcoin.policy import estimate_vsize
from anyhsm.bitcoin.psbt import PsbtOutput, TapKeyOrigin
from anyhsm.bitcoin.psbt_fields import TapTreeLeaf
from anyhsm.bitcoin.script import OP_CHECKSIG, p2tr, p2wpkh
from anyhsm.bitcoin.spend import describe_input
from anyhsm.bitcoin.taproot import leaf_hash, taproot_output_key
from anyhsm.bitcoin.tx import TxOut
from anyhsm.config import Config
from anyhsm.crypto import secp256k1 as ec
from anyhsm.errors import PsbtLimitExceeded
from anyhsm.hsm import Hsm
from anyhsm.ops.psbt import sign_psbt
from anyhsm.providers.software import SoftwareProvider
from anyhsm.types import Network

H = HARDENED


def _rules(err: SigningPolicyError) -> list[tuple[str, str]]:
    return [(str(d["where"]), str(d["rule"])) for d in err.details]


def _p2wpkh(w: Wallet, path: str = "m/84'/1'/0'/0/0", **kw: object) -> Spend:
    return Spend("p2wpkh", [w.key(path)], **kw)  # type: ignore[arg-type]


def _pays_key(w: Wallet, path: str | tuple[int, ...], amount: int = 90_000) -> PsbtOutput:
    pub, origin = w.key(path)
    out = PsbtOutput(amount, p2wpkh(hash160(pub)))
    out.bip32_derivations[pub] = origin
    return out


def _audit(hsm: Hsm) -> list[dict[str, object]]:
    return [json.loads(line) for line in hsm.audit_path.read_text().splitlines()]


class _Calls:
    """Counts what the real software provider is asked to do (derive, sign)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in ("sign_digest", "sign_batch", "derive_public"):
            real = getattr(SoftwareProvider, name)

            def counted(self_: SoftwareProvider, *a: object, _real: object = real) -> object:
                self.count += 1
                return _real(self_, *a)  # type: ignore[operator]

            monkeypatch.setattr(SoftwareProvider, name, counted)


# --- 10: change hijack through a taproot script tree ------------------------------------------


def test_taproot_change_with_an_attacker_leaf_is_not_change(hsm: Hsm, wallet: Wallet) -> None:
    """The internal key is our change key, but PSBT_OUT_TAP_TREE holds the leaf
    ``<attacker key> OP_CHECKSIG``: the attacker can spend it alone, so it is no change."""
    pub, origin = wallet.key("m/86'/1'/0'/1/0")
    attacker = ec.public_key(bytearray(b"\x42" * 32))[1:]
    script = bytes([32]) + attacker + bytes([OP_CHECKSIG])
    leaves = (TapTreeLeaf(0, 0xC0, script),)
    root = leaf_hash(script)
    out = PsbtOutput(99_000, p2tr(taproot_output_key(pub[1:], root)[0]))
    out.tap_internal_key = pub[1:]
    out.tap_tree = leaves
    out.tap_bip32_derivations[pub[1:]] = TapKeyOrigin((), origin)
    spend = Spend("p2tr", [wallet.key("m/86'/1'/0'/0/0")])
    res = sign_psbt(hsm, build_psbt([spend], [out]), "w")
    assert not res.outputs[0].change and res.outputs[0].owner is None
    assert "change-taproot-tree" in res.outputs[0].note
    (warning,) = [w for w in res.warnings if "output 0" in w]
    assert "NOT CHANGE [rule change-taproot-tree]" in warning and "PSBT_OUT_TAP_TREE" in warning
    # the same key without a tree (BIP86) is change
    bip86 = PsbtOutput(99_000, p2tr(taproot_output_key(pub[1:], None)[0]))
    bip86.tap_internal_key = pub[1:]
    bip86.tap_bip32_derivations[pub[1:]] = TapKeyOrigin((), origin)
    assert sign_psbt(hsm, build_psbt([spend], [bip86]), "w").outputs[0].change


# --- 11: segwit v0 fee attack -----------------------------------------------------------------


def _fee_attack_rounds(w: Wallet) -> tuple[Psbt, Psbt, Psbt]:
    """Two inputs of 0.5 BTC, one output of 0.5 BTC: a 0.5 BTC fee. Each round gives only
    PSBT_IN_WITNESS_UTXO and lies about the other input (5,000 sat), so each shows a
    5,000 sat fee."""
    spends = [
        _p2wpkh(w, "m/84'/1'/0'/0/0", amount=50_000_000, non_witness=False),
        _p2wpkh(w, "m/84'/1'/0'/0/1", amount=50_000_000, non_witness=False),
    ]
    outputs = [TxOut(50_000_000, p2wpkh(b"\x99" * 20))]
    honest = build_psbt(spends, outputs, rng=random.Random(11))
    rounds = []
    for lie in (1, 0):
        p = honest.copy()
        real = p.inputs[lie].witness_utxo
        assert real is not None
        p.inputs[lie].witness_utxo = TxOut(5_000, real.script_pubkey)
        rounds.append(p)
    return honest, rounds[0], rounds[1]


def test_segwit_v0_fee_attack_is_refused(hsm: Hsm, wallet: Wallet) -> None:
    _, round1, round2 = _fee_attack_rounds(wallet)
    for p in (round1, round2):
        with pytest.raises(SigningPolicyError) as e:
            sign_psbt(hsm, p, "w")
        assert _rules(e.value) == [
            ("input 0", "missing-previous-tx"),
            ("input 1", "missing-previous-tx"),
        ]
        assert "PSBT_IN_NON_WITNESS_UTXO" in e.value.message


def test_segwit_v0_fee_attack_with_the_other_input_not_ours_is_refused(
    hsm: Hsm, wallet: Wallet
) -> None:
    """The round leaves our derivation off the input it lies about: that input is not
    signed, but its amount is still in the fee and none of our signatures commits to it."""
    _, round1, _ = _fee_attack_rounds(wallet)
    round1.inputs[1].bip32_derivations.clear()
    round1.inputs[0].non_witness_utxo = (
        build_psbt([_p2wpkh(wallet, amount=50_000_000)], rng=random.Random(11))
        .inputs[0]
        .non_witness_utxo
    )
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(hsm, round1, "w")
    assert _rules(e.value) == [("input 1", "unverified-amount")]


def test_the_fee_attack_is_real_when_the_rule_is_relaxed(tmp_path: Path) -> None:
    """With policy.require_previous_tx_segwit_v0 = false (not allowed in production) each
    round shows a 5,000 sat fee and warns, and the kept signatures make a complete,
    valid transaction paying 0.5 BTC: what the rule prevents."""
    with software_hsm(tmp_path / "d", require_previous_tx_segwit_v0=False) as h:
        w = add_wallet(h, "w", bytes(range(32)))
        honest, round1, round2 = _fee_attack_rounds(w)
        r1, r2 = sign_psbt(h, round1, "w"), sign_psbt(h, round2, "w")
        assert r1.fee == r2.fee == 5_000
        assert any("rule missing-previous-tx not enforced" in x for x in r1.warnings)
        combined = honest.copy()
        combined.inputs[0].partial_sigs = r1.psbt.inputs[0].partial_sigs  # true amount
        combined.inputs[1].partial_sigs = r2.psbt.inputs[1].partial_sigs  # true amount
        final = finalize_psbt(combined)
        assert final.complete and final.tx is not None
        assert combined.fee() == 50_000_000  # five times the default policy.max_fee_sat


def test_relaxing_the_previous_tx_rule_is_an_error_in_production() -> None:
    raw: dict[str, object] = {"policy": {"require_previous_tx_segwit_v0": False}}
    dev = Config.from_mapping(raw, env={})
    (p,) = [p for p in dev.check() if p.setting == "policy.require_previous_tx_segwit_v0"]
    assert p.severity == "warning"
    prod = Config.from_mapping({**raw, "environment": "production"}, env={})
    (p,) = [p for p in prod.check() if p.setting == "policy.require_previous_tx_segwit_v0"]
    assert p.severity == "error"


# --- 12: fee-rate bypass ----------------------------------------------------------------------


def _junk_witness_psbt(w: Wallet) -> Psbt:
    stranger = Wallet("x", b"\x07" * 32)
    spends = [
        _p2wpkh(w, amount=5_000_000),
        _p2wpkh(stranger, amount=5_000_000),
    ]
    psbt = build_psbt(spends, fee=9_000_000)
    psbt.inputs[1].final_scriptwitness = [b"\x00" * 400_000]  # not covered by our signature
    return psbt


def test_junk_final_witness_does_not_make_a_large_fee_look_cheap(hsm: Hsm, wallet: Wallet) -> None:
    psbt = _junk_witness_psbt(wallet)
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(hsm, psbt, "w")
    assert _rules(e.value) == [("transaction", "max-fee-rate")]
    # the estimate is the one of the same PSBT without the junk: two P2WPKH inputs
    infos = [describe_input(i) for i in psbt.inputs]
    clean = psbt.copy()
    clean.inputs[1].final_scriptwitness = None
    assert estimate_vsize(psbt, infos)[0] == estimate_vsize(clean, infos)[0] < 250


def test_foreign_input_of_unknown_size_is_counted_small(hsm: Hsm, wallet: Wallet) -> None:
    """A foreign P2WSH input without its witness script cannot be bounded: it is counted at
    its smallest size (fee rate over-estimated, the safe direction) and the report says so."""
    stranger = Wallet("x", b"\x07" * 32)
    foreign = Spend("p2wsh", [stranger.key("m/48'/1'/0'/2'/0/0")])
    psbt = build_psbt([_p2wpkh(wallet), foreign])
    psbt.inputs[1].witness_script = None
    psbt.inputs[1].final_scriptwitness = [b"\x00" * 10_000, b"\x51"]  # does not hash right
    res = sign_psbt(hsm, psbt, "w")
    assert res.vsize < 200
    assert any("input 1" in x and "smallest plausible size" in x for x in res.warnings)


# --- 13: paths --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ((), "not under the account"),
        ("m/84'/1'/1'/1/0", "not on the change branch"),  # another account
        ("m/84'/0'/0'/1/0", "not on the change branch"),  # another coin type
        ("m/44'/1'/0'/1/0", "not on the change branch"),  # another purpose
        ("m/84'/1'/0'/1/2000000000", "not below policy.max_change_index = 100000"),
        ("m/84'/1'/0'/0/7", "not on the change branch"),  # receive branch
    ],
)
def test_change_outside_the_inputs_account_is_outgoing(
    hsm: Hsm, wallet: Wallet, path: str | tuple[int, ...], why: str
) -> None:
    res = sign_psbt(hsm, build_psbt([_p2wpkh(wallet)], [_pays_key(wallet, path)]), "w")
    assert not res.outputs[0].change and res.outputs[0].owner is None
    (warning,) = [w for w in res.warnings if w.startswith("output 0")]
    assert "[rule change-path]" in warning and why in warning


def test_change_under_the_inputs_account_is_change(hsm: Hsm, wallet: Wallet) -> None:
    res = sign_psbt(
        hsm, build_psbt([_p2wpkh(wallet)], [_pays_key(wallet, "m/84'/1'/0'/1/99999")]), "w"
    )
    assert res.outputs[0].change and res.outputs[0].path == "m/84'/1'/0'/1/99999"
    assert not res.warnings


def test_input_at_the_master_key_is_refused(hsm: Hsm, wallet: Wallet) -> None:
    psbt = build_psbt([Spend("p2wpkh", [wallet.key(())])])
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(hsm, psbt, "w")
    assert _rules(e.value) == [("input 0", "input-path")]
    assert "master key itself (m)" in e.value.message


def test_testnet_path_on_mainnet_is_refused(tmp_path: Path) -> None:
    with software_hsm(tmp_path / "main", Network.MAINNET) as h:
        w = add_wallet(h, "w", bytes(range(32)))
        with pytest.raises(SigningPolicyError) as e:
            sign_psbt(h, build_psbt([_p2wpkh(w, "m/84'/1'/0'/0/0")]), "w")
        assert _rules(e.value) == [("input 0", "input-path")]
        assert "coin type 1 is not the one of mainnet" in e.value.message
        # a non-BIP44 layout needs configuring on mainnet (test networks accept it)
        with pytest.raises(SigningPolicyError, match="input-path"):
            sign_psbt(h, build_psbt([_p2wpkh(w, "m/0'/0'/5'")]), "w")
        assert sign_psbt(h, build_psbt([_p2wpkh(w, "m/84'/0'/0'/0/0")]), "w").signed_inputs == 1


def test_input_paths_per_key_and_single_keys(tmp_path: Path) -> None:
    with software_hsm(
        tmp_path / "d",
        allowed_input_paths=("m/84'/1'/*'",),
        key_input_paths={"narrow": ("m/84'/1'/7'",)},
    ) as h:
        w = add_wallet(h, "w", bytes(range(32)))
        narrow = add_wallet(h, "narrow", b"\x03" * 32)
        assert sign_psbt(h, build_psbt([_p2wpkh(w, "m/84'/1'/3'/0/0")]), "w").signed_inputs == 1
        with pytest.raises(SigningPolicyError) as e:
            sign_psbt(h, build_psbt([_p2wpkh(w, "m/86'/1'/0'/0/0")]), "w")
        assert "policy.allowed_input_paths: m/84'/1'/*'" in e.value.message
        with pytest.raises(SigningPolicyError) as e:
            sign_psbt(h, build_psbt([_p2wpkh(narrow, "m/84'/1'/3'/0/0")]), "narrow")
        assert "policy.key_input_paths.narrow: m/84'/1'/7'" in e.value.message
        ok = build_psbt([_p2wpkh(narrow, "m/84'/1'/7'/0/0")])
        assert sign_psbt(h, ok, "narrow").signed_inputs == 1
        solo = h.generate_key("solo").public_key  # no path: the rule does not apply
        assert sign_psbt(h, build_psbt([Spend("p2wpkh", [(solo, None)])]), "solo").signed_inputs


def test_invalid_path_patterns_are_config_errors() -> None:
    cfg = Config.from_mapping(
        {"policy": {"allowed_input_paths": ["m", "84'/0'"], "key_input_paths": {"k": ["m/x"]}}},
        env={},
    )
    problems = [p for p in cfg.check() if "input_paths" in p.setting]
    assert [p.setting for p in problems] == [
        "policy.allowed_input_paths",
        "policy.allowed_input_paths",
        "policy.key_input_paths.k",
    ]
    assert all(p.severity == "error" for p in problems)


# --- 14: resource exhaustion ------------------------------------------------------------------


def _claims(w: Wallet, n: int, path_of: object, rng: random.Random) -> Psbt:
    """``n`` P2WPKH inputs whose keys are not ours but are named under our fingerprint."""
    spends = []
    for i in range(n):
        pub = ec.public_key(bytearray(rng.randbytes(32)))
        spends.append(Spend("p2wpkh", [(pub, KeyOrigin(w.fingerprint, path_of(i)))]))  # type: ignore[operator]
    return build_psbt(spends, rng=rng)


def test_deep_paths_on_a_thousand_inputs_are_refused_before_any_work(
    hsm: Hsm, wallet: Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(14)

    def deep(i: int) -> tuple[int, ...]:
        return (i | H, *(rng.randrange(H) | H for _ in range(254)))

    data = _claims(wallet, 1_000, deep, rng).serialize()
    assert len(data) > 1_100_000
    psbt = Psbt.parse(data)
    calls = _Calls(monkeypatch)
    with pytest.raises(PsbtLimitExceeded) as e:
        sign_psbt(hsm, psbt, "w")
    assert e.value.field == "policy.max_path_depth" and e.value.code == "psbt_limit_exceeded"
    assert "255 steps, deeper than 12" in e.value.message
    assert calls.count == 0
    last = _audit(hsm)[-1]
    assert last["op"] == "psbt_sign" and last["outcome"] == "refused"
    assert last["detail"]["rules"] == "limit"  # type: ignore[index]
    assert last["detail"]["setting"] == "policy.max_path_depth"  # type: ignore[index]


def test_many_derivations_are_refused_before_any_work(
    hsm: Hsm, wallet: Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 inputs at distinct 12-level paths (the depth allowed): 6,000 derivations."""
    rng = random.Random(15)

    def distinct(i: int) -> tuple[int, ...]:
        return (i | H, *(rng.randrange(H) | H for _ in range(11)))

    psbt = _claims(wallet, 500, distinct, rng)
    calls = _Calls(monkeypatch)
    with pytest.raises(PsbtLimitExceeded) as e:
        sign_psbt(hsm, psbt, "w")
    assert e.value.field == "policy.max_key_derivations"
    assert calls.count == 0


def test_counts_and_weight_limits(
    hsm: Hsm, wallet: Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _Calls(monkeypatch)
    many = build_psbt([_p2wpkh(wallet, non_witness=False)] * 2_501, fee=0)
    with pytest.raises(PsbtLimitExceeded) as e:
        sign_psbt(hsm, many, "w")
    assert e.value.field == "policy.max_inputs"
    outputs = [TxOut(1, p2wpkh(bytes(20)))] * 2_501
    with pytest.raises(PsbtLimitExceeded) as e:
        sign_psbt(hsm, build_psbt([_p2wpkh(wallet)], outputs), "w")
    assert e.value.field == "policy.max_outputs"
    heavy = [TxOut(1, b"\x6a" + bytes(9_000))] * 12  # 108 kB of outputs: 432,000 WU
    with pytest.raises(PsbtLimitExceeded) as e:
        sign_psbt(hsm, build_psbt([_p2wpkh(wallet)], heavy), "w")
    assert e.value.field == "policy.max_tx_weight"
    crowded = build_psbt([_p2wpkh(wallet)])
    for n in range(21):
        pub, origin = Wallet("x", bytes([n]) * 32).key("m/84'/1'/0'/0/0")
        crowded.inputs[0].bip32_derivations[pub] = origin
    with pytest.raises(PsbtLimitExceeded) as e:
        sign_psbt(hsm, crowded, "w")
    assert e.value.field == "policy.max_derivations_per_map"
    assert calls.count == 0


def test_quadratic_legacy_sighash_work_is_refused(
    hsm: Hsm, wallet: Wallet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """800 P2PKH inputs of ours: each legacy sighash hashes the whole ~33 kB transaction,
    26 MB in all, above the 20 MB of policy.max_legacy_sighash_bytes."""
    account = wallet.root.derive("m/44'/1'/0'/0")
    spends = [
        Spend(
            "p2pkh",
            [
                (
                    account.derive([i]).public_key,
                    KeyOrigin(wallet.fingerprint, (44 | H, 1 | H, H, 0, i)),
                )
            ],
        )
        for i in range(800)
    ]
    psbt = build_psbt(spends)
    calls = _Calls(monkeypatch)
    with pytest.raises(PsbtLimitExceeded) as e:
        sign_psbt(hsm, psbt, "w")
    assert e.value.field == "policy.max_legacy_sighash_bytes"
    assert calls.count == 0


def test_limits_come_from_the_config(tmp_path: Path) -> None:
    cfg = Config.from_mapping({"policy": {"max_inputs": 3, "max_path_depth": 0}}, env={})
    assert cfg.policy.max_inputs == 3
    assert [p.setting for p in cfg.check() if p.setting.startswith("policy.max")] == [
        "policy.max_path_depth"
    ]
    with software_hsm(tmp_path / "d", max_inputs=1) as h:
        w = add_wallet(h, "w", bytes(range(32)))
        with pytest.raises(PsbtLimitExceeded, match=r"2 inputs, more than 1 \(policy.max_inputs\)"):
            sign_psbt(h, build_psbt([_p2wpkh(w), _p2wpkh(w, "m/84'/1'/0'/0/1")]), "w")


# --- 5: every outcome is audited --------------------------------------------------------------


def test_every_outcome_of_sign_psbt_is_audited(hsm: Hsm, wallet: Wallet) -> None:
    psbt = build_psbt([_p2wpkh(wallet), _p2wpkh(wallet, "m/84'/1'/0'/0/1")])
    txid = psbt.unsigned_tx().txid_hex()
    res = sign_psbt(hsm, psbt, "w")
    *_, sign, ok = _audit(hsm)
    assert sign["op"] == "sign" and sign["detail"]["txid"] == txid  # type: ignore[index]
    assert sign["detail"]["inputs"] == "0,1"  # type: ignore[index]
    assert ok["op"] == "psbt_sign" and ok["outcome"] == "ok"
    assert ok["detail"] == {
        "txid": txid,
        "inputs": "0,1",
        "signatures": "2",
        "fee": str(res.fee),
    }
    assert ok["key"] == hsm.get_key("w").id

    spend = _p2wpkh(wallet, sighash=2, amount=30_000_000)
    refused = build_psbt([spend], fee=20_000_000, rng=random.Random(3))
    with pytest.raises(SigningPolicyError):
        sign_psbt(hsm, refused, "w")
    last = _audit(hsm)[-1]
    assert last["op"] == "psbt_sign" and last["outcome"] == "refused"
    detail = last["detail"]
    assert isinstance(detail, dict)
    assert detail["txid"] == refused.unsigned_tx().txid_hex()
    assert detail["rules"] == "sighash,max-fee,max-fee-rate"
    assert detail["message"].startswith("signing refused: input 0")
    assert last["error"] == "signing_policy"

    stranger = Wallet("x", b"\x07" * 32)
    nothing = build_psbt([_p2wpkh(stranger)], rng=random.Random(4))
    with pytest.raises(NothingSigned):
        sign_psbt(hsm, nothing, "w")
    last = _audit(hsm)[-1]
    assert last["op"] == "psbt_sign" and last["outcome"] == "error"
    assert last["error"] == "nothing_signed"
    assert last["detail"]["rules"] == "nothing-signed"  # type: ignore[index]
    assert last["detail"]["txid"] == nothing.unsigned_tx().txid_hex()  # type: ignore[index]
    assert all(isinstance(v, str) for e in _audit(hsm) for v in (e.get("detail") or {}).values())


def test_audit_entries_stay_bounded(hsm: Hsm, wallet: Wallet) -> None:
    spends = [_p2wpkh(wallet, f"m/84'/1'/0'/0/{i}") for i in range(100)]
    sign_psbt(hsm, build_psbt(spends), "w")
    inputs = _audit(hsm)[-1]["detail"]["inputs"]  # type: ignore[index]
    assert inputs.startswith("0,1,2,") and inputs.endswith(",63,...(+36)")


def test_cli_refused_and_nothing_signed_psbt_sign_are_in_the_audit_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.bitcoin.test_cli_bitcoin import _deploy, _import_wallet, _runner, _wallet

    cfg_path = _deploy(tmp_path, monkeypatch, Network.REGTEST)
    run = _runner(capsys)
    _import_wallet(run, tmp_path)
    w = _wallet()
    audit_log = Config.load(cfg_path, env={}).audit.path
    assert audit_log is not None

    refused = tmp_path / "refused.psbt"
    refused.write_text(build_psbt([_p2wpkh(w, "m/84'/1'/0'/0/0", sighash=3)]).to_base64())
    code, _, err = run("psbt", "sign", "w", str(refused))
    assert code == 7 and "sighash" in err
    nothing = tmp_path / "nothing.psbt"
    nothing.write_text(build_psbt([_p2wpkh(Wallet("x", b"\x07" * 32))]).to_base64())
    code, _, _ = run("psbt", "sign", "w", str(nothing))
    assert code == 9
    entries = [json.loads(line) for line in audit_log.read_text().splitlines()]
    psbt_entries = [e for e in entries if e["op"] == "psbt_sign"]
    assert [(e["outcome"], e["detail"].get("rules")) for e in psbt_entries] == [
        ("refused", "sighash"),
        ("error", "nothing-signed"),
    ]
    assert (
        psbt_entries[1]["detail"]["txid"]
        == Psbt.parse(nothing.read_text()).unsigned_tx().txid_hex()
    )


def test_byte_limit_on_parsed_and_built_psbts(tmp_path: Path) -> None:
    with software_hsm(tmp_path / "d", max_psbt_bytes=400) as h:
        w = add_wallet(h, "w", bytes(range(32)))
        built = build_psbt([_p2wpkh(w), _p2wpkh(w, "m/84'/1'/0'/0/1")])
        data = built.serialize()
        assert len(data) > 400
        parsed = Psbt.parse(data)
        assert parsed.parsed_size == len(data) and parsed == built  # not part of the value
        assert parsed.copy().parsed_size is None
        for psbt in (built, parsed):
            with pytest.raises(PsbtLimitExceeded) as e:
                sign_psbt(h, psbt, "w")
            assert e.value.field == "policy.max_psbt_bytes"
    for form in (data, built.to_base64(), built.to_hex()):
        with pytest.raises(PsbtLimitExceeded, match="before parsing"):
            Psbt.parse(form, max_bytes=400)
        assert Psbt.parse(form, max_bytes=len(data)) == built


@pytest.mark.parametrize("internal_ours", [False, True])
def test_size_estimate_of_taproot_script_and_key_path(tmp_path: Path, internal_ours: bool) -> None:
    """The estimate follows the spend our signatures make: a script path (the leaf, its
    control block, one signature) or the key path, within a few bytes of the real one,
    and finalized or not (final fields are not measured)."""
    from tests.bitcoin.test_signer import _tap_tree_psbt

    with software_hsm(tmp_path / "d", deterministic_schnorr=True) as h:
        w = add_wallet(h, "w", bytes(range(32)))
        psbt, _, _ = _tap_tree_psbt(w, internal_ours=internal_ours)
        res = sign_psbt(h, psbt, "w")
        final = finalize_psbt(res.psbt)
        assert final.tx is not None
        assert final.tx.vsize() <= res.vsize <= final.tx.vsize() + 1
        infos = [describe_input(i) for i in final.psbt.inputs]
        assert estimate_vsize(final.psbt, infos)[0] == final.tx.vsize()


# --- claims under our fingerprint must not relax a rule -------------------------------------
# The signer trusts a derivation naming our fingerprint until its signature fails to verify.
# No rule may be relaxed on such a claim alone: each is derived first.


def _claimed_taproot(w: Wallet, rng: random.Random, leaf_padding: int | None = None) -> Psbt:
    """One P2TR input whose key is not ours, named under our fingerprint: by key path, or
    (``leaf_padding``) by a leaf ``<key> OP_CHECKSIG`` followed by that many OP_NOPs."""
    from anyhsm.bitcoin.psbt import LeafScript
    from anyhsm.bitcoin.tx import OutPoint, Transaction, TxIn

    x = ec.public_key(bytearray(rng.randbytes(32)))[1:]
    origin = KeyOrigin(w.fingerprint, (86 | H, 1 | H, H, 0, 9))
    if leaf_padding is None:
        q = taproot_output_key(x, None)[0]
    else:
        nums = bytes.fromhex("50929b74c1a04954b78b4b6035e97a5e078a5a0f28ec96d547bfee9ace803ac0")
        script = bytes([32]) + x + bytes([OP_CHECKSIG]) + b"\x61" * leaf_padding
        q, parity = taproot_output_key(nums, leaf_hash(script))
    prev = Transaction(2, [TxIn(OutPoint(rng.randbytes(32), 0))], [TxOut(5_000_000, p2tr(q))], 0)
    psbt = Psbt.from_unsigned_tx(
        Transaction(2, [TxIn(OutPoint(prev.txid(), 0), b"", 0xFFFFFFFD)], [], 0)
    )
    inp = psbt.inputs[0]
    inp.witness_utxo = prev.outputs[0]
    if leaf_padding is None:
        inp.tap_internal_key = x
        inp.tap_bip32_derivations[x] = TapKeyOrigin((), origin)
    else:
        cb = bytes([0xC0 | parity]) + nums
        inp.tap_leaf_scripts[cb] = LeafScript(script, 0xC0)
        inp.tap_bip32_derivations[x] = TapKeyOrigin((leaf_hash(script),), origin)
    return psbt


def _join(a: Psbt, b: Psbt, outputs: list[TxOut]) -> Psbt:
    """The inputs of ``a`` then ``b``, with ``outputs``."""
    from anyhsm.bitcoin.tx import Transaction

    ins = [*a.unsigned_tx().inputs, *b.unsigned_tx().inputs]
    psbt = Psbt.from_unsigned_tx(Transaction(2, ins, outputs, 0))
    psbt.inputs = [*a.inputs, *b.inputs]
    return psbt


def test_a_claimed_taproot_input_does_not_waive_the_previous_tx_rule(
    hsm: Hsm, wallet: Wallet
) -> None:
    """A taproot signature of ours would commit to every amount; a taproot input whose
    key is merely claimed under our fingerprint must not waive the rule for the
    lied-about foreign input beside it."""
    rng = random.Random(21)
    stranger = Wallet("x", b"\x07" * 32)
    base = build_psbt([_p2wpkh(wallet), _p2wpkh(stranger, non_witness=False)], rng=rng)
    psbt = _join(base, _claimed_taproot(wallet, rng), [TxOut(5_150_000, p2wpkh(bytes(20)))])
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(hsm, psbt, "w")
    assert ("input 1", "unverified-amount") in _rules(e.value)


def test_a_claimed_input_at_another_account_does_not_make_change(hsm: Hsm, wallet: Wallet) -> None:
    """An input naming our fingerprint at account 5' with a key not ours must not make
    our key's output at account 5' look like change."""
    rng = random.Random(22)
    fake = ec.public_key(bytearray(rng.randbytes(32)))
    claim = Spend("p2wpkh", [(fake, KeyOrigin(wallet.fingerprint, (84 | H, 1 | H, 5 | H, 0, 0)))])
    change = _pays_key(wallet, "m/84'/1'/5'/1/0")
    res = sign_psbt(hsm, build_psbt([_p2wpkh(wallet), claim], [change], rng=rng), "w")
    assert [r.status for r in res.inputs] == ["signed", "not-signed"]
    assert not res.outputs[0].change
    assert any("[rule change-path]" in w for w in res.warnings)


def test_a_claimed_large_leaf_does_not_lower_the_fee_rate(hsm: Hsm, wallet: Wallet) -> None:
    """A foreign input's 100 kB leaf, with its key claimed under our fingerprint, is not
    a spend we make: its size is not counted (a 9,000,000 sat fee stays expensive)."""
    rng = random.Random(23)
    base = build_psbt([_p2wpkh(wallet, amount=5_000_000)], rng=rng)
    claimed = _claimed_taproot(wallet, rng, leaf_padding=100_000)
    claimed.inputs[0].non_witness_utxo = None
    psbt = _join(base, claimed, [TxOut(1_000_000, p2wpkh(bytes(20)))])
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(hsm, psbt, "w")
    assert ("transaction", "max-fee-rate") in _rules(e.value)


def test_a_claimed_taproot_input_cannot_lie_about_its_own_amount(hsm: Hsm, wallet: Wallet) -> None:
    """The claimed taproot input itself has only a witness UTXO: our ECDSA signature does
    not commit to its amount and its own "signature" will not verify, so it is refused."""
    rng = random.Random(24)
    base = build_psbt([_p2wpkh(wallet)], rng=rng)
    psbt = _join(base, _claimed_taproot(wallet, rng), [TxOut(5_050_000, p2wpkh(bytes(20)))])
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(hsm, psbt, "w")
    assert _rules(e.value) == [("input 1", "unverified-amount")]


def test_production_ignores_a_relaxed_previous_tx_rule(tmp_path: Path) -> None:
    """'config check' reports the relaxation as an error in production; signing there
    applies the rule anyway."""
    import dataclasses

    from tests.bitcoin.test_signer import PASSPHRASE

    from anyhsm.deploy import init_deployment
    from anyhsm.hsm import open_hsm
    from anyhsm.secret import SecretBytes
    from anyhsm.types import Environment

    cfg_path = init_deployment(
        tmp_path / "prod", SecretBytes(PASSPHRASE.encode()), environment=Environment.PRODUCTION
    )
    cfg = Config.load(cfg_path, env={})
    cfg = dataclasses.replace(
        cfg, policy=dataclasses.replace(cfg.policy, require_previous_tx_segwit_v0=False)
    )
    assert any(
        p.setting == "policy.require_previous_tx_segwit_v0" and p.severity == "error"
        for p in cfg.check()
    )
    with open_hsm(cfg, passphrase=PASSPHRASE) as h:
        w = add_wallet(h, "w", bytes(range(32)))
        with pytest.raises(SigningPolicyError) as e:
            sign_psbt(h, build_psbt([_p2wpkh(w, non_witness=False)]), "w")
        assert _rules(e.value) == [("input 0", "missing-previous-tx")]
