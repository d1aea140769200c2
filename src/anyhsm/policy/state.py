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
import time
import weakref
from collections.abc import Mapping
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

    def with_seq(self, seq: int) -> PolicyState:
        """This state numbered ``seq`` (cheaper than dataclasses.replace, once per commit)."""
        return PolicyState(seq, self.counters, self.debits, self.pending, self.used, self.frozen)

    def debited(self, txid: str) -> frozenset[str]:
        """The rules that already debited transaction ``txid`` (kept for the last txid
        asked: the evaluation and the debit of one decision both ask)."""
        last: tuple[str, frozenset[str]] | None = self.__dict__.get("_debited")
        if last is not None and last[0] == txid:
            return last[1]
        rules = frozenset([d.rule for d in self.debits if d.txid == txid])
        object.__setattr__(self, "_debited", (txid, rules))
        return rules

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
        state = state.with_seq(base + 1)
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
        self.slot_paths = tuple(str(directory / name) for name in SLOT_FILES)
        self.lock_path = str(directory / LOCK_FILE)
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

    def transaction(self) -> AbstractContextManager[StateTransaction]:
        """The exclusive ``flock`` of the lock file for the block. Uncontended, through a
        descriptor this thread keeps open (two system calls); contended, through
        :func:`anyhsm.fsutil.file_lock` (waits with a warning, then LockTimeout). See
        :class:`_Files` for how the kept descriptors are known to be the files."""
        return _Locked(self)

    def files(self) -> _Files:
        """This thread's descriptors (opened again after a fork: a child sharing its
        parent's open file would share its lock)."""
        files: _Files | None = getattr(self._local, "files", None)
        if files is None or files.pid != os.getpid():
            _ensure_dir(self.directory)
            files = _Files(self)
            self._local.files = files
        return files

    def drop_files(self) -> None:
        """Close this thread's descriptors (the next transaction opens them by path)."""
        files: _Files | None = getattr(self._local, "files", None)
        self._local.files = None
        if files is not None:
            files.close()

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
        """Slot ``index`` through this thread's descriptor (the caller holds the lock)."""
        fd = self.files().slots[index]
        if fd is None:
            self._known.pop(index, None)
            return _Slot(index, None, False)
        head = os.pread(fd, _HEAD_MAX, 0)
        line, sep, _ = head.partition(b"\n")
        known = self._known.get(index)
        if sep and known is not None and hmac.compare_digest(known[0], line):
            return _Slot(index, known[1], True)
        size = os.fstat(fd).st_size
        data = head if size <= len(head) else head + _pread_all(fd, size, len(head))
        state = self.decode(data)
        if state is None:
            self._known.pop(index, None)
        else:
            self._known[index] = (data.partition(b"\n")[0], state)
        return _Slot(index, state, True)

    def write_slot(self, index: int, state: PolicyState) -> None:
        data = self.encode(state)
        files = self.files()
        fd = files.slot_for_writing(index)
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        if self._durable:
            os.fsync(fd)
        self._known[index] = (data.partition(b"\n")[0], state)


_RACY_NS = 2_000_000_000
"""A directory changed this recently may change again within the same tick of the file
system's clock, unseen in its times: its stamp is not trusted (as git's racy index)."""


class _Files:
    """One thread's descriptors of the lock file and the two slots, and the stamp
    (inode, modification and change times) the directory had when they were opened.

    Every transaction, once locked, compares the directory's stamp with this one (one
    ``stat``): a file removed, created or renamed into the directory changes it, so while
    it is equal every kept descriptor is still the file at its path; a slot overwritten in
    place (as commits do) is read through the same descriptor. When it differs, or was
    taken too close to the directory's last change to be trusted (:data:`_RACY_NS`), the
    transaction looks at every file by its path: a replaced lock file is locked anew by
    path (else two processes could hold locks on two different files), and the slots are
    opened again."""

    def __init__(self, store: FileStateStore) -> None:
        self.store = store
        self.pid = os.getpid()
        self.lock = os.open(store.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.slots: list[int | None] = [None, None]
        self.stamp: tuple[int, int, int] | None = None
        # closed with this object (a store made for one call, its thread ended): the list
        # is the one reopen_slots updates
        self._closer = weakref.finalize(self, _close_all, self.lock, self.slots)
        self.reopen_slots()

    def reopen_slots(self) -> None:
        """Open the slots by path again (the caller holds the lock) and take the stamp."""
        self.stamp = None
        try:
            st = os.stat(self.store.directory)
        except OSError:
            st = None
        for i, path in enumerate(self.store.slot_paths):
            old = self.slots[i]
            try:
                self.slots[i] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                self.slots[i] = None
            if old is not None:
                os.close(old)
        if st is not None and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
            self.stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    def current(self) -> bool:
        """Whether the kept descriptors are still the files at their paths."""
        if self.stamp is None:
            return False
        try:
            st = os.stat(self.store.directory)
        except OSError:
            return False
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns) == self.stamp

    def lock_is_current(self) -> bool:
        return os.fstat(self.lock).st_ino == _inode(self.store.lock_path)

    def slot_for_writing(self, index: int) -> int:
        fd = self.slots[index]
        if fd is None:  # created: the directory's stamp changes, so it is taken afresh
            fd = os.open(self.store.slot_paths[index], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self.slots[index] = fd
            self.stamp = None
        return fd

    def close(self) -> None:
        self._closer()


def _close_all(lock: int, slots: list[int | None]) -> None:
    for fd in (lock, *slots):
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    slots[:] = [None] * len(slots)


class _Locked:
    """The context of :meth:`FileStateStore.transaction` (a class: a generator-based
    context manager costs more than the two system calls it wraps)."""

    __slots__ = ("_files", "_store", "_waited")

    def __init__(self, store: FileStateStore) -> None:
        self._store = store
        self._files: _Files | None = None
        self._waited: contextlib.ExitStack | None = None

    def __enter__(self) -> StateTransaction:
        store = self._store
        files = store.files()
        try:
            fcntl.flock(files.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self._lock_by_path()
            return _FileTransaction(store)
        self._files = files
        try:
            if not files.current():
                if files.lock_is_current():
                    files.reopen_slots()
                else:
                    # the lock file was replaced (the directory removed and made again):
                    # this descriptor locks nothing anyone else locks
                    fcntl.flock(files.lock, fcntl.LOCK_UN)
                    self._files = None
                    store.drop_files()
                    self._lock_by_path()
        except BaseException:
            self.__exit__()  # never leave the lock held by a transaction that did not start
            raise
        return _FileTransaction(store)

    def _lock_by_path(self) -> None:
        """Wait for the lock of the file at the path, then look at every file by its path
        (the kept lock descriptor, if it is another file, is dropped)."""
        from anyhsm.fsutil import file_lock

        store = self._store
        _ensure_dir(store.directory)
        stack = contextlib.ExitStack()
        stack.enter_context(file_lock(store.directory / LOCK_FILE))
        try:
            files = store.files()
            if files.lock_is_current():
                files.reopen_slots()
            else:
                store.drop_files()
                store.files()
        except BaseException:
            stack.close()
            raise
        self._waited = stack

    def __exit__(self, *exc: object) -> None:
        files, waited = self._files, self._waited
        self._files = self._waited = None
        if files is not None:
            fcntl.flock(files.lock, fcntl.LOCK_UN)
        if waited is not None:
            waited.close()


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
