"""``AuditLog.latest`` / ``Hsm.audit_latest``: the newest ``detail`` value of a member in
the whole chain, MAC-verified (anyhsm.audit_marks). What the spending policy's rollback
check stands on, so it is attacked on the real log: a newer value edited, removed or
forged before or after the checkpoint fails closed; entries of another process count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE

from anyhsm import open_hsm
from anyhsm.errors import AuditError, AuditStateMismatch
from anyhsm.hsm import Hsm

MEMBER = "state_seq"


def mark(hsm: Hsm, n: int, filler: int = 0) -> None:
    hsm.record_event("policy_state", "ok", {MEMBER: str(n)})
    for i in range(filler):
        hsm.record_event("note", "ok", {"n": str(i), "pad": "x" * 200})


def lines(dep: Path) -> list[bytes]:
    return (dep.parent / "audit.log").read_bytes().splitlines(keepends=True)


def test_newest_value_of_this_log(deployment: Path) -> None:
    with open_hsm(deployment) as hsm:
        assert hsm.audit_latest(MEMBER) is None
        mark(hsm, 1)
        mark(hsm, 2, filler=3)
        assert hsm.audit_latest(MEMBER) == "2"
        mark(hsm, 3)  # appended after the frontier exists: tracked as it is written
        assert hsm.audit_latest(MEMBER) == "3"
        with pytest.raises(ValueError):
            hsm.audit_latest('x":"1')


def test_found_before_the_checkpoint_across_blocks(deployment: Path) -> None:
    """A fresh handle reads back from the checkpoint (over 64 KiB of later entries)."""
    with open_hsm(deployment) as hsm:
        mark(hsm, 41)
        mark(hsm, 42, filler=400)  # ~100 KiB of entries after the newest mark
    with open_hsm(deployment) as hsm:
        assert hsm.audit_latest(MEMBER) == "42"


def test_another_processs_entries_count(deployment: Path) -> None:
    a = open_hsm(deployment)
    b = open_hsm(deployment)
    try:
        mark(a, 5)
        assert a.audit_latest(MEMBER) == "5"
        mark(b, 6)  # another handle (own log object), as another process would
        assert a.audit_latest(MEMBER) == "6"
        mark(a, 7)
        assert b.audit_latest(MEMBER) == "7"
    finally:
        b.close()
        a.close()


@pytest.mark.parametrize("edit", ["value", "removed"])
def test_newer_mark_edited_before_the_checkpoint_fails_closed(deployment: Path, edit: str) -> None:
    """The attacker lowers (or removes) the newest recorded number to make an older
    state copy look current: the chain from the line found to the checkpoint breaks."""
    with open_hsm(deployment) as hsm:
        mark(hsm, 10)
        mark(hsm, 11, filler=2)
    log = deployment.parent / "audit.log"
    data = lines(deployment)
    idx = max(i for i, raw in enumerate(data) if b'"state_seq":"11"' in raw)
    if edit == "value":
        data[idx] = data[idx].replace(b'"state_seq":"11"', b'"state_seq":"10"')
    else:
        data[idx] = data[idx].replace(b'"state_seq":"11"', b'"state_sex":"11"')
    log.write_bytes(b"".join(data))
    # the edit is before the checkpoint: the handle opens, latest() finds it
    with open_hsm(deployment) as hsm, pytest.raises(AuditStateMismatch):
        hsm.audit_latest(MEMBER)


def test_forged_line_after_the_frontier_fails_closed(deployment: Path) -> None:
    with open_hsm(deployment) as hsm:
        mark(hsm, 1)
        assert hsm.audit_latest(MEMBER) == "1"
        last = json.loads(lines(deployment)[-1])
        del last["mac"]
        forged = dict(last, seq=last["seq"] + 1, detail={MEMBER: "999"})
        body = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
        line = body[:-1] + b',"mac":"' + b"ab" * 32 + b'"}\n'  # well formed, no key
        with (deployment.parent / "audit.log").open("ab") as f:
            f.write(line)
        with pytest.raises(AuditStateMismatch):
            hsm.audit_latest(MEMBER)


def test_garbage_line_after_the_frontier_fails_closed(deployment: Path) -> None:
    with open_hsm(deployment) as hsm:
        mark(hsm, 1)
        assert hsm.audit_latest(MEMBER) == "1"
        with (deployment.parent / "audit.log").open("ab") as f:
            f.write(b'{"detail":{"state_seq":"999"}}\n')
        with pytest.raises(AuditError):
            hsm.audit_latest(MEMBER)


def test_no_entry_has_it(deployment: Path) -> None:
    with open_hsm(deployment) as hsm:
        mark(hsm, 0, filler=5)
    with open_hsm(deployment, passphrase=PASSPHRASE) as hsm:
        assert hsm.audit_latest("never_written") is None
        assert hsm.audit_latest(MEMBER) == "0"
