"""anyhsm.credentials: the one passphrase resolver and the PKCS#11 PIN passed as an
argument (never through os.environ); a missing PIN is an authentication failure (exit 5).
The PIN tests use a real SoftHSM2 token."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE
from tests.support.cli import cli

from anyhsm.config import Config
from anyhsm.credentials import (
    PIN_ENV,
    pin_available,
    prompt_pin,
    resolve_passphrase,
    resolve_pin,
)
from anyhsm.errors import ConfigError, HsmError, PinMissing
from anyhsm.hsm import open_hsm
from anyhsm.secret import SecretBytes
from anyhsm.types import Environment


def _secret_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def _cfg(tmp_path: Path, software: dict[str, object] | None = None, **raw: object) -> Config:
    body: dict[str, object] = {"providers": {"software": software or {}}, **raw}
    return Config.from_mapping(body, config_dir=tmp_path, env={})


def test_passphrase_sources_in_order(tmp_path: Path) -> None:
    conf_file = _secret_file(tmp_path / "configured", "from the config file\n")
    cfg = _cfg(tmp_path, {"passphrase_file": str(conf_file)})
    flag_file = _secret_file(tmp_path / "flag", "from --passphrase-file\n")
    env = {"ANYHSM_PASSPHRASE": "from the environment"}

    def asked(_: str) -> str:
        return "typed"

    def got(**kw: object) -> bytes:
        sb = resolve_passphrase(cfg, **kw)  # type: ignore[arg-type]
        assert sb is not None
        return bytes(sb.buffer)

    assert got(given="given", file=flag_file, env=env, prompt=asked) == b"given"
    assert got(file=flag_file, env=env, prompt=asked) == b"from --passphrase-file"
    assert got(env=env, prompt=asked) == b"from the environment"
    assert got(env={}, prompt=asked) == b"from the config file"
    bare = _cfg(tmp_path)
    assert resolve_passphrase(bare, env={}, prompt=asked).buffer == b"typed"  # type: ignore[union-attr]
    assert resolve_passphrase(bare, env={}) is None  # no prompt: nothing
    assert resolve_passphrase(bare, env={}, prompt=lambda _: None) is None  # cannot ask
    given = SecretBytes(b"x")
    assert resolve_passphrase(bare, given) is given  # a SecretBytes is not copied


def test_passphrase_confirmation(tmp_path: Path) -> None:
    answers = iter(["one", "two"])
    with pytest.raises(HsmError, match="do not match"):
        resolve_passphrase(None, env={}, prompt=lambda _: next(answers), confirm=True)
    same = resolve_passphrase(None, env={}, prompt=lambda _: "same", confirm=True)
    assert same is not None and same.equals(b"same")


def test_passphrase_files_follow_the_secret_file_rule(tmp_path: Path) -> None:
    exposed = tmp_path / "pw"
    exposed.write_text("long enough passphrase for production use, surely\n")
    exposed.chmod(0o644)
    with pytest.raises(ConfigError, match="group or others"):
        resolve_passphrase(None, file=exposed, environment=Environment.PRODUCTION, env={})


def test_pin_sources_in_order(tmp_path: Path) -> None:
    pin_file = _secret_file(tmp_path / "pin", "1111\n")
    env = {PIN_ENV: "2222"}
    dev = Environment.DEVELOPMENT
    assert resolve_pin(pin_file, dev, given=SecretBytes(b"0000"), env=env).equals(b"0000")
    assert resolve_pin(pin_file, dev, env=env).equals(b"1111")
    assert resolve_pin(None, dev, env=env).equals(b"2222")
    with pytest.raises(PinMissing) as exc:
        resolve_pin(None, dev, env={})
    assert exc.value.exit_code == 5 and exc.value.code == "pin_missing"
    given = SecretBytes(b"0000")
    copy = resolve_pin(None, dev, given=given)
    copy.wipe()
    assert given.equals(b"0000")  # the caller's PIN is the caller's


def test_prompt_only_when_the_chain_uses_a_token_and_nothing_gives_the_pin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def ask(text: str) -> str:
        asked.append(text)
        return "4321"

    software = _cfg(tmp_path)
    assert prompt_pin(software, ask) is None and not asked
    token = Config.from_mapping(
        {
            "fallback": {"chain": ["pkcs11", "software"]},
            "providers": {"pkcs11": {"module": "/x.so", "token_label": "t"}},
        },
        config_dir=tmp_path,
        env={},
    )
    assert not pin_available(token, env={})
    pin = prompt_pin(token, ask)
    assert pin is not None and pin.equals(b"4321") and asked == ["PKCS#11 token PIN: "]
    assert PIN_ENV not in os.environ  # nothing is put in the environment
    monkeypatch.setenv(PIN_ENV, "9")
    assert pin_available(token) and prompt_pin(token, ask) is None


# --- a real SoftHSM2 token ----------------------------------------------------------------


def _token_deployment(deployment: Path, token: object, chain: str) -> Path:
    text = deployment.read_text().replace('chain = ["software"]', f"chain = {chain}")
    text += (
        f'\n[providers.pkcs11]\nmodule = "{token.module}"\n'  # type: ignore[attr-defined]
        f'token_label = "{token.label}"\n'  # type: ignore[attr-defined]
    )
    deployment.write_text(text)
    return deployment


@pytest.mark.pkcs11
def test_a_pin_given_to_open_hsm_reaches_the_token(deployment: Path, token: object) -> None:
    """No ANYHSM_PKCS11_PIN, no pin_file: the PIN argument alone logs in (through the
    chain and through the keystore's own opening behind the token)."""
    _token_deployment(deployment, token, '["pkcs11", "software"]')
    assert PIN_ENV not in os.environ
    pin = SecretBytes(token.pin.encode())  # type: ignore[attr-defined]
    with open_hsm(deployment, passphrase=PASSPHRASE, pin=pin) as hsm:
        assert hsm.active_provider == "pkcs11"
        info = hsm.generate_key("in-token")
        assert info.provider == "pkcs11"
    assert pin.equals(token.pin.encode())  # type: ignore[attr-defined]  # the caller's copy
    assert PIN_ENV not in os.environ


@pytest.mark.pkcs11
def test_a_missing_pin_exits_5_in_a_real_process(deployment: Path, token: object) -> None:
    _token_deployment(deployment, token, '["pkcs11"]')
    r = cli("--config", str(deployment), "key", "list", "--json",
            env={"ANYHSM_PASSPHRASE": PASSPHRASE})  # fmt: skip
    assert r.returncode == 5, r.stderr
    err = json.loads(r.stdout)["error"]
    assert err["code"] == "pin_missing" and "ANYHSM_PKCS11_PIN" in err["message"]
