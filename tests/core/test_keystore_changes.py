"""The keystore's change counter (anyhsm.keystore.changes): the signing path skips its
per-signature ``stat`` of the key's record only while no anyhsm writer changed the store,
and never for longer than ``RECHECK_S``.

Attacked on real files: a key deleted by another process is refused at once; a record
removed by hand (no counter bump) or a replaced counter file is noticed within the window;
without a readable counter every signature looks at the record."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from anyhsm import open_hsm
from anyhsm.errors import HsmError, KeyNotFound
from anyhsm.keystore import changes
from anyhsm.keystore.changes import CHANGES_FILE, RECHECK_S, ChangeCounter

DIGEST = bytes.fromhex("ab" * 32)

_DELETE = """
import sys
from anyhsm import open_hsm
with open_hsm(sys.argv[1]) as hsm:
    hsm.delete_key(sys.argv[2])
print("deleted")
"""


class Clock:
    """time.monotonic of the keystore module, moved by the test (never slept)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr("anyhsm.keystore.store.time.monotonic", c)
    return c


@pytest.fixture
def looks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every full look the keystore takes at a key record file (its os.path.exists)."""
    seen: list[str] = []
    real = os.path.exists

    def exists(path: str) -> bool:
        if str(path).endswith(".json") and "/keys" in str(path):
            seen.append(str(path))
        return real(path)

    monkeypatch.setattr("os.path.exists", exists)
    return seen


def delete_in_another_process(dep: Path, key_id: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _DELETE, str(dep), key_id], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def record_path(dep: Path, key_id: str) -> Path:
    hits = list((dep.parent / "keystore").glob(f"keys*/{key_id}.json"))
    assert len(hits) == 1
    return hits[0]


def test_unchanged_store_signs_without_looking_again(
    deployment: Path, clock: Clock, looks: list[str]
) -> None:
    with open_hsm(deployment) as hsm:
        key = hsm.generate_key("hot")
        hsm.sign(key.id, DIGEST)
        looks.clear()
        for _ in range(50):
            hsm.sign(key.id, DIGEST)
        assert looks == []  # the counter answered: nothing changed
        clock.now += RECHECK_S + 0.01
        hsm.sign(key.id, DIGEST)
        assert len(looks) == 1  # the window ran out: one full look


def test_key_deleted_by_another_process_is_refused_at_once(deployment: Path, clock: Clock) -> None:
    with open_hsm(deployment) as hsm:
        key = hsm.generate_key("revoked")
        hsm.sign(key.id, DIGEST)
        hsm.sign(key.id, DIGEST)  # cached and verified: the fast path is armed
        delete_in_another_process(deployment, key.id)
        # No clock movement: the other process's delete bumped the counter.
        with pytest.raises(KeyNotFound):
            hsm.sign(key.id, DIGEST)
        with pytest.raises(KeyNotFound):
            hsm.sign("revoked", DIGEST)


def test_record_removed_by_hand_is_noticed_within_the_window(
    deployment: Path, clock: Clock
) -> None:
    with open_hsm(deployment) as hsm:
        key = hsm.generate_key("unlinked")
        hsm.sign(key.id, DIGEST)
        record_path(deployment, key.id).unlink()  # not through anyhsm: no counter bump
        clock.now += RECHECK_S + 0.01
        with pytest.raises(HsmError) as refused:
            hsm.sign(key.id, DIGEST)
        assert refused.value.code in {"key_not_found", "record_missing", "keystore_corrupted"} or (
            "missing" in refused.value.message
        ), refused.value.code


def test_replaced_counter_file_is_reopened(deployment: Path, clock: Clock) -> None:
    """An attacker swaps .changes for a file of its own so that this process's descriptor
    reads a counter no writer bumps any more: the next full look notices the new inode,
    and from then on another process's delete is seen at once again."""
    ks_dir = deployment.parent / "keystore"
    with open_hsm(deployment) as hsm:
        key = hsm.generate_key("watched")
        other = hsm.generate_key("other")
        hsm.sign(key.id, DIGEST)
        counter = ks_dir / CHANGES_FILE
        planted = ks_dir / "planted"
        planted.write_bytes(counter.read_bytes())
        os.replace(planted, counter)  # readers' descriptor now reads the old, dead inode
        clock.now += RECHECK_S + 0.01
        hsm.sign(key.id, DIGEST)  # full look: reopens the counter at its path
        hsm.sign(other.id, DIGEST)
        delete_in_another_process(deployment, key.id)
        with pytest.raises(KeyNotFound):
            hsm.sign(key.id, DIGEST)


def test_unreadable_counter_means_a_look_every_time(
    deployment: Path, clock: Clock, looks: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ChangeCounter, "stamp", lambda self: None)
    with open_hsm(deployment) as hsm:
        key = hsm.generate_key("cold")
        hsm.sign(key.id, DIGEST)
        looks.clear()
        for _ in range(5):
            hsm.sign(key.id, DIGEST)
        assert len(looks) == 5
        record_path(deployment, key.id).unlink()
        with pytest.raises(HsmError):
            hsm.sign(key.id, DIGEST)  # no window at all without a counter


def test_counter_file_is_private_and_counts(tmp_path: Path) -> None:
    c = ChangeCounter(tmp_path)
    first = c.stamp()
    assert first == b""  # created empty by the first reader
    assert (tmp_path / CHANGES_FILE).stat().st_mode & 0o777 == 0o600
    c.bump()
    c.bump()
    second = c.stamp()
    assert second is not None and int.from_bytes(second, "little") == 2
    c.close()
    assert changes.RECHECK_S <= 0.25  # the documented bound of a missed signal
