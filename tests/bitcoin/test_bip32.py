"""BIP32: official vectors 1-5, SLIP-132 forms, paths, key origins, embit differential, fuzz."""

from __future__ import annotations

import contextlib
import os
import random

import pytest
from embit import bip32 as embit_bip32
from embit.networks import NETWORKS
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.vectors import load_json

from anyhsm.bitcoin.bip32 import (
    HARDENED,
    VERSION_NAMES,
    ExtendedKey,
    KeyOrigin,
    fingerprint_of,
    format_path,
    parse_path,
)
from anyhsm.bitcoin.presets import OutputType
from anyhsm.errors import Bip32Error, HsmError
from anyhsm.types import Network

BIP32 = load_json("bip32")
assert isinstance(BIP32, dict)
CHAINS = [
    (v["name"], v["seed_hex"], c["path"], c["ext_prv"], c["ext_pub"])
    for v in BIP32["vectors"]
    for c in v["chains"]
]
INVALID = [(k["key"], k["reason"]) for k in BIP32["invalid_extended_keys"]]
H = HARDENED


def test_vector_counts() -> None:
    assert len(CHAINS) == 17
    assert len(INVALID) == 16


@pytest.mark.parametrize(("name", "seed", "path", "xprv", "xpub"), CHAINS)
def test_official_chain(name: str, seed: str, path: str, xprv: str, xpub: str) -> None:
    master = ExtendedKey.from_seed(bytes.fromhex(seed))
    key = master.derive(path)
    assert key.is_private
    assert str(key) == xprv
    pub = key.neuter()
    assert not pub.is_private
    assert str(pub) == xpub
    assert key.depth == len(parse_path(path))
    # parse back: private and public
    parsed = ExtendedKey.parse(xprv)
    assert str(parsed) == xprv and parsed == key
    assert parsed.public_key == key.public_key == pub.public_key
    assert parsed.chain_code == key.chain_code
    parsed_pub = ExtendedKey.parse(xpub)
    assert str(parsed_pub) == xpub and parsed_pub == pub
    assert parsed_pub.fingerprint == key.fingerprint == fingerprint_of(key.public_key)
    assert parsed.parent_fingerprint == key.parent_fingerprint
    assert parsed.child_number == key.child_number
    assert parsed.network is Network.MAINNET
    # public derivation of the trailing non-hardened steps equals private derivation
    steps = parse_path(path)
    k = len(steps)
    while k > 0 and steps[k - 1] < H:
        k -= 1
    if k < len(steps):
        base = master.derive(steps[:k]).neuter()
        assert str(base.derive(steps[k:])) == xpub


def test_parent_fingerprint_matches_parent() -> None:
    master = ExtendedKey.from_seed(bytes.fromhex(CHAINS[0][1]))
    child = master.derive("m/0H/1")
    parent = master.derive("m/0H")
    assert child.parent_fingerprint == parent.fingerprint
    assert child.child_number == 1
    assert parent.child_number == H
    assert master.parent_fingerprint == b"\0\0\0\0" and master.depth == 0


# Each reason of vector 5 and words the error message must contain.
_REASON_WORDS = {
    "pubkey version / prvkey mismatch": "pubkey version / prvkey mismatch",
    "prvkey version / pubkey mismatch": "prvkey version / pubkey mismatch",
    "invalid pubkey prefix 04": "invalid pubkey prefix 04",
    "invalid prvkey prefix 04": "invalid prvkey prefix 04",
    "invalid pubkey prefix 01": "invalid pubkey prefix 01",
    "invalid prvkey prefix 01": "invalid prvkey prefix 01",
    "zero depth with non-zero parent fingerprint": "zero depth with non-zero parent fingerprint",
    "zero depth with non-zero index": "zero depth with non-zero index",
    "unknown extended key version": "unknown extended key version",
    "private key 0 not in 1..n-1": "private key 0 not in 1..n-1",
    "private key n not in 1..n-1": "not below the curve order",
    "invalid pubkey 020000000000000000000000000000000000000000000000000000000000000007": (
        "invalid pubkey 0200000000000000000000000000000000000000000000000000000000000000"
    ),
    "invalid checksum": "invalid checksum",
}


