"""Descriptors (BIP380-382, 386, 389) and account presets: vectors, embit as oracle, fuzz."""

from __future__ import annotations

import contextlib
import json
import os
import random

import pytest
from embit.descriptor import Descriptor as EmbitDescriptor
from embit.descriptor.checksum import checksum as embit_checksum
from embit.networks import NETWORKS
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.vectors import data_dir

from anyhsm.bitcoin.bip32 import HARDENED, ExtendedKey, KeyOrigin, parse_path
from anyhsm.bitcoin.descriptor import (
    Descriptor,
    DescriptorKey,
    add_checksum,
    descriptor_checksum,
    parse_descriptor,
    split_checksum,
)
from anyhsm.bitcoin.presets import (
    OutputType,
    Purpose,
    account_path,
    address_path,
    coin_type,
    purpose_for,
    script_type,
)
from anyhsm.errors import Bip32Error, DescriptorError, HsmError, NetworkMismatch
from anyhsm.types import Network

VECTORS = json.loads((data_dir() / "descriptor_vectors.json").read_text(encoding="utf-8"))
H = HARDENED


# --- published vectors -------------------------------------------------------------------------


@pytest.mark.parametrize("case", VECTORS["checksum"]["valid"])
def test_bip380_valid_checksum(case: str) -> None:
    body, given_checksum = split_checksum(case, require=True)
    assert given_checksum == descriptor_checksum(body)
    assert add_checksum(body) == case


@pytest.mark.parametrize("case", VECTORS["checksum"]["invalid"])
def test_bip380_invalid_checksum(case: dict[str, str]) -> None:
    with pytest.raises(DescriptorError):
        split_checksum(case["descriptor"])


def test_no_checksum_is_accepted_unless_required() -> None:
    assert split_checksum("raw(deadbeef)") == ("raw(deadbeef)", None)
    with pytest.raises(DescriptorError, match="no checksum"):
        split_checksum("raw(deadbeef)", require=True)


@pytest.mark.parametrize("case", VECTORS["scripts"])
def test_published_scripts(case: dict[str, object]) -> None:
    desc = parse_descriptor(str(case["descriptor"]))
    scripts = case["scripts"]
    assert isinstance(scripts, list)
    if desc.is_ranged:
        got = [desc.script_pubkey(i).hex() for i in range(len(scripts))]
    else:
        got = [desc.script_pubkey().hex()]
    assert got == scripts
    # the canonical text parses back to an equal descriptor, checksum included
    again = parse_descriptor(str(desc), require_checksum=True)
    assert again == desc
    assert str(again) == str(desc)


@pytest.mark.parametrize("case", VECTORS["invalid"])
def test_published_invalid(case: dict[str, str]) -> None:
    with pytest.raises(DescriptorError):
        parse_descriptor(case["descriptor"])


# --- checksums against embit -------------------------------------------------------------------


def test_checksums_equal_embit() -> None:
    rng = random.Random(380)
    for _ in range(200):
        text = "".join(
            rng.choice("0123456789()[],'/*abcdefgh<>;xpubwkhtr ABCXYZ") for _ in range(60)
        )
        assert descriptor_checksum(text) == embit_checksum(text)


# --- derivation against embit -----------------------------------------------------------------

_TEMPLATES = {
    OutputType.P2PKH: "pkh({})",
    OutputType.P2SH_P2WPKH: "sh(wpkh({}))",
    OutputType.P2WPKH: "wpkh({})",
    OutputType.P2TR: "tr({})",
}
_EMBIT_NET = {Network.MAINNET: "main", Network.TESTNET: "test", Network.REGTEST: "regtest"}


