"""Fuzzing Psbt.parse: it either returns a PSBT whose serialisation is a fixed point of
parse -> serialize, or raises PsbtError. No other exception may escape.

Inputs: random bytes and text, and mutations of every valid vector (BIP174, BIP370, BIP371,
BIP373):
bit flips, truncations, insertions, deletions, key-value pairs of every field type spliced
in at map boundaries, and values of existing pairs replaced.
"""

from __future__ import annotations

import base64
import contextlib
import json
from io import BytesIO
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tests.vectors import data_dir, load_json

from anyhsm.bitcoin.encoding import read_compact_size, var_bytes
from anyhsm.bitcoin.psbt import Psbt
from anyhsm.errors import EncodingError, PsbtError


def _vectors() -> list[bytes]:
    bip174: dict[str, Any] = load_json("bip174")
    out = [v["hex"] for v in bip174["valid"] + bip174["fails_signer_checks"]]
    out += [
        s["result"]["hex"]
        for s in bip174["workflow"].values()
        if isinstance(s, dict) and isinstance(s.get("result"), dict)
    ]
    out += [bip174["combiner_unknown_keys"]["result"]["hex"]]
    for name in ("psbt_v2_vectors.json", "psbt_taproot_vectors.json"):
        with (data_dir() / name).open(encoding="utf-8") as fh:
            d = json.load(fh)
        out += [v["hex"] for v in d["valid"] + d.get("locktime", [])]
    with (data_dir() / "bip373" / "bip373_vectors.json").open(encoding="utf-8") as fh:
        out += [v["hex"] for v in json.load(fh)["valid"]]
    return [bytes.fromhex(h) for h in out]


VECTORS = _vectors()


def _boundaries(raw: bytes) -> list[tuple[int, int, int]]:
    """(start, value start, end) of every key-value pair of a valid PSBT, and (p, p, p) for
    every position just before a map separator."""
    s = BytesIO(raw)
    s.seek(5)
    out = []
    while s.tell() < len(raw):
        start = s.tell()
        n = read_compact_size(s)
        if n == 0:
            out.append((start, start, start))
            continue
        s.seek(n, 1)
        value_start = s.tell()
        s.seek(read_compact_size(s), 1)
        out.append((start, value_start, s.tell()))
    return out


def check(data: bytes | str) -> None:
    """The property: PsbtError, or a PSBT whose serialisation re-parses to itself."""
    try:
        psbt = Psbt.parse(data)
    except PsbtError as e:
        event(f"rejected: {e.field}")
        return
    event(f"parsed v{psbt.version}")
    raw = psbt.serialize()
    again = Psbt.parse(raw)
    assert again.serialize() == raw
    assert again == psbt
    assert Psbt.parse(psbt.to_base64()).serialize() == raw
    # Accessors either work or say what is wrong with a PsbtError.
    psbt.spent_outputs()
    psbt.fee()
    for call in (psbt.unsigned_tx, psbt.unique_id, psbt.to_v0, psbt.to_v2):
        with contextlib.suppress(PsbtError):
            call()


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes(data: bytes) -> None:
    check(data)
    check(b"psbt\xff" + data)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_text(text: str) -> None:
    check(text)
    check("cHNidP8" + text)
    check("70736274ff" + text)


@FUZZ
@given(st.sampled_from(VECTORS), st.data())
def test_byte_mutations(raw: bytes, data: st.DataObject) -> None:
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "byte"]))
        # Past the magic bytes (random_bytes covers those), anywhere in the maps.
        pos = data.draw(st.integers(min(5, len(buf)), max(len(buf) - 1, 5)))
        if op == "flip" and pos < len(buf):
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[pos : pos + data.draw(st.integers(1, 8))]
        elif op == "byte" and pos < len(buf):
            buf[pos] = data.draw(st.sampled_from([0x00, 0x01, 0xFC, 0xFD, 0xFE, 0xFF]))
    check(bytes(buf))
    if data.draw(st.booleans()):
        check(base64.b64encode(bytes(buf)).decode())


# Key types worth aiming at: every defined global/input/output type, the MuSig2 range, and
# some unknown ones, with key data and value sizes that the field rules care about.
KEY_TYPES = st.sampled_from([*range(0x00, 0x1D), 0xF0, 0xFB, 0xFC, 0xFD])
SIZES = st.sampled_from([0, 1, 4, 8, 20, 31, 32, 33, 64, 65, 66, 78, 98])


@st.composite
def records(draw: st.DrawFn) -> bytes:
    key_type = draw(KEY_TYPES)
    key = (
        (b"\xfd" + draw(st.binary(min_size=2, max_size=2)))
        if key_type == 0xFD
        else bytes([key_type])
    )
    key += draw(st.one_of(st.binary(max_size=4), SIZES.flatmap(_exactly)))
    value = draw(st.one_of(st.binary(max_size=12), SIZES.flatmap(_exactly)))
    return var_bytes(key) + var_bytes(value)


@FUZZ
@given(st.sampled_from(VECTORS), st.data())
def test_spliced_key_value_pairs(raw: bytes, data: st.DataObject) -> None:
    spots = _boundaries(raw)
    out = raw
    for _ in range(data.draw(st.integers(1, 3))):
        start, _, _ = data.draw(st.sampled_from(spots))
        out = out[:start] + data.draw(records()) + out[start:]
        spots = _boundaries(out) if _well_framed(out) else spots
    check(out)


@FUZZ
@given(st.sampled_from(VECTORS), st.data())
def test_replaced_values(raw: bytes, data: st.DataObject) -> None:
    pairs = [b for b in _boundaries(raw) if b[0] != b[2]]
    if not pairs:
        check(raw)
        return
    _, value_start, end = data.draw(st.sampled_from(pairs))
    payload = data.draw(st.one_of(st.binary(max_size=80), SIZES.flatmap(_exactly)))
    framed = data.draw(st.integers(0, 3)) > 0  # mostly well framed, to reach field checks
    check(raw[:value_start] + (var_bytes(payload) if framed else payload) + raw[end:])


def _exactly(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


def _well_framed(raw: bytes) -> bool:
    try:
        _boundaries(raw)
    except EncodingError:
        return False
    return True


def test_every_vector_is_a_fixed_point() -> None:
    for raw in VECTORS:
        psbt = Psbt.parse(raw)
        assert psbt.serialize() == raw
        assert Psbt.parse(raw) == psbt
