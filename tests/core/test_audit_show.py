"""``anyhsm audit show`` and ``audit export`` against a real deployment's log: filters,
text and JSON lines, the chain verified first (a broken chain still shows the entries but
says so and exits 8), exports 0600 with their verification summary, and neither command
writes to the log."""

from __future__ import annotations

import hashlib
import json
import stat
from datetime import datetime
from pathlib import Path

import pytest

from anyhsm.audit_query import AuditQuery, format_entry, parse_time, select
from anyhsm.cli.main import main
from anyhsm.errors import UsageError


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def busy(deployment: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, dict[str, str]]:
    """A deployment whose log holds key creations, signatures and a refused export."""
    c = ["--config", str(deployment), "--json"]
    ids = {}
    for label in ("hot", "cold"):
        code, out, _ = run(capsys, *c, "key", "create", "--label", label)
        assert code == 0
        ids[label] = json.loads(out)["id"]
    for digest in ("11" * 32, "22" * 32):
        assert run(capsys, *c, "sign", "--key", "hot", "--digest", digest)[0] == 0
    assert run(capsys, *c, "sign", "--key", "cold", "--digest", "33" * 32)[0] == 0
    code, _, _ = run(capsys, *c, "key", "export", "hot", "--out", str(deployment.parent / "x"))
    assert code != 0  # not exportable: a refused or error entry
    return deployment, ids


def _log(deployment: Path) -> Path:
    return deployment.parent / "audit.log"


def _entries(deployment: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in _log(deployment).read_text().splitlines()]


def _json_lines(out: str) -> tuple[list[dict[str, object]], dict[str, object]]:
    rows = [json.loads(x) for x in out.splitlines()]
    assert rows and "summary" in rows[-1]
    return rows[:-1], rows[-1]


