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
import getpass
import logging
import os
import secrets
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from anyhsm.errors import ConfigError, LockTimeout, SecretFileExposed
from anyhsm.secret import SecretBytes, wipe
from anyhsm.types import Environment

log = logging.getLogger("anyhsm")

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


# --- secret files ---------------------------------------------------------------------

MAX_SECRET_FILE_BYTES = 64 * 1024
"""No secret anyhsm reads (passphrase, PIN, mnemonic, xprv, WIF, hex key) is near this;
a larger file is a mistake (or an attempt to exhaust memory) and is refused unread."""

STDIN = "-"
"""The name that makes :func:`read_secret_source` read standard input."""


def check_secret_mode(
    path: Path | str, mode: int, what: str, environment: Environment, *, fix: str | None = None
) -> None:
    """The one rule for every secret file: group or others may not access it.

    Refused with :class:`SecretFileExposed` in staging and production; a warning in
    development (where test fixtures and demos live). Used for the keystore passphrase
    file (config and ``--passphrase-file``), the PKCS#11 PIN file, the BIP39 passphrase
    file and the files ``key import`` reads secrets from.
    """
    if not mode & 0o077:
        return
    fix = fix or f"chmod 600 {path}"
    text = (
        f"the {what} file {path} is accessible by group or others (mode {stat.S_IMODE(mode):03o})"
    )
    if environment is not Environment.DEVELOPMENT:
        raise SecretFileExposed(
            f"{text}; refused in {environment.value}",
            hint=fix,
        )
    log.warning("anyhsm: %s; this is refused in staging and production (%s)", text, fix)


def _read_fd(fd: int, size_hint: int, what: str, where: str) -> SecretBytes:
    """Read ``fd`` to its end into a SecretBytes, trailing newlines (LF/CRLF) removed.

    The bytes go straight into a bytearray that is wiped after the copy; nothing of them
    ever reaches an error message.
    """
    buf = bytearray(min(max(size_hint, 0), MAX_SECRET_FILE_BYTES) + 1)
    view = memoryview(buf)
    try:
        n = 0
        while True:
            if n == len(buf):
                if len(buf) > MAX_SECRET_FILE_BYTES:
                    raise ConfigError(
                        f"the {what} {where} is larger than {MAX_SECRET_FILE_BYTES} bytes",
                        hint="point it at the file that holds only the secret",
                    )
                grown = bytearray(min(len(buf) * 2, MAX_SECRET_FILE_BYTES + 1))
                grown[:n] = view[:n]
                view.release()
                wipe(buf)
                buf, view = grown, memoryview(grown)
            got = os.readv(fd, [view[n:]])
            if got == 0:
                break
            n += got
        while n and buf[n - 1] in (0x0A, 0x0D):
            n -= 1
        out = SecretBytes(n)
        out.buffer[:] = view[:n]
        return out
    finally:
        view.release()
        wipe(buf)


