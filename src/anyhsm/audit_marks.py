"""Marks: the newest value of a ``detail`` member anywhere in the audit chain, verified.

The spending policy's state names its sequence number in the audit entry of every commit
(``detail.state_seq``), and refuses a state older than the newest number the chain
records: the chain is anchored (its checkpoint in the keystore manifest, a TPM counter
where enrolled), so it cannot be put back together with the state's directory. That check
is only as good as the reading of the chain, so every line it relies on is MAC-verified:

- before the checkpoint: the newest line that has the member is found by reading back
  from the checkpointed entry, then the chain is verified forward from that line to the
  checkpointed entry, whose MAC the keystore records: an edit of any line in between
  (the member removed from a newer line included) breaks it;
- after it: every line from the verified frontier to the end of the file is verified in
  order, other processes' entries included (:class:`~anyhsm.audit.AuditLog` moves the
  frontier over its own entries as it appends them).

A line that does not verify is :class:`~anyhsm.errors.AuditStateMismatch`: fail closed.
Used by :meth:`anyhsm.audit.AuditLog.latest`, under its lock and a shared ``flock``.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

from anyhsm.audit import Frontier, line_mac, parse_line
from anyhsm.errors import AuditStateMismatch
from anyhsm.secret import SecretBytes

_BACK_READ = 1 << 16
_MEMBER = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

KeyFor = Callable[[int], SecretBytes]
"""The audit key of entry ``seq``."""


def needle(member: str) -> bytes:
    """The bytes ``"member":"`` a line holding ``member`` contains; members are plain
    names (ValueError otherwise)."""
    if not _MEMBER.match(member):
        raise ValueError(f"not a detail member name: {member!r}")
    return b'"' + member.encode() + b'":"'


def detail_value(body: bytes, member: str) -> str | None:
    """``detail[member]`` of a line's body, or None."""
    entry = json.loads(body)
    detail = entry.get("detail") if isinstance(entry, dict) else None
    value = detail.get(member) if isinstance(detail, dict) else None
    return value if isinstance(value, str) else None


def find_before(
    f: BinaryIO, member: str, checkpoint: Frontier, genesis: bytes, key_for: KeyFor
) -> str | None:
    """The newest ``detail[member]`` among the lines up to the checkpointed entry
    (``checkpoint.end``), verified up to the checkpoint; None when no line has it."""
    mark = needle(member)
    for start, raw in _lines_back(f, checkpoint.end):
        if mark in raw:
            value = _verified_value(f, start, member, checkpoint, genesis, key_for)
            if value is not None:
                return value
    return None


def verify_forward(
    f: BinaryIO, frontier: Frontier, size: int, members: Iterable[str], key_for: KeyFor
) -> tuple[Frontier, dict[str, str]]:
    """Verify the lines from ``frontier`` to ``size``, chaining on; the new frontier and
    the newest value of each of ``members`` those lines hold."""
    if size < frontier.end:
        raise AuditStateMismatch(
            f"the audit log shrank to {size} bytes below its verified part ({frontier.end})"
        )
    f.seek(frontier.end)
    data = f.read(size - frontier.end)
    found: dict[str, str] = {}
    if not data:
        return frontier, found
    lines = data.split(b"\n")
    if lines[-1] != b"":
        raise AuditStateMismatch("the audit log's last line is incomplete")
    lines.pop()
    marks = [(m, needle(m)) for m in members]
    prev, expected, end = frontier.mac, frontier.seq + 1, frontier.end
    for raw in lines:
        body, mac, seq = parse_line(raw)
        if seq != expected or not hmac.compare_digest(line_mac(key_for(seq), prev, body), mac):
            raise AuditStateMismatch(
                f"audit entry {seq} at byte {end} does not continue the verified chain "
                "(edited, inserted or removed)"
            )
        for member, mark in marks:
            if mark in body:
                value = detail_value(body, member)
                if value is not None:
                    found[member] = value
        prev, expected, end = mac, seq + 1, end + len(raw) + 1
    return Frontier(end, expected - 1, prev), found


def _verified_value(
    f: BinaryIO, line_start: int, member: str, checkpoint: Frontier, genesis: bytes, key_for: KeyFor
) -> str | None:
    """``detail[member]`` of the line at ``line_start`` (None if the bytes were found
    elsewhere in it), once the chain from that line to the checkpoint verifies."""
    before = next(_lines_back(f, line_start), None)
    if before is None:
        frontier = Frontier(line_start, 0, genesis)
    else:
        _, prev, prev_seq = parse_line(before[1])
        frontier = Frontier(line_start, prev_seq, prev)
    f.seek(line_start)
    first = f.readline().rstrip(b"\n")
    value = detail_value(parse_line(first)[0], member)
    if value is None:
        return None
    reached, _ = verify_forward(f, frontier, checkpoint.end, (), key_for)
    if reached.seq != checkpoint.seq or not hmac.compare_digest(reached.mac, checkpoint.mac):
        raise AuditStateMismatch("the audit chain does not reach its recorded checkpoint")
    return value


def _lines_back(f: BinaryIO, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line without its newline) of the whole lines ending at or before ``end``
    (a line boundary), newest first, read in blocks from the end."""
    pos, carry = end, b""
    while pos > 0:
        start = max(0, pos - _BACK_READ)
        f.seek(start)
        data = f.read(pos - start) + carry
        pos = start
        if start > 0:
            cut = data.find(b"\n")
            if cut == -1:  # all inside one line that began further back
                carry = data
                continue
            carry, data = data[: cut + 1], data[cut + 1 :]
            base = start + cut + 1
        else:
            carry, base = b"", 0
        off = base + len(data)
        for raw in reversed(data.split(b"\n")[:-1]):
            off -= len(raw) + 1
            yield off, raw
