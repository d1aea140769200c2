"""Secrets and the security floor (issue 9, items 7 and 15-17, 19): each test performs
the attack against real files, a real keystore and real ``anyhsm`` processes.

- 15: a secret given as an argument is readable in /proc/PID/cmdline: refused; files
  and standard input take its place.
- 16: in production a new mnemonic was printed for a key recorded as non-exportable.
- 17: a 0644 passphrase file was used at run time in production.
- 19: ANYHSM_MIN_SECURITY_LEVEL lowered production's floor with no consent, no warning.
- 7: ``keystore passwd`` accepted a 3-character passphrase and an 8 KiB Argon2id.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE
from tests.support.cli import cli
from tests.vectors import load_json

from anyhsm import open_hsm
from anyhsm.bitcoin.address import wif_encode
from anyhsm.bitcoin.bip32 import ExtendedKey
from anyhsm.bitcoin.bip39 import mnemonic_to_seed
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.errors import SecretFileExposed, SecurityLevelTooLow
from anyhsm.providers.pkcs11.settings import read_pin_file
from anyhsm.secret import SecretBytes
from anyhsm.types import Environment, Network

WORDS = "abandon " * 11 + "about"
CLI = (sys.executable, "-m", "anyhsm.cli.main")


def secret_file(directory: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def audit_entries(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@pytest.fixture
def dev(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A development deployment and the environment its commands run with."""
    cfg = init_deployment(tmp_path / "dev", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    return cfg, {"ANYHSM_CONFIG": str(cfg), "ANYHSM_PASSPHRASE": PASSPHRASE}


@pytest.fixture
def prod(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A production deployment on signet (software is at its floor) with a production
    passphrase and KDF, built by the real ``anyhsm init``."""
    pw = secret_file(tmp_path, "pw", PASSPHRASE + "\n")
    d = tmp_path / "prod"
    r = cli(
        "--passphrase-file",
        str(pw),
        "init",
        "--dir",
        str(d),
        "--environment",
        "production",
        "--network",
        "signet",
    )
    assert r.returncode == 0, r.stderr
    cfg = d / "anyhsm.toml"
    return cfg, {"ANYHSM_CONFIG": str(cfg), "ANYHSM_PASSPHRASE": PASSPHRASE}


# --- 15: secrets never in argv -------------------------------------------------------------


@pytest.mark.parametrize("form", ["--mnemonic", "--xprv", "--wif"])
def test_secret_arguments_are_refused_without_echo(
    dev: tuple[Path, dict[str, str]], form: str
) -> None:
    secret = {
        "--mnemonic": WORDS.split(),  # unquoted: several argv words
        "--xprv": ["tprv8ZgxMBicQKsPd9TeAdPADNnSyH9SSUUbTVeFszDE23Ki6TBB5nCefAdHkK8Fm3qMQR6sH"],
        "--wif": [wif_encode(b"\x33" * 32, Network.REGTEST)],
    }[form]
    r = cli("key", "import", "--label", "x", form, *secret, "--json", env=dev[1])
    assert r.returncode == 2, r.stderr
    assert f"{form}-file" in r.stderr and "cmdline" in r.stderr
    assert json.loads(r.stdout)["error"]["code"] == "secret_on_command_line"
    for word in set(secret) - {"abandon"}:
        assert word not in r.stdout and word not in r.stderr
    assert "abandon abandon" not in r.stderr
    # Nothing was imported.
    listed = cli("key", "list", "--json", env=dev[1])
    assert json.loads(listed.stdout)["keys"] == []


def test_mnemonic_from_stdin_is_not_in_the_command_line(
    dev: tuple[Path, dict[str, str]],
) -> None:
    """While the import runs, /proc/PID/cmdline (readable by every local user) does not
    hold the secret; the words arrive on standard input."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("ANYHSM_")} | dev[1]
    proc = subprocess.Popen(
        [*CLI, "key", "import", "--label", "hd", "--mnemonic-file", "-", "--json"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=e,
    )
    try:
        cmdline = b""
        for _ in range(2000):  # until the child has exec'd (it then waits for stdin)
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            if b"anyhsm.cli.main" in cmdline:
                break
            time.sleep(0.005)
        assert b"abandon" not in cmdline and b"--mnemonic-file" in cmdline
        out, err = proc.communicate(WORDS.encode() + b"\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    root = ExtendedKey.parse(load_json("bip39")["english"][0][3])  # same words, "TREZOR"
    data = json.loads(out)
    with mnemonic_to_seed(WORDS) as seed, ExtendedKey.from_seed(seed, Network.REGTEST) as k:
        assert data["public_key"] == k.public_key.hex()
    assert data["public_key"] != root.public_key.hex()  # no BIP39 passphrase was used


def test_xprv_and_wif_from_files_and_stdin(
    dev: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    with ExtendedKey.from_seed(bytes(range(32)), Network.REGTEST) as root:
        tprv, xpub = root.to_string(), root.public_key.hex()
    f = secret_file(tmp_path, "root.tprv", tprv + "\n")
    r = cli("key", "import", "--label", "node", "--xprv-file", str(f), "--json", env=dev[1])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["public_key"] == xpub
    wif = wif_encode(b"\x33" * 32, Network.REGTEST)
    r = cli("key", "import", "--label", "w", "--wif-file", "-", "--json", env=dev[1], stdin=wif)
    assert r.returncode == 0, r.stderr
    # One bad character: the error does not quote it (it is a character of the secret).
    bad = wif[:10] + "0" + wif[11:]  # '0' is not Base58
    r = cli("key", "import", "--label", "w2", "--wif-file", "-", env=dev[1], stdin=bad)
    assert r.returncode == 2 and "'0'" not in r.stderr and bad not in r.stderr


def test_import_files_follow_the_secret_file_rule_in_production(
    prod: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    words = secret_file(tmp_path, "words", WORDS, mode=0o644)
    r = cli("key", "import", "--label", "hd", "--mnemonic-file", str(words), env=prod[1])
    assert r.returncode == 3 and "mode 644" in r.stderr and "chmod 600" in r.stderr
    assert "abandon" not in r.stderr
    # A 0644 file redirected to standard input is the same file: refused too.
    with words.open("rb") as fh:
        e = {k: v for k, v in os.environ.items() if not k.startswith("ANYHSM_")} | prod[1]
        rr = subprocess.run(
            [*CLI, "key", "import", "--label", "hd", "--mnemonic-file", "-"],
            stdin=fh,
            capture_output=True,
            env=e,
            timeout=120,
        )
    assert rr.returncode == 3 and b"mode 644" in rr.stderr
    words.chmod(0o600)
    bip39 = secret_file(tmp_path, "bip39", "TREZOR", mode=0o640)
    r = cli(
        "key",
        "import",
        "--label",
        "hd",
        "--mnemonic-file",
        str(words),
        "--bip39-passphrase-file",
        str(bip39),
        env=prod[1],
    )
    assert r.returncode == 3 and "BIP39 passphrase file" in r.stderr and "mode 640" in r.stderr
    bip39.chmod(0o600)
    r = cli(
        "key",
        "import",
        "--label",
        "hd",
        "--mnemonic-file",
        str(words),
        "--bip39-passphrase-file",
        str(bip39),
        "--json",
        env=prod[1],
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["public_key"] == (
        ExtendedKey.parse(load_json("bip39")["english"][0][3]).public_key.hex()
    )


# --- 16: showing a seed is an export -----------------------------------------------------


def test_new_mnemonic_is_not_shown_in_production_without_export(
    prod: tuple[Path, dict[str, str]],
) -> None:
    cfg, env = prod
    log = cfg.parent / "audit.log"
    base = ["key", "create", "--type", "bip32", "--mnemonic-words", "24", "--json"]
    r = cli(*base, "--label", "hd", env=env)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert "mnemonic" not in data and data["mnemonic_shown"] is False
    assert data["exportable"] is False
    # key export of it is refused; so is an explicit backup display (before any key is made)
    r = cli(*base, "--label", "hd2", "--show-mnemonic-once", env=env)
    assert r.returncode == 7 and "allow_export" in r.stderr and "non-exportable" in r.stderr
    assert json.loads(r.stdout)["error"]["code"] == "export_not_allowed"
    labels = [k["label"] for k in json.loads(cli("key", "list", "--json", env=env).stdout)["keys"]]
    assert labels == ["hd"]
    refused = [e for e in audit_entries(log) if e["op"] == "export_key"]
    assert refused and refused[-1]["outcome"] == "refused"
    assert refused[-1]["detail"]["what"] == "mnemonic"  # type: ignore[index]
    # exportable alone is not enough: the configuration must allow export
    r = cli(*base, "--label", "hd3", "--exportable", "--show-mnemonic-once", env=env)
    assert r.returncode == 7 and "allow_export" in r.stderr
    # the flag means nothing without a new mnemonic, and says so
    r = cli("key", "create", "--label", "k", "--show-mnemonic-once", env=env)
    assert r.returncode == 1 and "--mnemonic-words" in r.stderr


def test_one_time_backup_display_where_the_config_allows_it(
    prod: tuple[Path, dict[str, str]],
) -> None:
    cfg, env = prod
    cfg.write_text(cfg.read_text() + "\n[policy]\nallow_export = true\n")
    r = cli(
        "key",
        "create",
        "--type",
        "bip32",
        "--mnemonic-words",
        "12",
        "--label",
        "hd",
        "--exportable",
        "--show-mnemonic-once",
        "--json",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    words = data["mnemonic"]
    assert len(words.split()) == 12 and data["exportable"] is True
    with mnemonic_to_seed(words) as seed, ExtendedKey.from_seed(seed, Network.SIGNET) as k:
        assert data["public_key"] == k.public_key.hex()  # the words are this key's seed
    log = (cfg.parent / "audit.log").read_text()
    assert words not in log and words.split()[0] + " " + words.split()[1] not in log
    shown = [e for e in audit_entries(cfg.parent / "audit.log") if e["op"] == "export_key"]
    assert shown[-1]["outcome"] == "ok" and shown[-1]["key"] == data["id"]
    assert shown[-1]["detail"]["what"] == "mnemonic"  # type: ignore[index]


# --- 17: one rule for every secret file ----------------------------------------------------


@pytest.mark.parametrize("environment", ["production", "staging"])
def test_exposed_passphrase_file_is_refused_outside_development(
    prod: tuple[Path, dict[str, str]], tmp_path: Path, environment: str
) -> None:
    cfg, _ = prod
    cfg.write_text(cfg.read_text().replace('"production"', f'"{environment}"', 1))
    pf = secret_file(cfg.parent, "pass.txt", PASSPHRASE, mode=0o644)
    text = cfg.read_text().replace(
        "[providers.software]\n", '[providers.software]\npassphrase_file = "pass.txt"\n'
    )
    cfg.write_text(text)
    # the library path (open_hsm -> resolve_passphrase)
    with pytest.raises(SecretFileExposed) as e:
        open_hsm(cfg)
    assert str(pf) in e.value.message and "644" in e.value.message
    assert e.value.hint == f"chmod 600 {pf}"
    # the CLI's --passphrase-file path: the same rule, the same error
    r = cli("--config", str(cfg), "--passphrase-file", str(pf), "key", "list")
    assert r.returncode == 3 and "mode 644" in r.stderr and "chmod 600" in r.stderr
    # the configured file through the CLI
    r = cli("--config", str(cfg), "key", "list")
    assert r.returncode == 3 and "mode 644" in r.stderr
    # config check reports it as an error in both environments
    r = cli("--config", str(cfg), "config", "check", "--json")
    problems = json.loads(r.stdout)["problems"]
    assert any(
        p["setting"] == "providers.software.passphrase_file" and p["severity"] == "error"
        for p in problems
    )
    pf.chmod(0o600)
    r = cli("--config", str(cfg), "key", "list", "--json")
    assert r.returncode == 0, r.stderr


def test_exposed_passphrase_file_warns_in_development(
    dev: tuple[Path, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    cfg, _ = dev
    secret_file(cfg.parent, "pass.txt", PASSPHRASE, mode=0o644)
    cfg.write_text(
        cfg.read_text().replace(
            "[providers.software]\n", '[providers.software]\npassphrase_file = "pass.txt"\n'
        )
    )
    with caplog.at_level(logging.WARNING, logger="anyhsm"), open_hsm(cfg) as hsm:
        assert hsm.active_provider == "software"  # ANYHSM_PASSPHRASE is unset here
    assert "mode 644" in caplog.text and "refused in staging and production" in caplog.text


def test_pin_file_and_passphrase_file_share_one_rule(tmp_path: Path) -> None:
    """The PIN file used to be refused only in production; it now follows the same rule as
    every secret file (refused in staging too), with the same typed error."""
    pin = secret_file(tmp_path, "pin", "123456\n", mode=0o640)
    for env in (Environment.STAGING, Environment.PRODUCTION):
        with pytest.raises(SecretFileExposed, match="mode 640"):
            read_pin_file(pin, env)
    assert read_pin_file(pin, Environment.DEVELOPMENT).equals(b"123456")
    pin.chmod(0o600)
    assert read_pin_file(pin, Environment.PRODUCTION).equals(b"123456")


# --- 19: lowering the floor needs consent -------------------------------------------------


def _mainnet(prod: tuple[Path, dict[str, str]], *, consent: bool) -> Path:
    cfg, _ = prod
    text = cfg.read_text().replace('network = "signet"', 'network = "mainnet"')
    text = text.replace(
        "allow_below_minimum = false", f"allow_below_minimum = {str(consent).lower()}"
    )
    cfg.write_text(text)
    return cfg


def test_env_lowering_the_floor_fails_closed_without_consent(
    prod: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _mainnet(prod, consent=False)
    env = {**prod[1], "ANYHSM_MIN_SECURITY_LEVEL": "software"}
    r = cli("key", "list", env=env)
    assert r.returncode == SecurityLevelTooLow.exit_code, r.stderr
    assert "allow_below_minimum" in r.stderr and "min_security_level software" in r.stderr
    r = cli("config", "check", "--json", env=env)
    assert r.returncode == 3
    floor = [p for p in json.loads(r.stdout)["problems"] if p["setting"] == "min_security_level"]
    assert floor and floor[0]["severity"] == "error"
    monkeypatch.setenv("ANYHSM_MIN_SECURITY_LEVEL", "software")
    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    with pytest.raises(SecurityLevelTooLow):
        open_hsm(cfg)
    lines = (cfg.parent / "audit.log").read_text().splitlines()
    assert not any('"floor_lowered":"yes"' in line for line in lines)


def test_consented_lowering_warns_and_is_in_the_open_entry(
    prod: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = _mainnet(prod, consent=True)
    monkeypatch.setenv("ANYHSM_MIN_SECURITY_LEVEL", "software")
    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    with caplog.at_level(logging.WARNING, logger="anyhsm"), open_hsm(cfg) as hsm:
        assert hsm.active_provider == "software"
    assert "below the default minimum tpm" in caplog.text
    opened = [e for e in audit_entries(cfg.parent / "audit.log") if e["op"] == "open"][-1]
    assert opened["detail"] == {  # type: ignore[comparison-overlap]
        **opened["detail"],  # type: ignore[dict-item]
        "min_security_level": "software",
        "default_min_security_level": "tpm",
        "floor_lowered": "yes",
    }
    r = cli("config", "check", "--json", env={**prod[1], "ANYHSM_MIN_SECURITY_LEVEL": "software"})
    floor = [p for p in json.loads(r.stdout)["problems"] if p["setting"] == "min_security_level"]
    assert floor and floor[0]["severity"] == "warning"
    monkeypatch.delenv("ANYHSM_MIN_SECURITY_LEVEL")
    with open_hsm(cfg):  # consent alone (a fallback below tpm) is not a lowered floor
        pass
    opened = [e for e in audit_entries(cfg.parent / "audit.log") if e["op"] == "open"][-1]
    assert opened["detail"]["floor_lowered"] == "no"  # type: ignore[index]
    assert opened["detail"]["min_security_level"] == "tpm"  # type: ignore[index]


# --- 7: passwd keeps production rules -----------------------------------------------------


def test_passwd_applies_the_production_rules_of_init(
    prod: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    cfg, env = prod
    header = cfg.parent / "keystore" / "keystore.json"
    before = header.read_bytes()
    short = secret_file(tmp_path, "short", "abc\n")
    r = cli("keystore", "passwd", "--new-passphrase-file", str(short), env=env)
    assert r.returncode == 3 and "production needs at least 32" in r.stderr
    assert header.read_bytes() == before
    strong = secret_file(tmp_path, "strong", "another long passphrase, also fit for production\n")
    weak_kdf = cfg.read_text() + "\n[providers.software.kdf]\nmemory_kib = 8\niterations = 1\n"
    cfg_weak = cfg.parent / "weak.toml"
    cfg_weak.write_text(weak_kdf)
    r = cli(
        "--config",
        str(cfg_weak),
        "keystore",
        "passwd",
        "--new-passphrase-file",
        str(strong),
        env={"ANYHSM_PASSPHRASE": PASSPHRASE},
    )
    assert r.returncode == 3 and "memory_kib=8" in r.stderr and "iterations=1" in r.stderr
    assert header.read_bytes() == before
    # a change that meets the rules goes through, and the new passphrase opens the store
    r = cli("keystore", "passwd", "--new-passphrase-file", str(strong), env=env)
    assert r.returncode == 0, r.stderr
    r = cli("key", "list", env={**env, "ANYHSM_PASSPHRASE": strong.read_text().strip()})
    assert r.returncode == 0, r.stderr
