"""Listeners told of every spending policy decision (the service's Prometheus counters).

A front end that keeps metrics subscribes a function; it is called, in the deciding
thread, with each :class:`~anyhsm.policy.engine.Decision` (its ``rules`` with their
``decision``, its ``budgets`` with ``limit``/``used``/``amount``). A listener that raises
is dropped from that call's notification, never from the decision.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anyhsm.policy.engine import Decision

Listener = Callable[["Decision"], None]

_lock = threading.Lock()
_listeners: list[Listener] = []


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call ``listener`` with every decision from now on; returns the unsubscribe."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock, contextlib.suppress(ValueError):
            _listeners.remove(listener)

    return unsubscribe


def notify(decision: Decision) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        with contextlib.suppress(Exception):
            listener(decision)


__all__ = ["Listener", "notify", "subscribe"]
