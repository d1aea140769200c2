"""anyhsm.ops.bitcoin on a real software keystore: xpub, address, descriptors, messages;
the typed results and their to_dict (what every front end prints or sends)."""

from __future__ import annotations

import json

import pytest
from embit.descriptor import Descriptor as EmbitDescriptor

from anyhsm.bitcoin.address import AddressKind
from anyhsm.errors import HsmError, MessageError, UnsupportedOperation
from anyhsm.hsm import Hsm
from anyhsm.ops import bitcoin as ops
from anyhsm.ops.keys import create_key
from anyhsm.types import Network


def test_xpub(mainnet: Hsm) -> None:
    res = ops.xpub(mainnet, "w", "m/84'/0'/0'")
    assert res.xpub.startswith("xpub6CatWdiZiodmUeTDp8LT5or8nmbKNcuyvz7WyksVFkKB4RHwCD3Xyuv")
    assert res.origin == "[73c5da0a/84'/0'/0']" and res.master_fingerprint == "73c5da0a"
    assert res.network is Network.MAINNET
    d = res.to_dict()
    assert d["network"] == "mainnet" and d["path"] == "m/84'/0'/0'"
    json.dumps(d)  # plain data only
    assert ops.xpub(mainnet, "w", [0x80000054, 0x80000000, 0x80000000]).xpub == res.xpub
    z = ops.xpub(mainnet, "w", "84h/0h/0h", slip132="zpub")
    assert z.xpub.startswith("zpub6rFR7y4Q2AijBEqTUquhVz398htDFrtymD9xYYfG1m4wAcvPhXNfE3E")
    with pytest.raises(HsmError, match="SLIP-132"):
        ops.xpub(mainnet, "w", slip132="qpub")


@pytest.mark.parametrize(
    ("kind", "address"),
    [
        ("p2pkh", "1LqBGSKuX5yYUonjxT5qGfpUsXKYYWeabA"),
        ("p2sh-p2wpkh", "37VucYSaXLCAsxYyAPfbSi9eh4iEcbShgf"),
        ("p2wpkh", "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu"),
        ("p2tr", "bc1p5cyxnuxmeuwuvkwfem96lqzszd02n6xdcjrs20cac6yqjjwudpxqkedrcr"),
    ],
)
def test_address_defaults_to_the_standard_path(mainnet: Hsm, kind: str, address: str) -> None:
    res = ops.address(mainnet, "w", kind=kind)
    assert res.address == address and res.type is AddressKind(kind)
    d = res.to_dict()
    assert d["type"] == kind and isinstance(d["public_key"], str) and d["path"]


def test_single_key_address_and_descriptor(hsm: Hsm) -> None:
    create_key(hsm, "s")
    res = ops.address(hsm, "s", kind="p2wpkh")
    assert res.path is None and res.address.startswith("bcrt1q")
    assert ops.address(hsm, "s", "m", kind="p2wpkh") == res
    assert ops.address(hsm, "s", "-", kind="p2wpkh") == res
    with pytest.raises(UnsupportedOperation, match="single"):
        ops.address(hsm, "s", "m/0")
    with pytest.raises(UnsupportedOperation, match="no chain code"):
        ops.xpub(hsm, "s")
    d = ops.descriptor(hsm, "s", "wpkh")
    assert d.descriptor.startswith(("wpkh(02", "wpkh(03")) and d.account is None
    assert d.to_dict()["receive"] is None and d.to_dict()["origin"] is None


def test_descriptor_of_an_account(mainnet: Hsm) -> None:
    d = ops.descriptor(mainnet, "w", "wpkh")
    assert d.receive is not None
    assert EmbitDescriptor.from_string(d.receive).derive(0).address() == (
        "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu"
    )
    assert d.descriptor.startswith("wpkh([73c5da0a/84'/0'/0']xpub6CatWdiZ")
    assert "/<0;1>/*)#" in d.descriptor and d.master_fingerprint == "73c5da0a"
    assert ops.descriptor(mainnet, "w", "tr", account=1).origin == "[73c5da0a/86'/0'/1']"
    with pytest.raises(HsmError, match="unknown descriptor type"):
        ops.descriptor(mainnet, "w", "wsh")


