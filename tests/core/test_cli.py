"""The CLI end to end: stable --json shapes, exit codes, one-line errors, no tracebacks,
passphrases never on the command line. Real subprocesses where it matters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import coincurve
import pytest
from tests.conftest import PASSPHRASE
from tests.support.cli import cli
from tests.vectors import load_json

from anyhsm.cli.main import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_init_prints_config_path_last(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(PASSPHRASE)
    r = cli(
        "--passphrase-file",
        str(pw),
        "init",
        "--dir",
        str(tmp_path / "d"),
        "--insecure-fast-kdf",
        "--network",
        "signet",
    )
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert Path(last) == tmp_path / "d" / "anyhsm.toml"
    assert 'network = "signet"' in Path(last).read_text()
    assert (tmp_path / "d" / "keystore" / "keystore.json").exists()
    assert (tmp_path / "d" / "audit.log").exists()


def test_key_lifecycle_json(deployment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = ["--config", str(deployment)]
    code, out, _ = run(capsys, *c, "key", "create", "--label", "hot", "--json")
    assert code == 0
    created = json.loads(out)
    assert {"id", "label", "provider", "public_key"} <= set(created)
    assert created["label"] == "hot" and created["provider"] == "software"
    pub = bytes.fromhex(created["public_key"])
    assert len(pub) == 33

    code, out, _ = run(capsys, *c, "key", "show", "hot", "--json")
    assert json.loads(out)["id"] == created["id"]
    code, out, _ = run(capsys, *c, "key", "list", "--json")
    assert [k["label"] for k in json.loads(out)["keys"]] == ["hot"]

    digest = "11" * 32
    code, out, _ = run(capsys, *c, "sign", "--key", "hot", "--digest", digest, "--json")
    sig = bytes.fromhex(json.loads(out)["signature"])
    assert coincurve.PublicKey(pub).verify(sig, bytes.fromhex(digest), hasher=None)
    code, out, _ = run(
        capsys, *c, "verify", "--key", "hot", "--digest", digest, "--signature", sig.hex(), "--json"
    )
    assert code == 0 and json.loads(out)["valid"] is True
    code, out, _ = run(
        capsys, *c, "verify", "--key", "hot", "--digest", "22" * 32, "--signature", sig.hex()
    )
    assert code == 1 and "INVALID" in out

    code, out, _ = run(
        capsys, *c, "sign", "--key", "hot", "--digest", digest, "--scheme", "schnorr", "--json"
    )
    assert len(bytes.fromhex(json.loads(out)["signature"])) == 64

    code, _, err = run(capsys, *c, "key", "delete", "hot")
    assert code != 0 and "--yes" in err
    code, out, _ = run(capsys, *c, "key", "delete", "hot", "--yes", "--json")
    assert code == 0 and json.loads(out)["deleted"] == created["id"]
    code, out, err = run(capsys, *c, "key", "show", "hot", "--json")
    assert code == 6
    assert json.loads(out)["error"]["code"] == "key_not_found"
    assert err.count("\n") == 1 and err.startswith("anyhsm: error:")


def test_errors_are_one_line_without_traceback(deployment: Path) -> None:
    r = cli(
        "--config",
        str(deployment),
        "sign",
        "--key",
        "nope",
        "--digest",
        "00" * 32,
        env={"ANYHSM_PASSPHRASE": PASSPHRASE},
    )
    assert r.returncode == 6
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    r = cli(
        "--config",
        str(deployment),
        "sign",
        "--key",
        "x",
        "--digest",
        "zz",
        env={"ANYHSM_PASSPHRASE": PASSPHRASE},
    )
    assert r.returncode == 2 and "hexadecimal" in r.stderr


def test_wrong_passphrase_exit_code(deployment: Path) -> None:
    r = cli("--config", str(deployment), "key", "list", env={"ANYHSM_PASSPHRASE": "nope"})
    assert r.returncode == 5  # an authentication failure, whatever the chain; names it
    assert "passphrase" in r.stderr and "Traceback" not in r.stderr


def test_no_passphrase_option_on_the_command_line() -> None:
    r = cli("key", "list", "--passphrase", "secret")
    assert r.returncode == 2  # argparse refuses: there is no such option


def test_missing_config(tmp_path: Path) -> None:
    r = cli("--config", str(tmp_path / "missing.toml"), "health")
    assert r.returncode == 3 and "does not exist" in r.stderr


def test_passphrase_file(
    deployment: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    pw = tmp_path / "pw"
    pw.write_text(PASSPHRASE + "\n")
    code, out, _ = run(
        capsys, "--config", str(deployment), "--passphrase-file", str(pw), "health", "--json"
    )
    assert code == 0 and json.loads(out)["active_provider"] == "software"


def test_export_requires_policy_and_flag(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ["--config", str(deployment)]
    secret = tmp_path / "s.hex"
    secret.write_text("22" * 32)
    code, _out, err = run(
        capsys,
        *c,
        "key",
        "import",
        "--label",
        "imp",
        "--secret-file",
        str(secret),
        "--exportable",
        "--json",
    )
    assert code == 0, err
    out_file = tmp_path / "out.hex"
    code, _, err = run(capsys, *c, "key", "export", "imp", "--out", str(out_file))
    assert code == 7 and "allow_export" in err  # policy forbids by default
    text = deployment.read_text() + "\n[policy]\nallow_export = true\n"
    deployment.write_text(text)
    code, _, err = run(capsys, *c, "key", "export", "imp", "--out", str(out_file))
    assert code == 0, err
    assert out_file.read_text().strip() == "22" * 32
    assert oct(out_file.stat().st_mode & 0o777) == "0o600"


def secret_file(directory: Path, name: str, text: str) -> Path:
    """A secret file the way an operator should write one: mode 0600."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def test_import_wif_and_network_check(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from anyhsm.bitcoin.address import wif_encode
    from anyhsm.types import Network

    c = ["--config", str(deployment)]
    wif_regtest = secret_file(
        tmp_path, "regtest.wif", wif_encode(bytes.fromhex("33" * 32), Network.REGTEST) + "\n"
    )
    code, out, err = run(
        capsys, *c, "key", "import", "--label", "w", "--wif-file", str(wif_regtest), "--json"
    )
    assert code == 0, err
    assert (
        json.loads(out)["public_key"]
        == coincurve.PrivateKey(b"\x33" * 32).public_key.format().hex()
    )
    wif_main = secret_file(
        tmp_path, "main.wif", wif_encode(bytes.fromhex("44" * 32), Network.MAINNET)
    )
    code, _, err = run(capsys, *c, "key", "import", "--label", "w2", "--wif-file", str(wif_main))
    assert code == 7 and "mainnet" in err


