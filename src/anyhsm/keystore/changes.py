"""The keystore's change counter: how a signing process learns, for the price of one
``pread``, that no other anyhsm process changed the store since it last looked.

The signing path must never use a key that another process deleted (or moved away by a
master-key rotation) once that delete has returned. Checking that the key's record file
still exists costs a ``stat`` per signature, a tenth of a software signature. Instead every
writer adds one to a counter in ``.changes`` beside the header when it leaves the write
lock, after all its effects (records removed, manifest and header replaced) are on disk;
a reader compares the counter with the value it read before its last full look at the
record. Equal means no anyhsm writer finished a change since.

What the counter cannot see (a record removed by hand, ``.changes`` replaced, a writer of
an older anyhsm) is caught by the full look a reader takes anyway once its last one is
:data:`RECHECK_S` old, and the full look also notices a replaced counter file. The counter
is a signal, not an authority: it carries no secret and is not authenticated; forging it
can only make readers look more often, and holding it still delays a reader by at most
:data:`RECHECK_S`. It is not fsynced: after a reboot no process holds a stale view.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

CHANGES_FILE = ".changes"
RECHECK_S = 0.1
"""The longest a reader trusts an unchanged counter before it looks at the record itself."""

_COUNTER = struct.Struct("<Q")


class ChangeCounter:
    """The counter file of one keystore directory: :meth:`stamp` for readers (one
    ``pread`` on a descriptor opened once), :meth:`bump` for writers (under the keystore's
    write lock)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / CHANGES_FILE
        self._fd: int | None = None
        self._ino: int | None = None
        self._lock = threading.Lock()

    def stamp(self) -> bytes | None:
        """The counter's bytes as they are now; None when the file cannot be read (then a
        reader looks at the record every time)."""
        fd = self._fd
        if fd is None:
            fd = self._open()
            if fd is None:
                return None
        try:
            return os.pread(fd, _COUNTER.size, 0)
        except OSError:
            return None

    def reopen_if_replaced(self) -> None:
        """Part of a reader's full look: if ``.changes`` is no longer the file this
        descriptor reads (replaced, or removed), read the one at the path from now on."""
        try:
            ino = os.stat(self.path).st_ino
        except OSError:
            ino = None
        if ino != self._ino:
            self.close()

    def bump(self) -> None:
        """Add one (the caller holds the keystore's write lock, so writers do not race).
        A failure is ignored: readers then wait for their periodic full look."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError:
            return
        try:
            raw = os.pread(fd, _COUNTER.size, 0)
            value = _COUNTER.unpack(raw)[0] if len(raw) == _COUNTER.size else 0
            os.pwrite(fd, _COUNTER.pack((value + 1) & 0xFFFFFFFFFFFFFFFF), 0)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _open(self) -> int | None:
        with self._lock:
            if self._fd is not None:
                return self._fd
            try:
                fd = os.open(
                    self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
                )
            except OSError:
                return None
            self._ino = os.fstat(fd).st_ino
            self._fd = fd
            return fd

    def close(self) -> None:
        with self._lock:
            fd, self._fd, self._ino = self._fd, None, None
        if fd is not None:
            os.close(fd)
