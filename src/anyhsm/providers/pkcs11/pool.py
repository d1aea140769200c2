"""A bounded pool of PKCS#11 sessions, one borrower at a time per session.

A session is single-threaded by the standard: the pool hands each one to one
thread, opens sessions lazily up to ``size``, and makes further borrowers wait
(bounded by the call timeout). Each pooled session remembers the key objects it
has looked up, so signing does not search the token every time.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from anyhsm.errors import HsmError, ProviderTimeout, ProviderUnavailable

if TYPE_CHECKING:
    from pkcs11 import Session


@dataclass(eq=False)
class PooledSession:
    """A session plus what it has cached; valid only in the module generation it was
    opened in (after a re-initialisation the handle number may belong to another)."""

    session: Session
    generation: int
    objects: dict[bytes, object] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolStats:
    size: int
    open: int
    idle: int
    in_use: int
    opened_total: int
    waits: int


class SessionPool:
    """Up to ``size`` sessions, opened on demand by ``opener``, closed by ``closer``."""

    def __init__(
        self,
        size: int,
        opener: Callable[[], PooledSession],
        closer: Callable[[PooledSession], None],
        timeout: float,
    ) -> None:
        self.size = size
        self._opener = opener
        self._closer = closer
        self._timeout = timeout
        self._cond = threading.Condition(threading.Lock())
        self._idle: list[PooledSession] = []
        self._open = 0
        self._in_use = 0
        self._opened_total = 0
        self._waits = 0
        self._closed = False
        self._close_returned = True

    def checkout(self) -> PooledSession:
        with self._cond:
            while True:
                if self._closed:
                    raise ProviderUnavailable(
                        "the PKCS#11 session pool was closed", hint="retry; anyhsm reconnects"
                    )
                if self._idle:
                    self._in_use += 1
                    return self._idle.pop()
                if self._open < self.size:
                    self._open += 1
                    self._in_use += 1
                    break
                self._waits += 1
                if not self._cond.wait(self._timeout):
                    raise ProviderTimeout(
                        f"no PKCS#11 session became free within {self._timeout:g} s "
                        f"(pool_size {self.size})",
                        hint="raise pool_size (if the token allows more sessions) or timeout_s",
                    )
        try:
            ps = self._opener()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._in_use -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._opened_total += 1
        return ps

    def checkin(self, ps: PooledSession) -> None:
        with self._cond:
            self._in_use -= 1
            if not self._closed:
                self._idle.append(ps)
                self._cond.notify()
                return
            self._open -= 1
            close = self._close_returned
        if close:
            self._close_quietly(ps)

    def discard(self, ps: PooledSession, *, close: bool) -> None:
        """Give up a borrowed session that broke; ``close`` it only if its handle is
        still ours (a handle the module already closed may now be someone else's)."""
        with self._cond:
            self._in_use -= 1
            self._open -= 1
            self._cond.notify()
        if close:
            self._close_quietly(ps)

    def close(self, *, close_sessions: bool) -> None:
        """Close idle sessions now (if their handles are still ours); borrowed ones are
        closed when they come back."""
        with self._cond:
            self._closed = True
            self._close_returned = close_sessions
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        if close_sessions:
            for ps in idle:
                self._close_quietly(ps)

    def _close_quietly(self, ps: PooledSession) -> None:
        with contextlib.suppress(HsmError):
            self._closer(ps)

    def stats(self) -> PoolStats:
        with self._cond:
            return PoolStats(
                size=self.size,
                open=self._open,
                idle=len(self._idle),
                in_use=self._in_use,
                opened_total=self._opened_total,
                waits=self._waits,
            )
