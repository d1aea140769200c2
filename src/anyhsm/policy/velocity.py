"""Velocity counters: amounts spent over a rolling period, in fixed time buckets.

As the Validating Lightning Signer's velocity control, a counter keeps a fixed ring of
buckets, each ``width`` seconds of wall-clock time (bucket ``t // width``), so its storage
never grows. A period of ``P`` seconds split in ``B`` buckets keeps ``B + 1`` of them: an
amount debited stays counted for at least ``P`` and at most ``P + width`` seconds, so
"at most X per P" holds over *every* window of length P (a ring of only ``B`` buckets
would forget an amount debited at the end of a bucket up to one width early).

Counters are plain values: :meth:`Counter.at` moves one to a time, :meth:`Counter.debit`
and :meth:`Counter.compensate` return a new one. A clock that goes backwards is treated
as standing still (the debit goes into the newest bucket, which expires last).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Counter:
    """``buckets[i]`` holds the amount debited during bucket ``newest - (n - 1) + i``."""

    period_s: int
    width_s: int
    newest: int  # index of the newest bucket (time // width)
    buckets: tuple[int, ...]

    @classmethod
    def empty(cls, period_s: int, width_s: int, now: float) -> Counter:
        n = -(-period_s // width_s) + 1
        return cls(period_s, width_s, int(now // width_s), (0,) * n)

    def fits(self, period_s: int, width_s: int) -> bool:
        """Whether this counter was kept for a rule of this period and bucket width."""
        return self.period_s == period_s and self.width_s == width_s

    def at(self, now: float) -> Counter:
        """This counter as of ``now``: buckets that left the window are dropped."""
        index = int(now // self.width_s)
        shift = index - self.newest
        if shift <= 0:
            return self
        n = len(self.buckets)
        if shift >= n:
            return Counter(self.period_s, self.width_s, index, (0,) * n)
        return Counter(self.period_s, self.width_s, index, self.buckets[shift:] + (0,) * shift)

    def used(self, now: float) -> int:
        """The amount counted against the limit at ``now``."""
        return sum(self.at(now).buckets)

    def debit(self, amount: int, now: float) -> tuple[Counter, int]:
        """(the counter with ``amount`` added to the bucket of ``now``, that bucket)."""
        c = self.at(now)
        b = list(c.buckets)
        b[-1] += amount
        return Counter(c.period_s, c.width_s, c.newest, tuple(b)), c.newest

    def compensate(self, amount: int, bucket: int, now: float) -> Counter:
        """Take back ``amount`` debited into ``bucket``, if that bucket is still counted
        (never below zero)."""
        c = self.at(now)
        pos = bucket - (c.newest - len(c.buckets) + 1)
        if not 0 <= pos < len(c.buckets):
            return c
        b = list(c.buckets)
        b[pos] = max(0, b[pos] - amount)
        return Counter(c.period_s, c.width_s, c.newest, tuple(b))

    @property
    def json_text(self) -> str:
        """:meth:`to_json` as canonical JSON text (sorted keys, no spaces; integers only,
        so nothing to escape), made once per counter: a commit writes every counter, and
        one debit changes only the counters it debits."""
        text: str | None = self.__dict__.get("_json")
        if text is None:
            buckets = ",".join(map(str, self.buckets))
            text = (
                f'{{"buckets":[{buckets}],"newest":{self.newest},'
                f'"period":{self.period_s},"width":{self.width_s}}}'
            )
            object.__setattr__(self, "_json", text)
        return text

    def to_json(self) -> dict[str, object]:
        return {
            "period": self.period_s,
            "width": self.width_s,
            "newest": self.newest,
            "buckets": list(self.buckets),
        }

    @classmethod
    def from_json(cls, raw: object) -> Counter:
        if not isinstance(raw, dict):
            raise ValueError("a counter is an object")
        period, width, newest, buckets = (
            raw.get(k) for k in ("period", "width", "newest", "buckets")
        )
        if not (
            _nat(period)
            and _nat(width)
            and isinstance(newest, int)
            and isinstance(buckets, list)
            and all(_nat(b, zero=True) for b in buckets)
        ):
            raise ValueError("malformed counter")
        assert isinstance(period, int) and isinstance(width, int)
        if len(buckets) != -(-period // width) + 1:
            raise ValueError("a counter with the wrong number of buckets")
        return cls(period, width, newest, tuple(int(b) for b in buckets))


def _nat(value: object, *, zero: bool = False) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (value >= 0 if zero else value > 0)
    )


__all__ = ["Counter"]
