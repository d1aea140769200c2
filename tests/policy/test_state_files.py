"""The state store keeps its lock and slot files open between transactions, trusting
them while the directory's stamp is unchanged: a slot or the lock file replaced behind
its back must still be seen, on real files, by another store object (another process's
view) doing it."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

import pytest

from anyhsm.policy import state as state_mod
from anyhsm.policy.state import LOCK_FILE, SLOT_FILES, FileStateStore, PolicyState

KEY = bytes(range(32))


def _store(directory: Path) -> FileStateStore:
    return FileStateStore(directory, KEY, durable=False)


def _commit(store: FileStateStore) -> int:
    with store.transaction() as txn:
        return txn.commit(txn.read_or_new()).seq


def _read(store: FileStateStore) -> PolicyState:
    with store.transaction() as txn:
        return txn.read()


def _age(directory: Path) -> None:
    """Set the directory's modification time an hour back, so the next change to it
    shows in its stamp whatever the file system clock's tick."""
    st = os.stat(directory)
    os.utime(directory, ns=(st.st_atime_ns, st.st_mtime_ns - 3600 * 10**9))


@pytest.fixture
def trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust a stamp however recent (the racy rule, tested on its own below, would
    otherwise make every transaction of a fresh directory look by path)."""
    monkeypatch.setattr(state_mod, "_RACY_NS", -(10**18))


def test_kept_descriptors_are_used_while_the_directory_is_unchanged(
    tmp_path: Path, trusted: None
) -> None:
    store = _store(tmp_path / "s")
    _commit(store)
    _commit(store)  # both slots exist now
    _age(tmp_path / "s")
    _read(store)  # takes the stamp
    files = store.files()
    kept = (files.lock, *files.slots)
    assert files.stamp is not None
    assert _commit(store) == 3 and _read(store).seq == 3
    assert (store.files().lock, *store.files().slots) == kept  # nothing opened again


def test_a_slot_replaced_by_rename_is_read_at_its_path(tmp_path: Path, trusted: None) -> None:
    directory = tmp_path / "s"
    a, b = _store(directory), _store(directory)
    for _ in range(3):
        _commit(a)
    _age(directory)
    assert _read(a).seq == 3  # a keeps its descriptors, stamp taken
    # b writes a newer state into fresh files and renames them over both slots
    staging = tmp_path / "staging"
    staging.mkdir()
    newer = _store(staging)
    for _ in range(7):
        _commit(newer)
    for name in SLOT_FILES:
        os.replace(staging / name, directory / name)
    assert _read(b).seq == 7
    assert _read(a).seq == 7  # not the old inodes a had open
    assert _commit(a) == 8 and _read(b).seq == 8  # and a's commit lands in the new files


def test_a_replaced_lock_file_is_locked_at_its_path(tmp_path: Path, trusted: None) -> None:
    directory = tmp_path / "s"
    store = _store(directory)
    _commit(store)
    _commit(store)
    _age(directory)
    _read(store)
    old = store.files().lock
    assert old >= 0
    os.unlink(directory / LOCK_FILE)
    (directory / LOCK_FILE).touch(mode=0o600)  # another process made a new lock file
    probe = os.open(directory / LOCK_FILE, os.O_RDWR)
    try:
        # the store holds the lock of the file at the path, not of the one it kept
        with store.transaction(), pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the block
        fcntl.flock(probe, fcntl.LOCK_UN)
    finally:
        os.close(probe)
    kept = store.files().lock
    assert os.fstat(kept).st_ino == os.stat(directory / LOCK_FILE).st_ino  # kept from now on
    del old


def test_the_directory_removed_and_made_again_is_followed(tmp_path: Path, trusted: None) -> None:
    directory = tmp_path / "s"
    store = _store(directory)
    for _ in range(4):
        _commit(store)
    _age(directory)
    _read(store)
    shutil.rmtree(directory)
    other = _store(directory)
    assert _commit(other) == 1
    assert _read(store).seq == 1  # the new directory's state, not the removed files'


def test_a_recently_changed_directory_is_looked_at_by_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the fixture: a directory changed within the racy interval gives no stamp,
    so every transaction opens the slots by path (a change in the same clock tick as the
    last one would not show in the directory's times); once the change is older, the
    stamp is taken and trusted."""
    store = _store(tmp_path / "s")
    _commit(store)
    _commit(store)
    _read(store)
    assert store.files().stamp is None
    later = time.time_ns() + 2 * state_mod._RACY_NS
    monkeypatch.setattr(state_mod.time, "time_ns", lambda: later)
    _read(store)
    assert store.files().stamp is not None


def test_a_forked_child_opens_its_own_descriptors(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    _commit(store)
    parent_lock = store.files().lock
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            ok = store.files().lock != parent_lock and _commit(store) == 2
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert _read(store).seq == 2


def test_stores_made_for_one_call_leave_no_descriptor_open(tmp_path: Path) -> None:
    """``policy check``, approvals and the raw-digest guard each make a store for one
    call; a long-running service makes thousands. Each store's descriptors close with it
    (before, every such store left its lock file open for the life of the process)."""
    import gc

    directory = tmp_path / "s"
    _commit(_store(directory))
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(200):
        store = _store(directory)
        _read(store)
        del store
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) - before <= 0
    kept = _store(directory)
    _read(kept)
    files = kept.files()
    lock = files.lock
    kept.drop_files()  # closes them at once
    assert files.slots == [None, None]
    with pytest.raises(OSError):
        os.fstat(lock)


def test_a_failure_while_looking_by_path_releases_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the slots cannot be opened again (descriptors exhausted) after the
    lock was taken; the transaction fails and the lock is not left held."""
    import errno

    directory = tmp_path / "s"
    store = _store(directory)
    _commit(store)  # a fresh directory: every transaction looks by path

    def exhausted(self: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(state_mod._Files, "reopen_slots", exhausted)
    with pytest.raises(OSError), store.transaction():
        pass
    probe = os.open(directory / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free
    finally:
        os.close(probe)
