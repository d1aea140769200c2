"""BIP373 MuSig2 PSBT fields: the BIP's vectors, field validation, Bitcoin Core's order,
combining and finalizing, and fuzzing of the new decoders."""

from __future__ import annotations

import base64
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.vectors import data_dir

from anyhsm.bitcoin.address import wif_decode
from anyhsm.bitcoin.encoding import var_bytes
from anyhsm.bitcoin.psbt import InputType, MuSig2Key, OutputType, Psbt
from anyhsm.crypto import secp256k1 as ec
from anyhsm.errors import PsbtError

_DATA: dict[str, Any] = __import__("json").loads(
    (data_dir() / "bip373" / "bip373_vectors.json").read_text(encoding="utf-8")
)
VALID: list[dict[str, str]] = _DATA["valid"]
INVALID: list[dict[str, str]] = _DATA["invalid"]
AGG = bytes.fromhex(_DATA["aggregate_pubkey"])
PARTICIPANTS = [bytes.fromhex(p["pubkey"]) for p in _DATA["participants"]]

IN_PARTICIPANTS = "PSBT_IN_MUSIG2_PARTICIPANT_PUBKEYS"
IN_NONCE = "PSBT_IN_MUSIG2_PUB_NONCE"
IN_PSIG = "PSBT_IN_MUSIG2_PARTIAL_SIG"
OUT_PARTICIPANTS = "PSBT_OUT_MUSIG2_PARTICIPANT_PUBKEYS"

# For each invalid vector (in the BIP's order): the field the error names and words its
# message holds.
INVALID_EXPECT = [
    (IN_PARTICIPANTS, "aggregate key is 32 bytes"),
    (IN_PARTICIPANTS, "not a list of 33-byte"),
    (OUT_PARTICIPANTS, "aggregate key is 32 bytes"),
    (OUT_PARTICIPANTS, "aggregate key is 32 bytes"),
    (IN_NONCE, "key data is 65 bytes"),
    (IN_NONCE, "key data is 65 bytes"),
    (IN_NONCE, "public nonce is 65 bytes"),
    (IN_PSIG, "key data is 97 bytes"),
    (IN_PSIG, "key data is 97 bytes"),
    (IN_PSIG, "partial signature is 31 bytes"),
]


def test_sources_and_counts() -> None:
    src = _DATA["source"]
    assert src["repository"] == "bitcoin/bips" and src["path"] == "bip-0373.mediawiki"
    assert len(VALID) == 14 and len(INVALID) == 10
    for v in VALID + INVALID:
        assert base64.b64decode(v["base64"]).hex() == v["hex"]


def test_listed_keys_match_their_wifs() -> None:
    for p in _DATA["participants"]:
        for wif in (p["wif_mainnet"], p["wif_testnet"]):
            secret, _, compressed = wif_decode(wif)
            assert compressed and ec.public_key(secret.buffer).hex() == p["pubkey"]
            secret.wipe()


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v["description"][:60])
def test_valid_vectors_round_trip_byte_for_byte(vector: dict[str, str]) -> None:
    for form in (vector["hex"], vector["base64"], bytes.fromhex(vector["hex"])):
        psbt = Psbt.parse(form)
        assert psbt.serialize().hex() == vector["hex"]
        assert not any(i.unknown for i in psbt.inputs)  # every MuSig2 pair is typed
        assert not any(o.unknown for o in psbt.outputs)
    again = Psbt.parse(psbt.serialize())
    assert again == psbt


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v["description"][:60])
def test_valid_vectors_are_typed(vector: dict[str, str]) -> None:
    psbt = Psbt.parse(vector["hex"])
    desc = vector["description"]
    if desc.startswith("Receiving"):
        assert psbt.outputs[0].musig2_participants == {AGG: tuple(PARTICIPANTS)}
        assert not psbt.inputs[0].musig2_participants
        return
    inp = psbt.inputs[0]
    assert inp.musig2_participants == {AGG: tuple(PARTICIPANTS)}
    nonces = 0 if "participant pubkeys only" in desc else 3
    psigs = 3 if "partial signatures" in desc else 0
    assert len(inp.musig2_pub_nonces) == nonces and len(inp.musig2_partial_sigs) == psigs
    # a key in a script signs in its leaf: the key data carries the leaf hash
    in_script = "key in a script" in desc
    for k in [*inp.musig2_pub_nonces, *inp.musig2_partial_sigs]:
        assert isinstance(k, MuSig2Key)
        assert k.participant in PARTICIPANTS
        # the aggregate key, or (where the vectors sign for the tweaked key) the output key
        spent = inp.witness_utxo
        assert spent is not None
        assert k.aggregate == AGG or k.aggregate[1:] == spent.script_pubkey[2:]
        assert (k.leaf_hash is not None) is in_script
        if in_script:
            assert k.leaf_hash in {h for (_, h) in inp.tap_script_sigs} | {
                h for o in inp.tap_bip32_derivations.values() for h in o.leaf_hashes
            }
    for nonce in inp.musig2_pub_nonces.values():
        assert len(nonce) == 66
    for psig in inp.musig2_partial_sigs.values():
        assert len(psig) == 32