def test_show_filters_by_op_and_key(
    busy: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    deployment, ids = busy
    c = ["--config", str(deployment)]
    code, out, _ = run(capsys, *c, "audit", "show", "--op", "sign", "--key", ids["hot"], "--json")
    assert code == 0
    rows, summary = _json_lines(out)
    expected = [e for e in _entries(deployment) if e["op"] == "sign" and e.get("key") == ids["hot"]]
    assert rows == expected and len(rows) >= 2
    assert summary["summary"]["verified"] is True  # type: ignore[index]
    assert summary["summary"]["matched"] == len(rows)  # type: ignore[index]
    assert "error" not in summary

    code, out, _ = run(capsys, *c, "audit", "show", "--op", "sign", "--outcome", "ok", "--json")
    rows, _ = _json_lines(out)
    assert {r["key"] for r in rows} == {ids["hot"], ids["cold"]}
    assert all(r["outcome"] == "ok" for r in rows)


def test_show_limit_keeps_the_most_recent(
    busy: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    deployment, _ = busy
    code, out, _ = run(
        capsys, "--config", str(deployment), "audit", "show", "--limit", "3", "--json"
    )
    assert code == 0
    rows, _ = _json_lines(out)
    assert rows == _entries(deployment)[-3:]


def test_show_time_window(
    busy: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    deployment, _ = busy
    entries = _entries(deployment)
    middle = entries[len(entries) // 2]
    ts = str(middle["ts"])
    c = ["--config", str(deployment), "audit", "show", "--json"]
    rows, _ = _json_lines(run(capsys, *c, "--since", ts)[1])
    assert rows == [e for e in entries if datetime.fromisoformat(str(e["ts"])) >= parse_time(ts)]
    assert rows[0]["seq"] <= middle["seq"]  # type: ignore[operator]
    rows, _ = _json_lines(run(capsys, *c, "--until", ts)[1])
    assert all(datetime.fromisoformat(str(e["ts"])) < parse_time(ts) for e in rows)
    assert middle not in rows
    # A zone-less time is UTC; "Z" is accepted.
    assert parse_time("2026-12-06T21:00:00") == parse_time("2026-12-06T21:00:00Z")
    assert parse_time("2026-12-06T22:00:00+01:00") == parse_time("2026-12-06T21:00Z")
    rows, _ = _json_lines(run(capsys, *c, "--since", "2999-01-01")[1])
    assert rows == []


def test_show_text_is_readable(
    busy: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    deployment, ids = busy
    code, out, _ = run(capsys, "--config", str(deployment), "audit", "show", "--op", "sign")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("audit chain verified:")
    assert lines[-1].endswith("entries shown")
    body = lines[1:-1]
    assert body and all(" sign " in line for line in body)
    assert any(f"key={ids['hot']}" in line for line in body)
    for line in body:  # no Python reprs, no MAC
        assert "{'" not in line and "True" not in line and "None" not in line
        assert "mac" not in line


def test_format_entry_flattens_detail() -> None:
    line = format_entry(
        {
            "seq": 7,
            "ts": "2026-12-06T21:00:00.000000+00:00",
            "op": "export_key",
            "outcome": "refused",
            "key": "k1",
            "detail": {"what": "mnemonic", "ok": True},
            "mac": "ab" * 32,
        }
    )
    assert line == (
        "#7 2026-12-06T21:00:00.000000+00:00 export_key refused "
        "detail.ok=yes detail.what=mnemonic key=k1"
    )


def test_bad_filters_are_usage_errors(deployment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = ["--config", str(deployment), "audit", "show", "--json"]
    code, out, _ = run(capsys, *c, "--since", "yesterday")
    assert code == 2 and json.loads(out)["error"]["code"] == "usage_error"
    code, out, _ = run(capsys, *c, "--limit", "0")
    assert code == 2 and json.loads(out)["error"]["code"] == "usage_error"
    with pytest.raises(UsageError):
        AuditQuery(limit=-1)


def test_show_and_export_never_write_the_log(
    busy: tuple[Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment, _ = busy
    before = _log(deployment).read_bytes()
    keystore = deployment.parent / "keystore"
    ks_before = {p.name: p.read_bytes() for p in keystore.rglob("*") if p.is_file()}
    c = ["--config", str(deployment)]
    assert run(capsys, *c, "audit", "show")[0] == 0
    assert run(capsys, *c, "audit", "export", "--out", str(tmp_path / "copy.log"))[0] == 0
    assert _log(deployment).read_bytes() == before
    assert {p.name: p.read_bytes() for p in keystore.rglob("*") if p.is_file()} == ks_before


def test_export_writes_copy_and_summary_0600(
    busy: tuple[Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment, _ = busy
    out_path = tmp_path / "export" / "audit.copy"
    out_path.parent.mkdir()
    code, out, _ = run(
        capsys, "--config", str(deployment), "audit", "export", "--out", str(out_path), "--json"
    )
    assert code == 0
    summary = json.loads(out)
    data = _log(deployment).read_bytes()
    assert out_path.read_bytes() == data
    on_disk = json.loads((tmp_path / "export" / "audit.copy.summary.json").read_text())
    # the file is the summary the command prints (which adds the CLI's schema_version;
    # the file carries its own "format")
    assert on_disk == {k: v for k, v in summary.items() if k != "schema_version"}
    assert summary["verified"] is True and summary["verify"]["ok"] is True
    assert summary["sha256"] == hashlib.sha256(data).hexdigest()
    entries = _entries(deployment)
    assert summary["first_seq"] == 1 and summary["last_seq"] == entries[-1]["seq"]
    assert summary["lines"] == len(entries)
    for p in (out_path, tmp_path / "export" / "audit.copy.summary.json"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    # Nothing else (no temp file) is left beside them.
    assert sorted(p.name for p in out_path.parent.iterdir()) == [
        "audit.copy",
        "audit.copy.summary.json",
    ]


def _tamper(deployment: Path) -> int:
    """Change the outcome of the first sign entry (its MAC no longer matches); returns
    its seq."""
    log = _log(deployment)
    lines = log.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        entry = json.loads(line)
        if entry["op"] == "sign" and entry["outcome"] == "ok":
            lines[i] = line.replace('"outcome":"ok"', '"outcome":"error"')
            log.write_text("".join(lines))
            return int(entry["seq"])
    raise AssertionError("no sign entry")


def test_show_on_a_broken_chain_flags_it(
    busy: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    deployment, _ = busy
    seq = _tamper(deployment)
    c = ["--config", str(deployment), "audit", "show"]
    code, out, _ = run(capsys, *c)
    assert code == 8
    lines = out.splitlines()
    assert lines[0].startswith("AUDIT CHAIN BROKEN:") and "unverified" in lines[0]
    assert any(line.startswith(f"#{seq} ") for line in lines)  # shown anyway
    code, out, _ = run(capsys, *c, "--json")
    assert code == 8
    rows, summary = _json_lines(out)
    assert any(r["seq"] == seq for r in rows)
    assert summary["summary"]["verified"] is False  # type: ignore[index]
    assert summary["error"]["code"] == "audit_tampered"  # type: ignore[index]


def test_export_of_a_broken_chain_keeps_the_evidence(
    busy: tuple[Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment, _ = busy
    _tamper(deployment)
    out_path = tmp_path / "evidence.log"
    code, out, _ = run(
        capsys, "--config", str(deployment), "audit", "export", "--out", str(out_path), "--json"
    )
    assert code == 8
    summary = json.loads(out)
    assert summary["verified"] is False and summary["verify"]["first_bad_line"]
    assert out_path.read_bytes() == _log(deployment).read_bytes()


def test_select_reports_unreadable_lines(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    log.write_text('{"seq":1,"op":"sign","outcome":"ok"}\nnot json\n[1]\n')
    found = select(log, AuditQuery())
    assert [e["seq"] for e in found.entries] == [1]
    assert found.unreadable_lines == [2, 3] and found.scanned == 3
    assert select(tmp_path / "none.log", AuditQuery()).entries == []