@pytest.mark.parametrize(("key", "reason"), INVALID)
def test_invalid_keys_of_vector_5(key: str, reason: str) -> None:
    with pytest.raises(Bip32Error) as info:
        ExtendedKey.parse(key)
    assert _REASON_WORDS[reason] in str(info.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("xpub661MyMwAqRbc", "characters"),
        ("", "characters"),
        ("0" * 111, "not Base58"),
        # 79-byte payload with a valid checksum
        (None, "bad length"),
    ],
)
def test_malformed_strings(text: str | None, words: str) -> None:
    if text is None:
        from anyhsm.bitcoin.encoding import b58check_encode

        text = b58check_encode(bytes.fromhex("0488b21e") + bytes(75))
    with pytest.raises(Bip32Error, match=words):
        ExtendedKey.parse(text)


# --- SLIP-132 -------------------------------------------------------------------------------

_SEED = bytes.fromhex("000102030405060708090a0b0c0d0e0f")


@pytest.mark.parametrize(
    ("version", "hint", "network"),
    [
        ("ypub", OutputType.P2SH_P2WPKH, Network.MAINNET),
        ("zpub", OutputType.P2WPKH, Network.MAINNET),
        ("Ypub", OutputType.P2SH_P2WSH, Network.MAINNET),
        ("Zpub", OutputType.P2WSH, Network.MAINNET),
        ("yprv", OutputType.P2SH_P2WPKH, Network.MAINNET),
        ("zprv", OutputType.P2WPKH, Network.MAINNET),
        ("Yprv", OutputType.P2SH_P2WSH, Network.MAINNET),
        ("Zprv", OutputType.P2WSH, Network.MAINNET),
        ("upub", OutputType.P2SH_P2WPKH, Network.TESTNET),
        ("vpub", OutputType.P2WPKH, Network.TESTNET),
        ("Upub", OutputType.P2SH_P2WSH, Network.TESTNET),
        ("Vpub", OutputType.P2WSH, Network.TESTNET),
        ("uprv", OutputType.P2SH_P2WPKH, Network.TESTNET),
        ("vprv", OutputType.P2WPKH, Network.TESTNET),
        ("Uprv", OutputType.P2SH_P2WSH, Network.TESTNET),
        ("Vprv", OutputType.P2WSH, Network.TESTNET),
    ],
)
def test_slip132_round_trip(version: str, hint: OutputType, network: Network) -> None:
    key = ExtendedKey.from_seed(_SEED, network).derive("m/84h/1h/0h")
    if version.endswith("pub"):
        key = key.neuter()
    text = key.to_string(version=version)
    assert text.startswith(version)
    parsed = ExtendedKey.parse(text)
    assert parsed.script_hint is hint
    assert parsed.network is network
    assert parsed == key
    # str() gives the canonical form; the explicit conversion gives the SLIP-132 form back
    assert str(parsed) == str(key)
    assert str(parsed)[:4] in ("xpub", "xprv", "tpub", "tprv")
    assert parsed.to_string(version=version) == text


