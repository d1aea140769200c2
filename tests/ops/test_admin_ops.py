"""anyhsm.ops.admin on real deployments: init (all refusals before the passphrase),
health (one shape, open or not), the audit log (verify, show, export, recover),
config check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE

from anyhsm.audit_query import AuditQuery
from anyhsm.config import Config
from anyhsm.errors import AuthenticationFailed, ConfigError, HsmError
from anyhsm.hsm import Hsm, open_hsm
from anyhsm.ops import admin
from anyhsm.ops.keys import create_key
from anyhsm.secret import SecretBytes
from anyhsm.types import Environment, Network


def test_init_creates_a_deployment_that_opens(tmp_path: Path) -> None:
    res = admin.init(
        tmp_path / "dep",
        SecretBytes(PASSPHRASE.encode()),
        chain=admin.parse_chain(" software, "),
        insecure_fast_kdf=True,
    )
    assert res.config.name == "anyhsm.toml" and res.keystore.exists() and res.audit_log.exists()
    assert res.chain == ("software",) and res.enrolled == ()
    d = res.to_dict()
    assert d["config"] == str(res.config) and d["enrolled"] == []
    json.dumps(d)
    with open_hsm(res.config, passphrase=PASSPHRASE) as hsm:
        assert hsm.active_provider == "software"


def test_init_refusals_come_before_anything(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="refused in production"):
        admin.check_init(
            ["software"],
            environment=Environment.PRODUCTION,
            network=Network.MAINNET,
            providers={},
            insecure_fast_kdf=True,
        )
    with pytest.raises(ConfigError, match="cannot reach the minimum"):
        admin.check_init(
            ["software"], environment=Environment.PRODUCTION, network=Network.MAINNET, providers={}
        )
    with pytest.raises(ConfigError, match="unknown provider"):
        admin.init(tmp_path / "x", SecretBytes(b"pw"), chain=("nope",))
    assert not (tmp_path / "x").exists()


def test_health_open_and_not_open(deployment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config.load(deployment)
    handles: list[Hsm] = []

    def opener() -> Hsm:
        handles.append(open_hsm(cfg))
        return handles[-1]

    ok = admin.health(opener, cfg)
    assert ok.error is None and ok.report.ok and ok.to_dict()["ok"] is True
    handles[0].close()
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    bad = admin.health(lambda: open_hsm(cfg), cfg)
    assert isinstance(bad.error, AuthenticationFailed) and bad.report.ok is False
    d = bad.to_dict()
    assert d["error"]["code"] == "authentication_failed"  # type: ignore[index]
    assert [p["name"] for p in d["providers"]] == ["software"]  # type: ignore[attr-defined]


def test_audit_verify_show_export(deployment: Path, tmp_path: Path) -> None:
    with open_hsm(deployment) as hsm:
        create_key(hsm, "k")
    with open_hsm(deployment, verify_only=True) as ro:
        res = admin.audit_verify(ro)
        assert res.ok and res.entries > 0
        shown = admin.audit_show(ro, AuditQuery(op="generate_key", outcome="ok"))
        assert shown.verified and [e["op"] for e in shown.entries] == ["generate_key"]
        summary = shown.summary()["summary"]
        assert summary["matched"] == 1 and summary["unreadable_lines"] == []  # type: ignore[index]
        assert "error" not in shown.summary()
        out = tmp_path / "copy.log"
        exp = admin.audit_export(ro, out)
        assert exp.verify.ok and out.read_bytes() and exp.to_dict()["verified"] is True
        assert out.stat().st_mode & 0o777 == 0o600


def test_audit_show_flags_a_broken_chain(deployment: Path) -> None:
    with open_hsm(deployment) as hsm:
        create_key(hsm, "k")
    log = deployment.parent / "audit.log"
    lines = log.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"ok"', '"OK"', 1)
    log.write_text("".join(lines))
    with open_hsm(deployment, verify_only=True) as ro:
        shown = admin.audit_show(ro, AuditQuery())
    assert not shown.verified
    assert shown.summary()["error"]["code"] == "audit_tampered"  # type: ignore[index]


def test_audit_recover_needs_a_reason_and_records_the_loss(deployment: Path) -> None:
    with pytest.raises(HsmError, match="say why"):
        admin.audit_recover(" short ", lambda why: open_hsm(deployment, audit_recovery=why))
    (deployment.parent / "audit.log").unlink()
    handles: list[Hsm] = []

    def opener(why: str) -> Hsm:
        handles.append(open_hsm(deployment, audit_recovery=why))
        return handles[-1]

    res = admin.audit_recover("disk replaced, log lost", opener)
    handles[0].close()
    d = res.to_dict()
    assert d["recovered"] is True and d["reason"] == "disk replaced, log lost"
    assert "missing" in str(d["found"])


def test_config_check(deployment: Path, tmp_path: Path) -> None:
    res = admin.config_check(deployment)
    assert res.ok and res.errors == () and res.to_dict()["ok"] is True
    bad = tmp_path / "bad.toml"
    bad.write_text('environment = "production"\n[fallback]\nchain = ["simulator"]\n')
    res = admin.config_check(bad)
    assert not res.ok and res.errors
    problems = res.to_dict()["problems"]
    assert isinstance(problems, list) and {"severity", "setting", "message"} <= set(problems[0])
    with pytest.raises(ConfigError, match="not valid TOML"):
        (tmp_path / "x.toml").write_text("[[")
        admin.config_check(tmp_path / "x.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        admin.config_check(tmp_path / "missing.toml")
