"""anyhsm.ops.psbt: parse, inspect (fee, vsize, one script-type vocabulary), sign under
the handle's policy and network, finalize."""

from __future__ import annotations

import json

import pytest
from tests.bitcoin.test_signer import Spend, Wallet, build_psbt
from tests.ops.conftest import wallet

from anyhsm.bitcoin.psbt import Psbt, PsbtOutput
from anyhsm.bitcoin.script import p2pkh, p2sh, p2tr, p2wsh
from anyhsm.bitcoin.script_kind import ScriptKind
from anyhsm.bitcoin.tx import TxOut
from anyhsm.errors import NothingSigned, PsbtError, PsbtLimitExceeded
from anyhsm.hsm import Hsm
from anyhsm.ops import psbt as ops
from anyhsm.types import Network


def test_parse_refuses_empty_and_oversized() -> None:
    with pytest.raises(PsbtError, match="stdin is empty"):
        ops.parse_psbt(b" \n", source="stdin")
    psbt = build_psbt([Spend("p2wpkh", [wallet().key("m/84'/1'/0'/0/0")])])
    assert ops.parse_psbt(psbt.to_base64()).unique_id() == psbt.unique_id()
    assert ops.parse_psbt(psbt.serialize()).unique_id() == psbt.unique_id()
    with pytest.raises(PsbtLimitExceeded):
        ops.parse_psbt(psbt.to_base64(), max_bytes=10)


def test_inspect_computes_the_fee_and_names_script_types_once() -> None:
    w = wallet()
    outs = [
        TxOut(10_000, p2pkh(b"\x01" * 20)),
        TxOut(10_000, p2sh(b"\x02" * 20)),
        TxOut(10_000, p2wsh(b"\x03" * 32)),
        TxOut(10_000, p2tr(b"\x02" * 32)),
        TxOut(0, bytes([0x6A, 0x02, 0xAB, 0xCD])),
    ]
    spends = [
        Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")], amount=30_000),
        Spend("p2sh-p2wpkh", [w.key("m/49'/1'/0'/0/0")], amount=11_500),
    ]
    res = ops.inspect_psbt(build_psbt(spends, outs), Network.REGTEST)
    assert res.fee == 41_500 - 40_000 and res.vsize > 0
    assert res.fee_rate == round(1_500 / res.vsize, 3)
    assert [i.script_type for i in res.inputs] == [ScriptKind.P2WPKH, ScriptKind.P2SH_P2WPKH]
    assert [o.script_type for o in res.outputs] == [
        ScriptKind.P2PKH,
        ScriptKind.P2SH,
        ScriptKind.P2WSH,
        ScriptKind.P2TR,
        ScriptKind.OP_RETURN,
    ]
    d = res.to_dict()
    json.dumps(d)
    outputs = d["outputs"]
    assert isinstance(outputs, list)
    assert outputs[0]["address"].startswith("m") or outputs[0]["address"].startswith("n")
    assert outputs[0]["note"] is None  # no value is null, never ""
    assert outputs[4]["address"] is None and "OP_RETURN" in outputs[4]["note"]
    assert d["inputs"][0]["derivations"] == [  # type: ignore[index]
        {"pubkey": w.pub("m/84'/1'/0'/0/0").hex(), "origin": "[73c5da0a/84'/1'/0'/0/0]"}
    ]
    every_kind = {o["script_type"] for o in outputs} | {
        i["script_type"]
        for i in d["inputs"]  # type: ignore[attr-defined]
    }
    assert every_kind <= {k.value for k in ScriptKind}


def test_inspect_without_previous_outputs_has_no_fee() -> None:
    psbt = build_psbt([Spend("p2wpkh", [wallet().key("m/84'/1'/0'/0/0")], witness=False)])
    psbt.inputs[0].non_witness_utxo = None
    res = ops.inspect_psbt(psbt)
    assert res.fee is None and res.fee_rate is None
    assert res.inputs[0].script_type is ScriptKind.UNKNOWN and res.inputs[0].problem


def test_sign_uses_the_handles_policy_and_network(hsm: Hsm) -> None:
    w = wallet()
    stranger = Wallet("x", b"\x05" * 32)
    psbt = build_psbt(
        [
            Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")]),
            Spend("p2tr", [w.key("m/86'/1'/0'/0/0")]),
            Spend("p2wpkh", [stranger.key("m/84'/1'/0'/0/0")]),
        ]
    )
    before = psbt.to_base64()
    res = ops.sign_psbt(hsm, psbt.to_base64(), "w")  # data is parsed under the policy
    assert [r.status for r in res.inputs] == ["signed", "signed", "not-signed"]
    assert res.fee == 1000 and psbt.to_base64() == before  # the input is not modified
    again = ops.sign_psbt(hsm, psbt)  # any key of the handle
    assert again.signed_inputs == 2
    fin = ops.finalize_psbt(res.psbt)
    assert not fin.complete  # the stranger's input is unsigned


def test_sign_then_finalize(hsm: Hsm) -> None:
    psbt = build_psbt([Spend("p2wpkh", [wallet().key("m/84'/1'/0'/0/0")])])
    res = ops.sign_psbt(hsm, psbt, "w")
    fin = ops.finalize_psbt(res.psbt)
    assert fin.complete and fin.tx is not None
    assert Psbt.parse(fin.to_dict()["psbt"]).is_finalized()  # type: ignore[arg-type]
    assert ops.inspect_psbt(fin.psbt).finalized


def test_nothing_signed_is_an_error(hsm: Hsm) -> None:
    stranger = Wallet("x", b"\x05" * 32)
    psbt = build_psbt([Spend("p2wpkh", [stranger.key("m/84'/1'/0'/0/0")])])
    with pytest.raises(NothingSigned):
        ops.sign_psbt(hsm, psbt, "w")


def test_oversized_psbt_data_is_refused_before_parsing(hsm: Hsm) -> None:
    limit = hsm.config.policy.max_psbt_bytes
    with pytest.raises(PsbtLimitExceeded):
        ops.sign_psbt(hsm, b"A" * (2 * limit + 1), "w")


def test_output_derivations_are_listed() -> None:
    w = wallet()
    pub, origin = w.key("m/84'/1'/0'/1/0")
    out = PsbtOutput(amount=9_000, script=p2pkh(b"\x01" * 20))
    out.bip32_derivations[pub] = origin
    res = ops.inspect_psbt(build_psbt([Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])], [out]))
    assert res.outputs[0].derivations[0].origin == "[73c5da0a/84'/1'/0'/1/0]"
    assert "leaves" not in res.to_dict()["outputs"][0]["derivations"][0]  # type: ignore[index]