# SLIP-132 test vector (satoshilabs/slips slip-0132.md, "Test vectors") and the BIP84 root keys
# (bitcoin/bips bip-0084.mediawiki, "Test vectors"), mnemonic "abandon x11 about", no passphrase.
_SLIP132 = [
    (
        "m/44'/0'/0'",
        "xprv9xpXFhFpqdQK3TmytPBqXtGSwS3DLjojFhTGht8gwAAii8py5X6pxeBnQ6ehJiyJ6nDjWGJfZ95WxByFXVkDxHXrqu"
        "53WCRGypk2ttuqncb",
        "xpub6BosfCnifzxcFwrSzQiqu2DBVTshkCXacvNsWGYJVVhhawA7d4R5WSWGFNbi8Aw6ZRc1brxMyWMzG3DSSSSoekkudh"
        "Ud9yLb6qx39T9nMdj",
    ),
    (
        "m/49'/0'/0'",
        "yprvAHwhK6RbpuS3dgCYHM5jc2ZvEKd7Bi61u9FVhYMpgMSuZS613T1xxQeKTffhrHY79hZ5PsskBjcc6C2V7DrnsMsNaG"
        "DaWev3GLRQRgV7hxF",
        "ypub6Ww3ibxVfGzLrAH1PNcjyAWenMTbbAosGNB6VvmSEgytSER9azLDWCxoJwW7Ke7icmizBMXrzBx9979FfaHxHcrArf"
        "3zbeJJJUZPf663zsP",
    ),
    (
        "m/84'/0'/0'",
        "zprvAdG4iTXWBoARxkkzNpNh8r6Qag3irQB8PzEMkAFeTRXxHpbF9z4QgEvBRmfvqWvGp42t42nvgGpNgYSJA9iefm1yYN"
        "ZKEm7z6qUWCroSQnE",
        "zpub6rFR7y4Q2AijBEqTUquhVz398htDFrtymD9xYYfG1m4wAcvPhXNfE3EfH1r1ADqtfSdVCToUG868RvUUkgDKf31mGD"
        "tKsAYz2oz2AGutZYs",
    ),
    (
        "m",
        "zprvAWgYBBk7JR8Gjrh4UJQ2uJdG1r3WNRRfURiABBE3RvMXYSrRJL62XuezvGdPvG6GFBZduosCc1YP5wixPox7zhZLfi"
        "Um8aunE96BBa4Kei5",
        "zpub6jftahH18ngZxLmXaKw3GSZzZsszmt9WqedkyZdezFtWRFBZqsQH5hyUmb4pCEeZGmVfQuP5bedXTB8is6fTv19U1G"
        "QRyQUKQGUTzyHACMF",
    ),
]


@pytest.mark.parametrize(("path", "prv", "pub"), _SLIP132)
def test_slip132_published_vectors(path: str, prv: str, pub: str) -> None:
    from anyhsm.bitcoin.bip39 import mnemonic_to_seed

    with mnemonic_to_seed("abandon " * 11 + "about") as seed:
        key = ExtendedKey.from_seed(seed).derive(path)
    assert key.to_string(prv[:4]) == prv
    assert key.neuter().to_string(pub[:4]) == pub
    parsed = ExtendedKey.parse(prv)
    assert parsed == key
    assert ExtendedKey.parse(pub) == key.neuter()
    expected_hint = {"x": None, "y": OutputType.P2SH_P2WPKH, "z": OutputType.P2WPKH}[prv[0]]
    assert parsed.script_hint is expected_hint


def test_version_conversion_errors() -> None:
    key = ExtendedKey.from_seed(_SEED)
    with pytest.raises(Bip32Error, match="unknown extended key version"):
        key.to_string(version="qpub")
    with pytest.raises(Bip32Error, match="neuter"):
        key.to_string(version="zpub")
    with pytest.raises(Bip32Error, match="public key"):
        key.neuter().to_string(version="zprv")
    with pytest.raises(Bip32Error, match="testnet"):
        key.to_string(version="tprv")
    assert set(VERSION_NAMES) >= {"xpub", "zpub", "Vprv", "tpub"}


def test_testnet_family() -> None:
    for net in (Network.TESTNET, Network.TESTNET4, Network.SIGNET, Network.REGTEST):
        key = ExtendedKey.from_seed(_SEED, net)
        assert str(key).startswith("tprv")
        assert key.network is Network.TESTNET
        assert net in key.networks
        assert Network.MAINNET not in key.networks
    main = ExtendedKey.from_seed(_SEED)
    assert main.networks == frozenset({Network.MAINNET})


# --- behaviour ------------------------------------------------------------------------------


def test_repr_never_shows_private_material() -> None:
    key = ExtendedKey.from_seed(_SEED).derive("m/0h")
    secret = key.secret()
    text = repr(key)
    assert "private" in text
    assert str(key) not in text
    assert secret.reveal().hex() not in text
    assert key.chain_code.hex() not in text
    secret.wipe()


def test_wipe_makes_key_unusable() -> None:
    with ExtendedKey.from_seed(_SEED) as key:
        xprv = str(key)
    assert "wiped" in repr(key)
    with pytest.raises(Bip32Error, match="wiped"):
        str(key)
    with pytest.raises(Bip32Error, match="wiped"):
        key.derive("0")
    assert str(ExtendedKey.parse(xprv)) == xprv
    pub = ExtendedKey.parse(xprv).neuter()
    pub.wipe()  # no-op on a public key
    assert str(pub).startswith("xpub")