@pytest.mark.parametrize("purpose", list(Purpose))
@pytest.mark.parametrize("network", [Network.MAINNET, Network.TESTNET, Network.REGTEST])
def test_account_descriptor_addresses_equal_embit(purpose: Purpose, network: Network) -> None:
    master = ExtendedKey.from_seed(os.urandom(32), network)
    path = account_path(purpose, network, account=random.randrange(5))
    account = master.derive(path).neuter()
    origin = KeyOrigin(master.fingerprint, path)
    desc = Descriptor.from_account_key(purpose.output_type, account, origin)
    text = str(desc)
    assert text == add_checksum(
        _TEMPLATES[purpose.output_type].format(f"{origin}{account}/<0;1>/*")
    )
    ours = parse_descriptor(text)
    assert ours == desc and ours.is_ranged and ours.is_multipath and ours.branch_count == 2
    theirs = EmbitDescriptor.from_string(text)
    assert embit_checksum(desc.to_string(checksum=False)) == desc.checksum
    net = NETWORKS[_EMBIT_NET[network]]
    for branch in (0, 1):
        for index in (0, 1, 7, random.randrange(HARDENED)):
            d = theirs.derive(index, branch_index=branch)
            assert desc.script_pubkey(index, branch=branch) == d.script_pubkey().data
            assert desc.address(index, network, branch=branch) == d.address(net)
            derived = desc.derive(index, branch=branch)
            assert derived.origin is not None
            assert derived.origin.path == (*path, branch, index)
            assert derived.origin.fingerprint == master.fingerprint
            # the private key at the full path has the same public key
            assert master.derive(derived.origin.path).public_key == derived.pubkey
    # BIP389 expansion
    receive, change = desc.branches()
    assert str(receive) == add_checksum(
        _TEMPLATES[purpose.output_type].format(f"{origin}{account}/0/*")
    )
    assert receive.script_pubkey(3) == desc.script_pubkey(3, branch=0)
    assert change.script_pubkey(3) == desc.script_pubkey(3, branch=1)


@pytest.mark.parametrize("otype", list(_TEMPLATES))
def test_single_key_descriptors_equal_embit(otype: OutputType) -> None:
    for _ in range(10):
        key = ExtendedKey.from_seed(os.urandom(32)).derive("m/0h")
        pub = key.public_key
        fp = os.urandom(4).hex()
        text = _TEMPLATES[otype].format(f"[{fp}/1h/2]{pub.hex()}")
        ours = parse_descriptor(text)
        theirs = EmbitDescriptor.from_string(text)
        assert ours.script_pubkey() == theirs.script_pubkey().data
        assert ours.address(None, Network.MAINNET) == theirs.address(NETWORKS["main"])
        assert ours.address(None, Network.TESTNET) == theirs.address(NETWORKS["test"])
        assert ours.derive().origin == KeyOrigin(bytes.fromhex(fp), (1 | H, 2))
        assert str(ours) == add_checksum(text)
        assert embit_checksum(text) == ours.checksum


def test_ranged_xpub_with_fixed_steps_equals_embit() -> None:
    xpub = ExtendedKey.from_seed(os.urandom(16)).derive("m/1h").neuter()
    text = f"wpkh({xpub}/5/<3;9;12>/*)"
    ours = parse_descriptor(text)
    assert ours.branch_count == 3
    theirs = EmbitDescriptor.from_string(text)
    for branch in range(3):
        for index in (0, 2):
            expected = theirs.derive(index, branch_index=branch).script_pubkey().data
            assert ours.script_pubkey(index, branch=branch) == expected
    # without an origin the derived key's origin starts at the xpub's own fingerprint
    assert ours.derive(2, branch=1).origin == KeyOrigin(xpub.fingerprint, (5, 9, 2))


def test_tr_xonly_key_published_and_embit() -> None:
    pub = ExtendedKey.from_seed(os.urandom(32)).public_key
    ours = parse_descriptor(f"tr({pub[1:].hex()})")
    assert ours.script_pubkey() == parse_descriptor(f"tr({pub.hex()})").script_pubkey()
    assert ours.derive().xonly == pub[1:]


# --- behaviour ------------------------------------------------------------------------------


def test_index_rules() -> None:
    xpub = ExtendedKey.from_seed(b"\1" * 32).neuter()
    ranged = parse_descriptor(f"wpkh({xpub}/0/*)")
    with pytest.raises(DescriptorError, match="give an index"):
        ranged.script_pubkey()
    with pytest.raises(DescriptorError, match="out of range"):
        ranged.script_pubkey(HARDENED)
    with pytest.raises(DescriptorError, match="out of range"):
        ranged.script_pubkey(-1)
    with pytest.raises(DescriptorError, match="branch"):
        ranged.script_pubkey(0, branch=1)
    fixed = parse_descriptor(f"wpkh({xpub}/0/1)")
    assert not fixed.is_ranged
    with pytest.raises(DescriptorError, match="no index"):
        fixed.script_pubkey(0)
    assert fixed.script_pubkey() == ranged.script_pubkey(1)


