"""Addresses, networks and WIF: BIP173/BIP350 vectors, Base58 round trips, network families
and mismatches, embit as a differential oracle, and a decoding fuzz."""

from __future__ import annotations

import contextlib
import json
import random
from typing import Any

import pytest
from embit import ec as eec
from embit import script as escript
from embit.networks import NETWORKS
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.vectors import data_dir

from anyhsm.bitcoin import networks as nets
from anyhsm.bitcoin.address import (
    AddressKind,
    address_for_pubkey,
    address_from_script,
    bip86_output_key,
    check_address,
    parse_address,
    redeem_script_for_pubkey,
    script_for_pubkey,
    script_from_address,
    wif_decode,
    wif_encode,
)
from anyhsm.bitcoin.encoding import (
    EncodingError,
    b58check_encode,
    bech32_decode,
    hash160,
)
from anyhsm.bitcoin.script import ScriptType, multisig, op_return, p2pk, p2sh, p2wsh
from anyhsm.crypto import secp256k1
from anyhsm.errors import AddressError, HsmError, InvalidKeyMaterial, NetworkMismatch
from anyhsm.secret import SecretBytes
from anyhsm.types import Network

VECTORS: Any = json.loads((data_dir() / "bech32_vectors.json").read_text())
MAIN, TEST, TEST4, SIGNET, REG = (
    Network.MAINNET,
    Network.TESTNET,
    Network.TESTNET4,
    Network.SIGNET,
    Network.REGTEST,
)
TB_FAMILY = frozenset({TEST, TEST4, SIGNET})
BASE58_TEST_FAMILY = frozenset({TEST, TEST4, SIGNET, REG})

ONE = bytearray((1).to_bytes(32, "big"))
G = secp256k1.public_key(ONE)


# --- network parameters --------------------------------------------------------------------------


def test_network_params() -> None:
    main = nets.params(MAIN)
    assert (main.p2pkh_prefix, main.p2sh_prefix, main.wif_prefix) == (0x00, 0x05, 0x80)
    assert main.bech32_hrp == "bc" and main.coin_type == 0
    assert (main.xprv_version.hex(), main.xpub_version.hex()) == ("0488ade4", "0488b21e")
    for net, hrp in ((TEST, "tb"), (TEST4, "tb"), (SIGNET, "tb"), (REG, "bcrt")):
        p = nets.params(net)
        assert (p.p2pkh_prefix, p.p2sh_prefix, p.wif_prefix) == (0x6F, 0xC4, 0xEF)
        assert p.bech32_hrp == hrp and p.coin_type == 1 and p.network is net
        assert (p.xprv_version.hex(), p.xpub_version.hex()) == ("04358394", "043587cf")
        assert p.name == net.value
    assert [p.network for p in nets.all_params()] == list(Network)


def test_network_families() -> None:
    assert nets.networks_for_hrp("bc") == {MAIN}
    assert nets.networks_for_hrp("TB") == TB_FAMILY
    assert nets.networks_for_hrp("bcrt") == {REG}
    assert nets.networks_for_hrp("ltc") == frozenset()
    assert nets.networks_for_base58_prefix(0x6F) == BASE58_TEST_FAMILY
    assert nets.networks_for_base58_prefix(0x05) == {MAIN}
    assert nets.networks_for_wif_prefix(0xEF) == BASE58_TEST_FAMILY
    assert nets.networks_for_bip32_version(bytes.fromhex("043587cf")) == BASE58_TEST_FAMILY
    assert nets.describe_family(TB_FAMILY) == "testnet/testnet4/signet"
    assert nets.address_networks("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4") == {MAIN}
    assert nets.address_networks("mrCDrCybB6J1vRfbwM5hemdJz73FwDBC8r") == BASE58_TEST_FAMILY
    with pytest.raises(AddressError):
        nets.address_networks("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t5")


# --- BIP173 / BIP350 -----------------------------------------------------------------------------


