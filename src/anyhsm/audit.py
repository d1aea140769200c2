"""Append-only, HMAC-chained JSON-lines audit log, and its verifier.

Each line is the canonical JSON of one entry (sorted keys, no spaces, ASCII)
followed by its MAC: ``{...,"mac":"<hex>"}``, where the MAC is
HMAC-SHA256(key, previous mac || the exact bytes of the line before ``,"mac"``,
closed by ``}``). The MAC covers the bytes on disk, not a parse of them, and a
line that is not in canonical form fails verification even when its MAC
matches, so an entry cannot be re-spelled (``\\u`` escapes, spacing, key order)
to hide it from grep, SIEM rules or log filters.

The state of the chain (its number, the last checkpointed sequence number, MAC
and byte offset, its genesis value, and the MAC keys) lives in authenticated
storage behind :class:`AuditStateStore`: the keystore manifest in every real
deployment, whose generation only grows. Before anything is appended, the log on
disk is checked against that state: a missing, shorter, swapped or replayed log
makes opening fail closed with :class:`AuditStateMismatch`. Recovery is an
explicit, audited step (:func:`recover_chain`): the first entry of the new
chain records what was lost, and its genesis is the last MAC the state knew.

Durability: in "batched" mode (default) each entry is written to the OS with
one ``write`` before the operation returns, so killing the process loses
nothing, and a background thread fsyncs every few milliseconds; in "fsync"
mode every entry is fsynced before returning. If an entry cannot be written
the operation fails (:class:`AuditWriteFailed`): the log never silently stops.

Several processes may append to one log: appends take an flock and re-read
the tail when another process has written since.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

from anyhsm.errors import (
    AuditKeyRotated,
    AuditStateMismatch,
    AuditTampered,
    AuditWriteFailed,
    HsmError,
    LockTimeout,
)
from anyhsm.secret import SecretBytes

log = logging.getLogger("anyhsm")

GENESIS = bytes(32)
MAX_SEQ = 2**63 - 1
CHECKPOINT_INTERVAL_S = 1.0
_TAIL_READ = 1 << 16
_MAC_SUFFIX = re.compile(rb',"mac":"([0-9a-f]{64})"\}\Z')

_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
# The same C encoder JSONEncoder.encode builds on every call, built once: identical output
# (the encoder's own), without its per-call set-up. No circular check: audit values are flat.
try:
    from _json import make_encoder as _make_encoder
except ImportError:  # pragma: no cover - CPython always has the C encoder
    _C_ENCODE: Callable[[object, int], Sequence[str]] | None = None
else:
    _C_ENCODE = _make_encoder(
        None,
        _ENCODER.default,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        True,
        False,
        True,
    )
_MIDDLES_MAX = 1024

try:
    from _hashlib import hmac_new as _hmac_new
except ImportError:  # pragma: no cover - CPython built without OpenSSL
    _hmac_new = None  # type: ignore[assignment]

principal: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "anyhsm_audit_principal", default=None
)
"""Who asks, beyond the process (uid, pid): set by a front end that authenticates callers
(the signing service sets the client name); recorded in every entry made meanwhile."""


def _canonical(obj: Mapping[str, object]) -> bytes:
    return _ENCODER.encode(obj).encode()


def _canonical_str(obj: Mapping[str, object]) -> str:
    if _C_ENCODE is None:  # pragma: no cover - CPython always has the C encoder
        return _ENCODER.encode(obj)
    return "".join(_C_ENCODE(obj, 0))


_ts_cache: list[object] = [-1, ""]

_pid = [os.getpid()]
"""This process's id, read once (a system call per entry otherwise) and again in a
forked child, so every entry still names the process that wrote it."""


def _reset_pid() -> None:
    _pid[0] = os.getpid()


os.register_at_fork(after_in_child=_reset_pid)


def _timestamp() -> str:
    """ISO 8601 UTC with microseconds, like datetime.isoformat, at a third of the cost
    (the date-time prefix is formatted once per second)."""
    ns = time.time_ns()
    sec, us = divmod(ns // 1000, 1_000_000)
    if _ts_cache[0] != sec:
        _ts_cache[0] = sec
        _ts_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_ts_cache[1]}.{us:06d}+00:00"


def entry_body(
    seq: int,
    ts: str,
    op: str,
    outcome: str,
    pid: int,
    uid: int,
    *,
    who: str | None = None,
    kid: int = 1,
    provider: str | None = None,
    key_id: str | None = None,
    error: str | None = None,
    detail: Mapping[str, str] | None = None,
) -> bytes:
    """The canonical bytes of one entry (before its MAC): the definition that
    :meth:`AuditLog._body` builds faster, byte for byte the same. Empty optional members
    are left out; ``kid`` only from the second audit key on."""
    body = _members(op, outcome, pid, who, kid, provider, key_id, error)
    body.update(seq=seq, ts=ts, uid=uid)
    if detail:
        body["detail"] = dict(detail)
    return _canonical(body)


def _members(
    op: str,
    outcome: str,
    pid: int,
    who: str | None,
    kid: int,
    provider: str | None,
    key_id: str | None,
    error: str | None,
) -> dict[str, object]:
    """The members of an entry besides detail, seq, ts and uid (all of which sort
    between ``detail`` and ``seq``)."""
    out: dict[str, object] = {"op": op, "outcome": outcome, "pid": pid}
    if who:
        out["principal"] = who
    if kid > 1:
        out["kid"] = kid
    if provider:
        out["provider"] = provider
    if key_id:
        out["key"] = key_id
    if error:
        out["error"] = error
    return out


def _hmac_sha256(key: bytearray, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data``. OpenSSL's legacy HMAC context made and freed per call (no
    key state outlives the call), at half the cost of :func:`hmac.digest`, whose one-shot
    looks the MAC and the digest up in OpenSSL's provider store every time."""
    if _hmac_new is None:  # pragma: no cover - CPython built without OpenSSL
        return hmac.digest(key, data, "sha256")
    return _hmac_new(key, data, "sha256").digest()


