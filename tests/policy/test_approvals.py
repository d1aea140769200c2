"""Approvals: M of N approver signatures (BIP137 made by embit's libsecp256k1) over the
unsigned txid and the policy version; wrong key, reused, expired, self-approval, wrong
policy version."""

from __future__ import annotations

import os
import random

import pytest
from tests.policy.conftest import APPROVERS, Deployment, approvals_table, audit_entries
from tests.policy.embit_psbt import Approver, approval_text, foreign_address, spend_psbt, txid_of
from tests.policy.test_velocity import sign_at

from anyhsm.errors import ApprovalRejected, SpendingPolicyRefused
from anyhsm.ops.policy import approval_request, show_policy, submit_approval

BTC = 100_000_000
NOW = 1_800_000_000
RNG = random.Random(5)
A, B, C = APPROVERS

HOT_WALLET = f"""
[[rules]]
name = "per-tx"
keys = ["hot"]
max_per_tx_sat = 10_000_000
approvals = {approvals_table(2)}
"""


def _big(dep: Deployment) -> str:
    return spend_psbt(dep.wallet, [(foreign_address(RNG), 20_000_000)], rng=RNG)


def _sha(dep: Deployment) -> str:
    s = show_policy(dep.hsm).sha256
    assert s is not None
    return s


def _approve(
    dep: Deployment, who: Approver, psbt: str, *, expires: int = NOW + 600, now: float = NOW
) -> str:
    txid = txid_of(psbt)
    sig = who.sign(approval_text(txid, _sha(dep), expires))
    return submit_approval(dep.hsm, txid, who.hex, sig, expires, now=now).id


def test_two_of_three_approve_a_larger_spend(dep: Deployment) -> None:
    dep.set(HOT_WALLET)
    psbt = _big(dep)
    with pytest.raises(SpendingPolicyRefused) as e:
        sign_at(dep, psbt, NOW)
    assert e.value.rules == ["per-tx"] and "needs 2 of 3 approvals, has 0" in e.value.message
    _approve(dep, A, psbt)
    with pytest.raises(SpendingPolicyRefused) as e:
        sign_at(dep, psbt, NOW + 1)
    assert "has 1" in e.value.message
    _approve(dep, C, psbt)
    res = sign_at(dep, psbt, NOW + 2)
    assert res.signed_inputs == 1
    decision = [e for e in audit_entries(dep.config) if e["op"] == "policy_decision"][-1]
    assert decision["outcome"] == "ok" and decision["detail"]["approved"] == "per-tx"  # type: ignore[index]
    assert set(decision["detail"]["approvers"].split(",")) == {A.hex, C.hex}  # type: ignore[index,union-attr]


def test_the_request_prints_the_exact_message(dep: Deployment) -> None:
    dep.set(HOT_WALLET)
    psbt = _big(dep)
    req = approval_request(dep.hsm, psbt, "hot", expires_in=600, now=NOW)
    assert req.message == approval_text(txid_of(psbt), _sha(dep), NOW + 600)
    assert [r["rule"] for r in req.rules] == ["per-tx"] and req.rules[0]["m"] == 2


def test_an_approval_is_single_use(dep: Deployment) -> None:
    dep.set(HOT_WALLET)
    psbt = _big(dep)
    expires = NOW + 600
    txid = txid_of(psbt)
    sig_a = A.sign(approval_text(txid, _sha(dep), expires))
    submit_approval(dep.hsm, txid, A.hex, sig_a, expires, now=NOW)
    _approve(dep, B, psbt, expires=expires)
    sign_at(dep, psbt, NOW + 1)
    with pytest.raises(ApprovalRejected) as e:
        submit_approval(dep.hsm, txid, A.hex, sig_a, expires, now=NOW + 2)
    assert "used already" in e.value.message and e.value.exit_code == 7
    with pytest.raises(SpendingPolicyRefused) as r:
        sign_at(dep, psbt, NOW + 3)  # signing it again needs new approvals
    assert "has 0" in r.value.message


