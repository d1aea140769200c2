"""PSBT version 2 (BIP370) and taproot fields (BIP371): the BIPs' vectors (tests/data, with
their source noted there), lock time determination, v0 <-> v2 conversion, construction, and
an embit differential."""

from __future__ import annotations

import json
from typing import Any

import pytest
from embit.psbt import PSBT as EmbitPsbt  # type: ignore[import-untyped]
from tests.vectors import data_dir

from anyhsm.bitcoin.encoding import tagged_hash, var_bytes
from anyhsm.bitcoin.psbt import Psbt, PsbtInput, PsbtOutput
from anyhsm.bitcoin.tx import OutPoint
from anyhsm.crypto.secp256k1 import xonly_tweak_add
from anyhsm.errors import PsbtError


def _load(name: str) -> dict[str, Any]:
    with (data_dir() / name).open(encoding="utf-8") as fh:
        return json.load(fh)  # type: ignore[no-any-return]


V2 = _load("psbt_v2_vectors.json")
TAPROOT = _load("psbt_taproot_vectors.json")
V2_VALID = [(v["description"], v) for v in V2["valid"]]
V2_ALL_VALID = V2_VALID + [(v["description"], v) for v in V2["locktime"]]
TR_VALID = [(v["description"], v) for v in TAPROOT["valid"]]


def ids(x: object) -> str:
    return str(x)[:60]


def test_sources_and_counts() -> None:
    assert V2["source"]["path"] == "bip-0370.mediawiki"
    assert TAPROOT["source"]["path"] == "bip-0371.mediawiki"
    assert (len(V2["invalid"]), len(V2["valid"]), len(V2["locktime"])) == (21, 14, 10)
    assert (len(TAPROOT["invalid"]), len(TAPROOT["valid"])) == (11, 6)


# --- BIP370 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vector", V2["invalid"] + TAPROOT["invalid"], ids=lambda v: v["description"][:60]
)
def test_invalid_vectors_name_the_field(vector: dict[str, str]) -> None:
    for form in (vector["hex"], vector["base64"], bytes.fromhex(vector["hex"])):
        with pytest.raises(PsbtError) as info:
            Psbt.parse(form)
        err = info.value
        assert err.field == vector["field"], err.message
        assert err.message.startswith(vector["field"] + ":")


@pytest.mark.parametrize(("description", "vector"), V2_ALL_VALID, ids=ids)
def test_v2_vectors_round_trip(description: str, vector: dict[str, Any]) -> None:
    for form in (vector["hex"], vector["base64"], bytes.fromhex(vector["hex"])):
        psbt = Psbt.parse(form)
        assert psbt.version == 2
        assert psbt.serialize().hex() == vector["hex"]
        assert psbt.to_base64() == vector["base64"]


@pytest.mark.parametrize("vector", V2["locktime"], ids=lambda v: v["description"][:60])
def test_locktime_determination(vector: dict[str, Any]) -> None:
    psbt = Psbt.parse(vector["base64"])
    if vector["locktime"] is None:
        with pytest.raises(PsbtError) as info:
            psbt.locktime()
        assert info.value.field == "PSBT_IN_REQUIRED_TIME_LOCKTIME"
        with pytest.raises(PsbtError):
            psbt.unsigned_tx()
        with pytest.raises(PsbtError):
            psbt.to_v0()
    else:
        assert psbt.locktime() == vector["locktime"]
        assert psbt.unsigned_tx().locktime == vector["locktime"]


def test_all_v2_fields_are_typed() -> None:
    (vector,) = [v for v in V2["valid"] if v["description"].endswith("with all PSBTv2 fields")]
    psbt = Psbt.parse(vector["hex"])
    g = psbt.global_map
    assert (g.tx_version, g.fallback_locktime, g.tx_modifiable, g.version_field) == (2, 0, 7, 2)
    (inp,) = psbt.inputs
    assert inp.prevout == OutPoint(
        bytes.fromhex("c85f81844094f9f0eec1e41f8d63e0a99e9f73dc725d7319871c9c4121d90a0b")[::-1], 0
    )
    assert inp.sequence_number == inp.sequence == 0xFFFFFFFE
    assert (inp.required_time_locktime, inp.required_height_locktime) == (1657048460, 10000)
    assert [(o.amount, o.script.hex()) for o in psbt.outputs] == [
        (800_000_000, "0014c430f64c4756da310dbd1a085572ef299926272c"),
        (199_998_859, "00144dd193ac964a56ac1b9e1cca8454fe2f474f8513"),
    ]
    tx = psbt.unsigned_tx()
    assert tx.locktime == 10000  # height wins when both kinds are possible
    assert tx.version == 2 and tx.inputs[0].sequence == 0xFFFFFFFE
    spent = psbt.spent_outputs()
    assert spent is not None and spent[0].value == 999_999_000
    assert psbt.fee() == 999_999_000 - 800_000_000 - 199_998_859 == 141


