"""The spending policy's state: velocity counters, recent debits, approvals, frozen keys.

Behind a small transactional interface (:class:`StateStore`: a transaction locks the
scope, :meth:`~StateTransaction.read` gives the state, :meth:`~StateTransaction.commit`
replaces it), so that a deployment across machines can keep it in PostgreSQL (``SELECT
... FOR UPDATE``, ``UPDATE``, ``COMMIT``). The state is a plain value
(:class:`PolicyState`); the engine computes the new one.

The file implementation (:class:`FileStateStore`) keeps the state as JSON in two slot
files, each record MAC-ed with HMAC-SHA256 under a key derived from the keystore, under an
exclusive ``flock`` on a lock file beside them; a commit overwrites the older slot, so a
process killed at any point leaves the old state or the new one (see the class), and the
kernel drops its lock.

Storage is bounded: one fixed ring of buckets per rule, at most :data:`MAX_DEBITS` recent
debits (for compensation and for not counting one transaction twice), approvals until
they expire (at most :data:`MAX_APPROVALS` pending, :data:`MAX_USED` used).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hmac
import json
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Protocol

from anyhsm.errors import PolicyNotAuthenticated
from anyhsm.policy.velocity import Counter

SLOT_FILES = ("state.0", "state.1")
LOCK_FILE = "lock"
_MAGIC = "anyhsm-policy-state/1"
_HEAD_MAX = 4096  # the header line is about 110 bytes; small states are read at once
MAX_DEBITS = 64
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
    text: str = field(default="", compare=False, repr=False)
    json_text: str = field(default="", init=False, compare=False, repr=False)  # text, as JSON

    def __post_init__(self) -> None:
        if not self.text:
            object.__setattr__(self, "text", f"{self.txid}:{self.rule}:{self.amount}:{self.bucket}")
        # made once per debit (a commit writes all MAX_DEBITS of them); json.dumps's own
        # escaping function, as the canonical encoding uses (ASCII)
        object.__setattr__(self, "json_text", encode_basestring_ascii(self.text))

    def to_json(self) -> str:
        """Compact (``txid:rule:amount:bucket``): up to MAX_DEBITS are read and written
        with every commit."""
        return self.text

    @classmethod
    def from_json(cls, raw: object) -> Debit:
        text = str(raw)
        txid, rule, amount, bucket = text.split(":")
        return cls(txid, rule, int(amount), int(bucket), text)


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
            debits=tuple(Debit.from_json(d) for d in debits),
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
        returning it. After a read that failed, it replaces the damaged state (the admin
        reset)."""
        ...


class StateAnchor(Protocol):
    """Where the newest state commit is recorded out of reach of the state's own storage,
    so that an older authentic copy of the state put back is seen: the audit chain, whose
    entry after each commit carries ``state_seq``
    (:class:`anyhsm.policy.anchor.AuditStateAnchor`)."""

    def newest(self) -> int | None:
        """The ``seq`` of the newest commit recorded (None: none recorded yet)."""
        ...


