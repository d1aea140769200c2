"""The audit log: every edit, deletion, reordering, insertion and truncation is caught
and the first bad line named; durability modes; the CLI's exit status."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from anyhsm import open_hsm
from anyhsm.audit import AuditLog, verify_log
from anyhsm.cli.main import main
from anyhsm.errors import AuditWriteFailed
from anyhsm.secret import SecretBytes

KEY = SecretBytes(b"k" * 32)


def write_entries(path: Path, n: int, **kw: object) -> list[str]:
    log = AuditLog(path, KEY, **kw)  # type: ignore[arg-type]
    for i in range(n):
        log.append("sign", "ok", provider="software", key_id=f"id{i}", detail={"i": str(i)})
    log.close()
    return path.read_text().splitlines()


def test_intact(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    write_entries(p, 10)
    res = verify_log(p, KEY)
    assert res.ok and res.entries == 10


@pytest.mark.parametrize("durability", ["batched", "fsync"])
def test_durability_modes(tmp_path: Path, durability: str) -> None:
    p = tmp_path / "a.log"
    write_entries(p, 5, durability=durability)
    assert verify_log(p, KEY).ok


def test_wrong_key_fails_first_line(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    write_entries(p, 3)
    res = verify_log(p, SecretBytes(b"x" * 32))
    assert not res.ok and res.first_bad_line == 1


def test_edited_entry(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    lines = write_entries(p, 10)
    entry = json.loads(lines[4])
    entry["outcome"] = "error"
    lines[4] = json.dumps(entry, separators=(",", ":"))
    p.write_text("\n".join(lines) + "\n")
    res = verify_log(p, KEY)
    assert not res.ok and res.first_bad_line == 5
    assert "MAC" in res.reason


def test_deleted_entry(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    lines = write_entries(p, 10)
    del lines[6]
    p.write_text("\n".join(lines) + "\n")
    res = verify_log(p, KEY)
    assert not res.ok and res.first_bad_line == 7


def test_reordered_entries(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    lines = write_entries(p, 10)
    lines[2], lines[3] = lines[3], lines[2]
    p.write_text("\n".join(lines) + "\n")
    res = verify_log(p, KEY)
    assert not res.ok and res.first_bad_line == 3


def test_inserted_entry(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    lines = write_entries(p, 10)
    forged = json.loads(lines[5])
    forged["op"] = "export_key"
    lines.insert(6, json.dumps(forged))
    p.write_text("\n".join(lines) + "\n")
    res = verify_log(p, KEY)
    assert not res.ok and res.first_bad_line == 7


def test_garbage_line(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    lines = write_entries(p, 4)
    lines[1] = "not json at all"
    p.write_text("\n".join(lines) + "\n")
    res = verify_log(p, KEY)
    assert not res.ok and res.first_bad_line == 2


def test_truncated_tail_caught_by_checkpoint(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    cp_path = tmp_path / "cp"

    def read_cp() -> bytes | None:
        return cp_path.read_bytes() if cp_path.exists() else None

    def write_cp(b: bytes) -> None:
        cp_path.write_bytes(b)

    lines = write_entries(p, 12, read_checkpoint=read_cp, write_checkpoint=write_cp)
    assert verify_log(p, KEY, read_cp()).ok
    p.write_text("\n".join(lines[:9]) + "\n")  # a clean cut at an entry boundary
    res = verify_log(p, KEY, read_cp())
    assert not res.ok
    assert "truncated" in res.reason
    assert res.first_bad_line == 10


def test_torn_last_line(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    write_entries(p, 3)
    data = p.read_bytes()
    p.write_bytes(data[:-20])
    res = verify_log(p, KEY)
    assert not res.ok and res.first_bad_line == 3


def test_reopened_log_continues_chain(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    write_entries(p, 3)
    write_entries(p, 3)
    res = verify_log(p, KEY)
    assert res.ok and res.entries == 6


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
    assert "02" * 16 not in text
