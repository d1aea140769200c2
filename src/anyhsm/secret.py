"""A zeroisable buffer for secret bytes.

What Python can and cannot guarantee (see docs/security-model.md):
- The bytes live in one ``bytearray`` that we overwrite with zeros on
  :meth:`SecretBytes.wipe`, on ``close`` of its owner, and when used as a
  context manager. Where the OS allows, its pages are ``mlock``-ed so they are
  not written to swap, and marked ``MADV_DONTDUMP`` so a core dump leaves them out
  (both best effort, both reported in ``health``; staging and production also make the
  whole process non-dumpable, see :mod:`anyhsm.hardening`).
- Python may still have made copies we cannot reach: the ``bytes`` a caller
  passed in, intermediate objects inside ``cryptography`` (its AEAD keys), the
  garbage collector moving nothing but not clearing freed memory either. We
  avoid copies on hot paths (secrets are handed to libsecp256k1 by pointer),
  but a memory disclosure of the process can still reveal keys in use.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hmac
import mmap
import sys
from types import TracebackType
from typing import Self

_libc: ctypes.CDLL | None
try:
    _libc_name = ctypes.util.find_library("c")
    _libc = ctypes.CDLL(_libc_name, use_errno=True) if _libc_name else None
except OSError:  # pragma: no cover - exotic platforms
    _libc = None

_mlock_state = {"attempted": 0, "locked": 0}
_dontdump_state = {"attempted": 0, "marked": 0}
MADV_DONTDUMP = getattr(mmap, "MADV_DONTDUMP", 16)  # Linux value; the module has it on Linux
_PAGE = mmap.PAGESIZE


def mlock_status() -> str:
    """'locked', 'partial', 'unavailable' or 'unused', for health reports."""
    if _libc is None or not sys.platform.startswith("linux"):
        return "unavailable"
    if _mlock_state["attempted"] == 0:
        return "unused"
    if _mlock_state["locked"] == _mlock_state["attempted"]:
        return "locked"
    if _mlock_state["locked"] == 0:
        return "unavailable"
    return "partial"


def dontdump_status() -> str:
    """'marked', 'partial', 'unavailable' or 'unused': whether secret buffers are
    excluded from core dumps (``MADV_DONTDUMP``), for health reports."""
    if _libc is None or not sys.platform.startswith("linux"):
        return "unavailable"
    if _dontdump_state["attempted"] == 0:
        return "unused"
    if _dontdump_state["marked"] == _dontdump_state["attempted"]:
        return "marked"
    if _dontdump_state["marked"] == 0:
        return "unavailable"
    return "partial"


def _buffer_address(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


def _mlock(buf: bytearray) -> bool:
    if _libc is None or not buf or not sys.platform.startswith("linux"):
        return False
    _mlock_state["attempted"] += 1
    try:
        ok = bool(
            _libc.mlock(ctypes.c_void_p(_buffer_address(buf)), ctypes.c_size_t(len(buf))) == 0
        )
    except (AttributeError, OSError):
        ok = False
    if ok:
        _mlock_state["locked"] += 1
    return ok


def _dontdump(buf: bytearray) -> bool:
    """Mark the pages holding ``buf`` MADV_DONTDUMP (whole pages: madvise needs an
    aligned start; neighbours on those pages are left out of a core too, which is fine).
    The mark stays after the buffer is wiped: the pages may hold other secrets."""
    if _libc is None or not buf or not sys.platform.startswith("linux"):
        return False
    _dontdump_state["attempted"] += 1
    try:
        addr = _buffer_address(buf)
        start = addr & ~(_PAGE - 1)
        end = (addr + len(buf) + _PAGE - 1) & ~(_PAGE - 1)
        ok = bool(
            _libc.madvise(
                ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(MADV_DONTDUMP)
            )
            == 0
        )
    except (AttributeError, OSError):
        ok = False
    if ok:
        _dontdump_state["marked"] += 1
    return ok


def _munlock(buf: bytearray) -> None:
    if _libc is None or not buf:
        return
    with contextlib.suppress(AttributeError, OSError):
        _libc.munlock(ctypes.c_void_p(_buffer_address(buf)), ctypes.c_size_t(len(buf)))


def wipe(buf: bytearray | memoryview) -> None:
    """Overwrite a mutable buffer with zeros in place."""
    view = memoryview(buf).cast("B")
    view[:] = bytes(len(view))  # same-length slice assignment writes in place


class SecretBytes:
    """Secret material in a wipeable, optionally mlock-ed bytearray.

    Never printed: ``repr`` and ``str`` show only the length. Compare with
    :meth:`equals`, which is constant-time.
    """

    __slots__ = ("_buf", "_locked", "_wiped")

    def __init__(self, data: bytes | bytearray | memoryview | int) -> None:
        size = data if isinstance(data, int) else len(data)
        self._buf = bytearray(size)
        self._locked = _mlock(self._buf)
        _dontdump(self._buf)
        if not isinstance(data, int):
            self._buf[:] = data
        self._wiped = False

    @classmethod
    def take(cls, data: bytearray) -> SecretBytes:
        """Copy ``data`` in and wipe the caller's buffer."""
        out = cls(data)
        wipe(data)
        return out

    @property
    def buffer(self) -> bytearray:
        """The live buffer (no copy). Do not keep references past ``wipe``."""
        if self._wiped:
            raise ValueError("secret already wiped")
        return self._buf

    def reveal(self) -> bytes:
        """An immutable copy, for APIs that only take ``bytes``; avoid on hot paths."""
        return bytes(self.buffer)

    @property
    def locked(self) -> bool:
        return self._locked

    @property
    def wiped(self) -> bool:
        return self._wiped

    def equals(self, other: SecretBytes | bytes | bytearray) -> bool:
        data = other.buffer if isinstance(other, SecretBytes) else other
        return hmac.compare_digest(self.buffer, data)

    def wipe(self) -> None:
        if self._wiped:
            return
        wipe(self._buf)
        if self._locked:
            _munlock(self._buf)
        self._wiped = True

    def __len__(self) -> int:
        return len(self._buf)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __del__(self) -> None:
        # Nothing useful can be done about a failure during interpreter teardown.
        with contextlib.suppress(Exception):
            self.wipe()

    def __repr__(self) -> str:
        return f"<SecretBytes len={len(self._buf)}{' wiped' if self._wiped else ''}>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:  # pragma: no cover - guard against misuse
        raise TypeError("compare secrets with SecretBytes.equals (constant time)")

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("SecretBytes cannot be pickled")