def test_secret_is_a_copy() -> None:
    key = ExtendedKey.from_seed(_SEED)
    s = key.secret()
    expected = s.reveal()
    s.wipe()
    again = key.secret()
    assert again.reveal() == expected
    again.wipe()
    with pytest.raises(Bip32Error, match="public"):
        key.neuter().secret()


def test_hardened_from_public_fails() -> None:
    pub = ExtendedKey.from_seed(_SEED).neuter()
    with pytest.raises(Bip32Error, match="hardened"):
        pub.derive("0/1h")


def test_absolute_path_below_master_fails() -> None:
    account = ExtendedKey.from_seed(_SEED).derive("m/84h/0h/0h")
    with pytest.raises(Bip32Error, match="depth 3"):
        account.derive("m/0/1")
    assert account.derive("0/1") == account.derive([0, 1])
    assert account.derive("") == account


def test_max_depth() -> None:
    key = ExtendedKey.from_seed(_SEED).neuter()
    with pytest.raises(Bip32Error, match="255"):
        key.derive([0] * 256)


def test_seed_length() -> None:
    with pytest.raises(Bip32Error):
        ExtendedKey.from_seed(b"\1" * 15)
    with pytest.raises(Bip32Error):
        ExtendedKey.from_seed(b"\1" * 65)


def test_cannot_pickle() -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(ExtendedKey.from_seed(_SEED))


# --- paths and origins ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("m", ()),
        ("", ()),
        ("m/", ()),
        ("m/84'/0'/0'/0/5", (84 | H, H, H, 0, 5)),
        ("m/84h/0h/0h/0/5", (84 | H, H, H, 0, 5)),
        ("m/84H/0H/0H/0/5", (84 | H, H, H, 0, 5)),
        ("84h/0'/0H", (84 | H, H, H)),
        ("0/1/", (0, 1)),
        ("m/2147483647'/2147483647", (0xFFFFFFFF, 0x7FFFFFFF)),
    ],
)
def test_parse_path(text: str, expected: tuple[int, ...]) -> None:
    assert parse_path(text) == expected


@pytest.mark.parametrize(
    "text",
    ["m/2147483648", "m/-1", "m/1''", "m//1", "m/a", "m/1x", "n/1", "m/ 1", "m/+1", "m/١"],
)
def test_parse_path_rejects(text: str) -> None:
    with pytest.raises(Bip32Error):
        parse_path(text)


def test_format_path() -> None:
    path = (84 | H, H, H, 0, 5)
    assert format_path(path) == "m/84'/0'/0'/0/5"
    assert format_path(path, "h") == "m/84h/0h/0h/0/5"
    assert format_path(path, "H", prefix="") == "84H/0H/0H/0/5"
    assert format_path(()) == "m"
    assert parse_path(format_path(path, "h")) == path
    with pytest.raises(Bip32Error):
        format_path(path, "x")
    with pytest.raises(Bip32Error):
        format_path([1 << 32])


def test_key_origin() -> None:
    origin = KeyOrigin(bytes.fromhex("d34db33f"), (84 | H, H, H))
    assert str(origin) == "[d34db33f/84'/0'/0']"
    assert origin.to_string("h") == "[d34db33f/84h/0h/0h]"
    assert KeyOrigin.parse("[d34db33f/84h/0'/0H]") == origin
    assert KeyOrigin.parse("D34DB33F/84'/0'/0'") == origin
    assert str(KeyOrigin.parse("[d34db33f]")) == "[d34db33f]"
    assert origin.child("0/5").path == (84 | H, H, H, 0, 5)
    for bad in ["[d34db33/0]", "[d34db33fa/0]", "[d34db33f/0", "[zzzzzzzz]", "[d34db33f/]", "[]"]:
        with pytest.raises(Bip32Error):
            KeyOrigin.parse(bad)
    with pytest.raises(Bip32Error):
        KeyOrigin(b"\0\0\0", ())


def test_fingerprint_of() -> None:
    master = ExtendedKey.from_seed(_SEED)
    assert fingerprint_of(master.public_key).hex() == "3442193e"  # BIP32 vector 1 master
    with pytest.raises(Bip32Error):
        fingerprint_of(b"\4" + bytes(64))