def test_wallet_descriptors_cover_every_type_the_key_can_spend(mainnet: Hsm) -> None:
    res = ops.wallet_descriptors(mainnet, "w", account=0)
    assert [d.type.value for d in res.descriptors] == ["pkh", "sh-wpkh", "wpkh", "tr"]
    assert res.refused == () and res.master_fingerprint == "73c5da0a"
    d = res.to_dict()
    assert d["refused"] == [] and len(d["descriptors"]) == 4  # type: ignore[arg-type]
    json.dumps(d)


@pytest.mark.parametrize(
    ("kind", "bip322", "path"),
    [
        ("p2pkh", False, "m/44'/1'/0'/0/0"),
        ("p2wpkh", False, "m/84'/1'/0'/0/0"),
        ("p2wpkh", True, "m/84'/1'/0'/0/0"),
        ("p2tr", True, "m/86'/1'/0'/0/0"),
    ],
)
def test_message_sign_then_verify(hsm: Hsm, kind: str, bip322: bool, path: str) -> None:
    sig = ops.sign_message(hsm, "w", "hello anyhsm", path, kind=kind, bip322=bip322)
    assert sig.format == ("bip322" if bip322 else "bip137") and sig.path == path
    ok = ops.verify_message(sig.address, "hello anyhsm", sig.signature, Network.REGTEST)
    d = ok.to_dict()
    assert ok.valid and d["valid"] is True and d["state"] == "valid"
    assert d["address"] == sig.address and d["network"] == "regtest" and "error" not in d
    assert d["format"] == sig.format
    if bip322:
        assert d["bip322_format"] == sig.bip322_format and d["locktime"] == 0
    else:
        assert d["bip322_format"] is None and d["locktime"] is None
    bad = ops.verify_message(sig.address, "other", sig.signature, Network.REGTEST)
    assert not bad.valid and bad.state == "invalid" and bad.reason


def test_message_taproot_needs_bip322(hsm: Hsm) -> None:
    with pytest.raises(MessageError, match="BIP137 cannot sign for taproot"):
        ops.sign_message(hsm, "w", "m", "m/86'/1'/0'/0/0", kind="p2tr")


def test_verify_without_a_network_takes_the_address_family(mainnet: Hsm) -> None:
    sig = ops.sign_message(mainnet, "w", "hi", "m/84'/0'/0'/0/0", kind="p2wpkh")
    assert ops.verify_message(sig.address, "hi", sig.signature).network is Network.MAINNET


def test_cli_choices_are_the_library_values() -> None:
    from anyhsm.cli import bitcoin_cmds

    assert tuple(k.value for k in AddressKind) == bitcoin_cmds.ADDRESS_KINDS
    assert tuple(t.value for t in ops.DescriptorType) == bitcoin_cmds.DESCRIPTOR_TYPES
    assert bitcoin_cmds.SLIP132 == ops.SLIP132_FORMS


def test_a_key_that_cannot_derive_refuses_any_path_before_parsing_it(hsm: Hsm) -> None:
    """As the library's derive_public: unsupported_operation (exit 4) for a single key,
    whether or not the path would parse (not bip32_error, exit 2)."""
    create_key(hsm, "s")
    for bad in ("m/4294967296", "m/" + "/".join(["1"] * 256), "m/-1", "m/0"):
        with pytest.raises(UnsupportedOperation):
            ops.address(hsm, "s", bad)
        with pytest.raises(UnsupportedOperation):
            ops.xpub(hsm, "s", bad)
        with pytest.raises(UnsupportedOperation):
            ops.sign_message(hsm, "s", "hi", bad)
    with pytest.raises(UnsupportedOperation):
        ops.address(hsm, "s", [0])
    assert ops.address(hsm, "s", "M").path is None and ops.address(hsm, "s", []).path is None