@pytest.mark.parametrize("index", range(10))
def test_invalid_vectors_name_the_field(index: int) -> None:
    vector = INVALID[index]
    field, words = INVALID_EXPECT[index]
    for form in (vector["hex"], vector["base64"]):
        with pytest.raises(PsbtError) as info:
            Psbt.parse(form)
        assert info.value.field == field, str(info.value)
        assert info.value.message.startswith(field + ":")
        assert words in info.value.message


# --- hand-made malformed fields ---------------------------------------------------------------

_BASE = VALID[2]["hex"]  # output key is the aggregate, with nonces and partial signatures
NOT_ON_CURVE = b"\x02" + b"\x00" * 31 + b"\x05"  # x = 5: x^3 + 7 = 132 is not a square mod p


def _input_records(raw: bytes) -> list[tuple[bytes, bytes]]:
    from tests.bitcoin.test_psbt import _records

    return _records(raw)[1]


def _with_input(records: list[tuple[bytes, bytes]]) -> bytes:
    """The base vector with input 0's map replaced by ``records``."""
    from tests.bitcoin.test_psbt import _records

    maps = _records(bytes.fromhex(_BASE))
    maps[1] = records
    return b"psbt\xff" + b"".join(
        b"".join(var_bytes(k) + var_bytes(v) for k, v in m) + b"\x00" for m in maps
    )


def _error(raw: bytes) -> PsbtError:
    with pytest.raises(PsbtError) as info:
        Psbt.parse(raw)
    return info.value


def _replace(key_type: int, key: bytes | None = None, value: bytes | None = None) -> bytes:
    """The base vector with the first record of ``key_type`` given another key or value."""
    records = _input_records(bytes.fromhex(_BASE))
    for n, (k, v) in enumerate(records):
        if k[0] == key_type:
            records[n] = (
                k if key is None else bytes([key_type]) + key,
                v if value is None else value,
            )
            break
    else:
        raise AssertionError("no such record")
    return _with_input(records)