def test_create_v2_reproduces_the_required_fields_vector() -> None:
    vector = V2["valid"][0]
    parsed = Psbt.parse(vector["hex"])
    built = Psbt.create_v2(
        [PsbtInput.from_outpoint(i.prevout) for i in parsed.inputs],
        [PsbtOutput(o.amount, o.script) for o in parsed.outputs],
        tx_version=2,
    )
    assert built.serialize().hex() == vector["hex"]
    assert built == parsed


def test_constructor_respects_tx_modifiable() -> None:
    base = Psbt.parse(V2["valid"][0]["hex"])
    extra_in = PsbtInput.from_outpoint(OutPoint(b"\x05" * 32, 3), 0xFFFFFFFD)
    extra_out = PsbtOutput(1000, b"\x51")
    with pytest.raises(PsbtError) as info:
        base.add_input(extra_in)
    assert info.value.field == "PSBT_GLOBAL_TX_MODIFIABLE"
    base.global_map.tx_modifiable = 0b01
    base.add_input(extra_in)
    with pytest.raises(PsbtError):
        base.add_output(extra_out)
    base.global_map.tx_modifiable = 0b11
    base.add_output(extra_out)
    again = Psbt.parse(base.serialize())
    assert len(again.inputs) == 2 and len(again.outputs) == 3
    assert again.inputs[1].sequence == 0xFFFFFFFD
    with pytest.raises(PsbtError):
        Psbt.parse(V2["valid"][0]["hex"]).to_v0().add_input(extra_in)


@pytest.mark.parametrize(("description", "vector"), V2_ALL_VALID, ids=ids)
def test_v2_to_v0_to_v2_keeps_the_transaction(description: str, vector: dict[str, Any]) -> None:
    psbt = Psbt.parse(vector["hex"])
    if vector.get("locktime", 0) is None:
        pytest.skip("no lock time can be determined, so no v0 transaction exists")
    v0 = Psbt.parse(psbt.to_v0().serialize())
    assert v0.version == 0
    assert v0.unsigned_tx().serialize() == psbt.unsigned_tx().serialize()
    back = Psbt.parse(v0.to_v2().serialize())
    assert back.unsigned_tx().serialize() == psbt.unsigned_tx().serialize()
    assert back.unique_id() == psbt.unique_id()


def test_unique_id_ignores_sequence_and_combine_merges() -> None:
    required, updated, with_sequence = (Psbt.parse(V2["valid"][i]["hex"]) for i in range(3))
    assert required.unique_id() == updated.unique_id() == with_sequence.unique_id()
    assert updated.unsigned_tx().txid() != with_sequence.unsigned_tx().txid()
    assert required.combine(updated).serialize().hex() == V2["valid"][1]["hex"]
    merged = updated.combine(with_sequence)
    assert merged.serialize().hex() == V2["valid"][2]["hex"]


@pytest.mark.parametrize(
    ("mine", "theirs", "merged"),
    [
        (0b011, 0b011, 0b011),
        (0b011, 0b001, 0b001),  # one side no longer allows outputs to be added
        (0b111, 0b011, 0b111),  # "has SIGHASH_SINGLE" of either side is kept
        (0b010, None, 0b000),  # absent on one side: nothing stays modifiable (as Core)
        (None, 0b100, 0b100),
        (None, None, None),
    ],
)
def test_combine_merges_tx_modifiable_as_core(
    mine: int | None, theirs: int | None, merged: int | None
) -> None:
    a = Psbt.parse(V2["valid"][0]["hex"])
    b = a.copy()
    a.global_map.tx_modifiable, b.global_map.tx_modifiable = mine, theirs
    assert a.combine(b).global_map.tx_modifiable == merged
    assert b.combine(a).global_map.tx_modifiable == merged


def test_v0_cannot_hold_v2_only_fields() -> None:
    psbt = Psbt.parse(V2["valid"][3]["hex"])  # with both required lock time fields
    broken = psbt.copy()
    broken.global_map.version_field = None
    with pytest.raises(PsbtError) as info:
        broken.serialize()
    assert info.value.field == "PSBT_GLOBAL_VERSION"
    v0 = psbt.to_v0()
    assert v0.serialize()  # to_v0 moves them into the transaction's lock time
    assert v0.unsigned_tx().locktime == 10000


def test_extract_from_v2() -> None:
    psbt = Psbt.parse(V2["valid"][3]["hex"])
    psbt.inputs[0].finalize(witness=[b"\x30" * 71, b"\x02" * 33])
    assert not psbt.inputs[0].bip32_derivations
    assert psbt.inputs[0].witness_utxo is not None  # finalizers keep the UTXO
    tx = psbt.extract_transaction()
    assert tx.locktime == 10000 and tx.inputs[0].sequence == 0xFFFFFFFE
    assert tx.inputs[0].witness == [b"\x30" * 71, b"\x02" * 33]
    assert Psbt.parse(psbt.serialize()).extract_transaction().serialize() == tx.serialize()