def test_network_mismatch() -> None:
    tpub = ExtendedKey.from_seed(b"\1" * 32, Network.TESTNET).neuter()
    desc = parse_descriptor(f"wpkh({tpub}/0/*)")
    assert desc.address(0, Network.SIGNET).startswith("tb1q")
    assert desc.address(0, Network.REGTEST).startswith("bcrt1q")
    with pytest.raises(NetworkMismatch):
        desc.address(0, Network.MAINNET)


def test_hardened_marker_preserved() -> None:
    xpub = ExtendedKey.from_seed(b"\2" * 32).neuter()
    for marker in ("'", "h"):
        text = f"tr([d34db33f/86{marker}/0{marker}/0{marker}]{xpub}/<0;1>/*)"
        desc = parse_descriptor(text)
        assert desc.to_string(checksum=False) == text
        assert str(desc) == add_checksum(text)
    mixed = parse_descriptor(f"pkh([d34db33f/44'/0h/0']{xpub}/0/*)")
    assert mixed.to_string(checksum=False) == f"pkh([d34db33f/44'/0'/0']{xpub}/0/*)"


def test_canonical_form_lowercases_hex() -> None:
    pub = ExtendedKey.from_seed(b"\3" * 32).public_key.hex()
    desc = parse_descriptor(f"wpkh([D34DB33F]{pub.upper()})")
    assert desc.to_string(checksum=False) == f"wpkh([d34db33f]{pub})"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda x: f"wpkh({x}/0h/*)", "hardened"),
        (lambda x: f"wpkh({x}/0/*h)", "hardened wildcard"),
        (lambda x: f"wpkh({x}/0/*')", "hardened wildcard"),
        (lambda x: f"wpkh({x}/*/0)", "last step"),
        (lambda x: f"wpkh({x}/<0;1>/<2;3>/*)", "at most one multipath"),
        (lambda x: f"wpkh({x}/<0>/*)", "at least two"),
        (lambda x: f"wpkh({x}/<0;0>/*)", "distinct"),
        (lambda x: f"wpkh({x}/2147483648/*)", "out of range"),
        (lambda x: f"wpkh({x}/1aa)", "not a number"),
        (lambda x: f"wpkh({x}/)", "not a number"),
        (lambda x: f"wsh(pkh({x}))", "not a supported"),
        (lambda x: f"sh(pkh({x}))", "not a supported"),
        (lambda x: f"pk({x})", "not a supported"),
        (lambda x: f"tr({x},pk({x}))", "script tree"),
        (lambda x: f"foo({x})", "not a known descriptor function"),
        (lambda x: f"wpkh([d34db33f]{x}", "unbalanced"),
        (lambda x: f"wpkh([d34db33f][d34db33f]{x})", "at most one key origin"),
        (lambda x: f"wpkh(d34db33f]{x})", "misplaced"),
        (lambda x: f"wpkh([d34db33f/0/*]{x})", "origin step"),
        (lambda x: "wpkh([d34db33f])", "not followed by a key"),
        (lambda x: f"wpkh({x[:-1]}1)", "bad extended public key"),
    ],
)
def test_rejects(make: object, words: str) -> None:
    xpub = str(ExtendedKey.from_seed(b"\4" * 32).neuter())
    assert callable(make)
    with pytest.raises(DescriptorError, match=words):
        parse_descriptor(make(xpub))


def test_private_material_refused() -> None:
    key = ExtendedKey.from_seed(b"\5" * 32)
    for text in (
        f"wpkh({key}/0/*)",
        f"wpkh({key.to_string('zprv')}/0/*)",
        "wpkh(L4rK1yDtCWekvXuE6oXD9jCYfFNV2cWRpVuPLBcCU2z8TrisoyY1)",
        "pkh(5KYZdUEo39z3FPrtuX2QbbwGnNP5zTd7yyr2SC1j299sBCnWjss)",
    ):
        with pytest.raises(DescriptorError, match="private key") as info:
            parse_descriptor(text)
        assert str(key) not in str(info.value)
    with pytest.raises(DescriptorError, match="not valid in descriptors"):
        parse_descriptor(f"wpkh({key.neuter().to_string('zpub')}/0/*)")
    with pytest.raises(DescriptorError, match="public keys only"):
        DescriptorKey.extended(key, ((0,),))


