"""Each rule of the spending policy with a passing and a failing PSBT (built by embit),
judged through the library's one signing path (ops.psbt.sign_psbt) and ``policy check``."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from tests.policy.conftest import Deployment, audit_entries
from tests.policy.embit_psbt import foreign_address, spend_psbt

from anyhsm.errors import PolicyNotAuthenticated, SpendingPolicyRefused
from anyhsm.ops.policy import check_psbt, freeze_key, show_policy, unfreeze_key
from anyhsm.ops.psbt import sign_psbt

BTC = 100_000_000
RNG = random.Random(7)


def _pay(dep: Deployment, amount: int, address: str | None = None, **kw: object) -> str:
    return spend_psbt(dep.wallet, [(address or foreign_address(RNG), amount)], **kw)  # type: ignore[arg-type]


def _refused(dep: Deployment, psbt: str) -> SpendingPolicyRefused:
    with pytest.raises(SpendingPolicyRefused) as e:
        sign_psbt(dep.hsm, psbt, "hot")
    assert e.value.exit_code == 7
    return e.value


def test_no_policy_keeps_todays_behaviour(dep: Deployment) -> None:
    res = sign_psbt(dep.hsm, _pay(dep, 5 * BTC), "hot")
    assert res.signed_inputs == 1
    check = check_psbt(dep.hsm, _pay(dep, 5 * BTC), "hot")
    assert check.decision == "allow" and check.policy is None
    assert [r.name for r in check.rules] == ["signing-policy"]
    assert not show_policy(dep.hsm).active


def test_max_per_tx(dep: Deployment) -> None:
    dep.set(
        """
        [[rules]]
        name = "per-tx"
        keys = ["hot"]
        max_per_tx_sat = 10_000_000
        """
    )
    ok = sign_psbt(dep.hsm, _pay(dep, 9_000_000), "hot")
    assert ok.signed_inputs == 1
    err = _refused(dep, _pay(dep, 10_000_000))  # + the 1000 sat fee: above the limit
    assert err.rules == ["per-tx"]
    assert "10001000 sat" in err.message and "max_per_tx_sat" in err.message
    d = err.to_dict()
    assert d["rules"] == ["per-tx"] and d["code"] == "spending_policy_refused"
    check = check_psbt(dep.hsm, _pay(dep, 20_000_000), "hot")
    assert check.decision == "refuse"
    assert {r.name: r.decision for r in check.rules} == {
        "network": "allow",
        "path": "allow",
        "sighash": "allow",
        "change": "allow",
        "fee": "allow",
        "per-tx": "refuse",
    }


def test_no_rule_matched_refuses(dep: Deployment) -> None:
    dep.set(
        """
        [[rules]]
        name = "cold-only"
        keys = ["cold"]
        """
    )
    err = _refused(dep, _pay(dep, 1000))
    assert err.rules == ["no-rule-matched"]


def test_rule_without_keys_names_every_key(dep: Deployment) -> None:
    dep.set(
        """
        [[rules]]
        name = "everything"
        """
    )
    assert sign_psbt(dep.hsm, _pay(dep, 5 * BTC), "hot").signed_inputs == 1


def test_destinations(dep: Deployment) -> None:
    allowed = [foreign_address(RNG) for _ in range(200)]
    listed = "\n".join(f'  "{a}",' for a in allowed)
    dep.set(
        f"""
        [[rules]]
        name = "allowlist"
        keys = ["hot"]
        destinations = [
        {listed}
        ]
        """
    )
    assert sign_psbt(dep.hsm, _pay(dep, 50_000, allowed[123]), "hot").signed_inputs == 1
    err = _refused(dep, _pay(dep, 50_000))
    assert err.rules == ["allowlist"] and "outside its list of 200" in err.message


def test_destinations_with_a_smaller_limit_elsewhere(dep: Deployment) -> None:
    dep.set(
        f"""
        [[rules]]
        name = "allowlist"
        destinations = ["{foreign_address(RNG)}"]
        max_outside_sat = 100_000
        """
    )
    assert sign_psbt(dep.hsm, _pay(dep, 90_000), "hot").signed_inputs == 1
    assert _refused(dep, _pay(dep, 200_000)).rules == ["allowlist"]


def test_destination_scripts(dep: Deployment) -> None:
    from embit import script as escript

    listed = foreign_address(RNG)
    spk = escript.address_to_scriptpubkey(listed).data.hex()
    dep.set(
        f"""
        [[rules]]
        name = "scripts"
        destination_scripts = ["{spk}"]
        """
    )
    assert sign_psbt(dep.hsm, _pay(dep, 50_000, listed), "hot").signed_inputs == 1
    assert _refused(dep, _pay(dep, 50_000)).rules == ["scripts"]


def test_destination_descriptor_with_a_range(dep: Deployment) -> None:
    from embit.bip32 import HDKey
    from embit.networks import NETWORKS

    other = HDKey.from_seed(b"\x05" * 32, version=NETWORKS["regtest"]["xprv"])
    xpub = other.derive("m/84h/1h/0h").to_public().to_base58(NETWORKS["regtest"]["xpub"])
    dep.set(
        f"""
        [[rules]]
        name = "exchange"
        destination_descriptors = ["wpkh({xpub}/0/*)"]
        descriptor_range = [0, 49]
        """
    )
    from embit import script as escript

    def addr(i: int) -> str:
        key = other.derive(f"m/84h/1h/0h/0/{i}").key.get_public_key()
        return escript.p2wpkh(key).address(NETWORKS["regtest"])

    assert sign_psbt(dep.hsm, _pay(dep, 50_000, addr(49)), "hot").signed_inputs == 1
    assert _refused(dep, _pay(dep, 50_000, addr(50))).rules == ["exchange"]


def test_output_shape(dep: Deployment) -> None:
    dep.set(
        """
        [[rules]]
        name = "shape"
        script_types = ["p2wpkh"]
        max_outputs = 3
        max_inputs = 2
        op_return = false
        """
    )
    assert sign_psbt(dep.hsm, _pay(dep, 50_000), "hot").signed_inputs == 1
    taproot = foreign_address(RNG, "p2tr")
    assert "p2tr" in _refused(dep, _pay(dep, 50_000, taproot)).message
    assert "3 inputs" in _refused(dep, _pay(dep, 50_000, inputs=3)).message
    assert "OP_RETURN" in _refused(dep, _pay(dep, 50_000, op_return=b"hello")).message
    many = spend_psbt(dep.wallet, [(foreign_address(RNG), 1000) for _ in range(3)], rng=RNG)
    assert "4 outputs" in _refused(dep, many).message


def test_own_outputs_outside_the_change_rules(dep: Deployment) -> None:
    dep.set(
        """
        [[rules]]
        name = "no-self"
        own_outputs = false
        """
    )
    own_receive = dep.wallet.address(0, 5)  # our key, but on the receive branch: not change
    psbt = _pay(dep, 50_000, own_receive)
    from embit.psbt import PSBT, DerivationPath

    p = PSBT.from_string(psbt)
    path = dep.wallet.path(0, 5)
    p.outputs[0].bip32_derivations[dep.wallet.root.derive(path).key.get_public_key()] = (
        DerivationPath(dep.wallet.fingerprint, path)
    )
    err = _refused(dep, p.to_string())
    assert err.rules == ["no-self"] and "own key" in err.message
    assert sign_psbt(dep.hsm, _pay(dep, 50_000), "hot").signed_inputs == 1


def test_time_window(dep: Deployment) -> None:
    dep.set(
        """
        [[rules]]
        name = "office-hours"
        hours = "08:00-18:00"
        days = ["mon", "tue", "wed", "thu", "fri"]
        timezone = "UTC"
        """
    )
    psbt = _pay(dep, 50_000)
    monday_noon = datetime(2026, 12, 7, 12, 0, tzinfo=UTC).timestamp()
    saturday_noon = datetime(2026, 12, 12, 12, 0, tzinfo=UTC).timestamp()
    monday_night = datetime(2026, 12, 7, 19, 0, tzinfo=UTC).timestamp()
    assert check_psbt(dep.hsm, psbt, "hot", now=monday_noon).decision == "allow"
    for t in (saturday_noon, monday_night):
        res = check_psbt(dep.hsm, psbt, "hot", now=t)
        assert res.decision == "refuse"
        assert "outside its time window" in next(
            r.reason for r in res.rules if r.name == "office-hours"
        )


def test_warn_rule_signs_with_a_warning(dep: Deployment) -> None:
    dep.set(
        """
        [[rules]]
        name = "base"

        [[rules]]
        name = "large"
        max_per_tx_sat = 1_000_000
        action = "warn"
        """
    )
    res = sign_psbt(dep.hsm, _pay(dep, 2_000_000), "hot")
    assert res.signed_inputs == 1
    check = check_psbt(dep.hsm, _pay(dep, 2_000_000), "hot")
    assert check.decision == "warn"
    decisions = [e for e in audit_entries(dep.config) if e["op"] == "policy_decision"]
    assert decisions[-1]["detail"]["decision"] == "warn"  # type: ignore[index]
    assert decisions[-1]["detail"]["warning"] == "large"  # type: ignore[index]


def test_freeze_switch(dep: Deployment) -> None:
    dep.set(
        """
        [[rules]]
        name = "base"
        """
    )
    assert freeze_key(dep.hsm, "hot", reason="incident 42").changed
    err = _refused(dep, _pay(dep, 1000))
    assert err.rules == ["frozen"] and "incident 42" in err.message
    assert show_policy(dep.hsm).frozen[0].label == "hot"
    assert unfreeze_key(dep.hsm, "hot").changed
    assert sign_psbt(dep.hsm, _pay(dep, 1000), "hot").signed_inputs == 1


def test_every_refusing_rule_is_named_and_audited(dep: Deployment) -> None:
    dep.set(
        f"""
        [[rules]]
        name = "per-tx"
        max_per_tx_sat = 1_000

        [[rules]]
        name = "allowlist"
        destinations = ["{foreign_address(RNG)}"]

        [[rules]]
        name = "fine"
        max_outputs = 10
        """
    )
    err = _refused(dep, _pay(dep, 50_000))
    assert err.rules == ["per-tx", "allowlist"]
    assert [d["rule"] for d in err.details] == ["per-tx", "allowlist"]
    entries = audit_entries(dep.config)
    refused = [e for e in entries if e["op"] == "policy_decision" and e["outcome"] == "refused"]
    assert refused[-1]["detail"]["refusing"] == "per-tx,allowlist"  # type: ignore[index]
    signer = [e for e in entries if e["op"] == "psbt_sign"][-1]
    assert signer["outcome"] == "refused" and "per-tx" in signer["detail"]["rules"]  # type: ignore[index]


def test_signing_policy_refusals_are_reported_as_rules(dep: Deployment) -> None:
    dep.set(
        """
        [[rules]]
        name = "base"
        """
    )
    big_fee = _pay(dep, 50_000, fee=20_000_000)
    res = check_psbt(dep.hsm, big_fee, "hot")
    assert res.decision == "refuse"
    verdicts = {r.name: r.decision for r in res.rules}
    assert verdicts == {
        "network": "allow",
        "path": "allow",
        "sighash": "allow",
        "change": "allow",
        "fee": "refuse",
        "base": "allow",
    }
    fee = next(r for r in res.rules if r.name == "fee")
    assert "[max-fee]" in fee.reason and "[max-fee-rate]" in fee.reason
    assert "raise policy.max_fee_sat" in fee.reason


def test_a_policy_edited_without_the_admin_step_is_refused(dep: Deployment) -> None:
    from anyhsm.policy.enforce import state_dir

    path = dep.set(
        """
        [[rules]]
        name = "per-tx"
        max_per_tx_sat = 1_000_000
        """
    )
    (active,) = state_dir(dep.hsm.config).glob("policy-*.toml")
    active.write_text(active.read_text().replace("1_000_000", "100_000_000"))
    with pytest.raises(PolicyNotAuthenticated) as e:
        sign_psbt(dep.hsm, _pay(dep, 50_000_000), "hot")
    assert e.value.exit_code == 7 and e.value.rules == ["policy-authenticated"]
    assert "without 'anyhsm policy set'" in e.value.message
    del path


def test_the_reasons_of_rules_that_held(dep: Deployment) -> None:
    """Signing does not write the reasons of the rules that held; ``policy check`` shows
    them (written when read), with the state the decision saw: the budget before the
    spend, and "already counted" once the transaction was debited."""
    dest = foreign_address(RNG)
    dep.set(
        f"""
        [[rules]]
        name = "listed"
        keys = ["hot"]
        destinations = ["{dest}"]
        max_per_tx_sat = 10_000_000
        max_per_period_sat = 50_000_000
        period = "24h"

        [[rules]]
        name = "anything"
        """
    )
    psbt = _pay(dep, 2_000_000, dest)
    before = {r.name: r.reason for r in check_psbt(dep.hsm, psbt, "hot").rules}
    assert before["listed"] == (
        "every destination listed; 2001000 sat (0.02001 BTC) of max 10000000 sat (0.1 BTC) "
        "per transaction; 2001000 sat (0.02001 BTC) of 50000000 sat (0.5 BTC) in 24h"
    )
    assert before["anything"] == "no condition"
    assert sign_psbt(dep.hsm, psbt, "hot").signed_inputs == 1
    after = {r.name: r.reason for r in check_psbt(dep.hsm, psbt, "hot").rules}
    assert after["listed"] == (
        "every destination listed; 2001000 sat (0.02001 BTC) of max 10000000 sat (0.1 BTC) "
        "per transaction; 2001000 sat (0.02001 BTC) of 50000000 sat (0.5 BTC) in 24h "
        "(this transaction is already counted)"
    )
