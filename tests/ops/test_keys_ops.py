"""anyhsm.ops.keys and anyhsm.ops.signing on a real software keystore: create, the import
checks (network, master xprv, no character of a secret quoted), list/show, delete,
export; digest sign/verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.bitcoin.test_signer import software_hsm
from tests.ops.conftest import MNEMONIC

from anyhsm.bitcoin.bip32 import ExtendedKey
from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import (
    Bip32Error,
    EncodingError,
    ExportNotAllowed,
    HsmError,
    InvalidDigest,
    KeyNotFound,
    NetworkMismatch,
)
from anyhsm.hsm import Hsm
from anyhsm.ops import keys as ops
from anyhsm.ops.signing import sign_digest, verify_digest
from anyhsm.secret import SecretBytes
from anyhsm.types import KeyType, Network, SigScheme

SEED = bytes(range(32))


def test_list_and_show(hsm: Hsm) -> None:
    listed = ops.list_keys(hsm)
    assert [k.label for k in listed.keys] == ["w"]
    d = listed.to_dict()
    json.dumps(d)
    keys = d["keys"]
    assert isinstance(keys, list) and keys[0]["master_fingerprint"] == "73c5da0a"
    assert ops.show_key(hsm, "w") == listed.keys[0]
    assert ops.show_key(hsm, listed.keys[0].id) == listed.keys[0]
    with pytest.raises(KeyNotFound):
        ops.show_key(hsm, "nope")


def test_create_plain_and_from_a_mnemonic(hsm: Hsm) -> None:
    made = ops.create_key(hsm, "k")
    assert made.info.key_type is KeyType.SECP256K1 and not made.from_mnemonic
    assert "mnemonic_shown" not in made.to_dict()
    hd = ops.create_key(hsm, "hd", KeyType.BIP32, mnemonic_words=12)
    assert hd.to_dict()["mnemonic_shown"] is False and "mnemonic" not in hd.to_dict()
    assert "mnemonic" not in repr(hd)
    with pytest.raises(ExportNotAllowed):  # the policy does not allow the display
        ops.create_key(hsm, "x", KeyType.BIP32, mnemonic_words=12, show_mnemonic_once=True)
    with pytest.raises(HsmError, match="needs --type bip32"):
        ops.create_key(hsm, "x", show_mnemonic_once=True)
    with pytest.raises(HsmError, match="12, 15, 18, 21 or 24"):
        ops.create_key(hsm, "x", KeyType.BIP32, mnemonic_words=13)


def test_import_mnemonic_again_warns(hsm: Hsm) -> None:
    res = ops.import_mnemonic(hsm, "again", MNEMONIC)
    assert [k.label for k in res.same_as] == ["w"]
    assert res.to_dict()["warnings"] == ["the same key is already in the store as w"]
    other = ops.import_mnemonic(hsm, "salted", MNEMONIC, "TREZOR")
    assert other.warnings == () and other.to_dict()["warnings"] == []


def test_import_xprv_checks_network_and_depth(hsm: Hsm) -> None:
    root = ExtendedKey.from_seed(SEED, Network.TESTNET)
    res = ops.import_xprv(hsm, "node", root.to_string())
    assert res.info.key_type is KeyType.BIP32_NODE
    assert res.info.master_fingerprint == root.fingerprint
    main = ExtendedKey.from_seed(SEED, Network.MAINNET)
    with pytest.raises(NetworkMismatch, match="not the configured regtest"):
        ops.import_xprv(hsm, "main", main.to_string())
    with pytest.raises(Bip32Error, match="depth 1"):
        ops.import_xprv(hsm, "child", root.derive("m/0'").to_string())
    with pytest.raises(Bip32Error, match="no private key"):
        ops.import_xprv(hsm, "pub", root.neuter().to_string())


def test_import_errors_never_quote_the_secret(hsm: Hsm) -> None:
    text = ExtendedKey.from_seed(SEED, Network.TESTNET).to_string()
    broken = text[:20] + "0" + text[21:]  # '0' is not a Base58 character
    with pytest.raises((EncodingError, Bip32Error)) as exc:
        ops.import_xprv(hsm, "bad", broken)
    assert "'" not in exc.value.message and text[:20] not in str(exc.value)
    with pytest.raises(EncodingError) as exc2:
        ops.import_wif(hsm, "bad", "cN0tAWiF")
    assert "'" not in exc2.value.message


def test_import_wif_and_raw_secret(tmp_path: Path) -> None:
    from anyhsm.bitcoin.address import wif_encode

    h = software_hsm(tmp_path / "d")
    try:
        secret = bytes([7]) * 32
        res = ops.import_wif(h, "wif", wif_encode(secret, Network.REGTEST))
        assert res.info.public_key == curve.public_key(secret)
        with pytest.raises(NetworkMismatch):
            ops.import_wif(h, "wif2", wif_encode(secret, Network.MAINNET))
        raw = ops.import_secret(h, "raw", SecretBytes((bytes([9]) * 32).hex().encode()))
        assert raw.info.public_key == curve.public_key(bytes([9]) * 32)
        with pytest.raises(InvalidDigest, match="not valid hexadecimal") as exc:
            ops.import_secret(h, "bad", SecretBytes(b"zz" * 32))
        assert "zz" not in str(exc.value)
    finally:
        h.close()


def test_delete_and_export(tmp_path: Path) -> None:
    h = software_hsm(tmp_path / "d", allow_export=True)
    try:
        made = ops.create_key(h, "e", exportable=True)
        out = tmp_path / "secret.hex"
        res = ops.export_key(h, "e", out)
        assert res.to_dict() == {"exported": made.info.id, "out": str(out), "label": "e"}
        assert out.stat().st_mode & 0o777 == 0o600
        secret = bytes.fromhex(out.read_text().strip())
        assert curve.public_key(secret) == made.info.public_key
        gone = ops.delete_key(h, "e")
        assert gone.to_dict() == {"deleted": made.info.id, "label": "e"}
        assert ops.list_keys(h).keys == ()
    finally:
        h.close()


def test_sign_and_verify_a_digest(hsm: Hsm) -> None:
    ops.create_key(hsm, "k")
    digest = bytes(range(32))
    for scheme in SigScheme:
        sig = sign_digest(hsm, "k", digest, scheme)
        want = {"signature": sig.signature.hex(), "scheme": scheme.value, "key": "k"}
        assert sig.to_dict() == want
        assert verify_digest(hsm, "k", digest, sig.signature, scheme).valid
        assert not verify_digest(hsm, "k", bytes(32), sig.signature, scheme).valid


def test_sign_digests_in_one_batch_with_per_item_errors(hsm: Hsm) -> None:
    from anyhsm.ops.signing import sign_digests

    made = ops.create_key(hsm, "b")
    good = [bytes([i]) * 32 for i in range(3)]
    res = sign_digests(hsm, "b", [good[0], b"short", good[1], good[2]])
    assert [r.index for r in res.results] == [0, 1, 2, 3]
    assert res.results[1].signature is None and res.results[1].error is not None
    assert res.results[1].to_dict()["error"]["code"] == "invalid_digest"  # type: ignore[index]
    for r, d in zip([res.results[0], res.results[2], res.results[3]], good, strict=True):
        assert r.signature is not None and curve.ecdsa_verify(made.info.public_key, d, r.signature)
    d = res.to_dict()
    json.dumps(d)
    assert d["scheme"] == "ecdsa" and len(d["results"]) == 4  # type: ignore[arg-type]
    signs = [e for e in hsm.audit_path.read_text().splitlines() if '"op":"sign"' in e]
    assert len(signs) == 1 and '"signatures":"3"' in signs[0]  # one entry for the batch
