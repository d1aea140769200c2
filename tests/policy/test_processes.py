"""Real processes on one budget: racing signers never exceed it together, and a signer
killed with SIGKILL at any moment neither loses a debit nor counts one twice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.policy.conftest import Deployment, audit_entries
from tests.policy.embit_psbt import foreign_address, spend_psbt, txid_of

from anyhsm.policy.enforce import state_dir, state_store

WORKER = Path(__file__).with_name("policy_worker.py")
UNIT = 1_000_000  # each PSBT makes exactly this leave (fee included)


def _psbts(dep: Deployment, directory: Path, n: int, seed: int) -> list[Path]:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = directory / f"{i:04d}.psbt"
        p.write_text(spend_psbt(dep.wallet, [(foreign_address(rng), UNIT - 1000)], rng=rng))
        out.append(p)
    return out


def _state(dep: Deployment) -> tuple[int, list[str]]:
    """(the daily counter's total, the txids debited), read through the store (MAC checked)."""
    with state_store(dep.hsm, state_dir(dep.hsm.config)).transaction() as txn:
        st = txn.read()
    counter = st.counters.get("daily")
    return (0 if counter is None else sum(counter.buckets)), [d.txid for d in st.debits]


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )


DAILY = """
[[rules]]
name = "daily"
keys = ["hot"]
max_per_period_sat = {limit}
period = "24h"
"""


def test_racing_processes_never_exceed_the_budget_together(dep: Deployment, tmp_path: Path) -> None:
    limit = 7 * UNIT
    dep.set(DAILY.format(limit=limit))
    nprocs, each = 4, 4
    files = _psbts(dep, tmp_path / "psbts", nprocs * each, seed=1)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        _spawn("race", str(dep.config), str(barrier), str(nprocs), *map(str, files[i::nprocs]))
        for i in range(nprocs)
    ]
    lines: list[str] = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        lines += out.splitlines()
    signed = [ln.split()[1] for ln in lines if ln.startswith("SIGNED")]
    refused = [ln for ln in lines if ln.startswith("REFUSED")]
    assert len(signed) + len(refused) == nprocs * each
    assert len(signed) == 7, lines  # exactly the budget: none more, and none lost to the race
    assert all(ln.endswith(" daily") for ln in refused)
    total, debited = _state(dep)
    assert total == 7 * UNIT and sorted(debited) == sorted(signed)
    assert dep.hsm.verify_audit().ok


@pytest.mark.parametrize("fail_every", [0, 3])
def test_sigkill_at_any_point_neither_loses_nor_doubles_a_debit(
    dep: Deployment, tmp_path: Path, fail_every: int
) -> None:
    dep.set(DAILY.format(limit=10**15))
    files = _psbts(dep, tmp_path / "psbts", 40, seed=2 + fail_every)
    txids = {txid_of(f.read_text()) for f in files}
    rng = random.Random(17 + fail_every)
    acknowledged: set[str] = set()
    failures = 0
    rounds = 12
    for _ in range(rounds):
        args = ["loop", str(dep.config), str(tmp_path / "psbts")]
        if fail_every:
            args += ["--fail-every", str(fail_every)]
        p = _spawn(*args)
        assert p.stdout is not None
        ready = p.stdout.readline()
        assert ready.startswith("READY"), p.stderr.read() if p.stderr else ""
        time.sleep(rng.uniform(0.0, 1.5))  # the kill lands anywhere in the loop
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate(timeout=60)
        for ln in out.splitlines():
            word, *rest = ln.split()
            if word == "SIGNED":
                acknowledged.add(rest[0])
            elif word == "FAILED":
                failures += 1
        total, debited = _state(dep)
        # never twice: one debit per transaction, and the counter is the sum of the debits
        assert len(debited) == len(set(debited))
        assert total == len(debited) * UNIT
        assert set(debited) <= txids
        # never lost: every signature handed out was debited first
        assert acknowledged <= set(debited)
        # (a failed signing is compensated, unless the kill fell between the failure and
        # the compensation's commit: then it stays counted, the safe side)
    assert acknowledged, "no signing finished in any round: the kills came too early"
    if fail_every:
        assert failures, "the fault was never injected"
        ops = [e["op"] for e in audit_entries(dep.config)]
        assert "policy_compensate" in ops
    assert dep.hsm.verify_audit().ok
