"""Issue 10 item 8: a keystore locked by another process. The waiter says that it waits
(once, naming the holder's pid), gives up with :class:`LockTimeout` (exit 10, its own
status) naming the pid, and proceeds as soon as the holder lets go.

The holder is a real second process that takes the keystore's write lock (the lock every
keystore writer takes) and keeps it until told to stop; the waiter is the real CLI.
Timeouts only bound the tests; nothing asserts how long anything took.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from anyhsm import fsutil
from anyhsm.cli.main import main
from anyhsm.errors import LockTimeout
from anyhsm.keystore.store import LOCK_FILE

HOLDER = r"""
import os, sys, time
from pathlib import Path
from anyhsm.keystore import Keystore
from anyhsm.secret import SecretBytes

store, stop = Path(sys.argv[1]), Path(sys.argv[2])
ks = Keystore.load(store)
ks.unlock_with_passphrase(SecretBytes(os.environ["ANYHSM_PASSPHRASE"].encode()))
with ks._write_lock():
    print("LOCKED", os.getpid(), flush=True)
    deadline = time.monotonic() + 60  # bounded: never outlives a broken test
    while not stop.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
print("RELEASED", flush=True)
ks.close()
"""


class Holder:
    """A second process holding the keystore write lock until :meth:`release`."""

    def __init__(self, store: Path, workdir: Path) -> None:
        self.stop_file = workdir / "stop-holder"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(store), str(self.stop_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if line[:1] != ["LOCKED"]:
            self.proc.kill()
            raise AssertionError(f"holder did not lock: {line} {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.pid = int(line[1])

    def release(self) -> None:
        self.stop_file.touch()
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "RELEASED"
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def holder(deployment: Path, tmp_path: Path) -> Iterator[Holder]:
    h = Holder(deployment.parent / "keystore", tmp_path)
    yield h
    h.stop_file.touch()
    try:
        h.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        h.kill()


class _Waiting(logging.Handler):
    """Collects the 'waiting for the lock' warnings; sets an event at the first."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "waiting for the lock" in text:
            self.records.append(text)
            self.seen.set()


@pytest.fixture
def waiting() -> Iterator[_Waiting]:
    h = _Waiting()
    logger = logging.getLogger("anyhsm")
    logger.addHandler(h)
    yield h
    logger.removeHandler(h)


def test_the_holder_is_named_in_the_lock_file(holder: Holder, deployment: Path) -> None:
    lock = deployment.parent / "keystore" / LOCK_FILE
    assert lock.read_text().strip() == str(holder.pid)
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    holder.release()
    assert lock.read_text() == ""  # a released lock names no past holder


def test_key_create_says_it_waits_and_names_the_holder_when_it_gives_up(
    holder: Holder,
    deployment: Path,
    waiting: _Waiting,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(fsutil, "LOCK_TIMEOUT_S", 1.5)
    code = main(["--config", str(deployment), "key", "create", "--label", "k", "--json"])
    out, err = capsys.readouterr()
    assert code == 10, err
    error = json.loads(out)["error"]
    assert error["code"] == "lock_timeout"
    assert f"process {holder.pid} holds it" in error["message"]
    assert f"ps -o pid,etime,args -p {holder.pid}" in error["hint"]
    assert (
        waiting.records == [r for r in waiting.records if f"held by pid {holder.pid}" in r]
        and len(waiting.records) == 1
    )  # said once, with the pid
    holder.release()
    # nothing was damaged: the same command succeeds once the holder is gone
    code = main(["--config", str(deployment), "key", "create", "--label", "k", "--json"])
    assert code == 0, capsys.readouterr().err


def test_the_waiter_proceeds_when_the_holder_lets_go(
    holder: Holder,
    deployment: Path,
    waiting: _Waiting,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(fsutil, "LOCK_TIMEOUT_S", 60.0)  # bounds the test only
    codes: list[int] = []
    argv = ["--config", str(deployment), "key", "create", "--label", "late", "--json"]
    worker = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    worker.start()
    assert waiting.seen.wait(30), "the waiter never said it was waiting"
    assert str(holder.pid) in waiting.records[0]
    holder.release()
    worker.join(60)
    assert not worker.is_alive() and codes == [0], capsys.readouterr().err
    assert len(waiting.records) == 1


def test_a_killed_holder_leaves_nothing_locked(holder: Holder, deployment: Path) -> None:
    lock = deployment.parent / "keystore" / LOCK_FILE
    holder.kill()  # SIGKILL while holding: the kernel drops the flock
    with fsutil.file_lock(lock, timeout_s=30):  # bounded; taken at once in practice
        assert lock.read_text().strip() == str(os.getpid())


def test_lock_timeout_carries_the_pid(holder: Holder, deployment: Path) -> None:
    lock = deployment.parent / "keystore" / LOCK_FILE
    with pytest.raises(LockTimeout) as e, fsutil.file_lock(lock, timeout_s=0.2):
        pass
    assert e.value.holder_pid == holder.pid and e.value.exit_code == 10
