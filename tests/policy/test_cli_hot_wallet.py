"""The hot wallet of docs/policy.md through the real ``anyhsm`` command: at most 0.5 BTC a
day, 0.1 BTC a transaction, only to 200 listed addresses; anything larger needs 2 of 3
approvers. Every decision is read back from the audit log."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE
from tests.policy.conftest import APPROVERS, Deployment, open_deployment
from tests.policy.embit_psbt import foreign_address, spend_psbt
from tests.support.cli import cli

RNG = random.Random(21)
ENV = {"ANYHSM_PASSPHRASE": PASSPHRASE}


def hot_wallet_policy(addresses: list[str]) -> str:
    listed = "\n".join(f'  "{a}",' for a in addresses)
    approvers = ",\n  ".join(f'"{a.hex}"' for a in APPROVERS)
    return f"""\
description = "hot wallet: 0.5 BTC a day, 0.1 BTC a transaction, 200 addresses; more needs 2 of 3"

[[rules]]
name = "allowlist"
keys = ["hot"]
destinations = [
{listed}
]

[[rules]]
name = "per-tx"
keys = ["hot"]
max_per_tx_sat = 10_000_000          # 0.1 BTC (outputs that are not change, plus the fee)
approvals = {{ m = 2, approvers = [
  {approvers},
] }}

[[rules]]
name = "daily"
keys = ["hot"]
max_per_period_sat = 50_000_000      # 0.5 BTC
period = "24h"
"""


@pytest.fixture
def wallet(tmp_path: Path, passphrase_env: str) -> tuple[Deployment, list[str]]:
    dep = open_deployment(tmp_path / "dep", '[policy]\nspending_policy = "hot-wallet.toml"\n')
    dep.hsm.close()
    addresses = [foreign_address(RNG) for _ in range(200)]
    dep.policy(hot_wallet_policy(addresses), "hot-wallet.toml")
    return dep, addresses


def run(dep: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("--config", str(dep.config), "--json", *args, env=ENV)


def _file(dep: Deployment, name: str, psbt: str) -> str:
    p = dep.config.parent / name
    p.write_text(psbt)
    return str(p)


def test_hot_wallet_end_to_end(wallet: tuple[Deployment, list[str]]) -> None:
    dep, addresses = wallet
    # signing is refused until the admin step has set the configured policy
    small = _file(dep, "small.psbt", spend_psbt(dep.wallet, [(addresses[0], 4_999_000)], rng=RNG))
    r = run(dep, "psbt", "sign", "hot", small)
    assert r.returncode == 7 and json.loads(r.stdout)["error"]["code"] == "policy_not_authenticated"

    r = run(dep, "policy", "set")
    assert r.returncode == 0, r.stderr
    sha = json.loads(r.stdout)["sha256"]

    shown = json.loads(run(dep, "policy", "show").stdout)
    assert shown["active"] and [x["name"] for x in shown["rules"]] == [
        "allowlist",
        "per-tx",
        "daily",
    ]
    assert shown["rules"][0]["destinations"] == 200

    r = run(dep, "policy", "check", small, "--key", "hot")
    check = json.loads(r.stdout)
    assert r.returncode == 0 and check["decision"] == "allow"
    assert {x["name"]: x["decision"] for x in check["rules"]} == {
        "network": "allow",
        "path": "allow",
        "sighash": "allow",
        "change": "allow",
        "fee": "allow",
        "allowlist": "allow",
        "per-tx": "allow",
        "daily": "allow",
    }
    assert all(set(x) >= {"name", "decision", "reason"} for x in check["rules"])
    assert check["budgets"][0] == {
        "rule": "daily",
        "period": "24h",
        "limit": 50_000_000,
        "used": 0,
        "left": 50_000_000,
        "amount": 5_000_000,
    }

    assert run(dep, "psbt", "sign", "hot", small).returncode == 0

    # not listed: refused, exit 7, the rule named in the JSON error
    stranger = _file(
        dep, "stranger.psbt", spend_psbt(dep.wallet, [(foreign_address(RNG), 10_000)], rng=RNG)
    )
    r = run(dep, "psbt", "sign", "hot", stranger)
    err = json.loads(r.stdout)["error"]
    assert r.returncode == 7 and err["rules"] == ["allowlist"], r.stdout

    # 0.2 BTC: needs 2 of the 3 approvers
    large_psbt = spend_psbt(dep.wallet, [(addresses[7], 19_999_000)], rng=RNG)
    large = _file(dep, "large.psbt", large_psbt)
    r = run(dep, "psbt", "sign", "hot", large)
    err = json.loads(r.stdout)["error"]
    assert r.returncode == 7 and err["rules"] == ["per-tx"] and "needs 2 of 3" in err["message"]
    req = json.loads(
        run(dep, "policy", "request", large, "--key", "hot", "--expires", "30m").stdout
    )
    assert req["policy"] == sha and req["rules"][0]["rule"] == "per-tx"
    for approver in APPROVERS[1:]:
        r = run(
            dep,
            "policy",
            "approve",
            "--psbt",
            large,
            "--pubkey",
            approver.hex,
            "--signature",
            approver.sign(req["message"]),
            "--expires",
            str(req["expires"]),
            "--policy",
            req["policy"],
        )
        assert r.returncode == 0, r.stdout + r.stderr
    r = run(dep, "psbt", "sign", "hot", large)
    assert r.returncode == 0, r.stdout

    # 0.05 + 0.2 spent; 0.1 more is within 0.1 per transaction but not within the day
    for n in range(2):
        ok = _file(dep, f"ok{n}.psbt", spend_psbt(dep.wallet, [(addresses[n], 9_999_000)], rng=RNG))
        assert run(dep, "psbt", "sign", "hot", ok).returncode == 0
    over = _file(dep, "over.psbt", spend_psbt(dep.wallet, [(addresses[9], 5_000_001)], rng=RNG))
    r = run(dep, "psbt", "sign", "hot", over)
    assert r.returncode == 7 and json.loads(r.stdout)["error"]["rules"] == ["daily"]
    assert (
        json.loads(run(dep, "policy", "check", over, "--key", "hot").stdout)["budgets"][0]["left"]
        == 5_000_000
    )

    # editing the configured file without the admin step stops every signing
    p = dep.config.parent / "hot-wallet.toml"
    p.write_text(p.read_text().replace("10_000_000", "90_000_000"))
    r = run(dep, "psbt", "sign", "hot", small)
    assert r.returncode == 7 and json.loads(r.stdout)["error"]["rules"] == ["policy-authenticated"]

    # every decision, read back from the audit log
    r = run(dep, "audit", "show", "--op", "policy_decision")
    entries = [
        json.loads(line)
        for line in r.stdout.splitlines()
        if line.startswith("{") and '"op"' in line
    ]
    outcomes = [
        (e["outcome"], e["detail"]["decision"], e["detail"].get("refusing")) for e in entries
    ]
    assert outcomes == [
        ("ok", "allow", None),
        ("refused", "refuse", "allowlist"),
        ("refused", "refuse", "per-tx"),
        ("ok", "allow", None),
        ("ok", "allow", None),
        ("ok", "allow", None),
        ("refused", "refuse", "daily"),
    ]
    approved = entries[3]["detail"]
    assert approved["approved"] == "per-tx" and approved["amount"] == "20000000"
    assert run(dep, "audit", "verify").returncode == 0
