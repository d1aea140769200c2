"""The service's limits: per-client token buckets, the bounded worker gate, and the store
of idempotent results. All of it lives on the event loop (one thread): no locks.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from anyhsm.errors import IdempotencyConflict, ServiceBusy


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; ``rate`` 0: no limit."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._at = clock()

    def take(self) -> float | None:
        """Take one token: None when there was one, else the seconds until there is."""
        if self.rate <= 0:
            return None
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return (1.0 - self._tokens) / self.rate


class Gate:
    """At most ``running + pending`` operations admitted at once (``running`` of them in
    the worker threads, the rest queued for one); past that, :class:`ServiceBusy` at once
    (503 with ``Retry-After``) instead of a queue that grows without bound. A slot is
    given back when the operation's thread finishes, not when its request gives up (a
    timed-out operation still occupies its worker), so a stuck provider cannot pile up
    threads or work."""

    def __init__(self, running: int, pending: int) -> None:
        self.running = running
        self.limit = running + pending
        self.admitted = 0
        self.closed = False

    def admit(self) -> None:
        if self.closed:
            raise ServiceBusy("the service is shutting down", hint="retry on another instance")
        if self.admitted >= self.limit:
            raise ServiceBusy(
                f"the service is busy ({self.admitted} requests running or waiting)",
                hint="retry after the time Retry-After says",
                retry_after=1.0,
            )
        self.admitted += 1

    def done(self) -> None:
        """The slot of an admitted operation whose thread has finished (or never ran)."""
        self.admitted -= 1


Stored = tuple[int, bytes]
"""An idempotent result: HTTP status and the exact response body."""


@dataclass
class _Entry:
    request_hash: bytes
    created: float
    result: asyncio.Future[Stored] = field(repr=False)


class IdempotencyStore:
    """Results of requests that carried an ``Idempotency-Key``, by (client, key): the
    same request again gets the stored answer (or waits for the first one still running)
    instead of signing twice; the same key with another request is refused
    (:class:`IdempotencyConflict`, 422). Bounded: ``capacity`` entries, each kept for
    ``ttl_s``; the oldest go first. In memory: a restart forgets them (documented)."""

    def __init__(
        self, capacity: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.created < self.ttl_s:
                break
            del self._entries[key]

    def claim(
        self, client: str, key: str, request_hash: bytes
    ) -> tuple[asyncio.Future[Stored], bool]:
        """(the result's future, True if this request is the first and must compute it)."""
        now = self._clock()
        self._expire(now)
        entry = self._entries.get((client, key))
        if entry is not None:
            if entry.request_hash != request_hash:
                raise IdempotencyConflict(
                    "this Idempotency-Key was already used for another request",
                    hint="use a new key for a new request; the same key only for a retry",
                )
            return entry.result, False
        fut: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()
        self._entries[(client, key)] = _Entry(request_hash, now, fut)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return fut, True

    def forget(self, client: str, key: str, fut: asyncio.Future[Stored]) -> None:
        """Drop an entry whose request failed in a way a retry should not inherit (the
        service was busy, the provider unavailable...): the retry runs again."""
        entry = self._entries.get((client, key))
        if entry is not None and entry.result is fut:
            del self._entries[(client, key)]
