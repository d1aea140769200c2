"""``POST /v1/policy/requests`` (``anyhsm policy request`` over HTTP) through a real
server and the typed client: the exact message approvers sign (checked against the
message as docs/policy.md writes it, spelled out independently in the test helpers), the
rules that want approvals, the same answer as the operation the CLI calls; right
``sign-psbt`` on the key; strict members; then the whole approval flow over HTTP."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.policy.conftest import (
    APPROVERS,
    Deployment,
    approvals_table,
    audit_entries,
    open_deployment,
)
from tests.policy.embit_psbt import approval_text, foreign_address, spend_psbt, txid_of
from tests.service.conftest import serve

from anyhsm.client import Client
from anyhsm.errors import (
    Forbidden,
    InvalidRequest,
    KeyNotFound,
    PolicyViolation,
    SpendingPolicyRefused,
)
from anyhsm.ops.policy import approval_request, show_policy
from anyhsm.service.settings import ClientSpec, Op, ServiceSettings
from anyhsm.service.tokens import hash_token, new_token

POLICY = f"""
[[rules]]
name = "per-tx"
keys = ["hot"]
max_per_tx_sat = 10_000_000
approvals = {approvals_table(2)}
"""
CLIENTS = {
    "treasury": (("hot",), frozenset({Op.SIGN_PSBT})),
    "alice": (("hot",), frozenset({Op.APPROVE})),
    "reader": (("*",), frozenset({Op.READ})),
    "other": (("cold-*",), frozenset({Op.SIGN_PSBT})),
}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Deployment, dict[str, Client]]]:
    dep = open_deployment(tmp_path / "dep")
    dep.set(POLICY)
    tokens = {name: new_token() for name in CLIENTS}
    specs = tuple(
        ClientSpec(name, hash_token(tokens[name]), keys, ops)
        for name, (keys, ops) in CLIENTS.items()
    )
    url, _, stop = serve(dep.hsm, ServiceSettings(rate_limit_per_s=0, clients=specs))
    clients = {name: Client(url, tokens[name], timeout=30) for name in CLIENTS}
    try:
        yield dep, clients
    finally:
        for c in clients.values():
            c.close()
        stop()
        dep.hsm.close()


def _large(dep: Deployment) -> str:
    return spend_psbt(dep.wallet, [(foreign_address(random.Random(5)), 20_000_000)])


def test_the_request_is_the_message_approvers_sign(
    served: tuple[Deployment, dict[str, Client]],
) -> None:
    dep, c = served
    large = _large(dep)
    before = int(time.time())
    req = c["treasury"].approval_request("hot", large, expires_in=600)
    sha = str(show_policy(dep.hsm).sha256)
    assert req.txid == txid_of(large) and req.policy == sha
    assert before + 600 <= req.expires <= int(time.time()) + 600
    assert req.message == approval_text(req.txid, sha, req.expires)
    assert [r["rule"] for r in req.rules] == ["per-tx"]
    assert req.rules[0]["m"] == 2 and req.rules[0]["approvers"] == [a.hex for a in APPROVERS]
    local = approval_request(dep.hsm, large, "hot", expires_in=600, now=float(req.expires - 600))
    assert local.to_dict() == req.to_dict()  # the CLI's operation, the same answer
    small = spend_psbt(dep.wallet, [(foreign_address(random.Random(6)), 1_000_000)])
    assert c["treasury"].approval_request("hot", small).rules == ()  # nothing to approve


def test_rights_and_members(served: tuple[Deployment, dict[str, Client]]) -> None:
    dep, c = served
    large = _large(dep)
    for name in ("alice", "reader"):  # approve or read alone may not ask
        with pytest.raises(Forbidden):
            c[name].approval_request("hot", large)
    with pytest.raises(Forbidden):  # not its key (and it learns nothing of it)
        c["other"].approval_request("hot", large)
    with pytest.raises(KeyNotFound):  # a name it could have used
        c["other"].approval_request("cold-9", large)
    for expires_in in (0, -5, 31 * 86400 + 1, True, "1h", 1.5):
        with pytest.raises(InvalidRequest):
            c["treasury"].request(
                "POST",
                "/v1/policy/requests",
                {"key": "hot", "psbt": large, "expires_in": expires_in},
            )
    with pytest.raises(InvalidRequest):
        c["treasury"].request("POST", "/v1/policy/requests", {"psbt": large})


def test_the_approval_flow_over_http(served: tuple[Deployment, dict[str, Client]]) -> None:
    dep, c = served
    large = _large(dep)
    with pytest.raises(SpendingPolicyRefused) as refused:
        c["treasury"].sign_psbt("hot", large)
    assert refused.value.rules == ["per-tx"]
    req = c["treasury"].approval_request("hot", large, expires_in=900)
    for approver in APPROVERS[:2]:
        accepted = c["alice"].submit_approval(
            req.txid, approver.hex, approver.sign(req.message), req.expires, policy=req.policy
        )
        assert accepted.rules == ("per-tx",) and accepted.pubkey.hex() == approver.hex
    assert c["treasury"].sign_psbt("hot", large).signed_inputs == 1


def test_no_active_policy(tmp_path: Path) -> None:
    dep = open_deployment(tmp_path / "bare")
    token = new_token()
    spec = ClientSpec("treasury", hash_token(token), ("hot",), frozenset({Op.SIGN_PSBT}))
    url, _, stop = serve(dep.hsm, ServiceSettings(rate_limit_per_s=0, clients=(spec,)))
    try:
        with Client(url, token) as c, pytest.raises(PolicyViolation):
            c.approval_request("hot", _large(dep))
    finally:
        stop()
        dep.hsm.close()


def test_the_approval_flow_through_the_cli_against_the_service(tmp_path: Path) -> None:
    """``anyhsm policy request`` and ``policy approve`` under ``--addr`` (no config, only
    the address and a token): the same request text as the service's, the approvals
    accepted over HTTP, and then the refused PSBT signs."""
    import json

    from tests.support.cli import cli

    dep = open_deployment(tmp_path / "dep")
    dep.set(POLICY)
    tokens = {name: new_token() for name in ("treasury", "alice")}
    specs = (
        ClientSpec("treasury", hash_token(tokens["treasury"]), ("hot",), frozenset({Op.SIGN_PSBT})),
        ClientSpec("alice", hash_token(tokens["alice"]), ("hot",), frozenset({Op.APPROVE})),
    )
    url, _, stop = serve(dep.hsm, ServiceSettings(rate_limit_per_s=0, clients=specs))
    try:
        large = _large(dep)
        psbt_file = tmp_path / "large.psbt"
        psbt_file.write_text(large)
        work = tmp_path / "cwd"
        work.mkdir()

        def remote(who: str, *args: str) -> dict[str, object]:
            r = cli(
                "--json", *args, env={"ANYHSM_ADDR": url, "ANYHSM_TOKEN": tokens[who]}, cwd=work
            )
            assert r.returncode == 0, r.stdout + r.stderr
            out = json.loads(r.stdout)
            assert isinstance(out, dict)
            return out

        req = remote(
            "treasury", "policy", "request", str(psbt_file), "--key", "hot", "--expires", "15m"
        )
        assert req["txid"] == txid_of(large)
        assert req["message"] == approval_text(
            str(req["txid"]), str(req["policy"]), int(str(req["expires"]))
        )
        for approver in APPROVERS[:2]:
            ok = remote(
                "alice", "policy", "approve", "--psbt", str(psbt_file),
                "--pubkey", approver.hex, "--signature", approver.sign(str(req["message"])),
                "--expires", str(req["expires"]), "--policy", str(req["policy"]),
            )  # fmt: skip
            assert ok["rules"] == ["per-tx"]
        no_key = cli(
            "--json", "policy", "request", str(psbt_file),
            env={"ANYHSM_ADDR": url, "ANYHSM_TOKEN": tokens["treasury"]}, cwd=work,
        )  # fmt: skip
        assert no_key.returncode != 0 and "--key" in no_key.stdout
        with Client(url, tokens["treasury"]) as c:
            assert c.sign_psbt("hot", large).signed_inputs == 1
    finally:
        stop()
        dep.hsm.close()


def test_policy_check_through_the_cli_against_the_service(tmp_path: Path) -> None:
    """``anyhsm policy check`` under ``--addr``: the service's decision, printed as the
    local operation's (``--json`` the same object, the text the same lines), exit 0 for
    an allowed PSBT and 1 for a refused one, nothing signed or debited; without
    ``--key`` it says to name one."""
    import json

    from tests.support.cli import cli

    from anyhsm.cli.policy_cmds import check_text
    from anyhsm.client import policy_check_result
    from anyhsm.ops.policy import check_psbt

    dep = open_deployment(tmp_path / "dep")
    dep.set(POLICY)
    token = new_token()
    spec = ClientSpec("treasury", hash_token(token), ("hot",), frozenset({Op.SIGN_PSBT}))
    url, _, stop = serve(dep.hsm, ServiceSettings(rate_limit_per_s=0, clients=(spec,)))
    env = {"ANYHSM_ADDR": url, "ANYHSM_TOKEN": token}
    work = tmp_path / "cwd"
    work.mkdir()
    try:
        small = spend_psbt(dep.wallet, [(foreign_address(random.Random(6)), 1_000_000)])
        for text, status, decision in ((small, 0, "allow"), (_large(dep), 1, "refuse")):
            f = tmp_path / f"{decision}.psbt"
            f.write_text(text)
            r = cli("--json", "policy", "check", str(f), "--key", "hot", env=env, cwd=work)
            assert r.returncode == status, r.stdout + r.stderr
            remote = json.loads(r.stdout)
            assert remote["decision"] == decision
            local = check_psbt(dep.hsm, text, "hot").to_dict()
            assert {k: v for k, v in remote.items() if k != "schema_version"} == local
            back = policy_check_result(remote)
            assert back.to_dict() == local
            plain = cli("policy", "check", str(f), "--key", "hot", env=env, cwd=work)
            assert plain.returncode == status
            assert plain.stdout.splitlines() == check_text(back)
        ops = [e["op"] for e in audit_entries(dep.config)]
        # four checks through the service, two by the operation here; nothing decided
        assert ops.count("policy_check") == 6 and "policy_decision" not in ops
        no_key = cli("--json", "policy", "check", str(tmp_path / "allow.psbt"), env=env, cwd=work)
        assert no_key.returncode != 0 and "--key" in no_key.stdout
    finally:
        stop()
        dep.hsm.close()


def test_a_malformed_policy_check_answer_is_a_typed_error() -> None:
    from anyhsm.client import policy_check_result
    from anyhsm.errors import ServiceError

    good: dict[str, object] = {
        "decision": "allow", "txid": "ab" * 32, "policy": None, "keys": ["hot"],
        "amount": 5, "fee": 1, "warnings": [], "budgets": [],
        "rules": [{"name": "r", "decision": "allow", "reason": "", "approved_by": ["02" * 33]}],
    }  # fmt: skip
    assert policy_check_result(good).rules[0].approved_by == (bytes.fromhex("02" * 33),)
    for bad in (
        {**good, "rules": "r"},
        {**good, "amount": "5"},
        {**good, "rules": [{"name": 1}]},
        {k: v for k, v in good.items() if k != "txid"},
        {
            **good,
            "rules": [{"name": "r", "decision": "allow", "reason": "", "approved_by": ["zz"]}],
        },
    ):
        with pytest.raises(ServiceError):
            policy_check_result(bad)


def test_policy_show_through_the_cli_against_the_service(tmp_path: Path) -> None:
    """``GET /v1/policy`` and ``anyhsm policy show`` under ``--addr``: the operation's
    view (rules, built-in rules, a velocity budget, a frozen key, an approval waiting),
    the same JSON and text as locally; right ``admin`` only (a signing client is refused
    with 403, exit 7)."""
    import argparse
    import json
    from typing import cast

    from tests.support.cli import cli

    from anyhsm.cli.app import App
    from anyhsm.cli.policy_cmds import cmd_show
    from anyhsm.client import policy_show_result
    from anyhsm.ops.policy import PolicyShow, freeze_key, submit_approval

    dep = open_deployment(tmp_path / "dep")
    dep.set(
        POLICY + '\n[[rules]]\nname = "daily"\nmax_per_period_sat = 50_000_000\nperiod = "24h"\n'
    )
    large = _large(dep)
    req = approval_request(dep.hsm, large, "hot", expires_in=900)
    submit_approval(
        dep.hsm, req.txid, APPROVERS[0].hex, APPROVERS[0].sign(req.message), req.expires
    )
    freeze_key(dep.hsm, "hot", reason="incident 7")
    tokens = {name: new_token() for name in ("operator", "treasury")}
    specs = (
        ClientSpec("operator", hash_token(tokens["operator"]), ("*",), frozenset({Op.ADMIN})),
        ClientSpec("treasury", hash_token(tokens["treasury"]), ("hot",), frozenset({Op.SIGN_PSBT})),
    )
    url, _, stop = serve(dep.hsm, ServiceSettings(rate_limit_per_s=0, clients=specs))
    work = tmp_path / "cwd"
    work.mkdir()
    try:
        local = show_policy(dep.hsm)
        assert local.frozen and local.pending_approvals and local.budgets  # every part shown
        with Client(url, tokens["operator"]) as c:
            answer = c.show_policy()
        assert answer.pop("schema_version") == 1 and answer == local.to_dict()
        back = policy_show_result(answer)
        assert back == local
        env = {"ANYHSM_ADDR": url, "ANYHSM_TOKEN": tokens["operator"]}
        r = cli("--json", "policy", "show", env=env, cwd=work)
        assert r.returncode == 0, r.stdout + r.stderr
        assert {k: v for k, v in json.loads(r.stdout).items() if k != "schema_version"} == (
            local.to_dict()
        )
        text = cli("policy", "show", env=env, cwd=work)
        assert text.returncode == 0

        class _Backend:  # the handler's text of the local view, to compare with
            def show_policy(self) -> PolicyShow:
                return local

        class _App:
            def backend(self) -> _Backend:
                return _Backend()

        lines = cmd_show(argparse.Namespace(), cast(App, _App())).text
        assert text.stdout.splitlines() == lines
        with Client(url, tokens["treasury"]) as c, pytest.raises(Forbidden):
            c.show_policy()
        refused = cli(
            "--json", "policy", "show", env={**env, "ANYHSM_TOKEN": tokens["treasury"]}, cwd=work
        )
        assert refused.returncode == 7
    finally:
        stop()
        dep.hsm.close()


def test_policy_requests_leave_no_descriptor_open(
    served: tuple[Deployment, dict[str, Client]],
) -> None:
    """A long-running service answers thousands of policy checks and approval requests:
    each makes a state store for the call, whose descriptors must close with it (before,
    every one left the state's lock file open until the process ended)."""
    import gc
    import os

    dep, c = served
    large = _large(dep)
    for _ in range(3):  # warm: the client's connection, the workers' own descriptors
        c["treasury"].check_policy("hot", large)
        c["treasury"].approval_request("hot", large, expires_in=600)
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(60):
        assert c["treasury"].check_policy("hot", large)["decision"] == "refuse"
        c["treasury"].approval_request("hot", large, expires_in=600)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before + 2  # slack: a pool thread started
