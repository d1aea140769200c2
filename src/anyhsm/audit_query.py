"""Reading the audit log: select entries (by operation, key, outcome, time) and export a
copy with its verification summary.

Read-only by design: nothing here writes to the log or the keystore. The chain is
verified by the caller (``Hsm.verify_audit`` on a ``verify_only`` handle) and passed in,
so that a reader always says whether what it shows is intact; entries are shown even
when it is not (an operator investigating a break needs them), flagged as unverified.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from anyhsm.audit import VerifyResult
from anyhsm.errors import UsageError
from anyhsm.fsutil import atomic_write

EXPORT_FORMAT = 1


def parse_time(text: str, what: str = "time") -> datetime:
    """An ISO 8601 instant (``2026-12-06``, ``2026-12-06T21:00``, ``...Z``, ``...+02:00``);
    without a zone it is UTC, like every audit timestamp."""
    raw = text.strip()
    if raw.endswith(("Z", "z")):
        raw = raw[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise UsageError(
            f"{what} {text!r} is not an ISO 8601 date or time",
            hint="e.g. 2026-12-06, 2026-12-06T21:00:00Z or 2026-12-06T22:00:00+01:00",
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class AuditQuery:
    """Which entries to show; every given criterion must hold. ``since`` is inclusive,
    ``until`` exclusive; ``limit`` keeps the last N matches (the most recent)."""

    op: str | None = None
    key: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be at least 1, not {self.limit}")

    def matches(self, entry: Mapping[str, object]) -> bool:
        if self.op is not None and entry.get("op") != self.op:
            return False
        if self.outcome is not None and entry.get("outcome") != self.outcome:
            return False
        if self.key is not None:
            detail = entry.get("detail")
            label = detail.get("label") if isinstance(detail, dict) else None
            if self.key not in (entry.get("key"), label):
                return False
        if self.since is not None or self.until is not None:
            when = _entry_time(entry)
            if when is None:
                return False
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when >= self.until:
                return False
        return True


def _entry_time(entry: Mapping[str, object]) -> datetime | None:
    ts = entry.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        when = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass
class AuditSelection:
    """The matching entries, in log order, and what could not be read."""

    entries: list[dict[str, object]]
    scanned: int = 0
    unreadable_lines: list[int] = field(default_factory=list)


def read_entries(path: Path) -> Iterator[tuple[int, dict[str, object] | None]]:
    """(1-based line number, entry or None when the line is not a JSON object) for every
    line of the log; a missing log has none. Only verification says an entry is genuine."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                entry = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                entry = None
            yield lineno, entry if isinstance(entry, dict) else None


def select(path: Path, query: AuditQuery) -> AuditSelection:
    """The entries of the log at ``path`` that ``query`` matches."""
    kept: deque[dict[str, object]] = deque(maxlen=query.limit)
    out = AuditSelection([])
    for lineno, entry in read_entries(path):
        out.scanned += 1
        if entry is None:
            out.unreadable_lines.append(lineno)
        elif query.matches(entry):
            kept.append(entry)
    out.entries = list(kept)
    return out


_FIXED = ("seq", "ts", "op", "outcome", "mac")


def _plain(value: object) -> str:
    """A value as an operator reads it: no quotes, no Python reprs."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def format_entry(entry: Mapping[str, object]) -> str:
    """One readable line: ``#seq ts op outcome`` then ``name=value`` for the rest (the
    detail's members flattened as ``detail.name``); the MAC is left out."""
    head = " ".join(_plain(entry.get(name)) for name in ("ts", "op", "outcome") if name in entry)
    parts = [f"#{_plain(entry.get('seq'))}", head] if head else [f"#{_plain(entry.get('seq'))}"]
    for name in sorted(entry):
        if name in _FIXED:
            continue
        value = entry[name]
        if name == "detail" and isinstance(value, dict):
            parts.extend(f"detail.{k}={_plain(v)}" for k, v in sorted(value.items()))
        else:
            parts.append(f"{name}={_plain(value)}")
    return " ".join(parts)


def export_log(log_path: Path, out: Path, verify: VerifyResult) -> dict[str, object]:
    """Write a byte-exact copy of the log to ``out`` and its summary (the verification
    result, counts, SHA-256 of the copy) to ``out`` + ``.summary.json``, each 0600 and
    atomically. When the chain verified, the copy is cut to the entries verified, so a
    line appended meanwhile by another process is never exported as verified; when it
    did not, the whole log is copied as evidence. Returns the summary."""
    try:
        data = log_path.read_bytes()
    except FileNotFoundError:
        data = b""
    if verify.ok:
        lines = data.split(b"\n")
        data = b"".join(line + b"\n" for line in lines[: verify.entries])
    entries = [json.loads(x) for x in data.splitlines() if _is_json_object(x)]
    first = entries[0] if entries else {}
    last = entries[-1] if entries else {}
    summary_path = out.with_name(out.name + ".summary.json")
    summary: dict[str, object] = {
        "format": EXPORT_FORMAT,
        "source": str(log_path),
        "out": str(out),
        "summary": str(summary_path),
        "exported_at": datetime.now(UTC).isoformat(),
        "bytes": len(data),
        "lines": data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1),
        "sha256": hashlib.sha256(data).hexdigest(),
        "first_seq": first.get("seq"),
        "last_seq": last.get("seq"),
        "first_ts": first.get("ts"),
        "last_ts": last.get("ts"),
        "verified": verify.ok,
        "verify": verify.to_dict(),
    }
    atomic_write(out, data, 0o600)
    atomic_write(summary_path, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return summary


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
