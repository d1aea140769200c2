"""The policy state cannot be rolled back: an older authentic copy of the state directory
put back is refused (rule policy-state), because the audit chain records the state's
sequence number with every commit; a crash between a commit and its audit entry is
never taken for a rollback."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable

import pytest
from tests.policy.conftest import Deployment, audit_entries
from tests.policy.embit_psbt import foreign_address, spend_psbt

from anyhsm.bitcoin.signer import SignResult
from anyhsm.bitcoin.signer import sign_psbt as signer
from anyhsm.errors import PolicyNotAuthenticated
from anyhsm.ops.psbt import parse_psbt
from anyhsm.policy.anchor import AuditStateAnchor, ManifestAnchor
from anyhsm.policy.enforce import PolicyGate, load_active, state_dir
from anyhsm.policy.state import SLOT_FILES, FileStateStore, PolicyState

RNG = random.Random(29)
POLICY = """
[[rules]]
name = "daily"
max_per_period_sat = 10_000_000
period = "24h"
"""


def _store(dep: Deployment) -> FileStateStore:
    """The deployment's state store with the audit chain as its rollback anchor."""
    key = ManifestAnchor(dep.hsm).state_key()
    return FileStateStore(state_dir(dep.hsm.config), key, anchor=AuditStateAnchor(dep.hsm))


def _signer(dep: Deployment) -> Callable[[int], SignResult]:
    store = _store(dep)

    def sign(amount: int = 100_000) -> SignResult:
        hsm = dep.hsm
        active = load_active(hsm)
        assert active is not None
        psbt = parse_psbt(spend_psbt(dep.wallet, [(foreign_address(RNG), amount)], rng=RNG))
        cfg = hsm.config
        return signer(
            hsm,
            psbt,
            "hot",
            policy=cfg.policy,
            network=hsm.network,
            environment=cfg.environment,
            spending=PolicyGate(hsm, active, store),
        )

    return sign


def _slots(dep: Deployment) -> dict[str, bytes]:
    d = state_dir(dep.hsm.config)
    return {name: (d / name).read_bytes() for name in SLOT_FILES if (d / name).exists()}


def _put_back(dep: Deployment, copy: dict[str, bytes]) -> None:
    d = state_dir(dep.hsm.config)
    for name, data in copy.items():
        (d / name).write_bytes(data)


def _used(store: FileStateStore) -> int:
    with store.transaction() as txn:
        c = txn.read().counters.get("daily")
    return 0 if c is None else sum(c.buckets)


def test_an_older_copy_of_the_state_put_back_is_refused(dep: Deployment) -> None:
    dep.set(POLICY)
    sign = _signer(dep)
    sign(100_000)
    aside = _slots(dep)  # an authentic copy, with one debit
    sign(2_000_000)
    sign(3_000_000)
    _put_back(dep, aside)  # the counters would say 0.1 + fee instead of 5.1 mBTC
    before = len(audit_entries(dep.config))
    with pytest.raises(PolicyNotAuthenticated) as e:
        sign(100_000)
    assert e.value.rules == ["policy-state"] and e.value.exit_code == 7
    assert "rolled back" in e.value.message
    assert not [x for x in audit_entries(dep.config)[before:] if x["outcome"] == "ok"]
    # a new handle (another process: nothing in memory) sees it from the audit log
    dep.reopen()
    with pytest.raises(PolicyNotAuthenticated, match="rolled back"):
        _signer(dep)(100_000)


def test_the_newest_state_put_back_is_accepted_again(dep: Deployment) -> None:
    dep.set(POLICY)
    sign = _signer(dep)
    sign(100_000)
    newest = _slots(dep)
    shutil.copytree(state_dir(dep.hsm.config), dep.config.parent / "aside")
    sign(100_000)
    aside = _slots(dep)
    _put_back(dep, newest)
    with pytest.raises(PolicyNotAuthenticated):
        sign(100_000)
    _put_back(dep, aside)  # the real newest state: signing goes on, nothing lost
    sign(100_000)
    assert _used(_store(dep)) == 3 * 101_000


def test_reset_after_a_rollback_continues_above_the_recorded_state(dep: Deployment) -> None:
    """The admin reset (``policy set --reset-state`` commits after the refused read) goes
    on above the recorded seq, so the fresh state is not itself taken for a rollback."""
    dep.set(POLICY)
    sign = _signer(dep)
    sign(100_000)
    aside = _slots(dep)
    sign(100_000)
    sign(100_000)
    _put_back(dep, aside)
    store = _store(dep)
    with store.transaction() as txn:
        with pytest.raises(PolicyNotAuthenticated):
            txn.read()
        fresh = txn.commit(PolicyState())
    assert fresh.seq > 4  # 1 set + 3 debits recorded
    sign(100_000)
    assert _used(_store(dep)) == 101_000


def test_a_commit_without_its_audit_entry_is_not_a_rollback(dep: Deployment) -> None:
    """The process killed between the commit and its audit entry: the state is newer than
    anything recorded, which is not a rollback."""
    dep.set(POLICY)
    sign = _signer(dep)
    sign(100_000)
    store = _store(dep)
    with store.transaction() as txn:  # a commit, and no entry (the kill)
        txn.commit(txn.read())
    sign(100_000)
    dep.reopen()
    _signer(dep)(100_000)


def test_a_torn_commit_is_not_a_rollback(dep: Deployment) -> None:
    """Killed while writing a slot: that slot fails its MAC, the other holds the state the
    audit log recorded last (the torn commit had not returned: no entry for it)."""
    dep.set(POLICY)
    sign = _signer(dep)
    sign(100_000)
    sign(100_000)
    d = state_dir(dep.hsm.config)
    store = _store(dep)
    with store.transaction() as txn:
        state = txn.read()
    older = min(SLOT_FILES, key=lambda n: (d / n).read_bytes().split(b" ")[1])
    data = store.encode(state)  # the next commit, cut in the middle of its write
    with (d / older).open("r+b") as f:
        f.write(data[: len(data) // 2])
    dep.reopen()
    _signer(dep)(100_000)
    assert _used(_store(dep)) == 3 * 101_000