def test_vector_file_source_is_recorded() -> None:
    src = VECTORS["source"]
    assert src["bip173"]["repository"] == src["bip350"]["repository"] == "bitcoin/bips"
    assert src["bip173"]["path"] == "bip-0173.mediawiki"
    assert src["bip350"]["path"] == "bip-0350.mediawiki"


@pytest.mark.parametrize("text", VECTORS["bip173_valid_bech32"])
def test_valid_bech32_strings(text: str) -> None:
    hrp, _, is_m = bech32_decode(text)
    assert not is_m and hrp == text[: text.rfind("1")].lower()


@pytest.mark.parametrize("text", VECTORS["bip350_valid_bech32m"])
def test_valid_bech32m_strings(text: str) -> None:
    _, _, is_m = bech32_decode(text)
    assert is_m


@pytest.mark.parametrize(
    ("text", "reason"), VECTORS["bip173_invalid_bech32"] + VECTORS["bip350_invalid_bech32m"]
)
def test_invalid_bech32_strings(text: str, reason: str) -> None:
    with pytest.raises(EncodingError):
        bech32_decode(text)
    with pytest.raises(AddressError):
        parse_address(text)


def _family_of(address: str) -> frozenset[Network]:
    hrp = address[: address.rfind("1")].lower()
    return nets.networks_for_hrp(hrp)


@pytest.mark.parametrize(("address", "spk"), VECTORS["bip350_valid_addresses"])
def test_bip350_valid_addresses(address: str, spk: str) -> None:
    info = parse_address(address)
    assert info.script_pubkey.hex() == spk
    assert info.networks == _family_of(address)
    for network in info.networks:
        assert script_from_address(address, network).hex() == spk
        assert address_from_script(bytes.fromhex(spk), network) == address.lower()
    expected_type = {
        "0014": ScriptType.P2WPKH,
        "0020": ScriptType.P2WSH,
        "5120": ScriptType.P2TR,
    }.get(spk[:4], ScriptType.WITNESS_UNKNOWN)
    assert info.type is expected_type


@pytest.mark.parametrize(("address", "spk"), VECTORS["bip173_valid_addresses"])
def test_bip173_valid_addresses_under_bip350(address: str, spk: str) -> None:
    """v0 addresses stay valid; v1+ with a Bech32 checksum became invalid with BIP350."""
    superseded = VECTORS["bip173_valid_superseded_by_bip350"]["addresses"]
    if address in superseded:
        assert not spk.startswith("00")
        with pytest.raises(AddressError):
            parse_address(address)
    else:
        assert parse_address(address).script_pubkey.hex() == spk


@pytest.mark.parametrize(
    ("address", "reason"),
    VECTORS["bip173_invalid_addresses"] + VECTORS["bip350_invalid_addresses"],
)
def test_invalid_addresses(address: str, reason: str) -> None:
    with pytest.raises(AddressError):
        parse_address(address)
    for network in Network:
        with pytest.raises(AddressError):
            script_from_address(address, network)


# --- Base58 --------------------------------------------------------------------------------------


def test_known_addresses_of_private_key_one() -> None:
    """Well-known addresses of the key 1 (pubkey = G), checked against embit below too."""
    assert address_for_pubkey(G, "p2pkh", MAIN) == "1BgGZ9tcN4rm9KBzDn7KprQz87SZ26SAMH"
    assert address_for_pubkey(G, "p2pkh", TEST) == "mrCDrCybB6J1vRfbwM5hemdJz73FwDBC8r"
    assert address_for_pubkey(G, "p2wpkh", MAIN) == "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"
    assert address_for_pubkey(G, AddressKind.P2SH_P2WPKH, MAIN).startswith("3")
    assert address_for_pubkey(G, "p2sh-p2wpkh", REG).startswith("2")
    assert address_for_pubkey(G, "p2wpkh", REG).startswith("bcrt1q")


