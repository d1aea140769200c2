"""PSBT v0 (BIP174): official vectors, the full creator..extractor workflow, combiner,
field validation, ordering of unknown fields, accessors and mutators, embit differential."""

from __future__ import annotations

import base64
import hashlib
from io import BytesIO
from typing import Any

import pytest
from embit.psbt import PSBT as EmbitPsbt  # type: ignore[import-untyped]
from tests.vectors import load_json

from anyhsm.bitcoin.bip32 import ExtendedKey, KeyOrigin, parse_path
from anyhsm.bitcoin.encoding import b58check_encode, hash160, read_compact_size, var_bytes
from anyhsm.bitcoin.psbt import (
    LeafScript,
    ProprietaryField,
    Psbt,
    PsbtInput,
    PsbtOutput,
    TapKeyOrigin,
    TapTreeLeaf,
    UnknownField,
)
from anyhsm.bitcoin.tx import OutPoint, Transaction, TxIn, TxOut
from anyhsm.errors import HsmError, PsbtError

BIP174: dict[str, Any] = load_json("bip174")
WORKFLOW: dict[str, Any] = BIP174["workflow"]

# For each invalid vector: (start of the BIP's description, field the error must name, words
# the message must contain). field None: a structural error that names no single field.
INVALID_EXPECT: list[tuple[str, str | None, tuple[str, ...]]] = [
    ("Network transaction, not PSBT", "magic", ("magic",)),
    ("PSBT missing outputs", "output 0", ("output 0", "missing")),
    ("PSBT where one input has a filled scriptSig", "PSBT_GLOBAL_UNSIGNED_TX", ("scriptSig",)),
    (
        "PSBT where inputs and outputs are provided but without an unsigned tx",
        "PSBT_GLOBAL_UNSIGNED_TX",
        ("missing",),
    ),
    ("PSBT with duplicate keys in an input", "PSBT_IN_NON_WITNESS_UTXO", ("duplicate", "input 0")),
    ("PSBT with invalid global transaction typed key", "PSBT_GLOBAL_UNSIGNED_TX", ("key",)),
    ("PSBT with invalid input witness utxo typed key", "PSBT_IN_WITNESS_UTXO", ("key",)),
    (
        "PSBT with invalid pubkey length for input partial signature typed key",
        "PSBT_IN_PARTIAL_SIG",
        ("public key",),
    ),
    ("PSBT with invalid redeemscript typed key", "PSBT_IN_REDEEM_SCRIPT", ("key",)),
    ("PSBT with invalid witnessscript typed key", "PSBT_IN_WITNESS_SCRIPT", ("key",)),
    (
        "PSBT with invalid pubkey in input BIP 32 derivation paths typed key",
        "PSBT_IN_BIP32_DERIVATION",
        ("public key",),
    ),
    ("PSBT with invalid non-witness utxo typed key", "PSBT_IN_NON_WITNESS_UTXO", ("key",)),
    ("PSBT with invalid final scriptsig typed key", "PSBT_IN_FINAL_SCRIPTSIG", ("key",)),
    ("PSBT with invalid final script witness typed key", "PSBT_IN_FINAL_SCRIPTWITNESS", ("key",)),
    (
        "PSBT with invalid pubkey in output BIP 32 derivation paths typed key",
        "PSBT_OUT_BIP32_DERIVATION",
        ("public key",),
    ),
    ("PSBT with invalid input sighash type typed key", "PSBT_IN_SIGHASH_TYPE", ("key",)),
    ("PSBT with invalid output redeemScript typed key", "PSBT_OUT_REDEEM_SCRIPT", ("key",)),
    ("PSBT with invalid output witnessScript typed key", "PSBT_OUT_WITNESS_SCRIPT", ("key",)),
    (
        "PSBT with unsigned tx serialized with witness serialization format",
        "PSBT_GLOBAL_UNSIGNED_TX",
        ("segwit",),
    ),
    (
        "PSBT with an invalid value data due to its size being not the stated size",
        "PSBT_GLOBAL_UNSIGNED_TX",
        ("trailing",),
    ),
]


def _step(ref: str) -> dict[str, str]:
    """A workflow reference such as "signer_1.result" -> {hex, base64}."""
    step, _, part = ref.partition(".")
    return WORKFLOW[step][part]  # type: ignore[no-any-return]


def _all_valid() -> list[tuple[str, dict[str, str]]]:
    out = [(v["description"], v) for v in BIP174["valid"]]
    out += [(v["description"], v) for v in BIP174["fails_signer_checks"]]
    out += [
        (f"workflow {k}", WORKFLOW[k]["result"])
        for k in WORKFLOW
        if "result" in WORKFLOW[k] and isinstance(WORKFLOW[k]["result"], dict)
    ]
    out += [("combiner unknown keys", BIP174["combiner_unknown_keys"]["result"])]
    return out


def build(*maps: list[tuple[bytes, bytes]]) -> bytes:
    """Raw PSBT bytes from maps of (key, value) records, for hand-made cases."""
    out = b"psbt\xff"
    for records in maps:
        out += b"".join(var_bytes(k) + var_bytes(v) for k, v in records) + b"\x00"
    return out


def parse_error(data: bytes | str) -> PsbtError:
    with pytest.raises(PsbtError) as info:
        Psbt.parse(data)
    return info.value


# --- official vectors -------------------------------------------------------------------------


def test_vector_counts() -> None:
    assert len(BIP174["invalid"]) == 20
    assert len(BIP174["valid"]) == 10


