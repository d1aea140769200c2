"""Issue 9, items 6-8: rollback and revocation in the keystore, attacked on real files.

- a deleted key's record put back (and its replacement removed) never signs again;
- two records with one label: the manifest decides, never directory order;
- ``keystore passwd`` / ``keystore rotate`` re-encrypt under a fresh master key, so the old
  passphrase with an old copy of the header opens nothing new, and the old header put
  back is refused;
- the audit chain stays verifiable across a rotation, with a new audit key after it.
(The token and TPM unlock blobs are attacked in tests/cli/test_unenroll_revokes.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE

from anyhsm import open_hsm
from anyhsm.cli.main import main
from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import HsmError, RecordNotInManifest, WrongPassphrase
from anyhsm.keystore import Keystore
from anyhsm.secret import SecretBytes

DIGEST = "cd" * 32
NEW_PASSPHRASE = "a different passphrase, also long enough to pass"


def run(capsys: pytest.CaptureFixture[str], dep: Path, *args: str) -> tuple[int, dict[str, object]]:
    code = main(["--config", str(dep), *args, "--json"])
    out = capsys.readouterr().out
    data = json.loads(out) if out.strip() else {}
    err = data.get("error") if isinstance(data, dict) else None
    return code, err if isinstance(err, dict) else data


def keys_dir(dep: Path) -> Path:
    ks = Keystore.load(dep.parent / "keystore")
    return ks.keys_dir


def test_resurrected_record_never_signs(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 6: restore the record file of a deleted key and remove its replacement."""
    code, old = run(capsys, deployment, "key", "create", "--label", "pay")
    assert code == 0
    kd = keys_dir(deployment)
    saved = (kd / f"{old['id']}.json").read_bytes()
    assert run(capsys, deployment, "key", "delete", "pay", "--yes")[0] == 0
    code, new = run(capsys, deployment, "key", "create", "--label", "pay")
    assert code == 0 and new["id"] != old["id"]
    (kd / f"{old['id']}.json").write_bytes(saved)  # the attacker restores the old record
    (kd / f"{new['id']}.json").unlink()  # ... and removes its replacement

    code, out = run(capsys, deployment, "sign", "--key", "pay", "--digest", DIGEST)
    assert code == 8 and out["code"] == "record_not_in_manifest", out
    assert str(new["id"]) in str(out["message"])  # names the key the label belongs to
    code, out = run(capsys, deployment, "sign", "--key", str(old["id"]), "--digest", DIGEST)
    assert code == 8 and "deleted key" in str(out["message"])
    code, out = run(capsys, deployment, "health")
    assert out["ok"] is False
    software = next(p for p in out["providers"] if p["name"] == "software")  # type: ignore[union-attr]
    assert "not the ones the manifest lists" in software["reason"]
    assert run(capsys, deployment, "audit", "verify")[0] == 0  # and it was all audited
    log = (deployment.parent / "audit.log").read_text()
    assert '"op":"sign","outcome":"error"' in log


def test_two_records_one_label_the_manifest_decides(deployment: Path) -> None:
    """Item 6: a restored copy beside the live key: whatever the directory order, the label
    means the key the manifest lists, and the copy is reported."""
    with open_hsm(deployment) as hsm:
        first = hsm.generate_key("dup")
        kd = hsm.keystore.keys_dir
        saved = (kd / f"{first.id}.json").read_bytes()
        hsm.delete_key("dup")
        live = hsm.generate_key("dup")
    # Make the restored copy sort first and last in turn: the answer must not change.
    for name in (f"{first.id}.json",):
        (kd / name).write_bytes(saved)
    with open_hsm(deployment) as hsm:
        assert hsm.get_key("dup").id == live.id
        sig = hsm.sign("dup", bytes.fromhex(DIGEST))
        assert curve.ecdsa_verify(live.public_key, bytes.fromhex(DIGEST), sig)
        assert isinstance(hsm.keystore.problems[first.id], RecordNotInManifest)