def read_secret_file(path: Path, what: str, environment: Environment) -> SecretBytes:
    """The secret held in ``path``: a regular file (not a symlink), no larger than
    :data:`MAX_SECRET_FILE_BYTES`, passing :func:`check_secret_mode`.

    The mode is checked on the opened descriptor, so the file checked is the file read.
    Errors name the file and the reason, never its bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ConfigError(
            f"the {what} file {path} does not exist",
            hint="create it with mode 600, or fix the path",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"the {what} file {path} cannot be opened: {exc.strerror}",
            hint="it must be a regular file (not a symlink) readable by this user",
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"the {what} file {path} is not a regular file")
        check_secret_mode(path, st.st_mode, what, environment)
        if st.st_size > MAX_SECRET_FILE_BYTES:
            raise ConfigError(
                f"the {what} file {path} is larger than {MAX_SECRET_FILE_BYTES} bytes",
                hint="point it at the file that holds only the secret",
            )
        return _read_fd(fd, st.st_size, what, f"file {path}")
    finally:
        os.close(fd)


def read_secret_source(
    source: str, what: str, environment: Environment, *, prompt: str | None = None
) -> SecretBytes:
    """A secret from a file, or from standard input when ``source`` is ``-``.

    Standard input on a terminal is a prompt without echo; a pipe is read to its end;
    a file redirected to standard input is held to the same mode rule as a named file.
    """
    if source != STDIN:
        return read_secret_file(Path(source), what, environment)
    stdin = sys.stdin
    if stdin is None:
        raise ConfigError(f"no standard input to read the {what} from")
    if stdin.isatty():
        text = getpass.getpass(prompt or f"{what[:1].upper()}{what[1:]}: ")
        return SecretBytes.take(bytearray(text.encode("utf-8")))
    fd = stdin.fileno()
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        check_secret_mode(
            "on standard input",
            st.st_mode,
            what,
            environment,
            fix="chmod 600 the file redirected to standard input",
        )
    return _read_fd(fd, st.st_size if stat.S_ISREG(st.st_mode) else 4096, what, "on standard input")


LOCK_TIMEOUT_S = 10.0
"""How long :func:`file_lock` waits for another process by default (read at each call)."""

LOCK_WAIT_WARNING_S = 0.5
"""After this long waiting, :func:`file_lock` logs (once) that it waits, and for whom."""

_PID_BYTES = 32

_warned: dict[str, int] = {}
"""Lock files this process has warned about and still waits for (count of waiters): a
second thread waiting on the same lock (the audit flusher behind a command) says nothing."""
_warned_lock = threading.Lock()


_told: dict[str, float] = {}
"""When this process last warned about each lock file: waiting again within
:data:`LOCK_WARNING_REPEAT_S` (a command's close after its open, the audit flusher after
a command, the holder's pid read before and after it was written) is not news."""
LOCK_WARNING_REPEAT_S = 60.0


def _warn_waiting(path: Path, holder: int | None, limit: float) -> bool:
    """Log that this process waits for ``path`` unless one of its threads already said so
    recently; True when this call counted itself as a waiter (the caller then calls
    :func:`_done_waiting`)."""
    key = str(path)
    now = time.monotonic()
    with _warned_lock:
        recent = now - _told.get(key, -LOCK_WARNING_REPEAT_S) < LOCK_WARNING_REPEAT_S
        first = key not in _warned and not recent
        _warned[key] = _warned.get(key, 0) + 1
        if first:
            _told[key] = now
    if first:
        log.warning(
            "anyhsm: waiting for the lock %s held by %s (up to %.0f s)",
            path,
            f"pid {holder}" if holder is not None else "another process",
            limit,
        )
    return True


def _done_waiting(path: Path) -> None:
    key = str(path)
    with _warned_lock:
        left = _warned.get(key, 1) - 1
        if left > 0:
            _warned[key] = left
        else:
            _warned.pop(key, None)


def _lock_holder(fd: int) -> int | None:
    """The pid the exclusive holder wrote into the lock file, or None (unknown, a shared
    holder, a holder from before pids were written, or a write in progress)."""
    try:
        raw = os.pread(fd, _PID_BYTES, 0)
    except OSError:
        return None
    text = raw.split(b"\n", 1)[0].strip()
    if not text.isdigit() or len(text) > 10:
        return None
    pid = int(text)
    return pid if pid > 0 else None


def _record_holder(fd: int) -> None:
    """Write this process's pid into the lock file, after the exclusive flock is taken
    (truncate first: the file is shared, the previous holder's pid may be longer)."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:  # naming the holder is a courtesy: never fail the lock for it
        log.debug("anyhsm: could not record the lock holder in the lock file: %s", e)


def _release_holder(fd: int) -> None:
    """Clear the pid before the flock goes, so the file never names a past holder."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)


def _lock_timeout(path: Path, timeout_s: float, holder: int | None) -> LockTimeout:
    who = f"process {holder}" if holder is not None else "another process"
    find = (
        f"see what it is with 'ps -o pid,etime,args -p {holder}'"
        if holder is not None
        else f"find it with 'fuser -v {path}' or 'lsof {path}'"
    )
    return LockTimeout(
        f"could not lock {path} within {timeout_s:.1f} s: {who} holds it",
        holder_pid=holder,
        hint=f"{find}; it may be a long key-derivation or a stuck anyhsm command: "
        "retry when it has finished, or stop it",
    )


@contextlib.contextmanager
def file_lock(
    path: Path, *, exclusive: bool = True, timeout_s: float | None = None
) -> Iterator[None]:
    """Advisory ``flock`` on ``path`` (created 0600), held for the ``with`` block.

    Works across processes; the kernel drops it if the holder dies, so a
    crashed writer never leaves the store locked. An exclusive holder writes its pid
    into the file, so a process that has to wait can say for whom: after
    :data:`LOCK_WAIT_WARNING_S` it logs a warning once, and :class:`LockTimeout` (after
    ``timeout_s``, default :data:`LOCK_TIMEOUT_S`) names the holder.
    """
    limit = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    locked = False
    warned = False
    try:
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        start = time.monotonic()
        deadline = start + limit
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                now = time.monotonic()
                if now >= deadline:
                    raise _lock_timeout(path, limit, _lock_holder(fd)) from None
                if not warned and now - start >= LOCK_WAIT_WARNING_S:
                    warned = _warn_waiting(path, _lock_holder(fd), limit)
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        if warned:
            warned = False
            _done_waiting(path)
        locked = exclusive
        if locked:
            _record_holder(fd)
        yield
    finally:
        if warned:
            _done_waiting(path)
        if locked:
            _release_holder(fd)
        os.close(fd)  # closing releases the flock
