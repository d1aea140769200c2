"""Issue 10 item 6: ``health --json`` always prints the health object (``ok``, a
top-level boolean ``degraded`` with its reasons, ``active_provider``, ``providers``), with
an ``error`` member when nothing could be opened; a handle that runs worse than its
configuration asks for (below the minimum with consent, fallen back, audit copies lost)
says so while ``ok`` stays true and the exit status 0. Real deployments throughout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anyhsm.cli.main import main
from anyhsm.hsm import DEGRADED_REASONS

SHAPE = {
    "ok",
    "degraded",
    "degraded_reasons",
    "active_provider",
    "security_level",
    "min_security_level",
    "environment",
    "network",
    "providers",
    "audit",
    "process",
    "schema_version",
}


def health(
    capsys: pytest.CaptureFixture[str], config: Path, *extra: str
) -> tuple[int, dict[str, object], str]:
    code = main(["--config", str(config), "health", *extra])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in extra else {"text": out}), err


def edit(config: Path, old: str, new: str, append: str = "", prepend: str = "") -> Path:
    text = config.read_text()
    assert old in text
    config.write_text(prepend + text.replace(old, new) + append)
    return config


def reason_codes(out: dict[str, object]) -> list[str]:
    reasons = out["degraded_reasons"]
    assert isinstance(reasons, list)
    assert all(set(r) == {"code", "reason"} and r["reason"] for r in reasons)
    return [str(r["code"]) for r in reasons]


def test_a_healthy_deployment_is_ok_and_not_degraded(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = health(capsys, deployment, "--json")
    assert code == 0, err
    assert set(out) == SHAPE
    assert out["ok"] is True and out["degraded"] is False and out["degraded_reasons"] == []
    assert out["active_provider"] == "software"


def test_below_the_minimum_with_consent_is_degraded(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: software running under a tpm minimum, consented."""
    edit(
        deployment,
        "allow_below_minimum = false",
        "allow_below_minimum = true",
        prepend='min_security_level = "tpm"\n',
    )
    code, out, err = health(capsys, deployment, "--json")
    assert code == 0, err  # ok + degraded: still exit 0 (documented)
    assert out["ok"] is True and out["degraded"] is True
    assert reason_codes(out) == ["below_minimum"]
    assert "below the minimum tpm" in str(out["degraded_reasons"])
    code, text, _ = health(capsys, deployment)
    assert code == 0 and "DEGRADED (below_minimum)" in str(text["text"])


def test_falling_back_is_degraded(
    deployment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(
        deployment,
        'chain = ["software"]',
        'chain = ["pkcs11", "software"]',
        append='\n[providers.pkcs11]\nmodule = "/nonexistent/libhsm.so"\ntoken_label = "x"\n',
    )
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", "1234")
    code, out, err = health(capsys, deployment, "--json")
    assert code == 0, err
    assert out["ok"] is True and out["degraded"] is True
    assert reason_codes(out) == ["fell_back"]
    assert "from pkcs11 to software" in str(out["degraded_reasons"])


def test_lost_audit_copies_are_degraded(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Forwarding to a syslog socket that is not there: every copy fails (not required)."""
    edit(
        deployment,
        'durability = "batched"',
        f'durability = "batched"\nforward = "syslog"\nsyslog_address = "{tmp_path}/no-syslog"',
    )
    code, out, err = health(capsys, deployment, "--json")
    assert code == 0, err
    assert out["ok"] is True and "audit_forward_errors" in reason_codes(out)


def test_everything_failing_prints_the_health_shape(
    deployment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the error shape alone, so a monitor reading ``ok`` broke exactly when it
    mattered."""
    monkeypatch.setenv("ANYHSM_PASSPHRASE", "not the passphrase at all")
    code, out, err = health(capsys, deployment, "--json")
    assert code == 5  # the error's status: an authentication failure
    assert set(out) == SHAPE | {"error"}
    assert out["ok"] is False and out["degraded"] is False
    assert out["active_provider"] is None and out["security_level"] is None
    error = out["error"]
    assert isinstance(error, dict) and error["code"] == "wrong_passphrase"
    providers = out["providers"]
    assert isinstance(providers, list) and len(providers) == 1
    assert providers[0]["name"] == "software" and providers[0]["active"] is False
    assert "passphrase" in providers[0]["reason"]
    assert "anyhsm: error:" in err
    code, text, _ = health(capsys, deployment)
    assert code == 5 and "NOT OK" in str(text["text"]) and "software" in str(text["text"])


def test_every_provider_failing_lists_each_reason(
    deployment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(
        deployment,
        'chain = ["software"]',
        'chain = ["pkcs11", "software"]',
        append='\n[providers.pkcs11]\nmodule = "/nonexistent/libhsm.so"\ntoken_label = "x"\n',
    )
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", "1234")
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    code, out, _ = health(capsys, deployment, "--json")
    assert code == 4
    assert set(out) == SHAPE | {"error"} and out["ok"] is False
    rows = {p["name"]: p for p in out["providers"]}  # type: ignore[union-attr]
    assert set(rows) == {"pkcs11", "software"}
    assert "libhsm.so" in rows["pkcs11"]["reason"] and "passphrase" in rows["software"]["reason"]
    assert out["error"]["code"] == "all_providers_failed"  # type: ignore[index]


def test_a_configuration_error_still_prints_the_health_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = health(capsys, tmp_path / "missing.toml", "--json")
    assert code == 3
    assert set(out) == SHAPE | {"error"} and out["ok"] is False and out["providers"] == []
    assert out["error"]["code"] == "config_error"  # type: ignore[index]


def test_degraded_reason_codes_are_documented() -> None:
    root = Path(__file__).resolve().parents[2] / "docs"
    for doc in ("cli.md", "operator-guide.md"):
        text = (root / doc).read_text(encoding="utf-8")
        missing = [c for c in DEGRADED_REASONS if f"`{c}`" not in text]
        assert not missing, (doc, missing)


def test_a_check_that_fails_after_the_open_keeps_the_shape_and_the_chain(
    deployment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fault injection: the audit log refuses the ``health`` entry (a full disk)."""
    from anyhsm.audit import AuditLog
    from anyhsm.errors import AuditWriteFailed

    real = AuditLog.append

    def append(self: AuditLog, op: str, *args: object, **kwargs: object) -> int:
        if op == "health":
            raise AuditWriteFailed("injected: the disk is full")
        return real(self, op, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(AuditLog, "append", append)
    code, out, _ = health(capsys, deployment, "--json")
    assert code == 8
    assert set(out) == SHAPE | {"error"} and out["ok"] is False
    assert out["error"]["code"] == "audit_write_failed"  # type: ignore[index]
    rows = out["providers"]
    assert isinstance(rows, list) and rows[0]["name"] == "software"
    assert rows[0]["status"] == "ok"  # it opened: the chain as walked, not a guess


def test_health_details_give_numbers_as_numbers(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 10 item 9: counts are JSON numbers, not strings ("records": 1, not "1")."""
    assert main(["--config", str(deployment), "health", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    details = next(p for p in out["providers"] if p["name"] == "software")["details"]
    assert type(details["records"]) is int and type(details["generation"]) is int
