"""The audit log: every edit, deletion, reordering, insertion and truncation is caught
and the first bad line named; lines are MAC-ed over their exact bytes; durability
modes; the CLI's exit status.

These unit tests keep the chain's state in :class:`FileAuditState` (the real store of a
keystore-less development set-up); tests/core/test_audit_history.py attacks the keystore
manifest's copy through real deployments."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from anyhsm import open_hsm
from anyhsm.audit import AuditKeyRing, AuditLog, VerifyResult, verify_log
from anyhsm.audit_file_state import FileAuditState
from anyhsm.cli.main import main
from anyhsm.errors import AuditStateMismatch, AuditWriteFailed
from anyhsm.secret import SecretBytes


def write_entries(path: Path, n: int, **kw: object) -> list[str]:
    log = AuditLog(path, FileAuditState(path), **kw)  # type: ignore[arg-type]
    for i in range(n):
        log.append("sign", "ok", provider="software", key_id=f"id{i}", detail={"i": str(i)})
    log.close()
    return path.read_text().splitlines()


def check(path: Path) -> VerifyResult:
    store = FileAuditState(path)
    with store.audit_keys() as ring:
        return verify_log(path, ring, store.load_audit_state())


def test_intact(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    write_entries(p, 10)
    res = check(p)
    assert res.ok and res.entries == 10 and res.checkpoint_seq == 10


@pytest.mark.parametrize("durability", ["batched", "fsync"])
def test_durability_modes(tmp_path: Path, durability: str) -> None:
    p = tmp_path / "a.log"
    write_entries(p, 5, durability=durability)
    assert check(p).ok


def test_wrong_key_fails_first_line(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    write_entries(p, 3)
    other = AuditKeyRing([(1, SecretBytes(b"x" * 32))])
    res = verify_log(p, other, FileAuditState(p).load_audit_state())
    assert not res.ok and res.first_bad_line == 1


def test_edited_entry(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    lines = write_entries(p, 10)
    entry = json.loads(lines[4])
    entry["outcome"] = "error"
    lines[4] = json.dumps(entry, separators=(",", ":"))
    p.write_text("\n".join(lines) + "\n")
    res = check(p)
    assert not res.ok and res.first_bad_line == 5


def test_deleted_entry(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    lines = write_entries(p, 10)
    del lines[6]
    p.write_text("\n".join(lines) + "\n")
    res = check(p)
    assert not res.ok and res.first_bad_line == 7


def test_reordered_entries(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    lines = write_entries(p, 10)
    lines[2], lines[3] = lines[3], lines[2]
    p.write_text("\n".join(lines) + "\n")
    res = check(p)
    assert not res.ok and res.first_bad_line == 3


def test_inserted_entry(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    lines = write_entries(p, 10)
    forged = json.loads(lines[5])
    forged["op"] = "export_key"
    lines.insert(6, json.dumps(forged))
    p.write_text("\n".join(lines) + "\n")
    res = check(p)
    assert not res.ok and res.first_bad_line == 7


def test_garbage_line(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    lines = write_entries(p, 4)
    lines[1] = "not json at all"
    p.write_text("\n".join(lines) + "\n")
    res = check(p)
    assert not res.ok and res.first_bad_line == 2


def test_truncated_tail_caught_by_the_recorded_state(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    lines = write_entries(p, 12)
    assert check(p).ok
    p.write_text("\n".join(lines[:9]) + "\n")  # a clean cut at an entry boundary
    res = check(p)
    assert not res.ok
    assert "truncated" in res.reason
    assert res.first_bad_line == 10
    with pytest.raises(AuditStateMismatch, match="shorter than recorded"):
        AuditLog(p, FileAuditState(p))  # and nothing is appended to it


def test_torn_last_line(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    write_entries(p, 3)
    data = p.read_bytes()
    p.write_bytes(data[:-20])
    res = check(p)
    assert not res.ok and res.first_bad_line == 3


def test_reopened_log_continues_chain(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    write_entries(p, 3)
    write_entries(p, 3)
    res = check(p)
    assert res.ok and res.entries == 6


@pytest.mark.parametrize(
    "respell",
    [
        lambda line: line.replace('"op":"sign"', '"op":"\\u0073ign"'),  # \u escape
        lambda line: line.replace('"op":"sign"', '"op": "sign"'),  # spacing
        lambda line: line.replace(
            '"detail":{"i":"2"},"key":"id2"', '"key":"id2","detail":{"i":"2"}'
        ),  # key order
    ],
    ids=["unicode-escape", "whitespace", "key-order"],
)
def test_non_canonical_respelling_fails(tmp_path: Path, respell: object) -> None:
    """Item 4 of issue 9: the MAC covers the bytes, and the bytes must be canonical."""
    p = tmp_path / "a.log"
    lines = write_entries(p, 5)
    changed = respell(lines[2])  # type: ignore[operator]
    assert changed != lines[2] and json.loads(changed) == json.loads(lines[2])
    lines[2] = changed
    p.write_text("\n".join(lines) + "\n")
    res = check(p)
    assert not res.ok and res.first_bad_line == 3


def test_entries_name_the_process_and_user(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    entry = json.loads(write_entries(p, 1)[0])
    assert entry["pid"] == os.getpid() and entry["uid"] == os.getuid()


def test_write_failure_fails_the_operation(
    deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anyhsm.audit as audit_mod

    hsm = open_hsm(deployment)
    info = hsm.generate_key("k")
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit_mod.os, "write", full_disk)
    with pytest.raises(AuditWriteFailed):
        hsm.sign(info.id, b"\x01" * 32)
    monkeypatch.setattr(audit_mod.os, "write", real_write)
    with pytest.raises(AuditWriteFailed):  # the log stays failed: never silently resumes
        hsm.sign(info.id, b"\x01" * 32)
    hsm._audit.close()  # type: ignore[union-attr]
    hsm._closed = True
    with open_hsm(deployment) as again:
        assert again.verify_audit().ok


def test_cli_audit_verify_exit_codes(deployment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(deployment), "audit", "verify"]) == 0
    log = deployment.parent / "audit.log"
    lines = log.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["ts"] = "2000-01-01T00:00:00.000000+00:00"
    lines[1] = json.dumps(entry, separators=(",", ":"))
    log.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["--config", str(deployment), "audit", "verify", "--json"]) == 8
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["first_bad_line"] == 2


def test_no_secrets_in_log(deployment: Path) -> None:
    with open_hsm(deployment) as hsm:
        info = hsm.import_key("imp", bytes.fromhex("11" * 32), exportable=True)
        hsm.sign(info.id, b"\x02" * 32)
    text = (deployment.parent / "audit.log").read_text()
    assert "11" * 16 not in text
    # What was signed is recorded (a digest is not secret): item 5 of issue 9.
    entries = [json.loads(x) for x in text.splitlines()]
    signs = [e for e in entries if e["op"] == "sign" and e["outcome"] == "ok"]
    assert signs[-1]["detail"]["digest"] == "02" * 32