def test_import_mnemonic(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    words = secret_file(tmp_path, "words", "abandon " * 11 + "about\n")
    code, out, err = run(
        capsys,
        "--config",
        str(deployment),
        "key",
        "import",
        "--label",
        "hd",
        "--mnemonic-file",
        str(words),
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["key_type"] == "bip32"
    code, _, err = run(
        capsys,
        "--config",
        str(deployment),
        "key",
        "import",
        "--label",
        "bad",
        "--mnemonic-file",
        str(secret_file(tmp_path, "bad", "abandon " * 12)),
    )
    assert code == 2 and "checksum" in err.lower()


def test_create_bip32_with_mnemonic_shows_it_once(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A backup display is an export: allowed by the config, the key recorded exportable.
    deployment.write_text(deployment.read_text() + "\n[policy]\nallow_export = true\n")
    code, out, _ = run(
        capsys,
        "--config",
        str(deployment),
        "key",
        "create",
        "--label",
        "hd",
        "--type",
        "bip32",
        "--mnemonic-words",
        "24",
        "--exportable",
        "--show-mnemonic-once",
        "--json",
    )
    data = json.loads(out)
    assert code == 0 and len(data["mnemonic"].split()) == 24 and data["mnemonic_shown"]
    code, out, _ = run(capsys, "--config", str(deployment), "key", "show", "hd", "--json")
    assert "mnemonic" not in json.loads(out)
    assert data["mnemonic"] not in (deployment.parent / "audit.log").read_text()


def test_import_mnemonic_with_bip39_passphrase_from_file(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from anyhsm.bitcoin.bip32 import ExtendedKey

    words = "abandon " * 11 + "about"
    pw = secret_file(tmp_path, "bip39", "TREZOR\n")
    code, out, err = run(
        capsys,
        "--config",
        str(deployment),
        "key",
        "import",
        "--label",
        "hd",
        "--mnemonic-file",
        str(secret_file(tmp_path, "words", words)),
        "--bip39-passphrase-file",
        str(pw),
        "--json",
    )
    assert code == 0, err
    # the first official BIP39 vector: "abandon ... about" + "TREZOR"
    vector = load_json("bip39")["english"][0]
    assert vector[1] == words.strip()
    root = ExtendedKey.parse(vector[3])
    assert json.loads(out)["public_key"] == root.public_key.hex()


def test_unreadable_or_binary_secret_file(
    deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ["--config", str(deployment)]
    code, _, err = run(
        capsys, *c, "key", "import", "--label", "x", "--secret-file", str(tmp_path / "missing")
    )
    assert code == 3 and err.count("\n") == 1 and "missing" in err
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xfe\xed" + b"\x07" * 30)
    code, _, err = run(capsys, *c, "key", "import", "--label", "x", "--secret-file", str(binary))
    assert code == 2 and "hexadecimal" in err
    assert "0xfe" not in err and "\\xfe" not in err  # no byte of the file is echoed