def test_from_account_key_forms() -> None:
    master = ExtendedKey.from_seed(b"\6" * 32)
    path = account_path(Purpose.BIP84, Network.MAINNET)
    account = master.derive(path)
    origin = KeyOrigin(master.fingerprint, path)
    zpub = ExtendedKey.parse(account.neuter().to_string("zpub"))
    for key in (account, account.neuter(), zpub):
        d = Descriptor.from_account_key(OutputType.P2WPKH, key, origin, change=1)
        assert d.to_string(checksum=False) == f"wpkh({origin}{account.neuter()}/1/*)"
    with pytest.raises(DescriptorError):
        Descriptor.from_account_key(OutputType.P2WPKH, account, origin, change=2)
    with pytest.raises(DescriptorError):
        Descriptor.from_account_key(OutputType.P2WSH, account, origin)


def test_redeem_script() -> None:
    pub = ExtendedKey.from_seed(b"\7" * 32).public_key
    d = parse_descriptor(f"sh(wpkh({pub.hex()}))")
    redeem = d.redeem_script()
    assert redeem is not None and redeem == parse_descriptor(f"wpkh({pub.hex()})").script_pubkey()
    assert parse_descriptor(f"wpkh({pub.hex()})").redeem_script() is None


# --- presets ----------------------------------------------------------------------------------


def test_presets() -> None:
    assert account_path(Purpose.BIP84, Network.MAINNET) == (84 | H, H, H)
    assert account_path(Purpose.BIP86, Network.TESTNET, 3) == (86 | H, 1 | H, 3 | H)
    assert account_path(Purpose.BIP44, Network.REGTEST, 1) == parse_path("m/44h/1h/1h")
    assert address_path(Purpose.BIP49, Network.MAINNET, 0, 1, 5) == parse_path("m/49'/0'/0'/1/5")
    assert coin_type(Network.MAINNET) == 0 and coin_type(Network.SIGNET) == 1
    assert script_type(Purpose.BIP44) is OutputType.P2PKH
    assert script_type(Purpose.BIP49) is OutputType.P2SH_P2WPKH
    assert Purpose.BIP84.output_type is OutputType.P2WPKH
    assert purpose_for(OutputType.P2TR) is Purpose.BIP86
    for text, expected in (
        ("84", 84),
        ("bip-86", 86),
        ("BIP44", 44),
        ("p2sh-p2wpkh", 49),
        (49, 49),
    ):
        assert Purpose.parse(text) == expected
    for bad in ("85", "bip", "p2wsh", 0, "x" * 10):
        with pytest.raises(Bip32Error):
            Purpose.parse(bad)
    with pytest.raises(Bip32Error):
        purpose_for(OutputType.P2WSH)
    with pytest.raises(Bip32Error):
        account_path(Purpose.BIP84, Network.MAINNET, HARDENED)
    with pytest.raises(Bip32Error):
        address_path(Purpose.BIP84, Network.MAINNET, 0, 2, 0)


# --- fuzz -------------------------------------------------------------------------------------

_XPUB = str(ExtendedKey.from_seed(b"\x08" * 32).neuter())
_FRAGMENTS = [
    "pkh(", "wpkh(", "sh(", "tr(", ")", "[d34db33f", "/84'", "/0h", "]", _XPUB, "/<0;1>",
    "/*", "/0", "#", "03a34b99f22c790c4e36b2b3c2c35a36db06226e41c692fc82b8b56ac1c540c5bd", ",",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=120) | st.lists(st.sampled_from(_FRAGMENTS), max_size=10).map("".join))
def test_fuzz_parse_descriptor(text: str) -> None:
    with contextlib.suppress(HsmError):
        desc = parse_descriptor(text)
        assert parse_descriptor(str(desc)) == desc
