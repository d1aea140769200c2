"""The encrypted keystore on real files: sealing, tamper and corruption detection,
wrong passphrase, format versions, permissions, passphrase change."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from anyhsm import open_hsm
from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import (
    AuthenticationFailed,
    KeyExists,
    KeyNotFound,
    KeystoreCorrupted,
    KeystoreExists,
    KeystoreNotFound,
    KeystoreTampered,
    UnsupportedFormatVersion,
    WrongPassphrase,
)
from anyhsm.keystore import KdfParams, Keystore
from anyhsm.keystore.store import HEADER_FILE, canonical
from anyhsm.secret import SecretBytes
from anyhsm.types import KeyType

FAST = KdfParams("argon2id", memory_kib=1024, iterations=1)
PW = SecretBytes(b"a passphrase that is long enough!!")


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture
def store(tmp_path: Path) -> Path:
    ks = Keystore.create(tmp_path / "ks", PW, kdf=FAST)
    for i in range(3):
        secret = bytearray(os.urandom(32))
        with SecretBytes(secret) as sb:
            ks.add_sealed(f"key{i}", KeyType.SECP256K1, sb, curve.public_key(secret))
    ks.close()
    return tmp_path / "ks"


def opened(path: Path) -> Keystore:
    ks = Keystore.load(path)
    ks.unlock_with_passphrase(PW)
    return ks


def test_roundtrip_and_secret(store: Path) -> None:
    ks = opened(store)
    recs = ks.records()
    assert [r.label for r in sorted(recs, key=lambda r: r.label)] == ["key0", "key1", "key2"]
    rec = ks.find("key1")
    with ks.secret(rec) as view:
        assert curve.public_key(view) == rec.public_key
    assert ks.find(rec.id) == rec


def test_files_are_private(store: Path) -> None:
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    for p in store.rglob("*"):
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p


def test_wrong_passphrase_changes_nothing(store: Path) -> None:
    before = snapshot(store)
    ks = Keystore.load(store)
    with pytest.raises(WrongPassphrase) as e:
        ks.unlock_with_passphrase(SecretBytes(b"wrong"))
    assert "passphrase" in str(e.value)
    assert snapshot(store) == before


def test_create_refuses_to_overwrite(store: Path) -> None:
    with pytest.raises(KeystoreExists):
        Keystore.create(store, PW, kdf=FAST)


def test_missing_store(tmp_path: Path) -> None:
    with pytest.raises(KeystoreNotFound):
        Keystore.load(tmp_path / "nope")


def test_truncated_header(store: Path) -> None:
    hp = store / HEADER_FILE
    hp.write_bytes(hp.read_bytes()[:40])
    with pytest.raises(KeystoreCorrupted):
        Keystore.load(store)


def test_header_bit_flip_is_corruption(store: Path) -> None:
    hp = store / HEADER_FILE
    data = bytearray(hp.read_bytes())
    i = data.index(b'"created_at"') + 20
    data[i] ^= 0x01
    hp.write_bytes(bytes(data))
    with pytest.raises(KeystoreCorrupted):
        Keystore.load(store)


def test_header_edit_with_fixed_checksum_is_tampering(store: Path) -> None:
    hp = store / HEADER_FILE
    header = json.loads(hp.read_bytes())
    header["created_at"] = "2001-01-01T00:00:00+00:00"
    body = {k: v for k, v in header.items() if k != "checksum"}
    header["checksum"] = hashlib.sha256(canonical(body)).hexdigest()
    hp.write_text(json.dumps(header))
    ks = Keystore.load(store)
    with pytest.raises(KeystoreTampered):
        ks.unlock_with_passphrase(PW)


def test_newer_format_refused(store: Path) -> None:
    hp = store / HEADER_FILE
    header = json.loads(hp.read_bytes())
    header["version"] = 99
    hp.write_text(json.dumps(header))
    before = snapshot(store)
    with pytest.raises(UnsupportedFormatVersion):
        Keystore.load(store)
    assert snapshot(store) == before


def _record_path(store: Path, ks: Keystore, label: str) -> Path:
    return store / "keys" / f"{ks.find(label).id}.json"


def test_edited_record_detected_and_isolated(store: Path) -> None:
    ks = opened(store)
    victim = ks.find("key1")
    p = _record_path(store, ks, "key1")
    rec = json.loads(p.read_bytes())
    rec["label"] = "evil"
    p.write_text(json.dumps(rec))
    ks2 = opened(store)
    labels = {r.label for r in ks2.records()}
    assert labels == {"key0", "key2"}  # the damaged record is not served
    assert victim.id in ks2.problems
    with pytest.raises(KeystoreTampered):
        ks2.find(victim.id)
    with pytest.raises(KeyNotFound):
        ks2.find("evil")


def test_swapped_ciphertexts_detected(store: Path) -> None:
    ks = opened(store)
    a, b = _record_path(store, ks, "key0"), _record_path(store, ks, "key2")
    ra, rb = json.loads(a.read_bytes()), json.loads(b.read_bytes())
    ra["ciphertext"], rb["ciphertext"] = rb["ciphertext"], ra["ciphertext"]
    ra["nonce"], rb["nonce"] = rb["nonce"], ra["nonce"]
    a.write_text(json.dumps(ra))
    b.write_text(json.dumps(rb))
    ks2 = opened(store)
    assert len(ks2.records()) == 1
    assert len(ks2.problems) == 2


def test_renamed_record_detected(store: Path) -> None:
    ks = opened(store)
    p = _record_path(store, ks, "key0")
    p.rename(p.with_name("0" * 32 + ".json"))
    ks2 = opened(store)
    assert len(ks2.records()) == 2
    assert "0" * 32 in ks2.problems
    assert isinstance(ks2.problems["0" * 32], KeystoreTampered)


def test_record_from_newer_version(store: Path) -> None:
    ks = opened(store)
    p = _record_path(store, ks, "key2")
    rec = json.loads(p.read_bytes())
    rec["version"] = 7
    p.write_text(json.dumps(rec))
    ks2 = opened(store)
    ks2.records()
    assert any(isinstance(e, UnsupportedFormatVersion) for e in ks2.problems.values())


def test_garbage_record(store: Path) -> None:
    (store / "keys" / ("a" * 32 + ".json")).write_bytes(b"\x00\x01 not json")
    ks = opened(store)
    assert len(ks.records()) == 3
    assert isinstance(ks.problems["a" * 32], KeystoreCorrupted)


def test_labels_unique(store: Path) -> None:
    ks = opened(store)
    with SecretBytes(os.urandom(32)) as sb, pytest.raises(KeyExists):
        ks.add_sealed("key0", KeyType.SECP256K1, sb, curve.public_key(sb.buffer))


def test_rotation_with_a_new_passphrase_keeps_keys(store: Path) -> None:
    ks = opened(store)
    ids = {r.id for r in ks.records()}
    new = SecretBytes(b"another passphrase, also long enough")
    ks.rotate(new, kdf=KdfParams("scrypt", n=2**10, r=8, p=1))
    ks.close()
    with pytest.raises(WrongPassphrase):
        Keystore.load(store).unlock_with_passphrase(PW)
    ks2 = Keystore.load(store)
    assert ks2.kdf.name == "scrypt"
    ks2.unlock_with_passphrase(new)
    assert {r.id for r in ks2.records()} == ids


def test_master_key_unlock(store: Path) -> None:
    ks = opened(store)
    with ks.master_key() as mk:
        other = Keystore.load(store)
        other.unlock_with_master_key(mk, via="test")
        assert other.unlocked_by == "test"
        assert len(other.records()) == 3
    with pytest.raises(AuthenticationFailed):
        Keystore.load(store).unlock_with_master_key(SecretBytes(os.urandom(32)))


def test_side_files(store: Path) -> None:
    ks = opened(store)
    ks.write_side_file("tpm-sealed.json", b"{}")
    assert ks.read_side_file("tpm-sealed.json") == b"{}"
    assert stat.S_IMODE((store / "tpm-sealed.json").stat().st_mode) == 0o600
    assert ks.remove_side_file("tpm-sealed.json")
    assert ks.read_side_file("tpm-sealed.json") is None


def test_damaged_record_makes_health_degraded(deployment: Path) -> None:
    with open_hsm(deployment) as hsm:
        info = hsm.generate_key("victim")
    p = deployment.parent / "keystore" / "keys" / f"{info.id}.json"
    rec = json.loads(p.read_bytes())
    rec["exportable"] = True  # an attacker trying to make a key exportable
    p.write_text(json.dumps(rec))
    with open_hsm(deployment) as hsm:
        report = hsm.health()
        assert not report.ok
        active = next(r for r in report.providers if r["active"])
        assert "authentication" in str(active["reason"])
        with pytest.raises(KeystoreTampered):
            hsm.sign(info.id, os.urandom(32))
