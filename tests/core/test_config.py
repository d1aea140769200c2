"""Configuration loading, environment overrides and the validator that reports
every problem at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from anyhsm import Config, Environment, Network, SecurityLevel
from anyhsm.cli.main import main
from anyhsm.config import default_min_level
from anyhsm.errors import ConfigError

ISSUE_EXAMPLE = """
environment = "development"      # development | staging | production
network = "regtest"              # mainnet | testnet | testnet4 | signet | regtest
[fallback]
chain = ["pkcs11", "software"]   # provider names, tried in order
allow_below_minimum = false      # explicit consent to fall below the environment's minimum level
[providers.software]
path = "keystore"                # relative paths are relative to the config file
[providers.simulator]
[providers.pkcs11]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "anyhsm"
[audit]
path = "audit.log"
"""


def test_issue_example_loads(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(ISSUE_EXAMPLE)
    cfg = Config.load(p)
    assert cfg.environment is Environment.DEVELOPMENT
    assert cfg.network is Network.REGTEST
    assert cfg.fallback.chain == ("pkcs11", "software")
    assert cfg.audit.path == tmp_path / "audit.log"
    assert cfg.provider_settings("pkcs11")["token_label"] == "anyhsm"


def test_env_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(ISSUE_EXAMPLE)
    env = {
        "ANYHSM_NETWORK": "signet",
        "ANYHSM_FALLBACK__CHAIN": '["software"]',
        "ANYHSM_FALLBACK__ALLOW_BELOW_MINIMUM": "true",
        "ANYHSM_PROVIDERS__PKCS11__TOKEN_LABEL": "prod",
        "ANYHSM_PASSPHRASE": "never a config value",
    }
    cfg = Config.load(p, env=env)
    assert cfg.network is Network.SIGNET
    assert cfg.fallback.chain == ("software",)
    assert cfg.fallback.allow_below_minimum is True
    assert cfg.provider_settings("pkcs11")["token_label"] == "prod"
    assert "passphrase" not in json.dumps(dict(cfg.raw), default=str)


def test_all_structural_problems_at_once(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        """
environment = "prod"
network = "bitcoin"
colour = "blue"
[fallback]
chain = ["pkcs11", "cloudhsm"]
allow_below_minimum = "yes"
[providers.pkcs11]
pin = "1234"
pool_size = "four"
[audit]
durability = "sometimes"
"""
    )
    with pytest.raises(ConfigError) as e:
        Config.load(p, env={})
    problems = "\n".join(e.value.problems)
    for needle in (
        "environment",
        "network",
        "colour",
        "cloudhsm",
        "allow_below_minimum",
        "providers.pkcs11.pin",
        "pool_size",
        "durability",
    ):
        assert needle in problems, needle
    assert "1234" not in problems  # a secret is never echoed


@pytest.mark.parametrize(
    ("env", "net", "level"),
    [
        (Environment.DEVELOPMENT, Network.MAINNET, SecurityLevel.SIMULATOR),
        (Environment.STAGING, Network.REGTEST, SecurityLevel.SOFTWARE),
        (Environment.PRODUCTION, Network.TESTNET4, SecurityLevel.SOFTWARE),
        (Environment.PRODUCTION, Network.MAINNET, SecurityLevel.TPM),
    ],
)
def test_default_minimum_levels(env: Environment, net: Network, level: SecurityLevel) -> None:
    assert default_min_level(env, net) is level


def prod_config(tmp_path: Path, body: str) -> Config:
    p = tmp_path / "c.toml"
    p.write_text(body)
    return Config.load(p, env={})


def test_production_semantic_checks(tmp_path: Path) -> None:
    ks = tmp_path / "keystore"
    ks.mkdir()
    (ks / "keystore.json").write_text("{}")
    os.chmod(ks / "keystore.json", 0o644)
    pf = tmp_path / "pass.txt"
    pf.write_text("x")
    os.chmod(pf, 0o644)
    cfg = prod_config(
        tmp_path,
        """
environment = "production"
network = "mainnet"
min_security_level = "software"
[fallback]
chain = ["simulator", "software"]
[providers.software]
path = "keystore"
passphrase_file = "pass.txt"
[providers.software.kdf]
name = "argon2id"
memory_kib = 1024
iterations = 1
""",
    )
    problems = cfg.check()
    text = "\n".join(str(p) for p in problems)
    assert "simulator is refused" in text
    assert "audit.path" in text  # missing audit log path
    assert "memory_kib" in text  # weak KDF
    assert "keystore.json" in text  # readable by others
    assert "pass.txt" in text  # secret file readable by others
    assert "lowers the default minimum" in text  # never silent
    errors = [p for p in problems if p.severity == "error"]
    assert len(errors) >= 5


def test_chain_that_can_never_meet_minimum(tmp_path: Path) -> None:
    cfg = prod_config(
        tmp_path,
        """
environment = "production"
network = "mainnet"
[fallback]
chain = ["software"]
[audit]
path = "audit.log"
""",
    )
    assert any("no provider in the chain reaches" in p.message for p in cfg.check())


def test_cli_config_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        'environment = "production"\nnetwork = "mainnet"\n[fallback]\nchain = ["simulator"]\n'
    )
    code = main(["--config", str(p), "config", "check", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 3
    assert out["ok"] is False
    settings = {pr["setting"] for pr in out["problems"]}
    assert {"fallback.chain", "audit.path"} <= settings
    assert all({"setting", "value", "message", "fix"} <= set(pr) for pr in out["problems"])


def test_cli_config_check_ok(deployment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(deployment), "config", "check"]) == 0
    assert "configuration OK" in capsys.readouterr().out


def test_bad_toml(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("environment = ")
    with pytest.raises(ConfigError):
        Config.load(p)
