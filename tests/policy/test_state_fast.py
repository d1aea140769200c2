"""The state's fast record encoder writes exactly the canonical JSON of the state."""

from __future__ import annotations

import random
from pathlib import Path

from anyhsm.policy.state import (
    Approval,
    Debit,
    FileStateStore,
    Frozen,
    PolicyState,
    _canonical,
)
from anyhsm.policy.velocity import Counter


def _state(rng: random.Random, seq: int) -> PolicyState:
    names = ["daily", 'odd "name" \u00e9', "hourly", "z\\r"]
    counters = {
        n: Counter.empty(rng.choice([3600, 86400]), 60, 1e9).debit(rng.randrange(10**9), 1e9)[0]
        for n in rng.sample(names, rng.randrange(len(names) + 1))
    }
    debits = tuple(
        Debit(
            rng.randbytes(32).hex(), rng.choice(names), rng.randrange(10**12), rng.randrange(10**6)
        )
        for _ in range(rng.randrange(70))
    )
    pending = tuple(
        Approval(
            str(i), "ab" * 32, "cd" * 32, rng.randbytes(33), 10**9 + i, rng.choice([None, "uid:1"])
        )
        for i in range(rng.randrange(4))
    )
    used = {rng.randbytes(8).hex(): rng.randrange(10**10) for _ in range(rng.randrange(5))}
    frozen = {
        rng.randbytes(4).hex(): Frozen("hot", "why \u2603", 5, rng.choice([None, "x"]))
        for _ in range(rng.randrange(3))
    }
    return PolicyState(seq, counters, debits, pending, used, frozen)


def test_fast_body_is_the_canonical_json(tmp_path: Path) -> None:
    rng = random.Random(7)
    store = FileStateStore(tmp_path, b"k" * 32)
    previous = PolicyState()
    for seq in range(200):
        state = _state(rng, seq)
        if seq % 3 == 0:  # the engine's way: a new state sharing the old one's parts
            state = PolicyState(seq, state.counters, state.debits, previous.pending, state.used)
        body = store.encode(state).partition(b"\n")[2]
        assert body == _canonical(state.to_json())
        assert store.decode(store.encode(state)) == state
        previous = state
