"""Process hardening: keep the keystore master key and other secrets out of core dumps
and away from other processes of the same user.

A crash core of an anyhsm process holds whatever is in its memory, including the
unlocked keystore master key. In staging and production :func:`harden_process`, called
as soon as the environment is known (the factory, before a passphrase is read or a
provider opened), makes the process non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``: no core
file, no ``ptrace`` attach and no ``/proc/PID/mem`` or ``/proc/PID/environ`` for other
processes of the same user) and sets ``RLIMIT_CORE`` to 0 (soft and hard, so it cannot
be raised again). Secret buffers are also marked ``MADV_DONTDUMP`` in every environment
(:mod:`anyhsm.secret`). Development is left alone: developers may want their cores.

Everything here is best effort (a platform without ``prctl`` still gets the rlimit);
``health`` reports what is in force (:func:`process_status`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
import threading
from dataclasses import dataclass, field

from anyhsm.secret import dontdump_status
from anyhsm.types import Environment

try:
    import resource
except ImportError:  # pragma: no cover - not on Unix
    resource = None  # type: ignore[assignment]

log = logging.getLogger("anyhsm")

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4

_lock = threading.Lock()
_state: dict[str, object] = {"environment": None, "failures": []}


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library's symbols (loaded once: every open calls :func:`harden_process`)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)  # the interpreter links libc: prctl is there
    except OSError:  # pragma: no cover - exotic platforms
        return None


def hardening_required(environment: Environment) -> bool:
    """Staging and production run hardened; development does not."""
    return environment is not Environment.DEVELOPMENT


def harden_process(environment: Environment) -> list[str]:
    """Make this process non-dumpable with no core limit, if ``environment`` asks for it.

    Idempotent and cheap: every open calls it. Returns what could not be done (each also
    logged as a warning); an empty list means fully hardened, or development.
    """
    if not hardening_required(environment):
        return []
    failures: list[str] = []
    with _lock:
        if resource is not None:
            try:
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            except (OSError, ValueError) as e:
                failures.append(f"setrlimit(RLIMIT_CORE, 0) failed: {e}")
        else:  # pragma: no cover - not on Unix
            failures.append("no resource module: core size limit not set")
        libc = _libc()
        if libc is None:
            failures.append("prctl is not available on this platform: the process stays dumpable")
        else:
            rc = libc.prctl(
                ctypes.c_int(PR_SET_DUMPABLE),
                ctypes.c_ulong(0),
                ctypes.c_ulong(0),
                ctypes.c_ulong(0),
                ctypes.c_ulong(0),
            )
            if rc != 0:
                failures.append(f"prctl(PR_SET_DUMPABLE, 0) failed: errno {ctypes.get_errno()}")
        _state["environment"] = environment.value
        _state["failures"] = failures
    for f in failures:
        log.warning("anyhsm: process hardening: %s", f)
    return failures


def _dumpable() -> bool | None:
    libc = _libc()
    if libc is None:
        return None
    zero = ctypes.c_ulong(0)
    rc = int(libc.prctl(ctypes.c_int(PR_GET_DUMPABLE), zero, zero, zero, zero))
    return None if rc < 0 else rc != 0


def _core_limit() -> tuple[int, int] | None:
    if resource is None:  # pragma: no cover - not on Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    return int(soft), int(hard)


@dataclass(frozen=True)
class ProcessStatus:
    """What protects this process's memory from being written out, as ``health`` shows it."""

    hardening: str  # "required" (staging/production) | "not required" (development)
    dumpable: bool | None  # None: unknown on this platform
    core_limit: tuple[int, int] | None  # (soft, hard); -1 is unlimited
    dontdump: str  # secret buffers: "marked" | "partial" | "unavailable" | "unused"
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Hardening is in force where the environment requires it."""
        if self.hardening != "required":
            return True
        return self.dumpable is False and self.core_limit is not None and self.core_limit[0] == 0

    def to_dict(self) -> dict[str, object]:
        return {
            "hardening": self.hardening,
            # JSON conventions (docs/cli.md): booleans and numbers as such, null unknown.
            "dumpable": self.dumpable,
            "core_limit": None if self.core_limit is None else self.core_limit[0],
            "dontdump_secrets": self.dontdump,
            "ok": self.ok,
            "failures": list(self.failures),
        }


def process_status(environment: Environment) -> ProcessStatus:
    """The hardening now in force (read back from the kernel, not remembered)."""
    failures = _state.get("failures")
    return ProcessStatus(
        hardening="required" if hardening_required(environment) else "not required",
        dumpable=_dumpable(),
        core_limit=_core_limit(),
        dontdump=dontdump_status(),
        failures=list(failures) if isinstance(failures, list) else [],
    )
