"""The audit writer builds each line from parts (the members that repeat from one entry
to the next kept encoded): the result must be byte for byte the canonical encoding of
the whole entry (:func:`anyhsm.audit.entry_body`), or verification would call the log
tampered. Also: an entry names the process that wrote it, in a forked child too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyhsm import audit
from anyhsm.audit import AuditLog, entry_body, verify_log
from anyhsm.audit_file_state import FileAuditState

TEXT = st.text(max_size=40)  # any code point: quotes, backslashes, controls, non-ASCII
OPTIONAL = st.none() | TEXT


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    path = tmp_path / "audit.log"
    return AuditLog(path, FileAuditState(path), durability="fsync")


@settings(max_examples=300, deadline=None)
@given(
    op=TEXT,
    outcome=TEXT,
    provider=OPTIONAL,
    key_id=OPTIONAL,
    error=OPTIONAL,
    who=OPTIONAL,
    kid=st.integers(min_value=1, max_value=5),
    detail=st.none() | st.dictionaries(TEXT, TEXT, max_size=6),
)
def test_the_line_built_from_parts_is_the_canonical_entry(
    tmp_path_factory: pytest.TempPathFactory,
    op: str,
    outcome: str,
    provider: str | None,
    key_id: str | None,
    error: str | None,
    who: str | None,
    kid: int,
    detail: dict[str, str] | None,
) -> None:
    path = tmp_path_factory.mktemp("a") / "audit.log"
    log = AuditLog(path, FileAuditState(path), durability="fsync")
    try:
        log._kid = kid
        token = audit.principal.set(who)
        try:
            for _ in range(2):  # the second time from the kept parts
                fast = log._body(op, outcome, provider, key_id, error, detail)
                body = json.loads(fast)
                ts = body["ts"]
                want = entry_body(
                    log._seq + 1,
                    ts,
                    op,
                    outcome,
                    os.getpid(),
                    os.getuid(),
                    who=who,
                    kid=kid,
                    provider=provider,
                    key_id=key_id,
                    error=error,
                    detail=detail,
                )
                assert fast == want
        finally:
            audit.principal.reset(token)
    finally:
        log.close()


def test_a_log_written_from_parts_verifies(log: AuditLog) -> None:
    for i in range(50):
        log.append("sign", "ok", provider="software", key_id=f"{i % 3:032x}", detail={"n": str(i)})
    log.append("sign", "error", error="invalid_digest", detail={"key_ref": 'a "quoted" ké'})
    log.append("close", "ok")
    path = log.path
    store = FileAuditState(path)
    log.close()
    with store.audit_keys() as ring:
        result = verify_log(path, ring, store.load_audit_state())
    assert result.ok and result.entries == 52, result.reason


def test_a_forked_child_writes_its_own_pid(log: AuditLog) -> None:
    log.append("parent", "ok")
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            log.append("child", "ok")
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    assert status == 0
    log.append("parent-again", "ok")
    entries = [json.loads(line) for line in log.path.read_text().splitlines()]
    pids = {e["op"]: e["pid"] for e in entries}
    assert pids["parent"] == pids["parent-again"] == os.getpid()
    assert pids["child"] == child