@pytest.mark.parametrize("index", range(20))
def test_invalid_vectors_raise_psbt_error_naming_the_field(index: int) -> None:
    vector = BIP174["invalid"][index]
    prefix, field, words = INVALID_EXPECT[index]
    assert vector["description"].startswith(prefix)
    for form in (vector["hex"], vector["base64"], bytes.fromhex(vector["hex"])):
        err = parse_error(form)
        assert err.field == field, str(err)
        for word in words:
            assert word in err.message
        if field and field.startswith("PSBT_"):
            assert err.message.startswith(field + ":")


@pytest.mark.parametrize(("description", "vector"), _all_valid(), ids=lambda x: str(x)[:50])
def test_valid_vectors_round_trip_byte_for_byte(description: str, vector: dict[str, str]) -> None:
    raw = bytes.fromhex(vector["hex"])
    assert base64.b64decode(vector["base64"]) == raw
    for form in (
        vector["hex"],
        vector["hex"].upper(),
        vector["base64"],
        vector["base64"].encode(),
        raw,
        bytearray(raw),
        memoryview(raw),
    ):
        psbt = Psbt.parse(form)
        assert psbt.version == 0
        assert psbt.serialize() == raw
        assert psbt.to_base64() == vector["base64"]
        assert psbt.to_hex() == vector["hex"]
    # Wrapped base64 (as in e-mail or files) is accepted too.
    b64 = vector["base64"]
    assert Psbt.parse("\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))).serialize() == raw


def test_zero_input_zero_output_unsigned_tx() -> None:
    psbt = Psbt.parse(BIP174["valid"][8]["hex"])
    tx = psbt.unsigned_tx()
    assert tx.inputs == [] and tx.outputs == []
    assert psbt.spent_outputs() == []


def test_unknown_input_types_are_kept() -> None:
    psbt = Psbt.parse(BIP174["valid"][6]["hex"])
    (unknown,) = psbt.inputs[0].unknown
    assert unknown.key_type == 0xF0
    assert unknown.key == bytes.fromhex("f0010203040506070809")
    assert unknown.value == bytes.fromhex("0102030405060708090a0b0c0d0e0f")


@pytest.mark.parametrize(("index", "count"), [(5, 2), (7, 1)])
def test_global_xpubs_are_typed(index: int, count: int) -> None:
    psbt = Psbt.parse(BIP174["valid"][index]["hex"])
    xpubs = psbt.global_map.xpubs
    assert len(xpubs) == count
    for key, origin in xpubs.items():
        assert len(key) == 78
        assert isinstance(origin, KeyOrigin)
        assert len(origin.fingerprint) == 4
        assert len(origin.path) == ExtendedKey.parse(b58check_encode(key)).depth


# --- the BIP174 workflow, role by role --------------------------------------------------------


def _creator_tx() -> Transaction:
    c = WORKFLOW["creator"]
    inputs = [TxIn(OutPoint(bytes.fromhex(i["txid"])[::-1], i["vout"])) for i in c["inputs"]]
    outputs = [TxOut(o["amount_sat"], bytes.fromhex(o["script_pubkey"])) for o in c["outputs"]]
    return Transaction(2, inputs, outputs, 0)


def test_creator() -> None:
    psbt = Psbt.from_unsigned_tx(_creator_tx())
    assert psbt.serialize().hex() == WORKFLOW["creator"]["result"]["hex"]
    assert psbt.spent_outputs() is None
    assert psbt.fee() is None


def _p2sh(script: bytes) -> bytes:
    return b"\xa9\x14" + hash160(script) + b"\x87"


def _multisig_keys(script: bytes) -> list[bytes]:
    """Public keys of a bare m-of-n CHECKMULTISIG script with 33-byte keys."""
    keys, i = [], 1
    while script[i] == 0x21:
        keys.append(script[i + 1 : i + 34])
        i += 34
    return keys


def _updated() -> Psbt:
    """The updater role, done with the public model only."""
    u = WORKFLOW["updater"]
    psbt = Psbt.parse(WORKFLOW["creator"]["result"]["hex"])
    fingerprint = ExtendedKey.parse(WORKFLOW["master_tprv"]).fingerprint
    prev = {t.txid(): t for t in map(Transaction.parse, u["previous_transactions"])}
    origins = {
        bytes.fromhex(p["pubkey"]): KeyOrigin(fingerprint, parse_path(p["path"]))
        for p in u["pubkeys"]
    }
    redeem = [bytes.fromhex(s) for s in u["redeem_scripts"]]
    witness = [bytes.fromhex(s) for s in u["witness_scripts"]]
    used: set[bytes] = set()
    for inp in psbt.inputs:
        prev_tx = prev[inp.previous_txid]
        spent = prev_tx.outputs[inp.output_index]
        rs = next(s for s in redeem if _p2sh(s) == spent.script_pubkey)
        inp.redeem_script = rs
        if rs[:2] == b"\x00\x20":  # P2SH-P2WSH: a witness UTXO is enough
            inp.witness_utxo = spent
            ws = next(s for s in witness if hashlib.sha256(s).digest() == rs[2:])
            inp.witness_script = ws
            keys = _multisig_keys(ws)
        else:
            inp.non_witness_utxo = prev_tx
            keys = _multisig_keys(rs)
        for k in sorted(keys):  # Bitcoin Core writes keyed fields in key order
            inp.bip32_derivations[k] = origins[k]
            used.add(k)
    for out in psbt.outputs:
        for k, origin in origins.items():
            if k not in used and out.script == b"\x00\x14" + hash160(k):
                out.bip32_derivations[k] = origin
    return psbt


def test_updater() -> None:
    psbt = _updated()
    assert psbt.serialize().hex() == WORKFLOW["updater"]["result"]["hex"]
    spent = psbt.spent_outputs()
    assert spent is not None and [s.value for s in spent] == [50_000_000, 200_000_000]
    assert psbt.fee() == 250_000_000 - 149_990_000 - 100_000_000


def test_updater_adds_sighash_all() -> None:
    psbt = _updated()
    for inp in psbt.inputs:
        inp.sighash_type = 1
    assert psbt.serialize().hex() == WORKFLOW["updater_add_sighash_all"]["result"]["hex"]


@pytest.mark.parametrize("signer", ["signer_1", "signer_2"])
def test_signer_results_rebuilt_with_add_partial_sig(signer: str) -> None:
    signed = Psbt.parse(WORKFLOW[signer]["result"]["base64"])
    psbt = Psbt.parse(_step(WORKFLOW[signer]["input"])["base64"])
    for mine, theirs in zip(psbt.inputs, signed.inputs, strict=True):
        for pub, sig in theirs.partial_sigs.items():
            mine.add_partial_sig(pub, sig)
    assert psbt.serialize().hex() == WORKFLOW[signer]["result"]["hex"]


def test_combiner() -> None:
    a, b = (Psbt.parse(_step(ref)["base64"]) for ref in WORKFLOW["combiner"]["inputs"])
    before = a.serialize()
    combined = a.combine(b)
    assert combined.serialize().hex() == WORKFLOW["combiner"]["result"]["hex"]
    assert a.serialize() == before  # combine returns a new PSBT
    # The other order holds the same key-value pairs (only their order differs).
    other = b.combine(a)
    for x, y in zip(other.inputs, combined.inputs, strict=True):
        assert x.partial_sigs == y.partial_sigs
    assert other.combine(combined).serialize() == other.serialize()


def test_combiner_unknown_keys() -> None:
    c = BIP174["combiner_unknown_keys"]
    a, b = (Psbt.parse(v["hex"]) for v in c["inputs"])
    assert a.combine(b).serialize().hex() == c["result"]["hex"]


def _push(data: bytes) -> bytes:
    assert len(data) < 0x4C
    return bytes([len(data)]) + data


def test_finalizer_rebuilt_with_finalize() -> None:
    psbt = Psbt.parse(_step(WORKFLOW["finalizer"]["input"])["base64"])
    for inp in psbt.inputs:
        script = inp.witness_script or inp.redeem_script
        assert script is not None
        sigs = [inp.partial_sigs[k] for k in _multisig_keys(script)]
        if inp.witness_script is not None:
            assert inp.redeem_script is not None
            inp.finalize(script_sig=_push(inp.redeem_script), witness=[b"", *sigs, script])
        else:
            inp.finalize(script_sig=b"\x00" + b"".join(map(_push, sigs)) + _push(script))
        assert inp.is_finalized
        assert not inp.partial_sigs and not inp.bip32_derivations and inp.sighash_type is None
    assert psbt.serialize().hex() == WORKFLOW["finalizer"]["result"]["hex"]


def test_extractor() -> None:
    psbt = Psbt.parse(_step(WORKFLOW["extractor"]["input"])["base64"])
    assert psbt.is_finalized()
    tx = psbt.extract_transaction()
    assert tx.serialize().hex() == WORKFLOW["extractor"]["result_tx_hex"]
    unsigned = psbt.unsigned_tx()
    assert [i.prevout for i in tx.inputs] == [i.prevout for i in unsigned.inputs]
    assert tx.outputs == unsigned.outputs
    assert all(i.script_sig for i in tx.inputs)


def test_extractor_refuses_unfinalized_input() -> None:
    psbt = Psbt.parse(WORKFLOW["combiner"]["result"]["base64"])
    assert not psbt.is_finalized()
    with pytest.raises(PsbtError, match="input 0 is not finalized"):
        psbt.extract_transaction()


def test_combine_is_order_independent_in_core_order() -> None:
    """Bitcoin Core writes the partial signatures of a map by the HASH160 of their keys
    (std::map<CKeyID, SigPair>), so combining in either order gives its bytes."""
    a, b = (Psbt.parse(_step(ref)["base64"]) for ref in WORKFLOW["combiner"]["inputs"])
    expected = WORKFLOW["combiner"]["result"]["hex"]
    assert a.combine(b).serialize().hex() == expected
    assert b.combine(a).serialize().hex() == expected
    for inp in Psbt.parse(expected).inputs:
        keys = list(inp.partial_sigs)
        assert keys == sorted(keys, key=hash160)


def test_keyed_fields_are_written_in_core_map_order() -> None:
    psbt = Psbt.parse(WORKFLOW["combiner"]["result"]["hex"])
    inp = psbt.inputs[1]
    # reversed insertion order of every keyed field: the bytes must not change
    inp.partial_sigs = dict(reversed(list(inp.partial_sigs.items())))
    inp.bip32_derivations = dict(reversed(list(inp.bip32_derivations.items())))
    assert psbt.serialize().hex() == WORKFLOW["combiner"]["result"]["hex"]
    # input 1's two signing keys: 03089d... comes first because its HASH160 is smaller
    first, second = list(Psbt.parse(psbt.serialize()).inputs[1].partial_sigs)
    assert first[:2] == b"\x03\x08" and second[:2] == b"\x02\x3a"
    assert hash160(first) < hash160(second) and first > second


def test_taproot_keyed_fields_in_core_order() -> None:
    x1, x2 = sorted((b"\x11" * 32, PUB[1:]))
    leaf_a, leaf_b = b"\x0a" * 32, b"\x0b" * 32
    inp = PsbtInput(b"\x11" * 32, 0)
    inp.tap_script_sigs = {(x2, leaf_a): b"\x01" * 64, (x1, leaf_b): b"\x02" * 64}
    cb_long, cb_short = b"\xc0" + b"\x01" * 64, b"\xc1" + b"\x02" * 32
    inp.tap_leaf_scripts = {
        b"\xc0" + b"\x03" * 32: LeafScript(b"\x52", 0xC0),  # larger script: last
        cb_long: LeafScript(b"\x51", 0xC0),
        cb_short: LeafScript(b"\x51", 0xC0),  # same script: shorter control block first
    }
    inp.tap_bip32_derivations = {
        x2: TapKeyOrigin((leaf_b, leaf_a, leaf_b), KeyOrigin(b"\x00" * 4, ())),
        x1: TapKeyOrigin((), KeyOrigin(b"\x01" * 4, ())),
    }
    records = [k for k, _ in inp.records(0)]
    assert records == [
        b"\x14" + x1 + leaf_b,
        b"\x14" + x2 + leaf_a,
        b"\x15" + cb_short,
        b"\x15" + cb_long,
        b"\x15" + b"\xc0" + b"\x03" * 32,
        b"\x16" + x1,
        b"\x16" + x2,
    ]
    value = dict(inp.records(0))[b"\x16" + x2]
    assert value[:1] == b"\x02" and value[1:65] == leaf_a + leaf_b  # sorted, unique


def test_xpubs_in_core_order() -> None:
    from anyhsm.bitcoin.psbt_fields import decode_origin

    psbt = Psbt.parse(WORKFLOW["creator"]["result"]["hex"])
    xpub = ExtendedKey.parse(WORKFLOW["master_tprv"]).neuter()
    keys = [xpub.derive(f"m/{i}").serialize() for i in range(3)]
    fp = b"\x01\x02\x03\x04"
    # Core's map<KeyOriginInfo, set<CExtPubKey>>: fingerprint, path length, path, key
    psbt.global_map.xpubs = {
        keys[0]: KeyOrigin(fp, (5, 1)),
        keys[1]: KeyOrigin(fp, (7,)),
        keys[2]: KeyOrigin(b"\x00\x00\x00\x09", (1, 2, 3)),
    }
    written = [(k[1:], decode_origin(v)) for k, v in _records(psbt.serialize())[0] if k[0] == 1]
    assert [k for k, _ in written] == [keys[2], keys[1], keys[0]]


def test_combine_refuses_other_transaction_and_other_version() -> None:
    a = Psbt.parse(WORKFLOW["creator"]["result"]["hex"])
    other = Psbt.parse(BIP174["valid"][0]["hex"])
    with pytest.raises(PsbtError) as info:
        a.combine(other)
    assert info.value.field == "PSBT_GLOBAL_UNSIGNED_TX"
    with pytest.raises(PsbtError) as info:
        a.combine(a.to_v2())
    assert info.value.field == "PSBT_GLOBAL_VERSION"


# --- hand-made invalid cases ---------------------------------------------------------------------

TX1 = Transaction(
    2, [TxIn(OutPoint(b"\x11" * 32, 0))], [TxOut(1000, b"\x00\x14" + b"\x22" * 20)], 0
)
UTX = TX1.serialize(False)
PUB = bytes.fromhex("029583bf39ae0a609747ad199addd634fa6108559d6c5cd39b4c2183f1ab96e07f")
XONLY = PUB[1:]
ORIGIN = bytes.fromhex("d90c6a4f") + (0x80000000).to_bytes(4, "little")


def _one_in_one_out(
    inp: list[tuple[bytes, bytes]], out: list[tuple[bytes, bytes]] | None = None
) -> bytes:
    return build([(b"\x00", UTX)], inp, out or [])


@pytest.mark.parametrize(
    ("records", "field", "words"),
    [
        ([(b"\x02\x05" + PUB[1:], b"\x30")], "PSBT_IN_PARTIAL_SIG", "public key"),
        ([(b"\x02" + PUB, b"")], "PSBT_IN_PARTIAL_SIG", "empty"),
        ([(b"\x03", b"\x01\x00\x00")], "PSBT_IN_SIGHASH_TYPE", "4-byte"),
        ([(b"\x06" + PUB, b"\x01\x02\x03")], "PSBT_IN_BIP32_DERIVATION", "fingerprint"),
        ([(b"\x06" + PUB, ORIGIN + b"\x00")], "PSBT_IN_BIP32_DERIVATION", "4 bytes per"),
        ([(b"\x01", b"\x00" * 8 + b"\x05\x00")], "PSBT_IN_WITNESS_UTXO", "end"),
        (
            [(b"\x01", (-1).to_bytes(8, "little", signed=True) + b"\x00")],
            "PSBT_IN_WITNESS_UTXO",
            "range",
        ),
        ([(b"\x08", b"\x02\x01\xaa")], "PSBT_IN_FINAL_SCRIPTWITNESS", "witness"),
        ([(b"\x08", b"\x01\x01\xaa\xbb")], "PSBT_IN_FINAL_SCRIPTWITNESS", "trailing"),
        ([(b"\x08", b"\xfe\xff\xff\xff\xff")], "PSBT_IN_FINAL_SCRIPTWITNESS", "declares"),
        ([(b"\x0a" + b"\x00" * 20, b"abc")], "PSBT_IN_RIPEMD160", "preimage"),
        ([(b"\x0b" + b"\x00" * 31, b"abc")], "PSBT_IN_SHA256", "32 bytes"),
        ([(b"\x0c" + hash160(b"x"), b"y")], "PSBT_IN_HASH160", "preimage"),
        ([(b"\x0d" + b"\x00" * 32, b"abc")], "PSBT_IN_HASH256", "preimage"),
        ([(b"\x13", b"\x01" * 64 + b"\x00")], "PSBT_IN_TAP_KEY_SIG", "0x00"),
        ([(b"\x14" + XONLY + b"\x00" * 32, b"\x01" * 63)], "PSBT_IN_TAP_SCRIPT_SIG", "63 bytes"),
        ([(b"\x14" + b"\x00" * 64, b"\x01" * 64)], "PSBT_IN_TAP_SCRIPT_SIG", "x-only"),
        ([(b"\x15\xc0" + XONLY, b"")], "PSBT_IN_TAP_LEAF_SCRIPT", "leaf version"),
        ([(b"\x15\xc0" + XONLY + b"\x00", b"\x51\xc0")], "PSBT_IN_TAP_LEAF_SCRIPT", "33 + 32"),
        (
            [(b"\x16" + XONLY, b"\x02" + b"\x00" * 32 + ORIGIN)],
            "PSBT_IN_TAP_BIP32_DERIVATION",
            "leaf hash",
        ),
        (
            [(b"\x16" + XONLY, b"\x00" + ORIGIN + b"\x00\x00")],
            "PSBT_IN_TAP_BIP32_DERIVATION",
            "4 bytes per",
        ),
        ([(b"\x17", b"\x00" * 32)], "PSBT_IN_TAP_INTERNAL_KEY", "x-only"),
        ([(b"\x18", b"\x00" * 31)], "PSBT_IN_TAP_MERKLE_ROOT", "32 bytes"),
        ([(b"\x13", b"\x01" * 64), (b"\x13", b"\x01" * 64)], "PSBT_IN_TAP_KEY_SIG", "duplicate"),
        ([(b"\xfc", b"")], "PSBT_IN_PROPRIETARY", "proprietary"),
        ([(b"\xfc\x05ab", b"")], "PSBT_IN_PROPRIETARY", "proprietary"),
        ([(b"\xfd\x01", b"")], "PSBT_IN key", "key type"),
        ([(b"\xfd\x10\x00", b"")], "PSBT_IN key", "non-canonical"),
    ],
)
def test_input_field_validation(records: list[tuple[bytes, bytes]], field: str, words: str) -> None:
    err = parse_error(_one_in_one_out(records))
    assert err.field == field
    assert words in err.message
    assert "(input 0)" in err.message


def _leaf(depth: int, version: int = 0xC0, script: bytes = b"\x51") -> bytes:
    return bytes([depth, version]) + var_bytes(script)


@pytest.mark.parametrize(
    ("records", "field", "words"),
    [
        ([(b"\x02\x05" + PUB[1:], ORIGIN)], "PSBT_OUT_BIP32_DERIVATION", "public key"),
        ([(b"\x05", PUB)], "PSBT_OUT_TAP_INTERNAL_KEY", "33 bytes"),
        ([(b"\x06", b"")], "PSBT_OUT_TAP_TREE", "empty"),
        ([(b"\x06", _leaf(1))], "PSBT_OUT_TAP_TREE", "incomplete"),
        ([(b"\x06", _leaf(0) + _leaf(0))], "PSBT_OUT_TAP_TREE", "root"),
        ([(b"\x06", _leaf(1) + _leaf(2) + _leaf(2) + _leaf(2))], "PSBT_OUT_TAP_TREE", "root"),
        ([(b"\x06", _leaf(2) + _leaf(1) + _leaf(2))], "PSBT_OUT_TAP_TREE", "depth-first"),
        ([(b"\x06", _leaf(0, 0xC1))], "PSBT_OUT_TAP_TREE", "odd"),
        ([(b"\x06", _leaf(129))], "PSBT_OUT_TAP_TREE", "128"),
        ([(b"\x06", _leaf(0)[:-1])], "PSBT_OUT_TAP_TREE", "malformed"),
        ([(b"\x07" + XONLY, b"\x00")], "PSBT_OUT_TAP_BIP32_DERIVATION", "fingerprint"),
        ([(b"\x07" + XONLY[:-1], b"\x00" + ORIGIN)], "PSBT_OUT_TAP_BIP32_DERIVATION", "31 bytes"),
    ],
)
def test_output_field_validation(
    records: list[tuple[bytes, bytes]], field: str, words: str
) -> None:
    err = parse_error(_one_in_one_out([], records))
    assert err.field == field
    assert words in err.message
    assert "(output 0)" in err.message


def test_valid_taproot_trees() -> None:
    tree = _leaf(1) + _leaf(2, script=b"\x52") + _leaf(2, script=b"\x53")
    raw = _one_in_one_out([], [(b"\x06", tree)])
    psbt = Psbt.parse(raw)
    assert psbt.outputs[0].tap_tree == (
        TapTreeLeaf(1, 0xC0, b"\x51"),
        TapTreeLeaf(2, 0xC0, b"\x52"),
        TapTreeLeaf(2, 0xC0, b"\x53"),
    )
    assert psbt.serialize() == raw
    assert Psbt.parse(_one_in_one_out([], [(b"\x06", _leaf(0))])).outputs[0].tap_tree == (
        TapTreeLeaf(0, 0xC0, b"\x51"),
    )


@pytest.mark.parametrize(
    ("records", "field", "words"),
    [
        ([(b"\x00", UTX), (b"\x01" + b"\x00" * 77, ORIGIN)], "PSBT_GLOBAL_XPUB", "78 bytes"),
        ([(b"\x00", UTX), (b"\x01" + b"\x00" * 78, ORIGIN)], "PSBT_GLOBAL_XPUB", "public key"),
        ([(b"\x00", UTX), (b"\xfb", b"\x01\x00\x00\x00")], "PSBT_GLOBAL_VERSION", "unsupported"),
        ([(b"\x00", UTX), (b"\xfb", b"\x00\x00")], "PSBT_GLOBAL_VERSION", "4-byte"),
        ([(b"\x00", UTX), (b"\x00", UTX)], "PSBT_GLOBAL_UNSIGNED_TX", "duplicate"),
        ([(b"\x00", UTX + b"\x00")], "PSBT_GLOBAL_UNSIGNED_TX", "trailing"),
        ([(b"\x00", UTX[:-1])], "PSBT_GLOBAL_UNSIGNED_TX", "end"),
    ],
)
def test_global_field_validation(
    records: list[tuple[bytes, bytes]], field: str, words: str
) -> None:
    err = parse_error(build(records, [], []))
    assert err.field == field
    assert words in err.message


def test_unsigned_tx_witness_and_count_mismatch() -> None:
    witness_tx = Transaction(2, [TxIn(OutPoint(b"\x11" * 32, 0), witness=[b"\x01"])], [], 0)
    err = parse_error(build([(b"\x00", witness_tx.serialize())], []))
    assert err.field == "PSBT_GLOBAL_UNSIGNED_TX" and "segwit" in err.message
    err = parse_error(build([(b"\x00", UTX)], []))  # two maps short
    assert err.field == "output 0" and "missing" in err.message
    err = parse_error(build([(b"\x00", UTX)]))
    assert err.field == "input 0" and "missing" in err.message


def test_non_witness_utxo_must_match_the_prevout() -> None:
    prev = Transaction(1, [TxIn(OutPoint(b"\x33" * 32, 7))], [TxOut(5000, b"\x51")], 0)
    tx = Transaction(2, [TxIn(OutPoint(prev.txid(), 0))], [], 0)
    ok = build([(b"\x00", tx.serialize())], [(b"\x00", prev.serialize())])
    psbt = Psbt.parse(ok)
    assert psbt.inputs[0].spent_output() == TxOut(5000, b"\x51")
    assert psbt.serialize() == ok
    bad = Transaction(2, [TxIn(OutPoint(b"\x44" * 32, 0))], [], 0)
    err = parse_error(build([(b"\x00", bad.serialize())], [(b"\x00", prev.serialize())]))
    assert err.field == "PSBT_IN_NON_WITNESS_UTXO" and "does not match" in err.message
    out_of_range = Transaction(2, [TxIn(OutPoint(prev.txid(), 1))], [], 0)
    err = parse_error(build([(b"\x00", out_of_range.serialize())], [(b"\x00", prev.serialize())]))
    assert err.field == "PSBT_IN_NON_WITNESS_UTXO" and "has 1 outputs" in err.message
    lying = build(
        [(b"\x00", tx.serialize())],
        [(b"\x00", prev.serialize()), (b"\x01", TxOut(9999, b"\x51").serialize())],
    )
    err = parse_error(lying)
    assert err.field == "PSBT_IN_WITNESS_UTXO" and "does not match" in err.message


def test_framing_errors() -> None:
    valid = bytes.fromhex(BIP174["valid"][0]["hex"])
    err = parse_error(valid + b"\x00")
    assert "trailing" in err.message
    err = parse_error(valid[:-1])
    assert "output 1" in err.message
    err = parse_error(b"psbt\xff\x01\x00\xfd\xff\xff\x00")
    assert "runs past the end" in err.message and err.field == "global map"
    err = parse_error(b"psbt\xff\x01\x00")
    assert "runs past the end" in err.message
    err = parse_error(b"psbt\xff\x01")
    assert "runs past the end" in err.message
    err = parse_error(b"psbt\xff\x01\x00\x01\x00")
    assert "separator" in err.message
    err = parse_error(b"psbt\xff\xfd\x01\x00")
    assert "non-canonical" in err.message and err.field == "global map"
    for junk in (
        b"",
        b"psbt",
        b"psbt\xfe\x00",
        "",
        "not base64!",
        "70736274ff0",
        "cHNidP8=",
        b"\xff\xfe",
    ):
        err = parse_error(junk)
        assert isinstance(err, PsbtError)


def test_parse_rejects_wrong_types_with_psbt_error() -> None:
    for obj in (None, 123, 1.5, ["psbt"]):
        with pytest.raises(PsbtError):
            Psbt.parse(obj)  # type: ignore[arg-type]


# --- ordering and preservation of unknown and proprietary fields ---------------------------------


def test_unknown_and_proprietary_fields_survive_in_core_order() -> None:
    prop = ProprietaryField(b"anyhsm", 3, b"\x01\x02", b"value")
    inp = [
        (b"\xf1\x01", b"second type first"),
        (b"\x03", b"\x01\x00\x00\x00"),
        (prop.key, prop.value),
        (b"\x19\xaa", b"between taproot and proprietary"),
        (b"\xf0\x01", b"lower type later"),
    ]
    raw = _one_in_one_out(inp)
    psbt = Psbt.parse(raw)
    i = psbt.inputs[0]
    assert i.proprietary == [prop]
    # held, like Bitcoin Core's std::map, in key order
    assert [u.key for u in i.unknown] == [b"\x19\xaa", b"\xf0\x01", b"\xf1\x01"]
    out = psbt.serialize()
    again = Psbt.parse(out)
    assert again.serialize() == out  # a fixed point
    assert again.inputs[0].unknown == i.unknown and again.inputs[0].proprietary == [prop]
    # Known fields first, then proprietary pairs, then unknown pairs, each sorted by key:
    # PSBTInput::Serialize in Bitcoin Core's psbt.h.
    keys = [k for k, _ in _records(out)[1]]
    assert keys == [b"\x03", prop.key, b"\x19\xaa", b"\xf0\x01", b"\xf1\x01"]


def test_core_order_input_round_trips_exactly() -> None:
    inp = [
        (b"\x03", b"\x01\x00\x00\x00"),
        (b"\xfc\x00\x01", b"p"),
        (b"\x19\xaa", b"x"),
        (b"\xf0", b""),
    ]
    # an output's proprietary pairs come before its taproot fields, its unknown ones last
    out = [
        (b"\x00", b"\x51"),
        (b"\xfc\x00\x01", b"q"),
        (b"\x05", bytes.fromhex(_XONLY)),
        (b"\xf5\x00", b"o"),
    ]
    raw = _one_in_one_out(inp, out)
    assert Psbt.parse(raw).serialize() == raw


_XONLY = "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"


def test_out_of_order_known_fields_are_canonicalised() -> None:
    raw = _one_in_one_out([(b"\x04", b"\x51"), (b"\x03", b"\x01\x00\x00\x00")])
    out = Psbt.parse(raw).serialize()
    assert out != raw
    assert [k for k, _ in _records(out)[1]] == [b"\x03", b"\x04"]


def _records(raw: bytes) -> list[list[tuple[bytes, bytes]]]:
    s = BytesIO(raw[5:])
    maps: list[list[tuple[bytes, bytes]]] = [[]]
    while s.tell() < len(raw) - 5:
        n = read_compact_size(s)
        if n == 0:
            maps.append([])
            continue
        k = s.read(n)
        v = s.read(read_compact_size(s))
        maps[-1].append((k, v))
    return maps[:-1]


# --- model, accessors, conversions, mutators ------------------------------------------------


def test_unsigned_tx_and_accessors() -> None:
    psbt = Psbt.parse(WORKFLOW["updater_add_sighash_all"]["result"]["hex"])
    tx = _creator_tx()
    assert psbt.unsigned_tx().serialize() == tx.serialize()
    assert [i.prevout for i in psbt.inputs] == [i.prevout for i in tx.inputs]
    assert [i.sequence for i in psbt.inputs] == [0xFFFFFFFF, 0xFFFFFFFF]
    assert [(o.amount, o.script) for o in psbt.outputs] == [
        (o.value, o.script_pubkey) for o in tx.outputs
    ]
    assert psbt.outputs[0].txout() == tx.outputs[0]
    assert psbt.unique_id() == tx.txid()
    assert psbt.locktime() == 0
    assert all(i.sighash_type == 1 for i in psbt.inputs)
    assert str(psbt) == "Psbt(v0, 2 inputs, 2 outputs)"


@pytest.mark.parametrize(("description", "vector"), _all_valid(), ids=lambda x: str(x)[:50])
def test_v0_to_v2_to_v0_keeps_the_transaction(description: str, vector: dict[str, str]) -> None:
    psbt = Psbt.parse(vector["hex"])
    v2 = psbt.to_v2()
    assert v2.version == 2
    v2 = Psbt.parse(v2.serialize())
    assert v2.unsigned_tx().serialize() == psbt.unsigned_tx().serialize()
    back = v2.to_v0()
    assert back.version == 0
    assert back.serialize().hex() == vector["hex"]
    assert psbt.serialize().hex() == vector["hex"]  # conversions copy


def test_from_unsigned_tx_rejects_signed_inputs() -> None:
    tx = _creator_tx()
    tx.inputs[1].script_sig = b"\x51"
    with pytest.raises(PsbtError) as info:
        Psbt.from_unsigned_tx(tx)
    assert info.value.field == "PSBT_GLOBAL_UNSIGNED_TX" and "input 1" in info.value.message


def test_mutator_validation() -> None:
    inp = PsbtInput.from_outpoint(OutPoint(b"\x01" * 32, 0))
    der = bytes.fromhex(
        "3044022074018ad4180097b873323c0015720b3684cc8123891048e7dbcd9b55ad679c99022073d369b740e3"
        "eb53dcefa33823c8070514ca55a7dd9544f157c167913261118c01"
    )
    inp.add_partial_sig(PUB, der)
    assert inp.partial_sigs == {PUB: der}
    with pytest.raises(PsbtError, match="public key"):
        inp.add_partial_sig(b"\x02" + b"\x00" * 32, der)
    with pytest.raises(PsbtError, match="DER"):
        inp.add_partial_sig(PUB, b"\x30" + der[1:-2] + b"\x01")
    with pytest.raises(PsbtError, match="64 or 65"):
        inp.add_tap_key_sig(b"\x01" * 63)
    with pytest.raises(PsbtError, match="0x00"):
        inp.add_tap_key_sig(b"\x01" * 64 + b"\x00")
    inp.add_tap_key_sig(b"\x01" * 64)
    with pytest.raises(PsbtError, match="x-only"):
        inp.add_tap_script_sig(b"\x00" * 32, b"\x02" * 32, b"\x01" * 64)
    with pytest.raises(PsbtError, match="leaf hash"):
        inp.add_tap_script_sig(XONLY, b"\x02" * 31, b"\x01" * 64)
    inp.add_tap_script_sig(XONLY, b"\x02" * 32, b"\x01" * 65)
    assert inp.tap_script_sigs == {(XONLY, b"\x02" * 32): b"\x01" * 65}
    with pytest.raises(PsbtError):
        inp.finalize()
    inp.tap_leaf_scripts[b"\xc0" + XONLY] = LeafScript(b"\x51", 0xC0)
    inp.finalize(witness=[b"\x01" * 64])
    assert inp.final_scriptwitness == [b"\x01" * 64] and inp.final_scriptsig is None
    assert not inp.tap_script_sigs and not inp.tap_leaf_scripts and inp.tap_key_sig is None
    assert inp.is_finalized


def _every_field_psbt() -> Psbt:
    """A PSBT that sets every input and output field type (global xpubs aside)."""
    prev = Transaction(1, [TxIn(OutPoint(b"\x33" * 32, 7))], [TxOut(5000, b"\x51")], 0)
    inp = PsbtInput.from_outpoint(OutPoint(prev.txid(), 0), 0xFFFFFFFD)
    inp.non_witness_utxo = prev
    inp.witness_utxo = TxOut(5000, b"\x51")
    inp.sighash_type = 0x83
    inp.redeem_script, inp.witness_script = b"\x00\x20" + b"\x01" * 32, b"\x51"
    inp.bip32_derivations[PUB] = KeyOrigin(b"\xd9\x0c\x6a\x4f", (0x80000054, 0))
    inp.por_commitment = b"proof"
    inp.ripemd160_preimages[hashlib.new("ripemd160", b"a").digest()] = b"a"
    inp.sha256_preimages[hashlib.sha256(b"b").digest()] = b"b"
    inp.hash160_preimages[hash160(b"c")] = b"c"
    inp.hash256_preimages[hashlib.sha256(hashlib.sha256(b"d").digest()).digest()] = b"d"
    inp.tap_internal_key, inp.tap_merkle_root = XONLY, b"\x07" * 32
    inp.tap_leaf_scripts[b"\xc0" + XONLY + b"\x09" * 32] = LeafScript(b"\x51", 0xC0)
    inp.proprietary.append(ProprietaryField(b"x", 0, b"", b""))
    inp.unknown.append(UnknownField(b"\xfd\x00\x01\x00", b"big type"))
    out = PsbtOutput(
        1000, b"\x51\x20" + XONLY, tap_internal_key=XONLY, tap_tree=(TapTreeLeaf(0, 0xC0, b"\x51"),)
    )
    psbt = Psbt.from_unsigned_tx(
        Transaction(2, [TxIn(inp.prevout, b"", inp.sequence)], [out.txout()], 99)
    )
    psbt.inputs[0], psbt.outputs[0] = inp, out
    return psbt


def test_built_psbt_round_trips_every_field_type() -> None:
    psbt = _every_field_psbt()
    raw = psbt.serialize()
    again = Psbt.parse(raw)
    assert again == psbt
    assert again.serialize() == raw
    assert again.to_v2().to_v0() == psbt
    assert again.fee() == 4000
    v2 = Psbt.parse(again.to_v2().serialize())
    assert v2.inputs[0].sequence_number == 0xFFFFFFFD and v2.locktime() == 99


def _mutable_ids(obj: object, seen: dict[int, object] | None = None) -> dict[int, object]:
    """id -> object for every mutable object reachable from ``obj``."""
    seen = {} if seen is None else seen
    if isinstance(obj, bytes | str | int | bool | float | type(None)):
        return seen
    if isinstance(obj, tuple):
        for item in obj:
            _mutable_ids(item, seen)
        return seen
    params = getattr(type(obj), "__dataclass_params__", None)
    if not (params is not None and params.frozen):
        seen[id(obj)] = obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            _mutable_ids(k, seen)
            _mutable_ids(v, seen)
    elif isinstance(obj, list):
        for item in obj:
            _mutable_ids(item, seen)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            _mutable_ids(v, seen)
    return seen


def test_copy_shares_no_mutable_object() -> None:
    """Psbt.copy() copies containers only; every value type must be immutable for that to be
    a full copy, which this checks over a PSBT with every field and the official vectors."""
    psbts = [_every_field_psbt()] + [Psbt.parse(v["hex"]) for _, v in _all_valid()]
    psbts[0].global_map.xpubs[b"\x04" * 78] = KeyOrigin(b"\x01" * 4, (1, 2))
    for psbt in psbts:
        dup = psbt.copy()
        assert dup == psbt
        assert dup.serialize() == psbt.serialize()
        shared = _mutable_ids(psbt).keys() & _mutable_ids(dup).keys()
        assert not shared, [type(_mutable_ids(psbt)[i]).__name__ for i in shared]
    original = psbts[0].serialize()
    dup = psbts[0].copy()
    dup.inputs[0].partial_sigs[PUB] = b"\x30"
    assert dup.inputs[0].witness_utxo is not None
    dup.inputs[0].witness_utxo.value = 1
    assert dup.inputs[0].non_witness_utxo is not None
    dup.inputs[0].non_witness_utxo.outputs.clear()
    dup.outputs[0].bip32_derivations[PUB] = KeyOrigin(b"\x00" * 4, ())
    assert psbts[0].serialize() == original


# --- differential: embit parses and writes the same bytes -----------------------------------


@pytest.mark.parametrize(("description", "vector"), _all_valid(), ids=lambda x: str(x)[:50])
def test_embit_writes_the_same_bytes(description: str, vector: dict[str, str]) -> None:
    ours = Psbt.parse(vector["base64"]).serialize()
    if not Psbt.parse(vector["base64"]).inputs:
        pytest.skip("embit cannot parse an unsigned transaction with no inputs")
    theirs = EmbitPsbt.from_string(vector["base64"]).serialize()
    assert theirs == ours


def test_errors_are_hsm_errors() -> None:
    err = parse_error("cHNidP8BAAo=")
    assert isinstance(err, HsmError)
    assert err.to_dict()["code"] == "psbt_error"


def test_serialize_reports_out_of_range_fields_as_psbt_error() -> None:
    psbt = Psbt.parse(WORKFLOW["creator"]["result"]["hex"])
    bad = psbt.copy()
    bad.global_map.tx_version = 2**40
    with pytest.raises(PsbtError, match="out-of-range"):
        bad.serialize()
    bad = psbt.copy()
    bad.inputs[0].previous_txid = b"\x00" * 31
    with pytest.raises(PsbtError) as info:
        bad.serialize()
    assert info.value.field == "PSBT_IN_PREVIOUS_TXID"
    bad = psbt.copy()
    bad.global_map.version_field = 1
    with pytest.raises(PsbtError) as info:
        bad.serialize()
    assert info.value.field == "PSBT_GLOBAL_VERSION"
    assert psbt.to_v0() == psbt and psbt.to_v2().to_v2() == psbt.to_v2()
