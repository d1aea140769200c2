"""PSBT Creator and Combiner (anyhsm.bitcoin.psbt_tools) against Bitcoin Core's vectors
and embit as an independent builder of the same bytes."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from embit.psbt import PSBT as EmbitPsbt  # type: ignore[import-untyped]
from embit.script import Script  # type: ignore[import-untyped]
from embit.transaction import (  # type: ignore[import-untyped]
    Transaction as EmbitTx,
)
from embit.transaction import (
    TransactionInput,
    TransactionOutput,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.vectors import load_json

from anyhsm.bitcoin.address import address_for_pubkey
from anyhsm.bitcoin.psbt import Psbt
from anyhsm.bitcoin.psbt_tools import (
    InputSpec,
    OutputSpec,
    combine_psbts,
    create_psbt,
    parse_amount,
)
from anyhsm.bitcoin.tx import OutPoint
from anyhsm.crypto import secp256k1 as ec
from anyhsm.errors import AddressError, NetworkMismatch, PsbtError
from anyhsm.secret import SecretBytes
from anyhsm.types import Network

BIP174: dict[str, Any] = load_json("bip174")
WORKFLOW: dict[str, Any] = BIP174["workflow"]

# Bitcoin Core's test/functional/data/rpc_psbt.json, "creator" (the BIP174 creator case):
# createpsbt(inputs, outputs, replaceable=False) on regtest gives WORKFLOW["creator"].
CORE_CREATOR_OUTPUTS = [
    "bcrt1qmpwzkuwsqc9snjvgdt4czhjsnywa5yjdqpxskv=1.49990000",
    "bcrt1qqzh2ngh97ru8dfvgma25d6r595wcwqy0cee4cc=1",
]


def _core_inputs() -> list[str]:
    return [f"{i['txid']}:{i['vout']}" for i in WORKFLOW["creator"]["inputs"]]


def test_core_createpsbt_vector() -> None:
    psbt = create_psbt(_core_inputs(), CORE_CREATOR_OUTPUTS, Network.REGTEST, replaceable=False)
    assert psbt.to_base64() == WORKFLOW["creator"]["result"]["base64"]
    for spec, out in zip(WORKFLOW["creator"]["outputs"], psbt.outputs, strict=True):
        assert out.script.hex() == spec["script_pubkey"] and out.amount == spec["amount_sat"]


def test_sequences_follow_core() -> None:
    net = Network.REGTEST
    default = create_psbt(_core_inputs(), CORE_CREATOR_OUTPUTS, net)
    assert [i.sequence for i in default.unsigned_tx().inputs] == [0xFFFFFFFD] * 2
    locked = create_psbt(_core_inputs(), CORE_CREATOR_OUTPUTS, net, locktime=800_000)
    assert [i.sequence for i in locked.unsigned_tx().inputs] == [0xFFFFFFFD] * 2
    final = create_psbt(_core_inputs(), [], net, locktime=800_000, replaceable=False)
    assert [i.sequence for i in final.unsigned_tx().inputs] == [0xFFFFFFFE] * 2
    assert final.unsigned_tx().locktime == 800_000
    given = [_core_inputs()[0] + ":7", _core_inputs()[1]]
    mixed = create_psbt(given, [], net, replaceable=False)
    assert [i.sequence for i in mixed.unsigned_tx().inputs] == [7, 0xFFFFFFFF]
    assert create_psbt(given, [], net, replaceable=True).unsigned_tx().inputs[1].sequence == (
        0xFFFFFFFD
    )
    finals = [_core_inputs()[0] + ":4294967295", _core_inputs()[1] + ":4294967294"]
    with pytest.raises(PsbtError, match="contradict"):
        create_psbt(finals, [], net, replaceable=True)
    assert create_psbt(finals, [], net).unsigned_tx().inputs[0].sequence == 0xFFFFFFFF


def test_version_and_psbt_version() -> None:
    net = Network.REGTEST
    v0 = create_psbt(_core_inputs(), CORE_CREATOR_OUTPUTS, net, tx_version=3)
    assert v0.version == 0 and v0.unsigned_tx().version == 3
    v2 = create_psbt(_core_inputs(), CORE_CREATOR_OUTPUTS, net, tx_version=3, psbt_version=2)
    assert v2.version == 2 and Psbt.parse(v2.serialize()) == v2
    assert v2.to_v0().serialize() == v0.serialize()
    for bad in (0, 4):
        with pytest.raises(PsbtError, match="version"):
            create_psbt([], [], net, tx_version=bad)
    with pytest.raises(PsbtError):
        create_psbt([], [], net, psbt_version=1)
    for bad_lock in (-1, 2**32):
        with pytest.raises(PsbtError, match="lock time"):
            create_psbt([], [], net, locktime=bad_lock)


def test_data_outputs() -> None:
    net = Network.REGTEST
    psbt = create_psbt([], ["data=", *CORE_CREATOR_OUTPUTS[:1]], net)
    assert psbt.outputs[0].script == b"\x6a\x00" and psbt.outputs[0].amount == 0
    assert OutputSpec.parse("data=01", net).script_pubkey == b"\x6a\x01\x01"  # a push, not OP_1
    long = OutputSpec.parse("data=" + "ab" * 80, net).script_pubkey
    assert long[:3] == b"\x6a\x4c\x50" and len(long) == 83
    with pytest.raises(PsbtError, match="twice"):
        create_psbt([], ["data=00", "data=01"], net)
    with pytest.raises(PsbtError, match="hex"):
        OutputSpec.parse("data=abc", net)


def test_output_and_input_errors() -> None:
    net = Network.REGTEST
    with pytest.raises(PsbtError, match="twice"):
        create_psbt([], [CORE_CREATOR_OUTPUTS[0], CORE_CREATOR_OUTPUTS[0]], net)
    with pytest.raises(PsbtError, match="given twice"):
        create_psbt([_core_inputs()[0], _core_inputs()[0] + ":5"], [], net)
    with pytest.raises(NetworkMismatch):
        OutputSpec.parse(CORE_CREATOR_OUTPUTS[0], Network.MAINNET)
    with pytest.raises(AddressError):
        OutputSpec.parse("bcrt1qnotanaddress=1", net)
    for bad in ("nothing", "=1", "addr"):
        with pytest.raises(PsbtError):
            OutputSpec.parse(bad, net)
    txid = WORKFLOW["creator"]["inputs"][0]["txid"]
    for bad in ("abcd:0", f"{txid}", f"{txid}:-1", f"{txid}:x", f"{txid}:4294967296", "a:b:c:d"):
        with pytest.raises(PsbtError) as info:
            InputSpec.parse(bad)
        assert info.value.field == "inputs"
    spec = InputSpec.parse(f"{txid}:3:12")
    assert spec.prevout == OutPoint(bytes.fromhex(txid)[::-1], 3) and spec.sequence == 12


@pytest.mark.parametrize(
    ("text", "sats"),
    [
        ("1", 100_000_000),
        ("1.49990000", 149_990_000),
        ("0.00000001", 1),
        ("0.", 0),
        ("21000000", 21_000_000 * 100_000_000),
        ("1500 sat", 1500),
        ("1500sats", 1500),
    ],
)
def test_amounts(text: str, sats: int) -> None:
    assert parse_amount(text) == sats


@pytest.mark.parametrize(
    "text", ["-1", "0.000000001", "21000000.00000001", "1e-8", "", "1,5", "abc", ".5"]
)
def test_bad_amounts(text: str) -> None:
    with pytest.raises(PsbtError):
        parse_amount(text)


# --- embit builds the same PSBT ---------------------------------------------------------------

_SECRETS = [SecretBytes(bytes([i]) * 32) for i in range(1, 4)]
_KEYS = [ec.public_key(s.buffer) for s in _SECRETS]
_ADDRESSES = [
    address_for_pubkey(k, kind, Network.TESTNET)
    for k in _KEYS
    for kind in ("p2pkh", "p2sh-p2wpkh", "p2wpkh", "p2tr")
]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.binary(min_size=32, max_size=32),
            st.integers(0, 2**32 - 1),
            st.none() | st.integers(0, 2**32 - 1),
        ),
        max_size=5,
        unique_by=lambda t: (t[0], t[1]),
    ),
    st.lists(
        st.tuples(st.sampled_from(_ADDRESSES), st.integers(0, 10**15)),
        max_size=5,
        unique_by=lambda t: t[0],
    ),
    st.integers(0, 2**32 - 1),
    st.integers(1, 3),
    st.booleans(),
)
def test_embit_builds_the_same_psbt(
    ins: list[tuple[bytes, int, int | None]],
    outs: list[tuple[str, int]],
    locktime: int,
    version: int,
    rbf: bool,
) -> None:
    specs = [InputSpec(OutPoint(t, v), s) for t, v, s in ins]
    out_specs = [f"{a}={n} sat" for a, n in outs]
    ours = create_psbt(
        specs,
        out_specs,
        Network.TESTNET,
        locktime=locktime,
        tx_version=version,
        replaceable=None if rbf else False,  # None: Core's default, RBF sequences
    )
    default = 0xFFFFFFFD if rbf else (0xFFFFFFFE if locktime else 0xFFFFFFFF)
    tx = EmbitTx(
        version=version,
        vin=[TransactionInput(t[::-1], v, sequence=default if s is None else s) for t, v, s in ins],
        vout=[
            TransactionOutput(n, Script(OutputSpec.parse(f"{a}=1", Network.TESTNET).script_pubkey))
            for a, n in outs
        ],
        locktime=locktime,
    )
    assert ours.unsigned_tx().serialize() == tx.serialize()
    if all(t.sequence for t in tx.vin):  # embit's PSBT writes a sequence of 0 as 0xffffffff
        assert EmbitPsbt(tx).serialize() == ours.serialize()


# --- combine ----------------------------------------------------------------------------------


def _step(ref: str) -> str:
    step, _, part = ref.partition(".")
    return str(WORKFLOW[step][part]["base64"])


def test_core_combinepsbt_vector_in_any_order() -> None:
    a, b = (_step(ref) for ref in WORKFLOW["combiner"]["inputs"])
    expected = WORKFLOW["combiner"]["result"]["base64"]
    assert combine_psbts([a, b]).to_base64() == expected
    assert combine_psbts([b, a]).to_base64() == expected
    assert combine_psbts([Psbt.parse(a), b, a]).to_base64() == expected  # idempotent
    assert combine_psbts([expected]).to_base64() == expected


def test_combiner_unknown_keys_vector() -> None:
    c = BIP174["combiner_unknown_keys"]
    a, b = (v["base64"] for v in c["inputs"])
    assert combine_psbts([a, b]).to_base64() == c["result"]["base64"]
    assert combine_psbts([b, a]).to_base64() == c["result"]["base64"]


def test_combine_errors_name_the_psbt() -> None:
    a = WORKFLOW["creator"]["result"]["base64"]
    other = BIP174["valid"][0]["base64"]
    with pytest.raises(PsbtError, match=r"^PSBT 2: cannot combine"):
        combine_psbts([a, a, other])
    with pytest.raises(PsbtError, match="at least one"):
        combine_psbts([])
    with pytest.raises(PsbtError) as info:
        combine_psbts([a, "not a psbt"])
    assert info.value.field == "magic"


def test_combine_does_not_modify_its_inputs() -> None:
    a, b = (Psbt.parse(_step(ref)) for ref in WORKFLOW["combiner"]["inputs"])
    before = (a.serialize(), b.serialize())
    combine_psbts([a, b])
    assert (a.serialize(), b.serialize()) == before


# --- fuzz: the spec parsers answer or raise the documented errors ------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=90))
def test_fuzz_specs(text: str) -> None:
    for parse in (
        InputSpec.parse,
        lambda t: OutputSpec.parse(t, Network.TESTNET),
        parse_amount,
        lambda t: OutputSpec.parse(f"{_ADDRESSES[0]}={t}", Network.TESTNET),
        lambda t: InputSpec.parse("00" * 32 + ":" + t),
    ):
        with contextlib.suppress(PsbtError, AddressError):
            parse(text)


def test_only_ascii_digits() -> None:
    txid = "00" * 32
    for bad in ("\u0661", "1\u0663", "\x1f0", "１"):  # Arabic-Indic, fullwidth digits
        with pytest.raises(PsbtError):
            InputSpec.parse(f"{txid}:{bad}")
        with pytest.raises(PsbtError):
            parse_amount(bad)
    assert InputSpec.parse(f" {txid}:1 ").prevout.vout == 1