@pytest.mark.parametrize(
    ("key_type", "key", "value", "field", "words"),
    [
        (0x1A, b"\x04" + b"\x11" * 64, None, IN_PARTICIPANTS, "33 bytes"),
        (0x1A, NOT_ON_CURVE, None, IN_PARTICIPANTS, "not a valid compressed public key"),
        (0x1A, None, PARTICIPANTS[0] + NOT_ON_CURVE, IN_PARTICIPANTS, "participant key 1"),
        (0x1A, None, PARTICIPANTS[0] + b"\x00", IN_PARTICIPANTS, "34 bytes"),
        (0x1A, None, ec.decompress(PARTICIPANTS[0]), IN_PARTICIPANTS, "65 bytes"),
        (0x1B, NOT_ON_CURVE + AGG, None, IN_NONCE, "participant key is not a valid"),
        (0x1B, PARTICIPANTS[0] + NOT_ON_CURVE, None, IN_NONCE, "aggregate key is not a valid"),
        (0x1B, PARTICIPANTS[0] + AGG + b"\x01" * 31, None, IN_NONCE, "key data is 97 bytes"),
        (0x1B, None, PARTICIPANTS[0] + NOT_ON_CURVE, IN_NONCE, "public nonce R2"),
        (0x1B, None, b"\x04" + PARTICIPANTS[0][1:] + PARTICIPANTS[1], IN_NONCE, "nonce R1"),
        (0x1B, None, bytes(67), IN_NONCE, "67 bytes"),
        (0x1C, PARTICIPANTS[0] + b"\x05" + AGG[1:], None, IN_PSIG, "aggregate key is not"),
        (0x1C, None, ec.CURVE_ORDER.to_bytes(32, "big"), IN_PSIG, "below the curve order"),
        (0x1C, None, b"\xff" * 32, IN_PSIG, "below the curve order"),
        (0x1C, None, b"\x01" * 33, IN_PSIG, "33 bytes"),
    ],
)
def test_malformed_musig2_fields(
    key_type: int, key: bytes | None, value: bytes | None, field: str, words: str
) -> None:
    err = _error(_replace(key_type, key, value))
    assert err.field == field and words in err.message, err.message
    assert "(input 0)" in err.message


def test_empty_participant_list_is_accepted_as_core_does() -> None:
    raw = _replace(0x1A, value=b"")
    assert raw != bytes.fromhex(_BASE)
    psbt = Psbt.parse(raw)
    assert psbt.inputs[0].musig2_participants == {AGG: ()}
    assert psbt.serialize() == raw


def test_leaf_hash_keys_and_partial_sig_bounds() -> None:
    psbt = Psbt.parse(_BASE)
    inp = psbt.inputs[0]
    leaf = b"\x42" * 32
    inp.musig2_pub_nonces[MuSig2Key(PARTICIPANTS[1], AGG, leaf)] = PARTICIPANTS[0] * 2
    inp.musig2_partial_sigs[MuSig2Key(PARTICIPANTS[1], AGG, leaf)] = (ec.CURVE_ORDER - 1).to_bytes(
        32, "big"
    )
    again = Psbt.parse(psbt.serialize())
    assert again == psbt
    assert again.inputs[0].musig2_partial_sigs[MuSig2Key(PARTICIPANTS[1], AGG, leaf)][0] == 0xFF


def test_output_field_validation() -> None:
    from tests.bitcoin.test_psbt import _records

    raw = bytes.fromhex(VALID[12]["hex"])
    maps = _records(raw)
    out_map = 2  # global, one input, then the first output
    for n, (k, v) in enumerate(maps[out_map]):
        if k[0] == OutputType.MUSIG2_PARTICIPANT_PUBKEYS:
            maps[out_map][n] = (k, v + NOT_ON_CURVE)
    bad = b"psbt\xff" + b"".join(
        b"".join(var_bytes(k) + var_bytes(v) for k, v in m) + b"\x00" for m in maps
    )
    err = _error(bad)
    assert err.field == OUT_PARTICIPANTS and "participant key 3" in err.message
    assert "(output 0)" in err.message


# --- Bitcoin Core's order, combining, finalizing ---------------------------------------------


def _core_order(records: list[tuple[bytes, bytes]], key_type: int) -> list[bytes]:
    """Keys of one MuSig2 type sorted as Core's map: (aggregate, leaf hash, participant)."""
    keys = [k for k, _ in records if k[0] == key_type]
    return sorted(keys, key=lambda k: (k[34:67], k[67:] or bytes(32), k[1:34]))


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v["description"][:60])
def test_vectors_are_in_core_order(vector: dict[str, str]) -> None:
    records = _input_records(bytes.fromhex(vector["hex"]))
    for key_type in (0x1B, 0x1C):
        keys = [k for k, _ in records if k[0] == key_type]
        assert keys == _core_order(records, key_type)