def test_bip86_first_address() -> None:
    """BIP86 test vector: m/86'/0'/0'/0/0 of the 'abandon ... about' mnemonic."""
    internal = bytes.fromhex("cc8a4bc64d897bddc5fbc2f670f7a8ba0b386779106cf1223c6fc5d7cd6fc115")
    expected = "bc1p5cyxnuxmeuwuvkwfem96lqzszd02n6xdcjrs20cac6yqjjwudpxqkedrcr"
    output = "a60869f0dbcf1dc659c9cecbaf8050135ea9e8cdc487053f1dc6880949dc684c"
    for parity in (b"\x02", b"\x03"):  # BIP86 uses only the x coordinate
        assert address_for_pubkey(parity + internal, "p2tr", MAIN) == expected
        assert bip86_output_key(parity + internal).hex() == output


def test_base58_round_trips() -> None:
    rng = random.Random(11)
    for _ in range(50):
        h = rng.randbytes(20)
        for network in Network:
            p = nets.params(network)
            for prefix, kind in ((p.p2pkh_prefix, ScriptType.P2PKH), (p.p2sh_prefix, None)):
                address = b58check_encode(bytes([prefix]) + h)
                info = check_address(address, network)
                assert address_from_script(info.script_pubkey, network) == address
                assert info.networks == ({MAIN} if network is MAIN else BASE58_TEST_FAMILY)
                assert info.type is (kind or ScriptType.P2SH)


@pytest.mark.parametrize(
    "payload",
    [
        bytes([0x00]) + bytes(19),  # short hash
        bytes([0x00]) + bytes(21),  # long hash
        bytes([0x30]) + bytes(20),  # Litecoin P2PKH prefix
        bytes([0x80]) + bytes(32),  # a WIF key is not an address
    ],
)
def test_base58_bad_payloads(payload: bytes) -> None:
    with pytest.raises(AddressError):
        parse_address(b58check_encode(payload))


def test_base58_bad_checksum_and_characters() -> None:
    good = "1BgGZ9tcN4rm9KBzDn7KprQz87SZ26SAMH"
    with pytest.raises(AddressError):
        parse_address(good[:-1] + ("J" if good[-1] != "J" else "K"))
    with pytest.raises(AddressError):
        parse_address("0BgGZ9tcN4rm9KBzDn7KprQz87SZ26SAMH")  # '0' is not Base58
    for bad in ("", " " + good, good + " ", "1" * 91):
        with pytest.raises(AddressError):
            parse_address(bad)
    with pytest.raises(AddressError):
        parse_address(123)  # type: ignore[arg-type]


def test_address_from_script_without_address() -> None:
    assert address_from_script(p2pk(G), MAIN) is None
    assert address_from_script(multisig(1, [G]), MAIN) is None
    assert address_from_script(op_return(b"x"), MAIN) is None
    assert address_from_script(b"", MAIN) is None
    assert address_from_script(bytes.fromhex("0015") + bytes(21), MAIN) is None


# --- network mismatch ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "valid_on"),
    [
        ("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4", {MAIN}),
        ("1BgGZ9tcN4rm9KBzDn7KprQz87SZ26SAMH", {MAIN}),
        ("mrCDrCybB6J1vRfbwM5hemdJz73FwDBC8r", BASE58_TEST_FAMILY),
        ("tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx", TB_FAMILY),
        ("bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080", {REG}),
    ],
)
def test_network_mismatch(address: str, valid_on: set[Network]) -> None:
    for network in Network:
        if network in valid_on:
            assert script_from_address(address, network)
            continue
        with pytest.raises(NetworkMismatch) as err:
            script_from_address(address, network)
        message = str(err.value)
        assert network.value in message
        assert all(n.value in message for n in valid_on)
        assert isinstance(err.value, HsmError) and not isinstance(err.value, AddressError)
        assert err.value.code == "network_mismatch"


