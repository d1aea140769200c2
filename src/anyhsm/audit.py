"""Append-only, HMAC-chained JSON-lines audit log, and its verifier.

Each line is one JSON object with a sequence number, time, operation, outcome,
provider, key id and error class, plus ``mac`` = HMAC-SHA256(key, previous mac
|| canonical JSON of the entry without its mac). Editing, deleting,
reordering or inserting a line breaks the chain at that line; truncating the
tail is caught against a checkpoint (last sequence number and mac, itself
MAC-ed) kept with the keystore.

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
import fcntl
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from anyhsm.errors import AuditError, AuditTampered, AuditWriteFailed
from anyhsm.secret import SecretBytes

log = logging.getLogger("anyhsm")

GENESIS = bytes(32)
MAX_SEQ = 2**63 - 1
CHECKPOINT_INTERVAL_S = 1.0
_TAIL_READ = 1 << 16


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _canonical(obj: Mapping[str, object]) -> bytes:
    return _ENCODER.encode(obj).encode()


_ts_cache: list[object] = [-1, ""]


def _timestamp() -> str:
    """ISO 8601 UTC with microseconds, like datetime.isoformat, at a third of the cost
    (the date-time prefix is formatted once per second)."""
    ns = time.time_ns()
    sec, us = divmod(ns // 1000, 1_000_000)
    if _ts_cache[0] != sec:
        _ts_cache[0] = sec
        _ts_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_ts_cache[1]}.{us:06d}+00:00"


def entry_mac(key: SecretBytes, prev: bytes, body: Mapping[str, object]) -> bytes:
    return hmac.digest(key.buffer, prev + _canonical(body), "sha256")


def checkpoint_mac(key: SecretBytes, seq: int, mac: bytes) -> bytes:
    return hmac.digest(
        key.buffer, b"anyhsm-audit-checkpoint" + seq.to_bytes(8, "big") + mac, "sha256"
    )


def make_checkpoint(key: SecretBytes, seq: int, mac: bytes) -> bytes:
    return _canonical({"seq": seq, "mac": mac.hex(), "check": checkpoint_mac(key, seq, mac).hex()})


CheckpointReader = Callable[[], bytes | None]
CheckpointWriter = Callable[[bytes], None]


class AuditLog:
    """An open audit log that entries are appended to."""

    def __init__(
        self,
        path: Path,
        key: SecretBytes,
        *,
        durability: str = "batched",
        flush_interval_ms: int = 5,
        read_checkpoint: CheckpointReader | None = None,
        write_checkpoint: CheckpointWriter | None = None,
    ) -> None:
        self.path = path
        self._key = SecretBytes(key.buffer)
        self._keybuf = self._key.buffer
        self._durability = durability
        self._interval = max(flush_interval_ms, 1) / 1000
        self._read_cp = read_checkpoint
        self._write_cp = write_checkpoint
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._seq = 0
        self._mac = GENESIS
        self._end = -1
        self._synced_seq = 0
        self._checkpointed_seq = 0
        self._checkpoint_at = 0.0
        self._failed: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise AuditWriteFailed(
                f"cannot open the audit log {path}: {e.strerror}",
                hint="check the path and permissions of [audit] path",
            ) from None
        self._checkpoint_missing = False
        if write_checkpoint is not None and read_checkpoint is not None:
            self._init_checkpoint()
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

    def _init_checkpoint(self) -> None:
        """A new log gets its checkpoint before its first entry. A non-empty log
        without one had it deleted: never recreate it silently (verify reports it)."""
        assert self._read_cp is not None and self._write_cp is not None
        if self._read_cp() is not None:
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if os.fstat(self._fd).st_size == 0:
                self._write_cp(make_checkpoint(self._key, 0, GENESIS))
            else:
                self._checkpoint_missing = True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # --- tail tracking -----------------------------------------------------------------

    def _sync_tail(self) -> None:
        """Re-read the last entry if the file changed under us (another process)."""
        size = os.fstat(self._fd).st_size
        if size == self._end:
            return
        self._seq, self._mac = read_tail(self.path, size)
        self._end = size

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
                    self._sync_tail()
                    body: dict[str, object] = {
                        "seq": self._seq + 1,
                        "ts": _timestamp(),
                        "op": op,
                        "outcome": outcome,
                        "pid": os.getpid(),
                    }
                    if provider:
                        body["provider"] = provider
                    if key_id:
                        body["key"] = key_id
                    if error:
                        body["error"] = error
                    if detail:
                        body["detail"] = dict(detail)
                    canon = _canonical(body)
                    mac = hmac.digest(self._keybuf, self._mac + canon, "sha256")
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
                    self._end += len(data)
                    seq = self._seq
                finally:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError as e:
                self._failed = e.strerror or str(e)
                raise AuditWriteFailed(
                    f"cannot write the audit log {self.path}: {self._failed}",
                    hint="the operation's result was not returned; fix the disk or permissions",
                ) from None
            if self._durability == "fsync":
                self._synced_seq = seq
                mac_now = self._mac
            elif not self._dirty.is_set():
                self._dirty.set()
        if self._durability == "fsync":
            self._maybe_checkpoint(seq, mac_now, force=False)
        return seq

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(timeout=0.5)
            if self._stop.is_set():
                break
            self._stop.wait(self._interval)
            try:
                self.flush()
            except AuditError:
                pass  # flush() has marked the log failed: appends now refuse
            except Exception as e:  # the flusher must never die silently
                with self._lock:
                    self._failed = f"background flush failed: {type(e).__name__}"
                return

    def flush(self) -> None:
        """fsync the log now and advance the checkpoint.

        Disk work (fsync, checkpoint write) runs outside the append lock, so
        appends are never stalled behind the disk; entries appended meanwhile
        are covered by the next flush.
        """
        with self._lock:
            if self._fd < 0 or (not self._dirty.is_set() and self._synced_seq == self._seq):
                return
            self._dirty.clear()
            target, target_mac, fd = self._seq, self._mac, self._fd
        try:
            os.fsync(fd)
        except OSError as e:
            with self._lock:
                self._failed = e.strerror or str(e)
            raise AuditWriteFailed(f"cannot fsync the audit log: {e.strerror}") from None
        with self._lock:
            self._synced_seq = max(self._synced_seq, target)
        self._maybe_checkpoint(target, target_mac, force=False)

    def _maybe_checkpoint(self, seq: int, mac: bytes, *, force: bool) -> None:
        """Advance the checkpoint to a synced entry (at most once a second unless
        forced); never backwards, in case another process got further."""
        if self._write_cp is None or seq == 0 or seq <= self._checkpointed_seq:
            return
        if self._checkpoint_missing:
            return  # keep the alarm visible to 'audit verify' until an operator acts
        now = time.monotonic()
        if not force and now - self._checkpoint_at < CHECKPOINT_INTERVAL_S:
            return
        self._checkpoint_at = now
        raw = self._read_cp() if self._read_cp else None
        current = parse_checkpoint(raw)
        if raw is None:
            self._checkpoint_missing = True  # vanished while we ran: do not paper over it
            return
        if current is not None and current[0] >= seq:
            self._checkpointed_seq = current[0]
            return
        try:
            self._write_cp(make_checkpoint(self._key, seq, mac))
            self._checkpointed_seq = seq
        except OSError as e:
            raise AuditWriteFailed(f"cannot write the audit checkpoint: {e.strerror}") from None

    @property
    def last_seq(self) -> int:
        return self._seq

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
                        if self._failed is None:
                            self._maybe_checkpoint(self._seq, self._mac, force=True)
                    finally:
                        fcntl.flock(self._fd, fcntl.LOCK_UN)
                except (OSError, AuditError) as e:
                    log.error("anyhsm: closing the audit log %s failed: %s", self.path, e)
                os.close(self._fd)
                self._fd = -1
        self._key.wipe()


def read_tail(path: Path, size: int) -> tuple[int, bytes]:
    """(seq, mac) of the last complete entry, or (0, GENESIS) for an empty log."""
    if size == 0:
        return 0, GENESIS
    with open(path, "rb") as f:
        start = max(0, size - _TAIL_READ)
        f.seek(start)
        chunk = f.read(size - start)
    lines = chunk.rstrip(b"\n").split(b"\n")
    last = lines[-1]
    try:
        entry = json.loads(last)
        seq = entry["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= MAX_SEQ:
            raise ValueError("bad sequence number")
        return seq, bytes.fromhex(str(entry["mac"]))
    except (ValueError, KeyError, TypeError, RecursionError, OverflowError):
        raise AuditTampered(
            f"the last line of {path} is not a valid audit entry",
            hint="run 'anyhsm audit verify'; restore the log from backup",
        ) from None


def parse_checkpoint(raw: bytes | None) -> tuple[int, bytes, bytes] | None:
    if not raw:
        return None
    try:
        d = json.loads(raw)
        seq = d["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
            return None
        return seq, bytes.fromhex(str(d["mac"])), bytes.fromhex(str(d["check"]))
    except (ValueError, KeyError, TypeError, RecursionError, OverflowError):
        return None


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    first_bad_line: int | None = None
    reason: str = ""
    checkpoint_seq: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "first_bad_line": self.first_bad_line,
            "reason": self.reason,
            "checkpoint_seq": self.checkpoint_seq,
        }


def verify_log(
    path: Path,
    key: SecretBytes,
    checkpoint: bytes | None = None,
    *,
    require_checkpoint: bool = False,
) -> VerifyResult:
    """Check the whole chain; name the first bad line (1-based).

    With ``require_checkpoint`` a non-empty log without a checkpoint fails: every
    log anyhsm creates gets its checkpoint before its first entry, so a missing
    one means it was deleted (which would otherwise hide a truncated tail).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return VerifyResult(False, 0, None, f"audit log {path} does not exist")
    prev = GENESIS
    expected = 1
    count = 0
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        return _bad(len(lines), count, "the last line is incomplete (torn write or truncation)")
    for lineno, raw in enumerate(lines, start=1):
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
            mac = bytes.fromhex(str(entry.pop("mac")))
            seq = entry.get("seq")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            return _bad(lineno, count, "not a valid audit entry (edited or damaged)")
        if type(seq) is not int or seq != expected:
            return _bad(
                lineno,
                count,
                f"sequence {seq!r} where {expected} was expected (entry deleted, reordered "
                "or inserted)",
            )
        if not hmac.compare_digest(entry_mac(key, prev, entry), mac):
            return _bad(lineno, count, "MAC mismatch (entry edited, or forged and inserted)")
        prev = mac
        expected += 1
        count += 1
    cp = parse_checkpoint(checkpoint)
    if checkpoint is not None and cp is None:
        return VerifyResult(False, count, None, "the checkpoint is unreadable")
    if cp is None and require_checkpoint and count > 0:
        return VerifyResult(
            False,
            count,
            None,
            "the audit checkpoint is missing although the log has entries (deleted?); "
            "a truncated tail cannot be ruled out",
        )
    if cp is not None:
        seq, mac, check = cp
        if not hmac.compare_digest(checkpoint_mac(key, seq, mac), check):
            return VerifyResult(False, count, None, "the checkpoint fails authentication", seq)
        if seq > count:
            return VerifyResult(
                False,
                count,
                count + 1,
                f"log truncated: it ends at entry {count} but the checkpoint records entry {seq}",
                seq,
            )
        line = lines[seq - 1] if seq >= 1 else None
        if line is not None and json.loads(line).get("mac") != mac.hex():
            return VerifyResult(False, count, seq, "entry at the checkpoint differs", seq)
        return VerifyResult(True, count, None, "", seq)
    return VerifyResult(True, count, None, "")


def _bad(lineno: int, count: int, reason: str) -> VerifyResult:
    return VerifyResult(False, count, lineno, f"line {lineno}: {reason}")
