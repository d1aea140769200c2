"""``anyhsm init`` is all or nothing and never writes a deployment that cannot open;
the enrolment-only handle opens a production mainnet keystore below the floor for
enrolment alone (issue 10, operator path items 1 and 2). No device here: the TPM named
by these configs does not answer; tests/cli/test_operator_path.py uses real ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE

from anyhsm import open_hsm
from anyhsm.cli.main import main
from anyhsm.config import Config
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.errors import ConfigError, EnrolmentOnlyHandle, HsmError, SecurityLevelTooLow
from anyhsm.hsm import Hsm, open_for_enrolment
from anyhsm.secret import SecretBytes
from anyhsm.types import Environment, KeyType, Network

DEAD_TCTI = "swtpm:host=127.0.0.1,port=9"  # nothing listens on the discard port


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object], str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    data = json.loads(out) if out.strip().startswith("{") else {}
    return code, data, out + err


def leftovers(parent: Path) -> list[str]:
    return sorted(os.listdir(parent))


def test_production_mainnet_software_refused_before_writing(
    tmp_path: Path, passphrase_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "prod"
    code, data, _ = run(
        capsys,
        "init", "--dir", str(target), "--network", "mainnet", "--environment", "production",
        "--json",
    )  # fmt: skip
    assert code == 3
    message = str(data["error"]["message"]) + str(data["error"].get("hint", ""))  # type: ignore[index]
    assert "--chain tpm,software" in message and "allow_below_minimum" in message
    assert leftovers(tmp_path) == []  # not even the directory

    target.mkdir()  # an empty directory stays empty
    code, _, _ = run(
        capsys, "init", "--dir", str(target), "--network", "mainnet", "--environment", "production"
    )
    assert code == 3 and leftovers(target) == [] and leftovers(tmp_path) == ["prod"]


def test_refused_chains_write_nothing(tmp_path: Path, passphrase_env: str) -> None:
    pw = SecretBytes(PASSPHRASE.encode())
    for chain, words in (
        (["pkcs11", "software"], "module"),
        (["nonsense"], "unknown"),
        (["simulator"], "simulator"),
        (["software", "software"], "twice"),
        ([], "empty"),
    ):
        with pytest.raises(ConfigError) as e:
            init_deployment(
                tmp_path / "d", pw, chain=chain, network=Network.MAINNET, kdf=FAST_DEV_KDF
            )
        assert words in str(e.value)
        assert leftovers(tmp_path) == []
    with pytest.raises(ConfigError, match="wrap"):
        init_deployment(
            tmp_path / "d",
            pw,
            chain=["pkcs11-wrapped", "software"],
            providers={"pkcs11": {"module": "/nonexistent.so", "token_label": "t"}},
            kdf=FAST_DEV_KDF,
        )
    assert leftovers(tmp_path) == []


def test_second_init_says_exists_and_changes_nothing(tmp_path: Path, passphrase_env: str) -> None:
    cfg = init_deployment(tmp_path / "d", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    before = {p: p.read_bytes() for p in cfg.parent.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already exists"):
        init_deployment(tmp_path / "d", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    assert {p: p.read_bytes() for p in cfg.parent.rglob("*") if p.is_file()} == before
    assert leftovers(tmp_path) == ["d"]


@pytest.mark.parametrize("where", ["missing", "empty", "with-other-file"])
def test_failed_init_leaves_nothing(
    tmp_path: Path, passphrase_env: str, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A failure after the keystore, config and audit log exist (the health check of the
    final open, injected) removes all of them; a directory that was there stays as it was."""
    target = tmp_path / "a" / "b" if where == "missing" else tmp_path / "d"
    if where != "missing":
        target.mkdir()
    if where == "with-other-file":
        (target / "notes.txt").write_text("mine")

    def broken(self: Hsm) -> object:
        assert (self.audit_path).exists()  # the log was written before the failure
        raise HsmError("injected health failure")

    monkeypatch.setattr(Hsm, "health", broken)
    with pytest.raises(HsmError, match="injected"):
        init_deployment(target, SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    if where == "missing":
        assert leftovers(tmp_path) == []  # the parents init made are gone too
    else:
        assert leftovers(tmp_path) == ["d"]
        assert leftovers(target) == ([] if where == "empty" else ["notes.txt"])


def test_init_into_a_directory_with_other_files(tmp_path: Path, passphrase_env: str) -> None:
    target = tmp_path / "d"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    cfg = init_deployment(target, SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    assert leftovers(target) == ["anyhsm.toml", "audit.log", "keystore", "notes.txt"]
    assert leftovers(tmp_path) == ["d"]  # no temporary directory left
    with open_hsm(cfg) as hsm:
        assert hsm.verify_audit().ok


def test_audit_log_and_keystore_agree_after_the_move(tmp_path: Path, passphrase_env: str) -> None:
    """Built elsewhere and renamed: the log's chain is the one the keystore records."""
    cfg = init_deployment(tmp_path / "d", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    entries = [json.loads(x) for x in (cfg.parent / "audit.log").read_text().splitlines()]
    assert [e["op"] for e in entries][:1] == ["open"] and entries[-1]["op"] == "close"
    with open_hsm(cfg) as hsm:
        result = hsm.verify_audit()
        assert result.ok and result.entries == len(entries) + 1  # + this open
        hsm.generate_key("k")


def test_consent_writes_the_consent(tmp_path: Path, passphrase_env: str) -> None:
    cfg = init_deployment(
        tmp_path / "d",
        SecretBytes(PASSPHRASE.encode()),
        network=Network.MAINNET,
        environment=Environment.PRODUCTION,
        allow_below_minimum=True,
    )
    config = Config.load(cfg)
    assert config.fallback.allow_below_minimum
    assert not [p for p in config.check() if p.severity == "error"]
    with open_hsm(config) as hsm:
        assert hsm.active_provider == "software"


def _unenrolled_production(tmp_path: Path) -> Path:
    """A production mainnet deployment whose chain is tpm,software, the TPM not enrolled
    (init with consent, then the consent taken away and the TPM named)."""
    cfg = init_deployment(
        tmp_path / "d",
        SecretBytes(PASSPHRASE.encode()),
        network=Network.MAINNET,
        environment=Environment.PRODUCTION,
        allow_below_minimum=True,
    )
    text = cfg.read_text()
    text = text.replace('chain = ["software"]', 'chain = ["tpm", "software"]')
    text = text.replace("allow_below_minimum = true", "allow_below_minimum = false")
    cfg.write_text(text + f'\n[providers.tpm]\ntcti = "{DEAD_TCTI}"\ntimeout_ms = 3000\n')
    return cfg


def test_enrolment_handle_refuses_every_key_operation(tmp_path: Path, passphrase_env: str) -> None:
    cfg = _unenrolled_production(tmp_path)
    with open_for_enrolment(cfg) as admin:
        assert admin.enrolment_only and admin.keystore.unlocked_by == "passphrase"
        refused = [
            lambda: admin.generate_key("k"),
            lambda: admin.import_key("k", b"\x01" * 32),
            lambda: admin.import_key("k", b"\x01" * 32, KeyType.BIP32),
            lambda: admin.list_keys(),
            lambda: admin.sign("anyhsm:health-probe", b"\x00" * 32),
            lambda: admin.sign_many("anyhsm:health-probe", []),
            lambda: admin.export_key("anyhsm:health-probe"),
            lambda: admin.public_key("anyhsm:health-probe"),
            lambda: admin.delete_key("anyhsm:health-probe"),
            lambda: admin.rotate_master_key(SecretBytes(PASSPHRASE.encode())),
            lambda: admin.reload(),
        ]
        for op in refused:
            with pytest.raises(EnrolmentOnlyHandle) as e:
                op()
            assert e.value.exit_code == 7
        admin.record_event("tpm_enroll", "noop")  # enrolment events are written
        assert admin.verify_audit().ok
    entries = [json.loads(x) for x in (cfg.parent / "audit.log").read_text().splitlines()]
    opens = [e for e in entries if e["op"] == "open"]
    assert opens[-1]["detail"]["purpose"] == "enrolment"
    assert opens[-1]["detail"]["below_floor"] == "yes"
    assert opens[-1]["detail"]["floor_lowered"] == "no"
    keyops = [e for e in entries if e["op"] in ("generate_key", "sign", "import_key", "export_key")]
    done = [e for e in keyops if e["outcome"] != "started"]
    assert done and all(e["outcome"] == "refused" for e in done)  # attempts audited, none done
    assert all(e["error"] == "enrolment_only_handle" for e in done)

    with pytest.raises(SecurityLevelTooLow):  # the floor is not lowered for anything else
        open_hsm(cfg)


def test_enrolment_handle_needs_the_passphrase(
    tmp_path: Path, passphrase_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _unenrolled_production(tmp_path)
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    with pytest.raises(HsmError) as e:
        open_for_enrolment(cfg)
    assert e.value.exit_code == 5 and "passphrase" in e.value.message
    monkeypatch.setenv("ANYHSM_PASSPHRASE", "wrong " * 8)
    with pytest.raises(HsmError) as e:
        open_for_enrolment(cfg)
    assert e.value.exit_code == 5


def test_cli_tpm_status_without_a_tpm_reports_through_the_enrolment_handle(
    tmp_path: Path, passphrase_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _unenrolled_production(tmp_path)
    code, data, _ = run(capsys, "--config", str(cfg), "tpm", "status", "--json")
    assert code == 4 and data["enrolled"] is False and data["reachable"] is False
    assert data["handle"] == "enrolment"
    code, data, _ = run(capsys, "--config", str(cfg), "key", "create", "--label", "k", "--json")
    assert code == 7 and data["error"]["code"] == "security_level_too_low"  # type: ignore[index]


def test_config_check_wrapped_chain_needs_a_wrap_key(tmp_path: Path, passphrase_env: str) -> None:
    cfg = init_deployment(tmp_path / "d", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    text = cfg.read_text().replace('chain = ["software"]', 'chain = ["pkcs11-wrapped", "software"]')
    cfg.write_text(text + '\n[providers.pkcs11]\nmodule = "/x.so"\ntoken_label = "t"\n')
    errors = [p for p in Config.load(cfg).check() if p.severity == "error"]
    assert [p.setting for p in errors] == ["providers.pkcs11.wrap_key_label"]


def test_init_through_a_symlinked_directory(tmp_path: Path, passphrase_env: str) -> None:
    real = tmp_path / "data" / "anyhsm"
    real.mkdir(parents=True)
    (tmp_path / "srv").symlink_to(real)
    cfg = init_deployment(tmp_path / "srv", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    assert cfg == tmp_path / "srv" / "anyhsm.toml"
    assert (tmp_path / "srv").is_symlink()  # the link is kept, the deployment is behind it
    assert leftovers(real) == ["anyhsm.toml", "audit.log", "keystore"]
    assert leftovers(real.parent) == ["anyhsm"]
    with open_hsm(cfg) as hsm:
        assert hsm.verify_audit().ok
