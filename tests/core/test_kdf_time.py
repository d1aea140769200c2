"""Issue 10 item 7: a KDF raised past the provider's open timeout would make every later
open time out. ``keystore passwd`` refuses it (unless told otherwise), and ``config check``
measures the keystore's KDF against the timeout. Real deployments, real Argon2id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anyhsm.cli.main import main
from anyhsm.keystore import Keystore
from anyhsm.keystore.kdf import KdfParams, estimate_ms, open_time_problem

NEW = "a new passphrase for this test, long enough"


def _new_pw(directory: Path) -> Path:
    f = directory / "new-pw"
    f.write_text(NEW)
    f.chmod(0o600)
    return f


def test_estimate_grows_with_cost() -> None:
    small = estimate_ms(KdfParams("argon2id", memory_kib=8 * 1024, iterations=1))
    big = estimate_ms(KdfParams("argon2id", memory_kib=1024 * 1024, iterations=4))
    assert big > 100 * small > 0
    assert open_time_problem(KdfParams("argon2id", memory_kib=1024 * 1024, iterations=4), 50)
    assert open_time_problem(KdfParams("argon2id", memory_kib=64, iterations=1), 60_000) is None


def test_passwd_refuses_a_kdf_slower_than_the_open_timeout(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = deployment.read_text().replace(
        "[providers.software]\n", "[providers.software]\ntimeout_ms = 20\n"
    )
    text += '\n[providers.software.kdf]\nname = "argon2id"\nmemory_kib = 262144\niterations = 4\n'
    deployment.write_text(text)
    ks_dir = deployment.parent / "keystore"
    epoch_before = Keystore.load(ks_dir).epoch
    code = main(
        ["--config", str(deployment), "--json", "keystore", "passwd",
         "--new-passphrase-file", str(_new_pw(deployment.parent))]
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 3, out
    assert "time out" in out["error"]["message"] and "--allow-slow-open" in out["error"]["hint"]
    assert Keystore.load(ks_dir).epoch == epoch_before  # nothing rotated


def test_config_check_measures_the_keystore_kdf(
    tmp_path: Path, passphrase_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The KDF the keystore really uses (32 MiB x 2 passes: tens of ms) against a bound of
    5 ms: config check reports that every open would time out; with the default bound, OK."""
    from anyhsm.deploy import init_deployment
    from anyhsm.secret import SecretBytes

    kdf = KdfParams("argon2id", memory_kib=32 * 1024, iterations=2)
    dep = init_deployment(tmp_path / "dep", SecretBytes(passphrase_env.encode()), kdf=kdf)
    assert main(["--config", str(dep), "config", "check", "--json"]) == 0
    capsys.readouterr()
    text = dep.read_text().replace(
        "[providers.software]\n", "[providers.software]\ntimeout_ms = 5\n"
    )
    dep.write_text(text)
    main(["--config", str(dep), "config", "check", "--json"])
    out = json.loads(capsys.readouterr().out)
    problems = [p for p in out["problems"] if p["setting"] == "providers.software.timeout_ms"]
    assert problems and "time out" in problems[0]["message"], out