def line_mac(key: SecretBytes, prev: bytes, body: bytes) -> bytes:
    """The MAC of one line, over the exact bytes of its body (the line without its mac)."""
    return _hmac_sha256(key.buffer, prev + body)


def split_line(raw: bytes) -> tuple[bytes, bytes] | None:
    """(body bytes, mac) of one line as written, or None if it does not end in a mac."""
    m = _MAC_SUFFIX.search(raw)
    if m is None:
        return None
    return raw[: m.start()] + b"}", bytes.fromhex(m.group(1).decode())


# --- the authenticated state of a chain ----------------------------------------------------


@dataclass(frozen=True)
class AuditState:
    """What authenticated storage records about the current chain."""

    chain: int = 1
    seq: int = 0  # last checkpointed entry (0: none yet)
    mac: bytes = GENESIS  # its MAC (the genesis value while seq == 0)
    offset: int | None = 0  # byte offset of that entry's line; None: unknown, found by scanning
    genesis: bytes = GENESIS  # the "previous MAC" of entry 1

    def to_dict(self) -> dict[str, object]:
        return {
            "chain": self.chain,
            "seq": self.seq,
            "mac": self.mac.hex(),
            "offset": self.offset,
            "genesis": self.genesis.hex(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> AuditState:
        chain, seq, offset = d["chain"], d["seq"], d.get("offset")
        if type(chain) is not int or type(seq) is not int or not 0 <= seq <= MAX_SEQ:
            raise ValueError("bad audit state")
        if offset is not None and (type(offset) is not int or offset < 0):
            raise ValueError("bad audit offset")
        mac, genesis = bytes.fromhex(str(d["mac"])), bytes.fromhex(str(d["genesis"]))
        if len(mac) != 32 or len(genesis) != 32:
            raise ValueError("bad audit mac")
        return cls(chain, seq, mac, offset, genesis)


class AuditKeyRing:
    """The MAC keys of one chain, each in force from a sequence number on (a master-key
    rotation retires the old key: entries before it keep verifying, new ones need the new
    key, so a leaked old keystore copy cannot extend the chain)."""

    def __init__(self, keys: Sequence[tuple[int, SecretBytes]]) -> None:
        if not keys or keys[0][0] != 1:
            raise ValueError("an audit key ring starts at entry 1")
        self._keys = sorted(keys, key=lambda k: k[0])

    def items(self) -> list[tuple[int, SecretBytes]]:
        """(from_seq, key) pairs, oldest first (the keys are this ring's: do not wipe)."""
        return list(self._keys)

    @property
    def current_kid(self) -> int:
        return len(self._keys)

    @property
    def current(self) -> SecretBytes:
        return self._keys[-1][1]

    @property
    def current_from(self) -> int:
        return self._keys[-1][0]

    def key_for(self, seq: int) -> tuple[int, SecretBytes]:
        """(kid, key) for entry ``seq``."""
        kid = len(self._keys)
        for from_seq, key in reversed(self._keys):
            if seq >= from_seq:
                return kid, key
            kid -= 1
        return 1, self._keys[0][1]

    def wipe(self) -> None:
        for _, k in self._keys:
            k.wipe()

    def __enter__(self) -> AuditKeyRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()


class AuditStateStore(Protocol):
    """Authenticated storage of a chain's state and keys (the keystore manifest today; a
    database row later). Narrow on purpose: load, advance, keys, start a new chain."""

    def load_audit_state(self) -> AuditState: ...

    def advance_audit_state(self, seq: int, mac: bytes, offset: int) -> None:
        """Record a synced entry; never moves backwards."""
        ...

    def audit_keys(self) -> AuditKeyRing:
        """A copy of the chain's keys; the caller wipes it."""
        ...

    def start_audit_chain(self, genesis: bytes) -> AuditState:
        """Begin chain ``chain + 1`` at ``genesis`` with a fresh key (recovery)."""
        ...

    def check_not_rotated(self) -> None:
        """Raise (KeystoreRotated) when the keys this handle holds were retired by another
        process; cheap, called before appending after another process wrote."""
        ...


class AuditForwarder(Protocol):
    """Somewhere each entry is copied to as it is written (syslog / journald)."""

    def send(self, line: bytes) -> None: ...

    def close(self) -> None: ...


# --- checking a log against its state -------------------------------------------------------


@dataclass
class _Tail:
    seq: int
    mac: bytes
    offset: int  # of the last entry's line
    end: int  # file size


def _check_against_state(path: Path, state: AuditState, ring: AuditKeyRing) -> _Tail:
    """Fail closed unless the log holds the recorded entry (same seq and MAC at the
    recorded place) and every entry after it chains from it."""
    try:
        with open(path, "rb") as f:
            # Shared flock: appenders hold it exclusively while they write, so a line
            # another process is writing is never read half-written (and taken for a tear).
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            size = os.fstat(f.fileno()).st_size
            if state.seq == 0:
                start, prev, expected = 0, state.genesis, 1
                if size == 0:
                    return _Tail(0, state.genesis, 0, 0)
            else:
                start = _locate(f, path, state, size)
                prev, expected = state.mac, state.seq + 1
            f.seek(start)
            data = f.read(size - start)
    except FileNotFoundError:
        if state.seq == 0:
            return _Tail(0, state.genesis, 0, 0)
        raise AuditStateMismatch(
            f"the audit log {path} is missing, but the keystore records chain {state.chain} "
            f"with {state.seq} entries (last MAC {state.mac.hex()[:16]}...): it was deleted, "
            "moved or swapped; nothing is appended to a new log until an operator acts"
        ) from None
    lines = data.split(b"\n")
    if lines[-1] != b"":
        raise AuditTampered(
            f"the last line of {path} is incomplete (torn write or truncation)",
            hint="run 'anyhsm audit verify'",
        )
    lines.pop()
    offset = start
    tail = _Tail(state.seq, state.mac, start, size)
    for i, raw in enumerate(lines):
        if state.seq and i == 0:
            offset += len(raw) + 1  # the recorded entry itself, checked by _locate
            continue
        body, mac, seq = parse_line(raw)
        if seq != expected or not hmac.compare_digest(
            line_mac(ring.key_for(seq)[1], prev, body), mac
        ):
            _refuse_newer_key(path, body, seq, ring)
            raise AuditStateMismatch(
                f"the audit log {path} does not continue the recorded chain after entry "
                f"{expected - 1} (entry {seq!r} at byte {offset} does not chain): edited, "
                "swapped for another log, or written with another key"
            )
        tail = _Tail(seq, mac, offset, size)
        prev, expected = mac, expected + 1
        offset += len(raw) + 1
    return tail


def _refuse_newer_key(path: Path, body: bytes, seq: int, ring: AuditKeyRing) -> None:
    """An entry that names a newer audit key than ours: a master-key rotation committed
    in another process between our reading the keystore and the log. That is the typed,
    retryable AuditKeyRotated (reopen), not a broken chain. Under the write lock no
    rotation can commit, so :func:`diagnose` treats it as the mismatch it then is."""
    try:
        kid = json.loads(body).get("kid", 1)
    except (ValueError, AttributeError):
        return
    if type(kid) is int and kid > ring.current_kid:
        raise AuditKeyRotated(
            f"entry {seq} of the audit log {path} names audit key {kid}, newer than this "
            f"keystore's key {ring.current_kid}: a master-key rotation committed while "
            "this handle opened",
            hint="reopen the handle (open_hsm); if it repeats, run 'anyhsm audit verify'",
        )


def _locate(f: BinaryIO, path: Path, state: AuditState, size: int) -> int:
    """Byte offset of the recorded entry's line (checked: same seq and MAC)."""
    if state.offset is None:  # unknown offset (a state carried over from a checkpoint)
        f.seek(0)
        pos = 0
        for _ in range(state.seq - 1):
            line = f.readline()
            if not line:
                break
            pos += len(line)
        offset = pos
    else:
        offset = state.offset
    if offset >= size:
        raise AuditStateMismatch(
            f"the audit log {path} is shorter than recorded: it has {size} bytes, but the "
            f"keystore records entry {state.seq} of chain {state.chain} at byte {offset} "
            "(cut back, or replaced by an older copy)"
        )
    f.seek(offset)
    raw = f.readline().rstrip(b"\n")
    try:
        _, mac, seq = parse_line(raw)
    except AuditTampered:
        seq, mac = -1, b""
    if seq != state.seq or not hmac.compare_digest(mac, state.mac):
        raise AuditStateMismatch(
            f"the audit log {path} differs from the recorded chain: entry {state.seq} of "
            f"chain {state.chain} (MAC {state.mac.hex()[:16]}...) is not where it was written "
            "(replaced by another log, an older copy, or edited)"
        )
    return offset


def parse_line(raw: bytes) -> tuple[bytes, bytes, int]:
    """(body, mac, seq) of a line in canonical form; AuditTampered otherwise."""
    split = split_line(raw)
    if split is None:
        raise AuditTampered("not a valid audit entry (no MAC at the end of the line)")
    body, mac = split
    try:
        entry = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise AuditTampered("not a valid audit entry (edited or damaged)") from None
    if not isinstance(entry, dict) or _canonical(entry) != body:
        raise AuditTampered("the entry is not in canonical form (re-encoded or edited)")
    seq = entry.get("seq")
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        raise AuditTampered("the entry has no valid sequence number")
    return body, mac, seq


class Frontier(NamedTuple):
    """The end of a verified part of a log: the offset just past its last line, that
    line's sequence number and MAC (see :mod:`anyhsm.audit_marks`)."""

    end: int
    seq: int
    mac: bytes


# --- the writer ----------------------------------------------------------------------------


class AuditLog:
    """An open audit log that entries are appended to."""

    def __init__(
        self,
        path: Path,
        store: AuditStateStore,
        *,
        durability: str = "batched",
        flush_interval_ms: int = 5,
        forwarder: AuditForwarder | None = None,
    ) -> None:
        self.path = path
        self._store = store
        self._durability = durability
        self._interval = max(flush_interval_ms, 1) / 1000
        self._forwarder = forwarder
        self.forward_errors = 0
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._failed: str | None = None
        self._uid = os.getuid()
        self._middles: dict[tuple[object, ...], str] = {}
        self._ring = store.audit_keys()
        try:
            self.state = store.load_audit_state()
            tail = _check_against_state(path, self.state, self._ring)
        except BaseException:
            self._ring.wipe()
            raise
        self._kid = self._ring.current_kid
        self._key = self._ring.current
        self._keybuf = self._key.buffer
        self._seq, self._mac, self._last_offset, self._end = (
            tail.seq,
            tail.mac,
            tail.offset,
            tail.end,
        )
        self._synced_seq = self._checkpointed_seq = self.state.seq
        self._checkpoint_at = 0.0
        # latest(): the newest value of each member asked for, and where the verified part
        # of the log ends (None until the first call); the last checkpoint made or read.
        self._marks: dict[str, str | None] = {}
        self._frontier: Frontier | None = None
        self._checkpoint = (self.state.seq, self.state.mac, self.state.offset)
        self._checkpoint_blocked = False  # the last checkpoint timed out on the store's lock
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            self._ring.wipe()
            raise AuditWriteFailed(
                f"cannot open the audit log {path}: {e.strerror}",
                hint="check the path and permissions of [audit] path",
            ) from None
        self._flusher: threading.Thread | None = None
        if durability == "batched":
            self._flusher = threading.Thread(
                target=self._flush_loop, name="anyhsm-audit", daemon=True
            )
            self._flusher.start()

    def _truncate_to(self, size: int) -> None:
        """Remove a partial entry we just wrote (called with the flock held)."""
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_size > size >= 0:
                os.ftruncate(self._fd, size)

    # --- tail tracking -----------------------------------------------------------------

    def _sync_tail(self) -> None:
        """Re-read the last entry if the file changed under us (another process)."""
        size = os.lseek(self._fd, 0, os.SEEK_END)  # the size (writes append: O_APPEND)
        if size == self._end:
            return
        if size < self._end:
            raise AuditStateMismatch(
                f"the audit log {self.path} shrank from {self._end} to {size} bytes while "
                "open (cut back or replaced)"
            )
        seq, mac, offset, kid = read_tail(self.path, size)
        if kid > self._kid:
            raise AuditKeyRotated(
                "the audit key was rotated by another process (master-key rotation)",
                hint="reopen the handle (open_hsm) to continue with the new key",
            )
        # The tail still shows our key, but the writer may have rotated the master key and
        # been killed before its first entry under the new one: ask the store, which
        # refuses a retired handle (the keystore: KeystoreRotated), before appending under
        # our key. Only that check (one stat), not a manifest reload racing our flusher.
        self._store.check_not_rotated()
        self._seq, self._mac, self._last_offset, self._end = seq, mac, offset, size

    # --- appending ---------------------------------------------------------------------

    def append(
        self,
        op: str,
        outcome: str,
        *,
        provider: str | None = None,
        key_id: str | None = None,
        error: str | None = None,
        detail: Mapping[str, str] | None = None,
    ) -> int:
        """Write one entry; returns its sequence number. Raises AuditWriteFailed."""
        with self._lock:
            if self._failed is not None:
                raise AuditWriteFailed(
                    f"the audit log {self.path} failed earlier ({self._failed}); "
                    "refusing operations",
                    hint="fix the disk or permissions problem and reopen",
                )
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
                try:
                    if os.lseek(self._fd, 0, os.SEEK_END) != self._end:
                        self._sync_tail()  # another process wrote since (rare)
                    data = self._write_locked(op, outcome, provider, key_id, error, detail)
                    seq = self._seq
                finally:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            except HsmError as e:
                self._failed = e.message
                raise
            except OSError as e:
                self._failed = e.strerror or str(e)
                raise AuditWriteFailed(
                    f"cannot write the audit log {self.path}: {self._failed}",
                    hint="the operation's result was not returned; fix the disk or permissions",
                ) from None
            if self._durability == "fsync":
                self._synced_seq = seq
                mac_now, offset_now = self._mac, self._last_offset
            elif not self._dirty.is_set():
                self._dirty.set()
        if self._forwarder is not None:
            self._forward(data)
        if self._durability == "fsync":
            self._maybe_checkpoint(seq, mac_now, offset_now, force=False)
        return seq

    def _write_locked(
        self,
        op: str,
        outcome: str,
        provider: str | None,
        key_id: str | None,
        error: str | None,
        detail: Mapping[str, str] | None,
    ) -> bytes:
        if self._seq >= MAX_SEQ:
            raise AuditWriteFailed("the audit chain reached its last sequence number")
        canon = self._body(op, outcome, provider, key_id, error, detail)
        mac = _hmac_sha256(self._keybuf, self._mac + canon)
        data = canon[:-1] + b',"mac":"' + mac.hex().encode() + b'"}\n'
        try:
            written = os.write(self._fd, data)
        except OSError:
            self._truncate_to(self._end)
            raise
        if written != len(data):
            # Never leave a torn entry behind: cut back to the last whole one.
            self._truncate_to(self._end)
            raise OSError(28, "short write to audit log")
        if self._durability == "fsync":
            os.fsync(self._fd)
        self._seq += 1
        self._mac = mac
        self._last_offset = self._end
        frontier = self._frontier
        if frontier is not None and frontier.end == self._end:  # latest() is in use
            self._frontier = Frontier(self._end + len(data), self._seq, mac)
            if detail:
                for member in self._marks:
                    value = detail.get(member)
                    if value is not None:
                        self._marks[member] = value
        self._end += len(data)
        return data

    def _body(
        self,
        op: str,
        outcome: str,
        provider: str | None,
        key_id: str | None,
        error: str | None,
        detail: Mapping[str, str] | None,
    ) -> bytes:
        """The canonical bytes of the next entry (:func:`entry_body`), built from parts:
        the members that sort between ``detail`` and ``seq`` (error, key, kid, op,
        outcome, pid, principal, provider) repeat from one entry to the next, so their
        encoding is kept per combination; ``detail``, ``seq``, ``ts`` and ``uid`` are
        added around it. Byte for byte :func:`entry_body` of the same entry
        (tests/core/test_audit_fast.py compares the two on generated entries)."""
        who = principal.get()
        pid = _pid[0]
        kid = self._kid
        ident = (op, outcome, provider, key_id, error, who, pid, kid)
        middle = self._middles.get(ident)
        if middle is None:
            fields = _members(op, outcome, pid, who, kid, provider, key_id, error)
            if len(self._middles) >= _MIDDLES_MAX:
                self._middles.clear()
            middle = self._middles[ident] = _canonical_str(fields)[1:-1]
        if detail:
            plain = detail if type(detail) is dict else dict(detail)
            head = '{"detail":' + _canonical_str(plain) + ","
        else:
            head = "{"
        seq = self._seq + 1
        return f'{head}{middle},"seq":{seq},"ts":"{_timestamp()}","uid":{self._uid}}}'.encode()

    def _forward(self, line: bytes) -> None:
        if self._forwarder is None:
            return
        try:
            self._forwarder.send(line)
        except HsmError:
            self.forward_errors += 1
            raise
        except OSError as e:
            self.forward_errors += 1
            log.warning("anyhsm: forwarding an audit entry failed: %s", e.strerror or e)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[Callable[[str, str, Mapping[str, str] | None], int]]:
        """Hold the log (thread lock and flock) for a step that must not interleave with
        other writers, such as switching keys; yields an append function."""
        with self._lock:
            if self._failed is not None:
                raise AuditWriteFailed(f"the audit log {self.path} failed earlier")
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                self._sync_tail()

                def append(op: str, outcome: str, detail: Mapping[str, str] | None) -> int:
                    data = self._write_locked(op, outcome, None, None, None, detail)
                    os.fsync(self._fd)
                    self._synced_seq = self._seq
                    self._forward(data)
                    return self._seq

                yield append
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def position(self) -> tuple[int, bytes, int]:
        """(seq, mac, offset) of the last entry written (call inside :meth:`exclusive`)."""
        return self._seq, self._mac, self._last_offset

    def switch_key(self) -> None:
        """Reload the key ring after a rotation made by this process (inside exclusive)."""
        ring = self._store.audit_keys()
        if ring.current_from != self._seq + 1:
            ring.wipe()
            raise AuditWriteFailed("the new audit key does not start at the next entry")
        self._ring.wipe()
        self._ring = ring
        self._kid, self._key = ring.current_kid, ring.current
        self._keybuf = self._key.buffer
        self._checkpointed_seq = self._synced_seq = self._seq

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(timeout=0.5)
            if self._stop.is_set():
                break
            self._stop.wait(self._interval)
            try:
                self.flush()
            except HsmError:
                pass  # flush() has marked the log failed: appends now refuse
            except Exception as e:  # the flusher must never die silently
                with self._lock:
                    self._failed = f"background flush failed: {type(e).__name__}"
                return

    def flush(self) -> None:
        """fsync the log now and advance the recorded state.

        Disk work (fsync, state write) runs outside the append lock, so appends are
        never stalled behind the disk; entries appended meanwhile are covered by the
        next flush.
        """
        with self._lock:
            if self._fd < 0 or (not self._dirty.is_set() and self._synced_seq == self._seq):
                return
            self._dirty.clear()
            target, target_mac, target_off, fd = self._seq, self._mac, self._last_offset, self._fd
        try:
            os.fsync(fd)
        except OSError as e:
            with self._lock:
                self._failed = e.strerror or str(e)
            raise AuditWriteFailed(f"cannot fsync the audit log: {e.strerror}") from None
        with self._lock:
            self._synced_seq = max(self._synced_seq, target)
        self._maybe_checkpoint(target, target_mac, target_off, force=False)

    def _maybe_checkpoint(self, seq: int, mac: bytes, offset: int, *, force: bool) -> None:
        """Advance the recorded state to a synced entry (at most once a second unless
        forced); the store never moves it backwards, in case another process got further."""
        if seq == 0 or seq <= self._checkpointed_seq:
            return
        now = time.monotonic()
        if not force and now - self._checkpoint_at < CHECKPOINT_INTERVAL_S:
            return
        self._checkpoint_at = now
        # On failure: plain assignments, no `with self._lock`: close() calls this with the
        # lock held (a threading.Lock, not reentrant), and taking it again here hung close()
        # for ever when recording the state failed (a damaged manifest, a rotation elsewhere).
        try:
            self._store.advance_audit_state(seq, mac, offset)
        except OSError as e:
            self._failed = e.strerror or str(e)
            raise AuditWriteFailed(f"cannot record the audit state: {e.strerror}") from None
        except LockTimeout:
            # Another process holds the keystore lock: the entries are written, only their
            # record in the manifest waits (it may lag the log). Not a failure of the log:
            # the caller gets the LockTimeout (exit 10), the next checkpoint tries again.
            self._checkpoint_blocked = True
            raise
        except HsmError as e:
            self._failed = e.message
            raise
        self._checkpoint_blocked = False
        self._checkpointed_seq = seq
        self._checkpoint = (seq, mac, offset)

    @property
    def last_seq(self) -> int:
        return self._seq

    def latest(self, member: str) -> str | None:
        """``detail[member]`` of the newest entry of the whole log that has it (None:
        none), as of now and MAC-verified (:mod:`anyhsm.audit_marks`): the entries of
        other processes appended since the last call are verified in order; the first call
        for a member reads back from the last checkpoint and verifies up to it. A line
        that does not verify is AuditStateMismatch. For the spending policy's state, whose
        commits record their sequence number here (``state_seq``)."""
        from anyhsm import audit_marks as marks

        with self._lock:
            if self._failed is not None:
                raise AuditWriteFailed(f"the audit log {self.path} failed earlier")
            frontier = self._frontier
            if (
                member in self._marks
                and frontier is not None
                and frontier.end == self._end
                and os.lseek(self._fd, 0, os.SEEK_END) == self._end
            ):
                return self._marks[member]  # verified to the end; nobody appended since
            with open(self.path, "rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # no line half-written by another
                size = os.fstat(f.fileno()).st_size
                ring = self._ring

                def key_for(seq: int) -> SecretBytes:
                    return ring.key_for(seq)[1]

                if member not in self._marks:
                    marks.needle(member)  # a plain member name, or ValueError
                    base = self._checkpoint_frontier(f, size)
                    self._marks[member] = (
                        marks.find_before(f, member, base, self.state.genesis, key_for)
                        if base.seq
                        else None
                    )
                    if self._frontier is None or self._frontier.end > base.end:
                        self._frontier = base  # verify on from the checkpoint, for all
                assert self._frontier is not None  # set with the first member
                frontier, found = marks.verify_forward(
                    f, self._frontier, size, self._marks, key_for
                )
                self._frontier = frontier
                self._marks.update(found)
                return self._marks[member]

    def _checkpoint_frontier(self, f: BinaryIO, size: int) -> Frontier:
        """The verified start of :meth:`latest`: the last checkpointed entry (made by this
        log, or recorded when it opened), checked to be where it was recorded."""
        seq, mac, offset = self._checkpoint
        if seq == 0:
            return Frontier(0, 0, self.state.genesis)
        state = AuditState(self.state.chain, seq, mac, offset, self.state.genesis)
        start = _locate(f, self.path, state, size)
        f.seek(start)
        return Frontier(start + len(f.readline()), seq, mac)

    @property
    def waits_per_entry(self) -> bool:
        """Whether each append waits on the disk (fsync durability) or a forwarder."""
        return self._durability == "fsync" or self._forwarder is not None

    @property
    def key_id(self) -> int:
        return self._kid

    def verify(self) -> VerifyResult:
        """Verify the whole chain against the recorded state (flushes first)."""
        self.flush()
        with self._store.audit_keys() as ring:
            return verify_log(self.path, ring, self._store.load_audit_state())

    def close(self) -> None:
        self._stop.set()
        self._dirty.set()
        if self._flusher is not None:
            self._flusher.join(timeout=2)
        with self._lock:
            if self._fd >= 0:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX)
                    try:
                        self._sync_tail()
                        os.fsync(self._fd)
                        self._synced_seq = self._seq
                        if self._failed is None and not self._checkpoint_blocked:
                            self._maybe_checkpoint(
                                self._seq, self._mac, self._last_offset, force=True
                            )
                        elif self._checkpoint_blocked:
                            # Not a second full lock wait on the way out: the recorded
                            # state lags the log until the next writer's checkpoint.
                            log.warning(
                                "anyhsm: audit state not recorded at close (the keystore "
                                "lock is held by another process)"
                            )
                    finally:
                        fcntl.flock(self._fd, fcntl.LOCK_UN)
                except (OSError, HsmError) as e:
                    log.error("anyhsm: closing the audit log %s failed: %s", self.path, e)
                os.close(self._fd)
                self._fd = -1
        if self._forwarder is not None:
            self._forwarder.close()
        self._ring.wipe()


def read_tail(path: Path, size: int) -> tuple[int, bytes, int, int]:
    """(seq, mac, line offset, key id) of the last complete entry; (0, GENESIS, 0, 1) for an
    empty log."""
    if size == 0:
        return 0, GENESIS, 0, 1
    with open(path, "rb") as f:
        start = max(0, size - _TAIL_READ)
        f.seek(start)
        chunk = f.read(size - start)
    body = chunk.rstrip(b"\n")
    cut = body.rfind(b"\n")
    last = body[cut + 1 :]
    offset = start + cut + 1
    try:
        entry = json.loads(last)
        seq = entry["seq"]
        kid = entry.get("kid", 1)
        if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= MAX_SEQ:
            raise ValueError("bad sequence number")
        if type(kid) is not int:
            raise ValueError("bad key id")
        return seq, bytes.fromhex(str(entry["mac"])), offset, kid
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError):
        raise AuditTampered(
            f"the last line of {path} is not a valid audit entry",
            hint="run 'anyhsm audit verify'; restore the log from backup",
        ) from None


# --- verification --------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    first_bad_line: int | None = None
    reason: str = ""
    checkpoint_seq: int | None = None
    chain: int = 1

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "first_bad_line": self.first_bad_line,
            "reason": self.reason or None,
            "checkpoint_seq": self.checkpoint_seq,
            "chain": self.chain,
        }


