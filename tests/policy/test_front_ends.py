"""The spending policy holds for every way of reaching a key: Bitcoin Core's external
signer (``anyhsm-signer signtx``, a real child process as bitcoind runs it) and the HTTP
service (403 with the rule names), besides the CLI (test_cli_hot_wallet.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE
from tests.policy.conftest import Deployment, audit_entries
from tests.policy.embit_psbt import foreign_address, spend_psbt

RNG = random.Random(31)
POLICY = """
[[rules]]
name = "per-tx"
keys = ["hot"]
max_per_tx_sat = 10_000_000
"""


def _small_and_large(dep: Deployment) -> tuple[str, str]:
    small = spend_psbt(dep.wallet, [(foreign_address(RNG), 1_000_000)], rng=RNG)
    large = spend_psbt(dep.wallet, [(foreign_address(RNG), 20_000_000)], rng=RNG)
    return small, large


def test_bitcoin_core_signer_is_refused_by_the_policy(dep: Deployment) -> None:
    from tests.signer.core import Core, CoreError

    dep.set(POLICY)
    with dep.config.open("a") as f:
        f.write('\n[signer]\nkey = "hot"\n')
    dep.hsm.close()
    env = {"ANYHSM_CONFIG": str(dep.config), "ANYHSM_PASSPHRASE": PASSPHRASE}
    core = Core("v28", "regtest", env, cwd=dep.config.parent)
    small, large = _small_and_large(dep)
    assert core.signtx(small) != small  # signed
    with pytest.raises(CoreError) as e:
        core.signtx(large)
    assert "per-tx" in str(e.value) and "max_per_tx_sat" in str(e.value)
    decisions = [e for e in audit_entries(dep.config) if e["op"] == "policy_decision"]
    assert [d["outcome"] for d in decisions] == ["ok", "refused"]
    dep.reopen()


def test_the_service_answers_403_with_the_rule_names(dep: Deployment, tmp_path: Path) -> None:
    pytest.importorskip("aiohttp", reason="the server extra is not installed")
    from tests.service.conftest import serve

    from anyhsm.client import Client
    from anyhsm.errors import SpendingPolicyRefused
    from anyhsm.service.settings import ClientSpec, Op, ServiceSettings
    from anyhsm.service.tokens import hash_token, new_token

    dep.set(
        POLICY
        + """
[[rules]]
name = "daily"
max_per_period_sat = 50_000_000
period = "24h"

[[rules]]
name = "large"
max_per_tx_sat = 500_000
action = "warn"
"""
    )
    token = new_token()
    spec = ClientSpec("treasury", hash_token(token), ("hot",), frozenset({Op.SIGN_PSBT, Op.READ}))
    url, _, stop = serve(dep.hsm, ServiceSettings(rate_limit_per_s=0, clients=(spec,)))
    client = Client(url, token, timeout=30)
    try:
        small, large = _small_and_large(dep)
        assert client.sign_psbt("hot", small).signed_inputs == 1
        with pytest.raises(SpendingPolicyRefused) as e:
            client.sign_psbt("hot", large)
        assert e.value.rules == ["per-tx"]
        status, body, _ = client.request(
            "POST", "/v1/psbt/sign", {"key": "hot", "psbt": large}, accept=(403,)
        )
        error = json.loads(body)["error"]
        assert status == 403 and error["rules"] == ["per-tx"]
        assert error["code"] == "spending_policy_refused"
        metrics = client.request("GET", "/metrics")[1].decode()
        assert 'anyhsm_policy_decisions_total{decision="refuse",rule="per-tx"}' in metrics
        assert 'anyhsm_policy_budget_used_sat{rule="daily"} 1.001e+06' in metrics
        assert 'anyhsm_policy_budget_limit_sat{rule="daily"} 5e+07' in metrics
        # a rule's verdict counts in every decision, the refused ones too
        assert 'anyhsm_policy_decisions_total{decision="warn",rule="large"} 3.0' in metrics
    finally:
        client.close()
        stop()
    decisions = [e for e in audit_entries(dep.config) if e["op"] == "policy_decision"]
    assert [d.get("principal") for d in decisions] == ["treasury"] * 3
    assert [d["detail"]["requester"] for d in decisions] == ["treasury"] * 3  # type: ignore[index]


def test_approvals_and_checks_through_the_service(dep: Deployment) -> None:
    pytest.importorskip("aiohttp", reason="the server extra is not installed")
    from tests.policy.conftest import APPROVERS, approvals_table
    from tests.policy.embit_psbt import approval_text, txid_of
    from tests.service.conftest import serve
    from tests.service.openapi_check import check_response

    from anyhsm.client import Client
    from anyhsm.errors import ApprovalRejected, Forbidden
    from anyhsm.ops.policy import show_policy
    from anyhsm.service.settings import ClientSpec, Op, ServiceSettings
    from anyhsm.service.tokens import hash_token, new_token

    dep.set(POLICY + f"approvals = {approvals_table(2)}\n")
    sha = show_policy(dep.hsm).sha256
    tokens = {"treasury": new_token(), "alice": new_token()}
    specs = (
        ClientSpec("treasury", hash_token(tokens["treasury"]), ("hot",), frozenset({Op.SIGN_PSBT})),
        ClientSpec("alice", hash_token(tokens["alice"]), ("hot",), frozenset({Op.APPROVE})),
    )
    url, _, stop = serve(dep.hsm, ServiceSettings(rate_limit_per_s=0, clients=specs))
    treasury, alice = Client(url, tokens["treasury"], timeout=30), Client(url, tokens["alice"])
    try:
        _, large = _small_and_large(dep)
        status, body, h = treasury.request(
            "POST", "/v1/policy/check", {"key": "hot", "psbt": large}
        )
        check_response("POST", "/v1/policy/check", status, body, h.get("content-type", ""))
        check = json.loads(body)
        assert check["decision"] == "refuse" and check["rules"][-1]["name"] == "per-tx"
        txid = txid_of(large)
        expires = int(__import__("time").time()) + 600
        text = approval_text(txid, str(sha), expires)
        with pytest.raises(Forbidden):  # treasury may not approve
            treasury.request(
                "POST",
                "/v1/policy/approvals",
                {"txid": txid, "pubkey": APPROVERS[0].hex, "signature": "x", "expires": expires},
            )
        with pytest.raises(ApprovalRejected):
            alice.request(
                "POST",
                "/v1/policy/approvals",
                {"txid": txid, "pubkey": APPROVERS[0].hex, "signature": "x", "expires": expires},
            )
        for a in APPROVERS[:2]:
            status, body, h = alice.request(
                "POST",
                "/v1/policy/approvals",
                {"txid": txid, "pubkey": a.hex, "signature": a.sign(text), "expires": expires},
            )
            check_response("POST", "/v1/policy/approvals", status, body, h.get("content-type", ""))
            assert json.loads(body)["rules"] == ["per-tx"]
        assert treasury.sign_psbt("hot", large).signed_inputs == 1
    finally:
        treasury.close()
        alice.close()
        stop()