def test_wrong_key(dep: Deployment) -> None:
    dep.set(HOT_WALLET)
    psbt = _big(dep)
    txid, expires = txid_of(psbt), NOW + 600
    stranger = Approver(b"\x09" * 32)
    sig = stranger.sign(approval_text(txid, _sha(dep), expires))
    with pytest.raises(ApprovalRejected, match="not an approver"):
        submit_approval(dep.hsm, txid, stranger.hex, sig, expires, now=NOW)
    # an approver's key named, but the signature is another key's
    with pytest.raises(ApprovalRejected, match="not this approver's"):
        submit_approval(dep.hsm, txid, A.hex, sig, expires, now=NOW)
    # the approver's signature over another transaction
    other = B.sign(approval_text("00" * 32, _sha(dep), expires))
    with pytest.raises(ApprovalRejected, match="not this approver's"):
        submit_approval(dep.hsm, txid, B.hex, other, expires, now=NOW)
    refused = [e for e in audit_entries(dep.config) if e["op"] == "policy_approval"]
    assert [e["outcome"] for e in refused] == ["refused"] * 3


def test_expired(dep: Deployment) -> None:
    dep.set(HOT_WALLET)
    psbt = _big(dep)
    with pytest.raises(ApprovalRejected, match="expired"):
        _approve(dep, A, psbt, expires=NOW - 1)
    with pytest.raises(ApprovalRejected, match="later than its rules allow"):
        _approve(dep, A, psbt, expires=NOW + 2 * 86_400)
    _approve(dep, A, psbt, expires=NOW + 60)
    _approve(dep, B, psbt, expires=NOW + 60)
    with pytest.raises(SpendingPolicyRefused) as e:
        sign_at(dep, psbt, NOW + 61)  # both expired before the signing
    assert "has 0" in e.value.message


def test_a_requester_cannot_approve_its_own_request(dep: Deployment) -> None:
    me = f"uid:{os.getuid()}"
    dep.set(HOT_WALLET + f'\n[principals]\n"{me}" = ["{A.hex}"]\n')
    psbt = _big(dep)
    _approve(dep, A, psbt)
    _approve(dep, B, psbt)
    with pytest.raises(SpendingPolicyRefused) as e:
        sign_at(dep, psbt, NOW + 1)
    assert "1 approval(s) by the requester's own key not counted" in e.value.message
    # another requester (the service's client "ops") may use both
    from anyhsm.audit import principal

    token = principal.set("ops")
    try:
        assert sign_at(dep, psbt, NOW + 2).signed_inputs == 1
    finally:
        principal.reset(token)


def test_wrong_policy_version(dep: Deployment) -> None:
    dep.set(HOT_WALLET)
    psbt = _big(dep)
    old = _sha(dep)
    _approve(dep, A, psbt)  # made under the first policy
    dep.set(HOT_WALLET.replace("10_000_000", "10_000_001"))
    assert _sha(dep) != old
    txid, expires = txid_of(psbt), NOW + 600
    stale = B.sign(approval_text(txid, old, expires))
    with pytest.raises(ApprovalRejected, match="not the active policy"):
        submit_approval(dep.hsm, txid, B.hex, stale, expires, policy=old, now=NOW)
    with pytest.raises(ApprovalRejected, match="not this approver's"):
        submit_approval(dep.hsm, txid, B.hex, stale, expires, now=NOW)
    _approve(dep, B, psbt)  # one valid approval under the new policy; A's was dropped
    with pytest.raises(SpendingPolicyRefused) as e:
        sign_at(dep, psbt, NOW + 1)
    assert "has 1" in e.value.message


def test_bip322_simple_approvals_are_accepted(dep: Deployment) -> None:
    """BIP322 simple for the approver's P2WPKH address (signed by anyhsm's own signer here:
    the verification is what is under test, and BIP322 itself is tested elsewhere)."""
    from anyhsm.bitcoin.message import sign_message_bip322
    from anyhsm.crypto import secp256k1 as ec

    dep.set(HOT_WALLET)
    psbt = _big(dep)
    txid, expires = txid_of(psbt), NOW + 600
    text = approval_text(txid, _sha(dep), expires)
    secret = bytearray(b"\x02" * 32)

    def sign(digest: bytes) -> bytes:
        return ec.ecdsa_sign(secret, digest)

    sig = sign_message_bip322(sign, B.pubkey, text, "p2wpkh")
    assert sig.startswith("smp")
    submit_approval(dep.hsm, txid, B.hex, sig, expires, now=NOW)
    _approve(dep, A, psbt)
    assert sign_at(dep, psbt, NOW + 1).signed_inputs == 1