def verify_log(path: Path, ring: AuditKeyRing, state: AuditState) -> VerifyResult:
    """Check the whole chain line by line against ``state``; name the first bad line
    (1-based). Every line must be canonical and MAC-ed over its exact bytes, in sequence
    from the chain's genesis, and the recorded entry must be there with its MAC."""
    try:
        with open(path, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # no half-written line of another writer
            data = f.read()
    except FileNotFoundError:
        if state.seq == 0:
            return VerifyResult(True, 0, None, "", 0, state.chain)
        return VerifyResult(
            False, 0, None, f"audit log {path} does not exist", state.seq, state.chain
        )
    prev = state.genesis
    expected = 1
    count = 0
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        return _bad(len(lines), count, "the last line is incomplete (torn write or truncation)")
    recorded_ok = state.seq == 0
    for lineno, raw in enumerate(lines, start=1):
        try:
            body, mac, seq = parse_line(raw)
        except AuditTampered as e:
            return _bad(lineno, count, e.message)
        if seq != expected:
            return _bad(
                lineno,
                count,
                f"sequence {seq!r} where {expected} was expected (entry deleted, reordered "
                "or inserted)",
            )
        kid, key = ring.key_for(seq)
        if not hmac.compare_digest(line_mac(key, prev, body), mac):
            return _bad(lineno, count, "MAC mismatch (entry edited, or forged and inserted)")
        if json.loads(body).get("kid", 1) != kid:
            return _bad(lineno, count, f"entry names audit key {kid} wrongly")
        if seq == state.seq:
            recorded_ok = hmac.compare_digest(mac, state.mac)
            if not recorded_ok:
                return _bad(lineno, count, "entry at the recorded state differs", state)
        prev = mac
        expected += 1
        count += 1
    if not recorded_ok:
        return VerifyResult(
            False,
            count,
            count + 1,
            f"log truncated: it ends at entry {count} but the keystore records entry {state.seq}",
            state.seq,
            state.chain,
        )
    return VerifyResult(True, count, None, "", state.seq, state.chain)


def _bad(lineno: int, count: int, reason: str, state: AuditState | None = None) -> VerifyResult:
    return VerifyResult(
        False,
        count,
        lineno,
        f"line {lineno}: {reason}",
        state.seq if state else None,
        state.chain if state else 1,
    )


# --- recovery ------------------------------------------------------------------------------


def diagnose(path: Path, store: AuditStateStore) -> str | None:
    """Why the log does not match the recorded state, or None when it does."""
    with store.audit_keys() as ring:
        try:
            _check_against_state(path, store.load_audit_state(), ring)
        except (AuditStateMismatch, AuditTampered, AuditKeyRotated) as e:
            return e.message
    return None


def recover_chain(
    path: Path, store: AuditStateStore, reason: str
) -> tuple[Path | None, dict[str, str]]:
    """Start a new chain after an operator accepted a loss: move whatever log is there
    aside (kept, never deleted), begin chain n+1 whose genesis is the last MAC the state
    recorded, and return (where the old log went, the detail for the first entry, which
    the caller writes through a normal AuditLog)."""
    problem = diagnose(path, store)
    if problem is None:
        raise AuditStateMismatch(
            f"the audit log {path} matches the recorded chain: there is nothing to recover",
            hint="'anyhsm audit verify' checks it",
        )
    old = store.load_audit_state()
    moved: Path | None = None
    if path.exists():
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        moved = path.with_name(f"{path.name}.lost-chain{old.chain}-{stamp}")
        os.replace(path, moved)
    new = store.start_audit_chain(old.mac)
    detail = {
        "reason": reason[:500],
        "found": problem[:500],
        "lost_chain": str(old.chain),
        "lost_recorded_seq": str(old.seq),
        "lost_recorded_mac": old.mac.hex(),
        "new_chain": str(new.chain),
        "old_log_moved_to": str(moved) if moved else "",
    }
    return moved, detail