def test_mainnet_address_on_regtest_names_both() -> None:
    with pytest.raises(NetworkMismatch, match=r"mainnet, not regtest"):
        script_from_address("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4", REG)


# --- key addresses and embit differential --------------------------------------------------------

EMBIT_NET = {MAIN: "main", TEST: "test", TEST4: "test", SIGNET: "signet", REG: "regtest"}


def _embit_address(pub: bytes, kind: AddressKind, network: Network) -> str:
    key = eec.PublicKey.parse(pub)
    net = NETWORKS[EMBIT_NET[network]]
    if kind is AddressKind.P2PKH:
        return str(escript.p2pkh(key).address(net))
    if kind is AddressKind.P2WPKH:
        return str(escript.p2wpkh(key).address(net))
    if kind is AddressKind.P2SH_P2WPKH:
        return str(escript.p2sh(escript.p2wpkh(key)).address(net))
    return str(escript.p2tr(key).address(net))


def test_differential_key_addresses_against_embit() -> None:
    rng = random.Random(12)
    for _ in range(40):
        secret = bytearray(rng.randbytes(32))
        if not secp256k1.valid_secret(secret):
            continue
        pub = secp256k1.public_key(secret)
        for network in Network:
            for kind in AddressKind:
                ours = address_for_pubkey(pub, kind, network)
                assert ours == _embit_address(pub, kind, network), (kind, network)
                spk = script_for_pubkey(pub, kind)
                assert script_from_address(ours, network) == spk
                assert spk == escript.address_to_scriptpubkey(ours).data
            assert wif_encode(secret, network) == eec.PrivateKey(bytes(secret)).wif(
                NETWORKS[EMBIT_NET[network]]
            )


def test_scripts_for_pubkey_kinds() -> None:
    h = hash160(G)
    assert script_for_pubkey(G, "p2wpkh") == bytes.fromhex("0014") + h
    redeem = redeem_script_for_pubkey(G, "p2sh-p2wpkh")
    assert redeem == bytes.fromhex("0014") + h
    assert script_for_pubkey(G, "P2SH_P2WPKH") == p2sh(hash160(redeem))
    assert redeem_script_for_pubkey(G, "p2tr") is None
    assert AddressKind.parse(" P2TR ") is AddressKind.P2TR
    with pytest.raises(AddressError):
        AddressKind.parse("p2wsh")
    for bad in (secp256k1.decompress(G), G[:32], b"\x02" + b"\xff" * 32):
        with pytest.raises(AddressError):
            address_for_pubkey(bad, "p2wpkh", MAIN)


def test_other_scripts_round_trip_on_every_network() -> None:
    ws = multisig(2, [G, secp256k1.public_key(bytearray((2).to_bytes(32, "big")))])
    for network in Network:
        for spk in (p2wsh(bytes(32)), p2sh(hash160(ws)), bytes.fromhex("5102abcd")):
            address = address_from_script(spk, network)
            assert address is not None
            assert script_from_address(address, network) == spk
            if spk[0] != 0xA9:  # Bech32 is case-insensitive (all one case); Base58 is not
                assert script_from_address(address.upper(), network) == spk


# --- WIF -----------------------------------------------------------------------------------------


def test_wif_known_values() -> None:
    assert wif_encode(ONE, MAIN) == "KwDiBf89QgGbjEhKnhXJuH7LrciVrZi3qYjgd9M7rFU73sVHnoWn"
    assert wif_encode(ONE, MAIN, compressed=False) == (
        "5HpHagT65TZzG1PH3CSu63k8DbpvD8s5ip4nEB3kEsreAnchuDf"
    )
    assert wif_encode(bytes(ONE), TEST) == "cMahea7zqjxrtgAbB7LSGbcQUr1uX1ojuat9jZodMN87JcbXMTcA"


