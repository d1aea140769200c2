"""The policy is authenticated state: changes only through the audited admin step (its
binding lives in the keystore manifest: tests/core/test_policy_binding.py); a policy or
state file changed on disk is refused, never trusted or ignored."""

from __future__ import annotations

import random

import pytest
from tests.policy.conftest import Deployment, audit_entries, open_deployment
from tests.policy.embit_psbt import foreign_address, spend_psbt

from anyhsm.errors import ConfigError, PolicyNotAuthenticated, SpendingPolicyRefused
from anyhsm.ops.policy import set_policy, show_policy
from anyhsm.ops.psbt import sign_psbt
from anyhsm.policy import guard_digest
from anyhsm.policy.enforce import state_dir

RNG = random.Random(13)
POLICY = """
[[rules]]
name = "per-tx"
max_per_tx_sat = 1_000_000
"""


def _pay(dep: Deployment, amount: int = 50_000) -> str:
    return spend_psbt(dep.wallet, [(foreign_address(RNG), amount)], rng=RNG)


def _refused(dep: Deployment, rule: str) -> PolicyNotAuthenticated:
    with pytest.raises(PolicyNotAuthenticated) as e:
        sign_psbt(dep.hsm, _pay(dep), "hot")
    assert e.value.rules == [rule] and e.value.exit_code == 7
    return e.value


def test_policy_set_is_audited_with_old_and_new_hash(dep: Deployment) -> None:
    first = set_policy(dep.hsm, dep.policy(POLICY))
    second = set_policy(dep.hsm, dep.policy(POLICY + "\n# reviewed\n"))
    assert (first.version, second.version) == (1, 2) and second.previous == first.sha256
    sets = [e for e in audit_entries(dep.config) if e["op"] == "policy_set"]
    assert [e["outcome"] for e in sets] == ["started", "ok", "started", "ok"]
    assert sets[0]["detail"]["old"] == "none"  # type: ignore[index]
    assert sets[3]["detail"]["old"] == first.sha256  # type: ignore[index]
    assert sets[3]["detail"]["new"] == second.sha256  # type: ignore[index]
    assert dep.hsm.verify_audit().ok


def test_a_bad_policy_file_is_refused_with_every_problem(dep: Deployment) -> None:
    path = dep.policy(
        """
        [[rules]]
        name = "x"
        max_per_tx_sat = -1
        period = "fortnight"
        destinations = ["bc1qnotregtest"]
        approvals = { m = 3, approvers = ["02aa"] }
        colour = "red"
        """
    )
    with pytest.raises(ConfigError) as e:
        set_policy(dep.hsm, path)
    assert len(e.value.problems) >= 5
    assert not show_policy(dep.hsm).active


@pytest.mark.parametrize("what", ["policy", "state"])
def test_a_file_changed_on_disk_is_refused(dep: Deployment, what: str) -> None:
    dep.set(POLICY)
    directory = state_dir(dep.hsm.config)
    if what == "policy":
        (p,) = directory.glob("policy-*.toml")
        p.write_text(p.read_text().replace("1_000_000", "900_000_000"))
        rule = "policy-authenticated"
    else:
        for p in directory.glob("state.*"):  # every slot
            p.write_bytes(p.read_bytes().replace(b'"frozen":{}', b'"frozen":{"x":{}}'))
        rule = "policy-state"
    _refused(dep, rule)


def test_removing_the_state_directory_does_not_remove_the_policy(dep: Deployment) -> None:
    import shutil

    dep.set(POLICY)
    shutil.rmtree(state_dir(dep.hsm.config))
    _refused(dep, "policy-authenticated")  # the manifest still names the policy


