"""``anyhsm tpm enroll|status|unenroll`` against a real swtpm: after enrolment, health,
key create and sign work with no passphrase and report the tpm provider; the
passphrase still opens the same keys (recovery)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.cli.conftest import use_tpm_chain
from tests.conftest import PASSPHRASE

from anyhsm.cli.main import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip().startswith("{") else {"_err": err})


def test_enroll_then_no_passphrase(
    deployment: Path,
    tpm: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    c = use_tpm_chain(deployment, tpm)

    # before enrolment the chain falls back to the passphrase path
    code, out = run(capsys, *c, "health", "--json")
    assert code == 0 and out["active_provider"] == "software"
    code, out = run(capsys, *c, "tpm", "enroll", "--json")
    assert code == 0 and out["enrolled"] is True
    code, out = run(capsys, *c, "key", "create", "--label", "via-passphrase", "--json")
    assert code == 0

    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    code, out = run(capsys, *c, "health", "--json")
    assert code == 0 and out["active_provider"] == "tpm" and out["security_level"] == "tpm"
    code, out = run(capsys, *c, "key", "create", "--label", "via-tpm", "--json")
    assert code == 0 and out["provider"] == "tpm"
    code, out = run(capsys, *c, "sign", "--key", "via-passphrase", "--digest", "aa" * 32, "--json")
    assert code == 0 and out["signature"]
    code, out = run(capsys, *c, "tpm", "status", "--json")
    assert code == 0 and out["opens_keystore"] is True

    # the TPM goes away: the recovery passphrase opens the same keys, and it is audited
    tpm.stop()  # type: ignore[attr-defined]
    try:
        code, out = run(capsys, *c, "key", "list", "--json")
        assert code != 0  # no passphrase and no TPM: nothing opens
        monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
        code, out = run(capsys, *c, "key", "list", "--json")
        assert code == 0
        assert {"via-passphrase", "via-tpm"} <= {k["label"] for k in out["keys"]}  # type: ignore[union-attr]
        code, out = run(capsys, *c, "audit", "verify", "--json")
        assert code == 0
        entries = [
            json.loads(x) for x in (deployment.parent / "audit.log").read_text().splitlines()
        ]
        assert any(e["op"] == "tpm_enroll" and e["outcome"] == "ok" for e in entries)
        # the recovery (TPM skipped, passphrase used) is in the audit log
        assert any(e["op"] == "fallback_skip" and e["provider"] == "tpm" for e in entries)
    finally:
        tpm.start()  # type: ignore[attr-defined]

    code, out = run(capsys, *c, "tpm", "unenroll", "--json")
    assert code == 0 and out["unenrolled"] is True