def test_wif_round_trips() -> None:
    rng = random.Random(13)
    for _ in range(20):
        secret = bytearray(rng.randbytes(32))
        for network in Network:
            for compressed in (True, False):
                text = wif_encode(secret, network, compressed)
                key, family, comp = wif_decode(text)
                assert isinstance(key, SecretBytes)
                assert key.equals(secret) and comp is compressed
                assert network in family
                assert family == ({MAIN} if network is MAIN else BASE58_TEST_FAMILY)
                key.wipe()


@pytest.mark.parametrize(
    "payload",
    [
        bytes([0x80]) + bytes(32) + b"\x01",  # zero key, compressed
        bytes([0xEF]) + bytes(32),  # zero key, uncompressed
        bytes([0x80]) + secp256k1.CURVE_ORDER.to_bytes(32, "big"),  # key = n
    ],
)
def test_wif_out_of_range_keys(payload: bytes) -> None:
    with pytest.raises(InvalidKeyMaterial):
        wif_decode(b58check_encode(payload))


@pytest.mark.parametrize(
    "payload",
    [
        bytes([0x80]) + b"\x01" * 32 + b"\x02",  # bad compression flag
        bytes([0x80]) + b"\x01" * 31,  # short
        bytes([0x80]) + b"\x01" * 34,  # long
        bytes([0x00]) + b"\x01" * 32,  # address prefix
    ],
)
def test_wif_malformed(payload: bytes) -> None:
    with pytest.raises(EncodingError):
        wif_decode(b58check_encode(payload))


def test_wif_errors() -> None:
    good = "KwDiBf89QgGbjEhKnhXJuH7LrciVrZi3qYjgd9M7rFU73sVHnoWn"
    with pytest.raises(EncodingError):
        wif_decode(good[:-1] + "o")
    with pytest.raises(EncodingError):
        wif_decode("")
    with pytest.raises(InvalidKeyMaterial):
        wif_encode(bytes(32), MAIN)
    with pytest.raises(InvalidKeyMaterial):
        wif_encode(bytes(31), MAIN)
    key, _, _ = wif_decode(good)
    assert "Kw" not in repr(key) and "01" not in repr(key)
    key.wipe()


# --- fuzz ----------------------------------------------------------------------------------------

_SAMPLES = [
    "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
    "tb1pqqqqp399et2xygdj5xreqhjjvcmzhxw4aywxecjdzew6hylgvsesf3hn0c",
    "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080",
    "1BgGZ9tcN4rm9KBzDn7KprQz87SZ26SAMH",
    "2NAUYAHhujozruyzpsFRP63mbrdaU5wnEpN",
    "KwDiBf89QgGbjEhKnhXJuH7LrciVrZi3qYjgd9M7rFU73sVHnoWn",
]
_ALPHABET = (
    "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
    "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    "0OIl! \x00\xff"
)


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    text = list(draw(st.sampled_from(_SAMPLES)))
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        op = draw(st.sampled_from(["sub", "ins", "del", "case"]))
        pos = draw(st.integers(min_value=0, max_value=max(len(text) - 1, 0)))
        ch = draw(st.sampled_from(_ALPHABET))
        if op == "sub" and text:
            text[pos] = ch
        elif op == "ins":
            text.insert(pos, ch)
        elif op == "del" and text:
            del text[pos]
        elif text:
            text[pos] = text[pos].swapcase()
    return "".join(text)


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(_mutated(), st.text(max_size=100)))
def test_fuzz_address_and_wif_decoding(text: str) -> None:
    try:
        info = parse_address(text)
    except AddressError:
        pass
    else:
        assert info.networks
        some = next(iter(info.networks))
        assert address_from_script(info.script_pubkey, some) is not None
    for network in (MAIN, REG, SIGNET):
        with contextlib.suppress(AddressError, NetworkMismatch):
            script_from_address(text, network)
    try:
        key, _, _ = wif_decode(text)
    except HsmError:
        pass
    else:
        key.wipe()