def test_rotation_revokes_the_old_passphrase_and_header(
    deployment: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Item 8: an old keystore.json plus the old (leaked) passphrase must not decrypt keys
    created after ``passwd``, and putting the old header back must be refused."""
    ks_dir = deployment.parent / "keystore"
    assert run(capsys, deployment, "key", "create", "--label", "before")[0] == 0
    stolen = tmp_path / "stolen"
    shutil.copytree(ks_dir, stolen)  # a backup or a thief's copy, old passphrase known
    new_pw = tmp_path / "new-pw"
    new_pw.write_text(NEW_PASSPHRASE)
    new_pw.chmod(0o600)
    code, out = run(capsys, deployment, "keystore", "passwd", "--new-passphrase-file", str(new_pw))
    assert code == 0, out
    assert out["epoch"] == 2 and out["keys"] == 1  # the user's key (not the health probe)
    assert not (ks_dir / "keys").exists()  # the old epoch, under the old master key, is gone

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANYHSM_PASSPHRASE", NEW_PASSPHRASE)
        assert run(capsys, deployment, "key", "create", "--label", "after")[0] == 0
        assert run(capsys, deployment, "sign", "--key", "before", "--digest", DIGEST)[0] == 0
        code, out = run(capsys, deployment, "audit", "verify")
        assert code == 0, out

    # The old passphrase no longer opens the live store.
    with pytest.raises(WrongPassphrase):
        Keystore.load(ks_dir).unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
    # The thief's old copy opens (it is theirs), but a key created after the rotation,
    # copied in beside it, does not decrypt under the old master key.
    after_id = next(r.id for r in _open(ks_dir, NEW_PASSPHRASE).records() if r.label == "after")
    new_record = next(ks_dir.glob(f"keys.2/{after_id}.json"))
    shutil.copy(new_record, stolen / "keys" / new_record.name)
    old = _open(stolen, PASSPHRASE)
    assert after_id not in {r.id for r in old.records()}
    assert after_id in old.problems  # fails authentication under the old master key
    old.close()
    # The old header put back into the live store: nothing opens.
    shutil.copy(stolen / "keystore.json", ks_dir / "keystore.json")
    with pytest.raises(HsmError):
        _open(ks_dir, PASSPHRASE)
    with pytest.raises(HsmError):
        _open(ks_dir, NEW_PASSPHRASE)


def test_rotate_keeps_passphrase_and_audit_chain(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, deployment, "key", "create", "--label", "k")[0] == 0
    code, out = run(capsys, deployment, "keystore", "rotate")
    assert code == 0, out
    assert out["epoch"] == 2 and out["audit_key"] == 2
    assert run(capsys, deployment, "sign", "--key", "k", "--digest", DIGEST)[0] == 0
    code, out = run(capsys, deployment, "audit", "verify")
    assert code == 0 and out["ok"] is True
    entries = [json.loads(x) for x in (deployment.parent / "audit.log").read_text().splitlines()]
    started = next(i for i, e in enumerate(entries) if e["op"] == "rotate_master_key")
    assert entries[started]["outcome"] == "started" and "kid" not in entries[started]
    assert entries[started + 1]["op"] == "rotate_master_key"
    assert entries[started + 1]["outcome"] == "ok" and entries[started + 1]["kid"] == 2
    assert all(e.get("kid") == 2 for e in entries[started + 1 :])


def test_rotation_needs_the_current_passphrase(deployment: Path) -> None:
    """Where a TPM or token opened the store, rotating still needs the passphrase."""
    with open_hsm(deployment) as hsm:
        with pytest.raises(WrongPassphrase):
            hsm.keystore.check_passphrase(SecretBytes(b"not the passphrase of this store"))
        hsm.keystore.check_passphrase(SecretBytes(PASSPHRASE.encode()))
    assert (deployment.parent / "keystore" / "keys").exists()  # nothing rotated


def _open(path: Path, passphrase: str) -> Keystore:
    ks = Keystore.load(path)
    ks.unlock_with_passphrase(SecretBytes(passphrase.encode()))
    return ks


def test_delete_killed_before_removing_the_record_is_finished_not_alarmed(
    deployment: Path,
) -> None:
    """A delete killed after its manifest but before the record went leaves the record
    and its pending-removal marker: that is not a restored copy (no alarm), and the next
    writer finishes the removal. Reproduced by putting back exactly what such a crash
    leaves on disk."""
    with open_hsm(deployment) as hsm:
        info = hsm.generate_key("gone")
        kd = hsm.keystore.keys_dir
        record = (kd / f"{info.id}.json").read_bytes()
        hsm.delete_key("gone")
    (kd / f"{info.id}.json").write_bytes(record)
    (kd / f"{info.id}.removing").write_bytes(b"")
    with open_hsm(deployment) as hsm:
        assert info.id not in hsm.keystore.problems  # not reported as an attack
        with pytest.raises(HsmError):
            hsm.sign(info.id, bytes(32))  # and never used
        hsm.generate_key("next")  # the next writer finishes the removal
        assert not (kd / f"{info.id}.json").exists()
        assert not (kd / f"{info.id}.removing").exists()
    # Without the marker the same file is a restored copy of a deleted key: an alarm.
    (kd / f"{info.id}.json").write_bytes(record)
    with open_hsm(deployment) as hsm:
        assert isinstance(hsm.keystore.problems[info.id], RecordNotInManifest)
