"""The spending policy's state: velocity counters, recent debits, approvals, frozen keys.

Behind a small transactional interface (:class:`StateStore`: a transaction locks the
scope, :meth:`~StateTransaction.read` gives the state, :meth:`~StateTransaction.commit`
replaces it), so that a deployment across machines can keep it in PostgreSQL (``SELECT
... FOR UPDATE``, ``UPDATE``, ``COMMIT``). The state is a plain value
(:class:`PolicyState`); the engine computes the new one.

The file implementation (:class:`FileStateStore`) keeps one JSON file, MAC-ed with
HMAC-SHA256 under a key derived from the keystore, replaced atomically (temp file, fsync,
rename, directory fsync) under an exclusive ``flock`` on a lock file beside it. A process
killed at any point leaves the old state or the new one; the kernel drops its lock.

Storage is bounded: one fixed ring of buckets per rule, at most :data:`MAX_DEBITS` recent
debits (for compensation and for not counting one transaction twice), approvals until
they expire (at most :data:`MAX_APPROVALS` pending, :data:`MAX_USED` used).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from anyhsm.errors import PolicyNotAuthenticated
from anyhsm.policy.velocity import Counter

FORMAT = "anyhsm-policy-state"
VERSION = 1
STATE_FILE = "state.json"
LOCK_FILE = "lock"
MAX_DEBITS = 1024
MAX_APPROVALS = 1000
MAX_USED = 10_000
STATE_RULE = "policy-state"  # the rule a refusal for damaged state names


@dataclass(frozen=True)
class Debit:
    """``amount`` debited from rule ``rule``'s counter, into bucket ``bucket``, for the
    transaction ``txid`` (one per rule and transaction)."""

    txid: str
    rule: str
    amount: int
    bucket: int

    def to_json(self) -> dict[str, object]:
        return {"txid": self.txid, "rule": self.rule, "amount": self.amount, "bucket": self.bucket}


@dataclass(frozen=True)
class Approval:
    """An approval verified when it was submitted: ``pubkey`` approved ``txid`` under the
    policy whose SHA-256 is ``policy``, until ``expires`` (Unix seconds). ``id`` is the
    SHA-256 of the signed message and the key: the same approval twice is one."""

    id: str
    txid: str
    policy: str
    pubkey: bytes
    expires: int
    submitted_by: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "txid": self.txid,
            "policy": self.policy,
            "pubkey": self.pubkey.hex(),
            "expires": self.expires,
            "submitted_by": self.submitted_by,
        }


@dataclass(frozen=True)
class Frozen:
    """A key frozen by ``anyhsm policy freeze``: nothing it signs passes the policy."""

    label: str
    reason: str
    since: int
    by: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"label": self.label, "reason": self.reason, "since": self.since, "by": self.by}


@dataclass(frozen=True)
class PolicyState:
    """Everything the policy remembers. ``seq`` grows by one with every commit."""

    seq: int = 0
    counters: Mapping[str, Counter] = field(default_factory=dict)
    debits: tuple[Debit, ...] = ()
    pending: tuple[Approval, ...] = ()
    used: Mapping[str, int] = field(default_factory=dict)  # approval id -> its expiry
    frozen: Mapping[str, Frozen] = field(default_factory=dict)  # key id -> why

    def pruned(self, now: float) -> PolicyState:
        """Without approvals that have expired, and with at most MAX_DEBITS debits."""
        t = int(now)
        pending = tuple(a for a in self.pending if a.expires > t)
        used = {k: v for k, v in self.used.items() if v > t}
        debits = self.debits[-MAX_DEBITS:]
        same = (len(pending), len(used), len(debits))
        if same == (len(self.pending), len(self.used), len(self.debits)):
            return self
        return replace(self, pending=pending, used=used, debits=debits)

    def to_json(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "counters": {k: c.to_json() for k, c in sorted(self.counters.items())},
            "debits": [d.to_json() for d in self.debits],
            "pending": [a.to_json() for a in self.pending],
            "used": dict(sorted(self.used.items())),
            "frozen": {k: f.to_json() for k, f in sorted(self.frozen.items())},
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> PolicyState:
        seq = raw["seq"]
        counters = raw["counters"]
        debits = raw["debits"]
        pending = raw["pending"]
        used = raw["used"]
        frozen = raw["frozen"]
        if not (
            isinstance(seq, int)
            and isinstance(counters, dict)
            and isinstance(debits, list)
            and isinstance(pending, list)
            and isinstance(used, dict)
            and isinstance(frozen, dict)
        ):
            raise ValueError("malformed state")
        return cls(
            seq=seq,
            counters={str(k): Counter.from_json(v) for k, v in counters.items()},
            debits=tuple(
                Debit(str(d["txid"]), str(d["rule"]), int(d["amount"]), int(d["bucket"]))
                for d in debits
            ),
            pending=tuple(
                Approval(
                    str(a["id"]),
                    str(a["txid"]),
                    str(a["policy"]),
                    bytes.fromhex(str(a["pubkey"])),
                    int(a["expires"]),
                    None if a.get("submitted_by") is None else str(a["submitted_by"]),
                )
                for a in pending
            ),
            used={str(k): int(v) for k, v in used.items()},
            frozen={
                str(k): Frozen(
                    str(f["label"]),
                    str(f["reason"]),
                    int(f["since"]),
                    None if f.get("by") is None else str(f["by"]),
                )
                for k, f in frozen.items()
            },
        )


class StateTransaction(Protocol):
    """One locked scope over the state: read it, then commit a new one (or nothing)."""

    def read(self) -> PolicyState:
        """The current state; PolicyNotAuthenticated when it is missing or damaged."""
        ...

    def read_or_new(self) -> PolicyState:
        """The current state, or an empty one when there is none yet (for ``policy set``);
        PolicyNotAuthenticated when one is there but damaged."""
        ...

    def commit(self, state: PolicyState) -> PolicyState:
        """Replace the state (its ``seq`` set to the previous one + 1) durably before
        returning it."""
        ...


class StateStore(Protocol):
    def transaction(self) -> AbstractContextManager[StateTransaction]:
        """Lock the scope (exclusively) for the ``with`` block."""
        ...


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class _FileTransaction:
    def __init__(self, store: FileStateStore) -> None:
        self._store = store
        self._seq: int | None = None

    def _load(self, missing_ok: bool) -> PolicyState:
        path = self._store.path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if missing_ok:
                self._seq = 0
                return PolicyState()
            raise _refused(
                f"the spending policy's state file {path} is missing",
                "restore it from a backup, or run 'anyhsm policy set --reset-state' "
                "(audited; the velocity counters start again from zero)",
            ) from None
        state = self._store.decode(data)
        self._seq = state.seq
        return state

    def read(self) -> PolicyState:
        return self._load(False)

    def read_or_new(self) -> PolicyState:
        return self._load(True)

    def commit(self, state: PolicyState) -> PolicyState:
        if self._seq is None:
            raise RuntimeError("commit without read")
        state = replace(state, seq=self._seq + 1)
        self._store.write(state)
        self._seq = state.seq
        return state


class FileStateStore:
    """:class:`StateStore` in one MAC-ed file (see the module doc)."""

    def __init__(
        self, directory: Path, mac_key: bytes | bytearray, *, durable: bool = True
    ) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self._key = bytes(mac_key)
        self._durable = durable

    @contextlib.contextmanager
    def transaction(self) -> Iterator[StateTransaction]:
        from anyhsm.fsutil import clean_temp_files, file_lock, make_private_dir

        make_private_dir(self.directory)
        with file_lock(self.directory / LOCK_FILE):
            clean_temp_files(self.directory)
            yield _FileTransaction(self)

    def mac(self, body: bytes) -> str:
        return hmac.new(self._key, b"anyhsm/v1/policy-state\x00" + body, hashlib.sha256).hexdigest()

    def encode(self, state: PolicyState) -> bytes:
        body = _canonical(state.to_json())
        wrapper = {"format": FORMAT, "version": VERSION, "mac": self.mac(body)}
        return _canonical(wrapper)[:-1] + b',"state":' + body + b"}\n"

    def decode(self, data: bytes) -> PolicyState:
        try:
            raw = json.loads(data)
            body = _canonical(raw["state"])
            mac = str(raw["mac"])
            if raw.get("format") != FORMAT or raw.get("version") != VERSION:
                raise ValueError("format")
        except (ValueError, KeyError, TypeError):
            raise _refused(
                f"the spending policy's state file {self.path} is damaged",
                "restore it from a backup, or run 'anyhsm policy set --reset-state'",
            ) from None
        if not hmac.compare_digest(mac, self.mac(body)):
            raise _refused(
                f"the spending policy's state file {self.path} fails authentication (edited, "
                "or written under another keystore key)",
                "restore it from a backup, or run 'anyhsm policy set --reset-state' (audited)",
            )
        try:
            return PolicyState.from_json(raw["state"])
        except (ValueError, KeyError, TypeError):
            raise _refused(
                f"the spending policy's state file {self.path} is damaged", None
            ) from None

    def write(self, state: PolicyState) -> None:
        from anyhsm.fsutil import atomic_write

        data = self.encode(state)
        if self._durable:
            atomic_write(self.path, data)
            return
        _replace_quickly(self.path, data)


def _replace_quickly(path: Path, data: bytes) -> None:
    """Atomic (rename) but not flushed: a killed process loses nothing (the page cache
    is the kernel's), a power cut may lose the last commits. ``[audit] durability =
    "batched"`` chooses it, as it does for the audit log."""
    from anyhsm.fsutil import TEMP_SUFFIX

    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _refused(message: str, hint: str | None) -> PolicyNotAuthenticated:
    return PolicyNotAuthenticated(message, hint=hint, rules=[STATE_RULE])


__all__ = [
    "Approval",
    "Debit",
    "FileStateStore",
    "Frozen",
    "PolicyState",
    "StateStore",
    "StateTransaction",
]