# --- BIP371 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("description", "vector"), TR_VALID, ids=ids)
def test_taproot_vectors_round_trip(description: str, vector: dict[str, Any]) -> None:
    for form in (vector["hex"], vector["base64"], bytes.fromhex(vector["hex"])):
        psbt = Psbt.parse(form)
        assert psbt.serialize().hex() == vector["hex"]
        assert psbt.to_base64() == vector["base64"]
    v2 = Psbt.parse(psbt.to_v2().serialize())
    assert v2.to_v0().serialize().hex() == vector["hex"]


def _leaf_hash(script: bytes, version: int) -> bytes:
    return tagged_hash("TapLeaf", bytes([version]) + var_bytes(script))


def _branch(a: bytes, b: bytes) -> bytes:
    return tagged_hash("TapBranch", min(a, b) + max(a, b))


def _tweaked(internal: bytes, merkle_root: bytes | None) -> bytes:
    return xonly_tweak_add(internal, tagged_hash("TapTweak", internal + (merkle_root or b"")))[0]


def test_taproot_key_path_fields() -> None:
    psbt = Psbt.parse(TAPROOT["valid"][1]["hex"])
    (inp,) = psbt.inputs
    assert inp.tap_internal_key is not None and inp.tap_key_sig is not None
    assert len(inp.tap_key_sig) == 64
    origin = inp.tap_bip32_derivations[inp.tap_internal_key]
    assert origin.leaf_hashes == ()
    assert origin.origin.fingerprint.hex() == "772b2da7"
    assert origin.origin.path == (0x80000056, 0x80000001, 0x80000000, 1, 0)
    spent = inp.spent_output()
    assert spent is not None
    assert spent.script_pubkey == b"\x51\x20" + _tweaked(inp.tap_internal_key, None)


@pytest.mark.parametrize("index", [3, 5])
def test_taproot_script_path_fields_are_consistent(index: int) -> None:
    """Control blocks, leaf scripts, leaf hashes and the Merkle root parsed from the vector
    agree with each other and with the output key, so each field was read correctly."""
    (inp,) = Psbt.parse(TAPROOT["valid"][index]["hex"]).inputs
    assert len(inp.tap_leaf_scripts) == 3
    leaf_hashes = set()
    for control_block, leaf in inp.tap_leaf_scripts.items():
        assert leaf.leaf_version == control_block[0] & 0xFE == 0xC0
        node = _leaf_hash(leaf.script, leaf.leaf_version)
        leaf_hashes.add(node)
        for i in range(33, len(control_block), 32):
            node = _branch(node, control_block[i : i + 32])
        assert node == inp.tap_merkle_root
        internal = control_block[1:33]
        assert internal == inp.tap_internal_key
    spent = inp.spent_output()
    assert spent is not None and inp.tap_internal_key is not None
    assert spent.script_pubkey[2:] == _tweaked(inp.tap_internal_key, inp.tap_merkle_root)
    for key, origin in inp.tap_bip32_derivations.items():
        assert set(origin.leaf_hashes) <= leaf_hashes
        if origin.leaf_hashes:
            assert key != inp.tap_internal_key
    if index == 5:
        assert len(inp.tap_script_sigs) == 3
        for (xonly, leaf_hash), sig in inp.tap_script_sigs.items():
            assert leaf_hash in leaf_hashes and len(sig) == 64
            assert leaf_hash in inp.tap_bip32_derivations[xonly].leaf_hashes


def test_taproot_output_tree() -> None:
    psbt = Psbt.parse(TAPROOT["valid"][4]["hex"])
    (out,) = psbt.outputs
    assert out.tap_tree is not None and out.tap_internal_key is not None
    assert [(leaf.depth, leaf.leaf_version) for leaf in out.tap_tree] == [
        (2, 0xC0),
        (2, 0xC0),
        (1, 0xC0),
    ]
    a, b, c = (_leaf_hash(leaf.script, leaf.leaf_version) for leaf in out.tap_tree)
    root = _branch(_branch(a, b), c)
    assert out.script == b"\x51\x20" + _tweaked(out.tap_internal_key, root)
    assert len(out.tap_bip32_derivations) == 4


# --- differential: embit reads the same content --------------------------------------------------


@pytest.mark.parametrize(("description", "vector"), V2_ALL_VALID + TR_VALID, ids=ids)
def test_embit_reads_the_same_content(description: str, vector: dict[str, Any]) -> None:
    ours = Psbt.parse(vector["base64"])
    theirs_raw = EmbitPsbt.from_string(vector["base64"]).serialize()
    theirs = Psbt.parse(theirs_raw)
    # embit always writes PSBT_IN_SEQUENCE in v2 (as 0xffffffff when absent) and puts some
    # fields in another order; the content must be the same.
    for mine, other in zip(ours.inputs, theirs.inputs, strict=True):
        if mine.sequence_number is None and other.sequence_number == 0xFFFFFFFF:
            other.sequence_number = None
    assert theirs == ours
    if ours.version == 0 and theirs_raw == ours.serialize():
        return
    assert theirs.serialize() == ours.serialize()
