"""A keystore written before manifests (tests/data/keystore_before_manifests, made by
anyhsm at 71e5082) opens, is given its manifest once, keeps its keys and its audit
chain, and from then on cannot be downgraded by deleting the manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from anyhsm import open_hsm
from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import ManifestMissing

LEGACY = Path(__file__).parent.parent / "data" / "keystore_before_manifests"


@pytest.fixture
def legacy(tmp_path: Path, passphrase_env: str) -> Path:
    shutil.copytree(LEGACY, tmp_path / "dep")
    for p in (tmp_path / "dep").rglob("*"):
        p.chmod(0o700 if p.is_dir() else 0o600)
    (tmp_path / "dep").chmod(0o700)
    return tmp_path / "dep" / "anyhsm.toml"


def test_legacy_store_is_upgraded_with_keys_and_audit_chain(legacy: Path) -> None:
    ks_dir = legacy.parent / "keystore"
    assert not (ks_dir / "keys" / "MANIFEST").exists()
    with open_hsm(legacy) as hsm:
        assert hsm.keystore.upgraded
        assert {k.label for k in hsm.list_keys()} == {"alpha", "gamma"}
        sig = hsm.sign("alpha", bytes(32))
        assert curve.ecdsa_verify(hsm.public_key("alpha"), bytes(32), sig)
        assert hsm.verify_audit().ok
    assert (ks_dir / "keys" / "MANIFEST").exists()
    assert not (ks_dir / "audit-checkpoint.json").exists()  # carried into the manifest
    header = json.loads((ks_dir / "keystore.json").read_bytes())
    assert header["manifest"] == 1 and header["epoch"] == 1
    with open_hsm(legacy) as hsm:
        assert not hsm.keystore.upgraded  # once
        assert hsm.verify_audit().ok


def test_no_downgrade_after_the_upgrade(legacy: Path) -> None:
    open_hsm(legacy).close()
    (legacy.parent / "keystore" / "keys" / "MANIFEST").unlink()
    with pytest.raises(ManifestMissing):
        open_hsm(legacy)


def test_legacy_log_cut_back_is_caught_after_the_upgrade(legacy: Path) -> None:
    log = legacy.parent / "audit.log"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-2]))  # the old checkpoint covers the whole log
    from anyhsm.errors import AuditStateMismatch

    with pytest.raises(AuditStateMismatch):
        open_hsm(legacy)