# --- differential against embit -------------------------------------------------------------


def _random_path(rng: random.Random) -> str:
    steps = []
    for _ in range(rng.randint(0, 6)):
        index = rng.choice([0, 1, 44, 84, 86, rng.randrange(1 << 31)])
        steps.append(f"{index}{rng.choice(['', 'h', chr(39)])}")
    return "/".join(["m", *steps])


@pytest.mark.parametrize("net", ["main", "test"])
def test_differential_embit(net: str) -> None:
    rng = random.Random(0xB1932 + len(net))
    network = Network.MAINNET if net == "main" else Network.TESTNET
    for _ in range(40):
        seed = os.urandom(rng.choice([16, 32, 64]))
        path = _random_path(rng)
        ours = ExtendedKey.from_seed(seed, network).derive(path)
        theirs = embit_bip32.HDKey.from_seed(seed, version=NETWORKS[net]["xprv"]).derive(path)
        assert str(ours) == theirs.to_base58(), path
        assert str(ours.neuter()) == theirs.to_public().to_base58(), path
        assert ours.fingerprint == theirs.my_fingerprint
        # and embit's output parses back to the same key
        assert ExtendedKey.parse(theirs.to_base58()) == ours


def test_public_derivation_matches_embit() -> None:
    rng = random.Random(7)
    for _ in range(20):
        xpub = ExtendedKey.from_seed(os.urandom(32)).derive("m/84h/0h/0h").neuter()
        path = [rng.randrange(1 << 31) for _ in range(rng.randint(1, 3))]
        theirs = embit_bip32.HDKey.from_base58(str(xpub)).derive(path)
        assert str(xpub.derive(path)) == theirs.to_base58()


# --- fuzz ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=130))
def test_fuzz_parse_text(text: str) -> None:
    with contextlib.suppress(HsmError):
        ExtendedKey.parse(text)


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_B58, min_size=100, max_size=120))
def test_fuzz_parse_base58(text: str) -> None:
    with contextlib.suppress(Bip32Error):
        ExtendedKey.parse(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=78, max_size=78))
def test_fuzz_parse_payload_with_valid_checksum(payload: bytes) -> None:
    from anyhsm.bitcoin.encoding import b58check_encode

    versions = [bytes.fromhex(v) for v in ("0488ade4", "0488b21e", "04b24746", "04358394")]
    body = versions[payload[0] % 4] + payload[4:]
    try:
        key = ExtendedKey.parse(b58check_encode(body))
    except Bip32Error:
        return
    assert key.to_string(version=None) == b58check_encode(
        _canonical(body, key.is_private, key.network)
    )


def _canonical(body: bytes, private: bool, network: Network) -> bytes:
    table = {
        (Network.MAINNET, True): "0488ade4",
        (Network.MAINNET, False): "0488b21e",
        (Network.TESTNET, True): "04358394",
        (Network.TESTNET, False): "043587cf",
    }
    return bytes.fromhex(table[(network, private)]) + body[4:]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="m/0123456789'hH x-", max_size=60) | st.text(max_size=40))
def test_fuzz_parse_path(text: str) -> None:
    try:
        path = parse_path(text)
    except Bip32Error:
        return
    assert parse_path(format_path(path)) == path


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_fuzz_key_origin(text: str) -> None:
    with contextlib.suppress(Bip32Error):
        KeyOrigin.parse(text)


def test_constructor_rejects_mismatched_private_key() -> None:
    from anyhsm.secret import SecretBytes

    key = ExtendedKey.from_seed(_SEED)
    with pytest.raises(Bip32Error, match="does not match"):
        ExtendedKey(
            network=Network.MAINNET,
            depth=0,
            parent_fingerprint=b"\0\0\0\0",
            child_number=0,
            chain_code=key.chain_code,
            public_key=key.public_key,
            secret=SecretBytes(b"\1" * 32),
        )
    with pytest.raises(Bip32Error, match="depth-0"):
        ExtendedKey(
            network=Network.MAINNET,
            depth=0,
            parent_fingerprint=b"\0\0\0\1",
            child_number=0,
            chain_code=key.chain_code,
            public_key=key.public_key,
        )
