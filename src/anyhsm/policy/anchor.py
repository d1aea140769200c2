"""Where the active spending policy is authenticated: its binding and the state's MAC key.

The binding is (SHA-256 of the active policy file, version), kept in the keystore's
manifest (:meth:`anyhsm.hsm.Hsm.policy_binding`, :meth:`~anyhsm.hsm.Hsm.set_policy_binding`):
authenticated under the master key, part of the store's generation, which a TPM anchors
where one is enrolled, so neither an edit nor a rollback of the directory goes unseen.
``anyhsm policy set`` changes it (audited by the handle as ``policy_set``); every signing
checks the policy file it reads against it.

The state key MACs the velocity counters; it comes from the manifest's state secret
(:meth:`~anyhsm.hsm.Hsm.state_key`), sealed under the master key and sealed again by every
rotation, so it outlives master-key rotations.

The active policy's file is kept beside the state under its hash's name
(``policy-<sha256>.toml``): the copy a binding names is written before the binding moves
to it, so signers never see a binding without its file.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from anyhsm.errors import HsmError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from anyhsm.hsm import Hsm

BINDING_RULE = "policy-authenticated"
STATE_PURPOSE = "spending-policy"


def policy_file(directory: Path, sha256: str) -> Path:
    """The active policy's copy for the binding ``sha256``."""
    return directory / f"policy-{sha256}.toml"


@dataclass(frozen=True)
class Binding:
    """The active policy: the SHA-256 of its file and how many times one was set."""

    sha256: str
    version: int


class PolicyAnchor(Protocol):
    def binding(self) -> Binding | None:
        """The active binding; None when no policy is set."""
        ...

    def bind(self, sha256: str, detail: Mapping[str, str]) -> Binding:
        """Make ``sha256`` the active policy (version + 1), audited with ``detail``."""
        ...

    def state_key(self) -> bytes:
        """The key MAC-ing the policy state."""
        ...


class ManifestAnchor:
    """:class:`PolicyAnchor` in the keystore manifest, through the handle."""

    def __init__(self, hsm: Hsm) -> None:
        self._hsm = hsm

    def binding(self) -> Binding | None:
        try:
            found = self._hsm.policy_binding()
        except HsmError:
            return None  # no keystore: no policy can have been set (setting one needs it)
        return None if found is None else Binding(*found)

    def bind(self, sha256: str, detail: Mapping[str, str]) -> Binding:
        return Binding(sha256, self._hsm.set_policy_binding(sha256, detail))

    def state_key(self) -> bytes:
        with self._hsm.state_key(STATE_PURPOSE) as key:
            return bytes(key.buffer)


STATE_SEQ = "state_seq"  # the detail member of every state commit's audit entry
_STATE_SEQ = re.compile(rb'"state_seq":"([0-9]{1,19})"')
_BACK_READ = 1 << 16


class AuditStateAnchor:
    """:class:`~anyhsm.policy.state.StateAnchor` in the audit chain: the newest
    ``detail.state_seq`` the handle's audit log records. Every state commit's entry
    carries it (``policy_decision``, ``policy_compensate``, ``policy_approval``,
    ``policy_freeze``/``unfreeze``, ``policy_state``), written while the state's lock is
    held, so the last one in the log is the newest commit; the chain is anchored in the
    keystore manifest (and a TPM where enrolled), so the log cannot be put back with the
    state directory (up to its last checkpoint, see docs/policy.md section 6).

    Read from the log file: the part appended since the last look (one open, stat and
    read of the new bytes; the whole tail, backwards, when the file is new to it or was
    replaced), under the audit writer's shared lock as a reader of the log."""

    def __init__(self, hsm: Hsm) -> None:
        self._path = str(hsm.audit_path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None  # (inode, size) read up to
        self._newest: int | None = None

    def newest(self) -> int | None:
        import fcntl

        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # no log: the audit open refuses a missing log that has a record
        try:
            st = os.fstat(fd)
            with self._lock:
                seen, newest = self._seen, self._newest
                if seen is not None and seen[0] == st.st_ino and seen[1] == st.st_size:
                    return newest
                fcntl.flock(fd, fcntl.LOCK_SH)  # no half-written line (appenders hold LOCK_EX)
                size = os.fstat(fd).st_size
                if seen is not None and seen[0] == st.st_ino and seen[1] <= size:
                    found = _last_seq(os.pread(fd, size - seen[1], seen[1]))
                    newest = newest if found is None else max(found, newest or 0)
                else:
                    newest = _scan_back(fd, size)
                self._seen, self._newest = (st.st_ino, size), newest
                return newest
        finally:
            os.close(fd)


def _last_seq(data: bytes) -> int | None:
    found = None
    for m in _STATE_SEQ.finditer(data):
        found = max(found or 0, int(m.group(1)))
    return found


def _scan_back(fd: int, size: int) -> int | None:
    """The newest state_seq in the file, reading backwards from its end."""
    end = size
    while end > 0:
        start = max(0, end - _BACK_READ)
        chunk = os.pread(fd, end - start + (64 if end < size else 0), start)
        found = _last_seq(chunk)
        if found is not None:
            return found
        end = start
    return None


__all__ = [
    "BINDING_RULE",
    "STATE_SEQ",
    "AuditStateAnchor",
    "Binding",
    "ManifestAnchor",
    "PolicyAnchor",
    "policy_file",
]