class StateStore(Protocol):
    def transaction(self) -> AbstractContextManager[StateTransaction]:
        """Lock the scope (exclusively) for the ``with`` block."""
        ...


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _canonical_text(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@lru_cache(maxsize=256)
def _key_text(key: str) -> str:
    """A rule name as JSON text (the same few names in every commit)."""
    return encode_basestring_ascii(key)


class _Encoder:
    """The state's record body, byte for byte ``_canonical(state.to_json())``
    (tests/policy/test_state_fast.py compares them), built from parts: a commit changes a
    counter or two and adds a debit, so the text of each counter and debit is made once
    (cached on the value, immutable) and the waiting approvals, which change rarely, are
    kept as text while the state still holds the same tuple (the engine's new states share
    it; a tuple of frozen values cannot change under the cache). The used approvals and
    frozen keys are plain dicts: encoded each time (usually empty or small). Without this,
    the JSON of the 64 recent debits was most of a commit's cost."""

    def __init__(self) -> None:
        self._pending_text: tuple[tuple[Approval, ...], str] | None = None

    def _pending(self, pending: tuple[Approval, ...]) -> str:
        found = self._pending_text
        if found is not None and found[0] is pending:  # held by the cache: no id reuse
            return found[1]
        text = _canonical_text([a.to_json() for a in pending])
        self._pending_text = (pending, text)
        return text

    def body(self, state: PolicyState) -> bytes:
        counters = ",".join(
            [f"{_key_text(k)}:{c.json_text}" for k, c in sorted(state.counters.items())]
        )
        pending = self._pending(state.pending)
        used = _canonical_text(state.used) if state.used else "{}"
        frozen = (
            _canonical_text({k: f.to_json() for k, f in state.frozen.items()})
            if state.frozen
            else "{}"
        )
        debits = ",".join([d.json_text for d in state.debits])
        return (
            f'{{"counters":{{{counters}}},"debits":[{debits}],"frozen":{frozen},'
            f'"pending":{pending},"seq":{state.seq},"used":{used}}}'
        ).encode()


@dataclass(frozen=True)
class _Slot:
    index: int
    state: PolicyState | None  # None: empty, torn or failing authentication
    present: bool


class _FileTransaction:
    def __init__(self, store: FileStateStore) -> None:
        self._store = store
        self._seq: int | None = None
        self._slot = 0  # the slot the next commit writes (never the one holding the latest)

    def _load(self, missing_ok: bool) -> PolicyState:
        slots = [self._store.read_slot(i) for i in range(len(SLOT_FILES))]
        valid = [s for s in slots if s.state is not None]
        if not valid:
            # an admin reset after this failed read continues above every recorded commit
            self._seq = self._store.recorded_newest()
            if not any(s.present for s in slots):
                if missing_ok:
                    self._seq, self._slot = self._seq or 0, 0
                    return PolicyState(seq=self._seq)
                raise _refused(
                    f"the spending policy's state in {self._store.directory} is missing",
                    "restore it from a backup, or run 'anyhsm policy set FILE --reset-state' "
                    "(audited; the velocity counters start again from zero)",
                )
            raise _refused(
                f"the spending policy's state in {self._store.directory} fails authentication "
                "(edited, damaged, or written under another keystore key)",
                "restore it from a backup, or run 'anyhsm policy set FILE --reset-state' (audited)",
            )
        latest = max(valid, key=lambda s: s.state.seq if s.state is not None else -1)
        assert latest.state is not None
        self._seq = latest.state.seq
        self._slot = 1 - latest.index
        self._store.check_not_rolled_back(latest.state.seq, self)
        return latest.state

    def continue_from(self, seq: int) -> None:
        """After a refused read: a commit (the admin reset) goes on above ``seq``."""
        self._seq = max(self._seq or 0, seq)

    def read(self) -> PolicyState:
        return self._load(False)

    def read_or_new(self) -> PolicyState:
        return self._load(True)

    def commit(self, state: PolicyState) -> PolicyState:
        # after a read that failed (only the admin reset commits then) seq goes on from
        # the state given
        base = self._seq if self._seq is not None else state.seq
        state = replace(state, seq=base + 1)
        self._store.write_slot(self._slot, state)
        self._seq, self._slot = state.seq, 1 - self._slot
        return state


class FileStateStore:
    """:class:`StateStore` in two MAC-ed slot files (see the module doc).

    A commit overwrites, in place, the slot that does not hold the latest state, then the
    reader takes the valid slot with the higher ``seq``: a process killed mid-write leaves
    a slot that fails its MAC, and the other still holds the state before that commit
    (which had not returned, so nothing was signed on it). In place, because replacing a
    file by rename (or truncating it) makes ext4 flush its data on the spot (its
    ``auto_da_alloc``), milliseconds per commit; ``durable`` adds an fsync of the slot
    (``[audit] durability = "fsync"``) against power loss, which a kill does not need."""

    def __init__(
        self,
        directory: Path,
        mac_key: bytes | bytearray,
        *,
        durable: bool = True,
        anchor: StateAnchor | None = None,
    ) -> None:
        self.directory = directory
        self._slots = tuple(str(directory / name) for name in SLOT_FILES)
        self._lock_path = str(directory / LOCK_FILE)
        self._key = bytes(mac_key)
        self._durable = durable
        # per slot: the header line of a record this store wrote or authenticated, and its
        # state; a slot whose header is still that line is not read and decoded again (the
        # header holds the record's seq and MAC: another record cannot have the same one)
        self._known: dict[int, tuple[bytes, PolicyState]] = {}
        self._local = threading.local()
        self._encoder = _Encoder()
        self._anchor = anchor

    def recorded_newest(self) -> int | None:
        """The newest commit the anchor records (None without an anchor or a record)."""
        return None if self._anchor is None else self._anchor.newest()

    def check_not_rolled_back(self, seq: int, txn: _FileTransaction) -> None:
        """Refuse (rule ``policy-state``) a state older than the newest commit the anchor
        records: an older copy of the state put back (the slots cannot tell, both copies
        are authentic). A commit whose audit entry was never written (the process killed
        between the two) is newer than every record, never older, so a crash is not
        taken for a rollback. After the refusal an admin reset (``policy set FILE
        --reset-state``) commits above the recorded seq."""
        recorded = self.recorded_newest()
        if recorded is None or seq >= recorded:
            return
        txn.continue_from(recorded)
        raise _refused(
            f"the spending policy's state in {self.directory} was rolled back: it is "
            f"state {seq}, but the audit log records state {recorded} committed after it "
            "(an older copy of the state directory was put back)",
            "find out who wrote the state directory; then run 'anyhsm policy set FILE "
            "--reset-state' (audited: counters, approvals and freezes start afresh) or "
            "restore the newest state",
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[StateTransaction]:
        """The exclusive ``flock`` of the lock file for the block. Uncontended, through a
        descriptor this thread keeps open (two system calls); contended, through
        :func:`anyhsm.fsutil.file_lock` (waits with a warning, then LockTimeout)."""
        from anyhsm.fsutil import file_lock

        fd = self._lock_fd()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            with file_lock(self.directory / LOCK_FILE):
                yield _FileTransaction(self)
            return
        try:
            if os.fstat(fd).st_ino != _inode(self._lock_path):
                # the lock file was replaced (the directory removed and made again): this
                # descriptor locks nothing anyone else locks
                fcntl.flock(fd, fcntl.LOCK_UN)
                self._local.fd = None
                _ensure_dir(self.directory)
                with file_lock(self.directory / LOCK_FILE):
                    yield _FileTransaction(self)
                return
            yield _FileTransaction(self)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _lock_fd(self) -> int:
        """This thread's descriptor of the lock file (opened again after a fork: a child
        sharing its parent's open file would share its lock)."""
        pid = os.getpid()
        fd: int | None = getattr(self._local, "fd", None)
        if fd is None or getattr(self._local, "pid", None) != pid:
            _ensure_dir(self.directory)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._local.fd, self._local.pid = fd, pid
        return fd

    def _mac(self, seq: int, body: bytes) -> str:
        data = b"anyhsm/v1/policy-state\x00%d\x00" % seq + body
        return hmac.digest(self._key, data, "sha256").hex()  # one call: read and commit

    def encode(self, state: PolicyState) -> bytes:
        body = self._encoder.body(state)
        head = f"{_MAGIC} {state.seq} {len(body)} {self._mac(state.seq, body)}\n"
        return head.encode() + body

    def decode(self, data: bytes) -> PolicyState | None:
        """The state in a slot's bytes, or None when they are not a whole, authentic record."""
        head, sep, rest = data.partition(b"\n")
        parts = head.decode("ascii", "replace").split(" ")
        if not sep or len(parts) != 4 or parts[0] != _MAGIC:
            return None
        try:
            seq, size = int(parts[1]), int(parts[2])
        except ValueError:
            return None
        body = rest[:size]
        if len(body) != size or not hmac.compare_digest(parts[3], self._mac(seq, body)):
            return None
        try:
            state = PolicyState.from_json(json.loads(body))
        except (ValueError, KeyError, TypeError):
            return None
        return state if state.seq == seq else None

    def read_slot(self, index: int) -> _Slot:
        try:
            fd = os.open(self._slots[index], os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._known.pop(index, None)
            return _Slot(index, None, False)
        try:
            head = os.pread(fd, _HEAD_MAX, 0)
            line, sep, _ = head.partition(b"\n")
            known = self._known.get(index)
            if sep and known is not None and hmac.compare_digest(known[0], line):
                return _Slot(index, known[1], True)
            size = os.fstat(fd).st_size
            data = head if size <= len(head) else head + _pread_all(fd, size, len(head))
        finally:
            os.close(fd)
        state = self.decode(data)
        if state is None:
            self._known.pop(index, None)
        else:
            self._known[index] = (data.partition(b"\n")[0], state)
        return _Slot(index, state, True)

    def write_slot(self, index: int, state: PolicyState) -> None:
        data = self.encode(state)
        fd = os.open(self._slots[index], os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            offset = 0
            while offset < len(data):
                offset += os.pwrite(fd, view[offset:], offset)
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._known[index] = (data.partition(b"\n")[0], state)


def _ensure_dir(directory: Path) -> None:
    if not directory.is_dir():
        from anyhsm.fsutil import make_private_dir

        make_private_dir(directory)


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    parts = []
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _refused(message: str, hint: str | None) -> PolicyNotAuthenticated:
    return PolicyNotAuthenticated(message, hint=hint, rules=[STATE_RULE])


__all__ = [
    "Approval",
    "Debit",
    "FileStateStore",
    "Frozen",
    "PolicyState",
    "StateAnchor",
    "StateStore",
    "StateTransaction",
]
