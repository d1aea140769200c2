"""PKCS#11 end to end through the factory and the CLI, on a real SoftHSM2 token:
module missing / wrong PIN fall back with the reason in ``health --json``; keys made
in the token are never swapped; wrap mode opens the keystore without a passphrase."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE

from anyhsm import open_hsm
from anyhsm.cli.main import main
from anyhsm.errors import ProviderUnavailable


def configure(deployment: Path, token: object, chain: str, extra: str = "") -> Path:
    text = deployment.read_text().replace('chain = ["software"]', f"chain = {chain}")
    text += f"""
[providers.pkcs11]
module = "{token.module}"
token_label = "{token.label}"
{extra}
"""  # type: ignore[attr-defined]
    deployment.write_text(text)
    return deployment


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object], str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip().startswith("{") else {}), err


def test_wrong_pin_is_reported_and_falls_back(
    deployment: Path,
    token: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure(deployment, token, '["pkcs11", "software"]')
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", "000000-wrong")
    code, out, _ = run(capsys, "--config", str(deployment), "health", "--json")
    assert code == 0 and out["active_provider"] == "software"
    p11 = next(p for p in out["providers"] if p["name"] == "pkcs11")  # type: ignore[union-attr]
    assert p11["status"] == "unavailable"
    assert "PIN" in p11["reason"] and "rejected" in p11["reason"]


def test_missing_module_falls_back(
    deployment: Path, token: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = deployment.read_text().replace('chain = ["software"]', 'chain = ["pkcs11", "software"]')
    deployment.write_text(text + '[providers.pkcs11]\nmodule = "/nonexistent/libhsm.so"\n'
                          'token_label = "x"\n')  # fmt: skip
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", "1234")
    with open_hsm(deployment) as hsm:
        assert hsm.active_provider == "software"
        first = hsm.attempts[0]
        assert first.name == "pkcs11" and first.status == "unavailable"
        assert "not found" in first.reason or "does not exist" in first.reason


def test_token_keys_are_never_swapped(
    deployment: Path,
    token: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure(deployment, token, '["pkcs11", "software"]')
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)  # type: ignore[attr-defined]
    c = ["--config", str(deployment)]
    code, out, err = run(capsys, *c, "key", "create", "--label", "cold", "--json")
    assert code == 0, err
    assert out["provider"] == "pkcs11"
    code, out, _ = run(capsys, *c, "sign", "--key", "cold", "--digest", "ab" * 32, "--json")
    assert code == 0

    # the token becomes unreachable: the chain falls back to the software keystore...
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", "wrong-pin")
    with open_hsm(deployment) as hsm:
        assert hsm.active_provider == "software"
        # ...but a key that lives in the token is never answered by another key
        with pytest.raises(ProviderUnavailable) as e:
            hsm.sign("cold", os.urandom(32))
        assert "pkcs11" in str(e.value) and "cold" in str(e.value)
    code, out, err = run(capsys, *c, "sign", "--key", "cold", "--digest", "ab" * 32, "--json")
    assert code == 4 and out["error"]["code"] == "provider_unavailable"  # type: ignore[index]
    # key list still shows it, marked unavailable (issue 10 item 10), never "(no keys)"
    code, out, _ = run(capsys, *c, "key", "list", "--json")
    listed = {k["label"]: k for k in out["keys"]}  # type: ignore[union-attr]
    assert code == 0 and listed["cold"]["available"] is False
    assert listed["cold"]["provider"] == "pkcs11"

    monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)  # type: ignore[attr-defined]
    code, _, _ = run(capsys, *c, "key", "delete", "cold", "--yes")
    assert code == 0


def test_wrap_mode_opens_without_passphrase(
    deployment: Path,
    token: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure(deployment, token, '["pkcs11-wrapped", "software"]', 'wrap_key_label = "e2e-wrap"')
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)  # type: ignore[attr-defined]
    c = ["--config", str(deployment)]
    code, out, err = run(capsys, *c, "pkcs11", "wrap-enroll", "--json")
    assert code == 0, err
    assert out["enrolled"] is True
    code, out, _ = run(capsys, *c, "key", "create", "--label", "k", "--json")
    assert code == 0

    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    code, out, err = run(capsys, *c, "health", "--json")
    assert code == 0, err
    assert out["active_provider"] == "pkcs11-wrapped" and out["security_level"] == "hsm-wrapped"
    code, out, _ = run(capsys, *c, "sign", "--key", "k", "--digest", "cd" * 32, "--json")
    assert code == 0

    # token PIN gone: only the recovery passphrase opens the same keys
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", "wrong-pin")
    code, _, _ = run(capsys, *c, "key", "list", "--json")
    assert code != 0
    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    code, out, _ = run(capsys, *c, "key", "show", "k", "--json")
    assert code == 0 and out["label"] == "k"
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)  # type: ignore[attr-defined]
    code, out, _ = run(capsys, *c, "pkcs11", "wrap-unenroll", "--json")
    assert code == 0 and out["unenrolled"] is True