def test_fields_added_in_any_order_are_written_in_core_order() -> None:
    psbt = Psbt.parse(_BASE)
    inp = psbt.inputs[0]
    rng = random.Random(373)
    for attr in ("musig2_pub_nonces", "musig2_partial_sigs"):
        items = list(getattr(inp, attr).items())
        rng.shuffle(items)
        extra = MuSig2Key(PARTICIPANTS[2], PARTICIPANTS[0], b"\x00" * 31 + b"\x01")
        items.insert(0, (extra, items[0][1]))
        setattr(inp, attr, dict(items))
    raw = psbt.serialize()
    records = _input_records(raw)
    for key_type in (0x1B, 0x1C):
        assert [k for k, _ in records if k[0] == key_type] == _core_order(records, key_type)
    assert Psbt.parse(raw) == psbt


def test_combine_merges_nonces_and_partial_signatures() -> None:
    full = Psbt.parse(_BASE)
    parts = []
    for participant in PARTICIPANTS:  # each participant's PSBT holds only its own data
        mine = full.copy()
        inp = mine.inputs[0]
        inp.musig2_pub_nonces = {
            k: v for k, v in inp.musig2_pub_nonces.items() if k.participant == participant
        }
        inp.musig2_partial_sigs = {
            k: v for k, v in inp.musig2_partial_sigs.items() if k.participant == participant
        }
        parts.append(mine)
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        combined = parts[order[0]].combine(parts[order[1]]).combine(parts[order[2]])
        assert combined.serialize() == full.serialize()


def test_finalizer_clears_musig2_fields() -> None:
    psbt = Psbt.parse(_BASE)
    inp = psbt.inputs[0]
    inp.finalize(witness=[b"\x01" * 64])
    assert not inp.musig2_participants and not inp.musig2_pub_nonces
    assert not inp.musig2_partial_sigs
    types = {k[0] for k, _ in _input_records(psbt.serialize())}
    assert types == {InputType.WITNESS_UTXO, InputType.FINAL_SCRIPTWITNESS}


def test_musig2_fields_in_a_v2_psbt() -> None:
    v2 = Psbt.parse(_BASE).to_v2()
    raw = v2.serialize()
    again = Psbt.parse(raw)
    assert again.version == 2 and again.inputs[0].musig2_partial_sigs
    assert again.serialize() == raw
    assert again.to_v0().serialize() == bytes.fromhex(_BASE)


# --- fuzz --------------------------------------------------------------------------------------

_KEYS = [*PARTICIPANTS, AGG, NOT_ON_CURVE, b"\x03" + PARTICIPANTS[0][1:], b"\x04" * 33]


@st.composite
def musig_records(draw: st.DrawFn) -> tuple[bytes, bytes]:
    key_type = draw(st.sampled_from([0x1A, 0x1B, 0x1C]))
    if key_type == 0x1A:
        key = draw(st.sampled_from(_KEYS)) + draw(st.sampled_from([b"", b"\x00"]))
        value = b"".join(draw(st.lists(st.sampled_from(_KEYS), max_size=4)))
        value += draw(st.binary(max_size=2))
    else:
        key = draw(st.sampled_from(_KEYS)) + draw(st.sampled_from(_KEYS))
        key += draw(st.sampled_from([b"", b"\x07" * 32, b"\x07" * 31, b"\x07" * 33]))
        size = 66 if key_type == 0x1B else 32
        value = draw(
            st.one_of(
                st.binary(min_size=size, max_size=size),
                st.sampled_from(_KEYS).map(lambda k: k * 2 if size == 66 else k[1:]),
                st.binary(max_size=70),
            )
        )
    return bytes([key_type]) + key, value


@settings(max_examples=400, deadline=None)
@given(st.lists(musig_records(), min_size=1, max_size=6))
def test_fuzz_musig_records(records: list[tuple[bytes, bytes]]) -> None:
    """Any mix of well-formed and malformed MuSig2 pairs: PsbtError naming a MuSig2 field
    (or the duplicate), or a PSBT that re-serialises to a fixed point."""
    raw = _with_input(_input_records(bytes.fromhex(VALID[0]["hex"])) + records)
    try:
        psbt = Psbt.parse(raw)
    except PsbtError as e:
        assert e.field in (IN_PARTICIPANTS, IN_NONCE, IN_PSIG), e.message
        return
    out = psbt.serialize()
    again = Psbt.parse(out)
    assert again == psbt and again.serialize() == out
