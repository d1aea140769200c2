"""Durable file primitives: atomic writes, directory fsync, inter-process locks.

A write is acknowledged only after the data, the rename and the directory
entry have reached the disk: temp file (created 0600, O_EXCL) -> write ->
fsync -> rename -> fsync directory. A crash at any point leaves either the
old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from anyhsm.errors import LockTimeout

TEMP_SUFFIX = ".tmp-anyhsm"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def remove_durably(path: Path) -> bool:
    """Unlink ``path`` and fsync its directory; False if it did not exist."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def clean_temp_files(directory: Path) -> int:
    """Remove temp files left by a crash mid-write (call while holding the lock)."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.endswith(TEMP_SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def readable_by_others(path: Path) -> bool:
    """True if group or others may read (or write) ``path``."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return bool(st.st_mode & (stat.S_IRWXG | stat.S_IRWXO))


@contextlib.contextmanager
def file_lock(path: Path, *, exclusive: bool = True, timeout_s: float = 10.0) -> Iterator[None]:
    """Advisory ``flock`` on ``path`` (created 0600), held for the ``with`` block.

    Works across processes; the kernel drops it if the holder dies, so a
    crashed writer never leaves the store locked.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + timeout_s
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"could not lock {path} within {timeout_s:.1f} s",
                        hint="another anyhsm process holds it; retry, or find the stuck process",
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        yield
    finally:
        os.close(fd)  # closing releases the flock