def test_a_torn_commit_leaves_the_state_before_it(dep: Deployment) -> None:
    """A process killed while it wrote a commit leaves that slot torn (the new record's
    start over the older one's bytes): the other slot still holds the state before the
    commit, which had not returned (nothing was signed on it)."""
    import dataclasses

    from anyhsm.ops.policy import freeze_key, unfreeze_key
    from anyhsm.policy.enforce import state_store
    from anyhsm.policy.state import Frozen

    dep.set(POLICY)
    freeze_key(dep.hsm, "hot")  # seq 2 (slot 1)
    unfreeze_key(dep.hsm, "hot")  # seq 3 (slot 0)
    directory = state_dir(dep.hsm.config)
    store = state_store(dep.hsm, directory)
    with store.transaction() as txn:
        now = txn.read()
    assert now.seq == 3 and not now.frozen
    key_id = dep.hsm.get_key("hot").id
    frozen = dataclasses.replace(now, seq=4, frozen={key_id: Frozen("hot", "", 0)})
    record = store.encode(frozen)
    slot = directory / "state.1"  # where seq 4 would go
    with slot.open("r+b") as f:
        f.write(record[: len(record) // 2])  # killed halfway through the write
    shown = show_policy(dep.hsm)
    assert not shown.frozen  # seq 3, the state before the torn commit
    freeze_key(dep.hsm, "hot")  # the next commit goes into the torn slot
    assert show_policy(dep.hsm).frozen[0].label == "hot"


def test_missing_state_is_refused_until_reset_by_the_admin_step(dep: Deployment) -> None:
    path = dep.set(POLICY)
    for p in state_dir(dep.hsm.config).glob("state.*"):
        p.unlink()
    err = _refused(dep, "policy-state")
    assert "--reset-state" in (err.hint or "")
    with pytest.raises(PolicyNotAuthenticated):
        set_policy(dep.hsm, path)
    set_policy(dep.hsm, path, reset_state=True)
    assert sign_psbt(dep.hsm, _pay(dep), "hot").signed_inputs == 1
    sets = [e for e in audit_entries(dep.config) if e["op"] == "policy_set"]
    assert sets[-1]["detail"]["reset_state"] == "true"  # type: ignore[index]


def test_the_file_the_config_names_must_be_the_active_one(
    tmp_path: object, passphrase_env: str
) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    dep = open_deployment(tmp_path / "dep", '[policy]\nspending_policy = "spending.toml"\n')
    try:
        path = dep.policy(POLICY)
        dep.reopen()
        err = _refused(dep, "policy-authenticated")
        assert "no policy has been set" in err.message
        set_policy(dep.hsm)  # the configured file
        assert sign_psbt(dep.hsm, _pay(dep), "hot").signed_inputs == 1
        path.write_text(POLICY.replace("1_000_000", "100_000_000"))  # edited, not set
        err = _refused(dep, "policy-authenticated")
        assert "was edited, or never set" in err.message
        set_policy(dep.hsm)
        assert sign_psbt(dep.hsm, _pay(dep, 50_000_000), "hot").signed_inputs == 1
    finally:
        dep.hsm.close()


def test_the_policy_and_its_counters_outlive_a_master_key_rotation(dep: Deployment) -> None:
    """The binding is in the manifest and the state key derives from its state secret,
    which every rotation seals again: nothing to set again afterwards."""
    from tests.conftest import PASSPHRASE

    from anyhsm.secret import SecretBytes

    dep.set(POLICY + 'max_per_period_sat = 1_000_000\nperiod = "24h"\n')
    assert sign_psbt(dep.hsm, _pay(dep, 600_000), "hot").signed_inputs == 1
    dep.hsm.rotate_master_key(SecretBytes(PASSPHRASE.encode()))
    assert show_policy(dep.hsm).budgets[0].used == 601_000  # the fee leaves too
    with pytest.raises(SpendingPolicyRefused):
        sign_psbt(dep.hsm, _pay(dep, 500_000), "hot")
    assert sign_psbt(dep.hsm, _pay(dep, 300_000), "hot").signed_inputs == 1


def test_raw_digest_signing_is_refused_for_a_covered_key(dep: Deployment) -> None:
    guard_digest(dep.hsm, "hot")  # no policy: allowed
    dep.set(POLICY)
    with pytest.raises(SpendingPolicyRefused) as e:
        guard_digest(dep.hsm, "hot")
    assert e.value.rules == ["raw-digest"]
    dep.set(POLICY + "raw_digests = true\n")
    guard_digest(dep.hsm, "hot")
    dep.set('[[rules]]\nname = "cold"\nkeys = ["cold"]\nraw_digests = true\n')
    with pytest.raises(SpendingPolicyRefused) as e:
        guard_digest(dep.hsm, "hot")  # no rule names it: refused, as its PSBTs would be
    assert e.value.rules == ["no-rule-matched"]
