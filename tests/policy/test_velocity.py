"""Velocity limits: counters in fixed buckets across bucket boundaries (an injected clock,
never sleeping), debits once per transaction, compensation when signing fails."""

from __future__ import annotations

import random

import pytest
from tests.policy.conftest import Deployment, audit_entries
from tests.policy.embit_psbt import foreign_address, spend_psbt

from anyhsm.bitcoin.psbt import Psbt
from anyhsm.bitcoin.signer import SignResult
from anyhsm.errors import SigningFailed, SpendingPolicyRefused
from anyhsm.ops.policy import check_psbt, show_policy
from anyhsm.policy.enforce import spending_gate
from anyhsm.policy.velocity import Counter

BTC = 100_000_000
DAY = 86_400
HOUR = 3_600
T0 = 1_800_000_000 // HOUR * HOUR  # the start of an hour bucket
RNG = random.Random(11)

DAILY = """
[[rules]]
name = "daily"
keys = ["hot"]
max_per_period_sat = 50_000_000
period = "24h"
"""


def sign_at(dep: Deployment, psbt: str, t: float) -> SignResult:
    """The library's signer with the deployment's gate on a clock standing at ``t``."""
    from anyhsm.bitcoin.signer import sign_psbt

    cfg = dep.hsm.config
    return sign_psbt(
        dep.hsm,
        Psbt.parse(psbt),
        "hot",
        policy=cfg.policy,
        network=dep.hsm.network,
        environment=cfg.environment,
        spending=spending_gate(dep.hsm, clock=lambda: t),
    )


def pay(dep: Deployment, amount: int) -> str:
    """``amount`` leaving in total (the 1000 sat fee included)."""
    return spend_psbt(dep.wallet, [(foreign_address(RNG), amount - 1000)], rng=RNG)


def test_counter_keeps_an_amount_at_least_one_period_and_at_most_one_bucket_more() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        period = rng.choice([60, 600, HOUR, DAY])
        buckets = rng.choice([1, 2, 24, 60])
        width = -(-period // buckets)
        debit_at = T0 + rng.uniform(0, 3 * period)
        c, _ = Counter.empty(period, width, T0).debit(7, debit_at)
        later = debit_at + rng.uniform(0, 2 * period + 2 * width)
        used = c.used(later)
        if later - debit_at < period:
            assert used == 7, (period, buckets, later - debit_at)
        elif later - debit_at >= period + width:
            assert used == 0, (period, buckets, later - debit_at)


def test_counter_storage_is_constant_and_a_backwards_clock_stands_still() -> None:
    c = Counter.empty(DAY, HOUR, T0)
    for n in range(500):
        c, _ = c.debit(1, T0 + n * 977)
    assert len(c.buckets) == 25
    back, bucket = c.debit(5, T0)  # the clock went back: counted in the newest bucket
    assert bucket == c.newest and back.used(T0) == c.used(T0) + 5


def test_daily_limit_across_bucket_boundaries(dep: Deployment) -> None:
    dep.set(DAILY)
    sign_at(dep, pay(dep, 30_000_000), T0)  # bucket 0
    sign_at(dep, pay(dep, 19_000_000), T0 + HOUR)  # bucket 1
    with pytest.raises(SpendingPolicyRefused) as e:
        sign_at(dep, pay(dep, 2_000_000), T0 + 2 * HOUR)
    assert e.value.rules == ["daily"] and "1000000 sat (0.01 BTC) left" in e.value.message
    sign_at(dep, pay(dep, 1_000_000), T0 + 2 * HOUR)  # exactly up to the limit
    # a full period after the first debit it still counts (at least 24h) ...
    with pytest.raises(SpendingPolicyRefused):
        sign_at(dep, pay(dep, 20_000_000), T0 + DAY)
    # ... and once its bucket has left the window (24h + one bucket) it no longer does
    sign_at(dep, pay(dep, 30_000_000), T0 + DAY + HOUR)
    with pytest.raises(SpendingPolicyRefused):
        sign_at(dep, pay(dep, 1_000_000), T0 + DAY + HOUR)
    shown = show_policy(dep.hsm, now=T0 + DAY + HOUR)
    assert [(b.rule, b.used, b.left) for b in shown.budgets] == [("daily", 50_000_000, 0)]


def test_budget_left_in_check(dep: Deployment) -> None:
    dep.set(DAILY)
    sign_at(dep, pay(dep, 10_000_000), T0)
    res = check_psbt(dep.hsm, pay(dep, 5_000_000), "hot", now=T0 + 60)
    assert res.decision == "allow"
    assert res.budgets == (
        {
            "rule": "daily",
            "period": "24h",
            "limit": 50_000_000,
            "used": 10_000_000,
            "left": 40_000_000,
            "amount": 5_000_000,
        },
    )
    # check debits nothing
    assert show_policy(dep.hsm, now=T0 + 60).budgets[0].used == 10_000_000


def test_one_transaction_is_debited_once(dep: Deployment) -> None:
    dep.set(DAILY)
    psbt = pay(dep, 30_000_000)
    sign_at(dep, psbt, T0)
    sign_at(dep, psbt, T0 + 10)  # the same transaction again (a retry, or a second key)
    assert show_policy(dep.hsm, now=T0 + 20).budgets[0].used == 30_000_000
    decisions = [e["detail"] for e in audit_entries(dep.config) if e["op"] == "policy_decision"]
    assert [d.get("debits") for d in decisions] == ["daily:30000000", None]  # type: ignore[union-attr]


def test_a_failed_signing_is_compensated_by_an_audited_entry(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep.set(DAILY)

    def broken(*args: object, **kwargs: object) -> list[bytes]:
        raise SigningFailed("the provider failed (fault injected)")

    monkeypatch.setattr(dep.hsm, "sign_many", broken)
    with pytest.raises(SigningFailed):
        sign_at(dep, pay(dep, 30_000_000), T0)
    monkeypatch.undo()
    assert show_policy(dep.hsm, now=T0 + 1).budgets[0].used == 0
    ops = [
        (e["op"], e["outcome"]) for e in audit_entries(dep.config) if e["op"].startswith("policy_")
    ]  # type: ignore[union-attr]
    assert ops[-2:] == [("policy_decision", "ok"), ("policy_compensate", "ok")]
    comp = [e for e in audit_entries(dep.config) if e["op"] == "policy_compensate"][-1]
    assert comp["detail"]["debits"] == "daily:30000000"  # type: ignore[index]
    assert comp["detail"]["reason"] == "signing_failed"  # type: ignore[index]
    sign_at(dep, pay(dep, 50_000_000), T0 + 2)  # the whole budget is there again


def test_counters_survive_a_new_policy_that_keeps_the_rule(dep: Deployment) -> None:
    dep.set(DAILY)
    sign_at(dep, pay(dep, 30_000_000), T0)
    from anyhsm.ops.policy import set_policy

    res = set_policy(dep.hsm, dep.policy(DAILY + '\n[[rules]]\nname = "other"\nkeys = ["x"]\n'))
    assert res.counters_kept == ("daily",) and res.version == 2
    with pytest.raises(SpendingPolicyRefused):
        sign_at(dep, pay(dep, 30_000_000), T0 + 60)
    changed = DAILY.replace('period = "24h"', 'period = "12h"')
    assert set_policy(dep.hsm, dep.policy(changed)).counters_kept == ()
    sign_at(dep, pay(dep, 30_000_000), T0 + 120)
