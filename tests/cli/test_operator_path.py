"""The production mainnet operator path as the docs give it, on a real swtpm and a real
SoftHSM2 token (issue 10, operator path items 1-3): ``init --chain`` writes a deployment
that ``config check`` accepts and that opens; ``tpm enroll`` and ``pkcs11 wrap-enroll``
work on a fresh production deployment through the audited enrolment-only handle without
lowering the floor for anything else; after a token wrap, a ``["pkcs11", "software"]``
chain opens the keystore through the token with no passphrase."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anyhsm import open_hsm
from anyhsm.cli.main import main

PROD = ("--network", "mainnet", "--environment", "production")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip().startswith("{") else {"_err": err, "_out": out})


def audit_entries(cfg: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (cfg.parent / "audit.log").read_text().splitlines()]


def test_init_tpm_chain_production(
    tmp_path: Path,
    tpm: object,
    passphrase_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tcti = tpm.tcti  # type: ignore[attr-defined]
    target = tmp_path / "prod"
    code = main(["init", "--dir", str(target), *PROD, "--chain", "tpm,software", "--tcti", tcti])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    cfg = Path(out[-1])  # the config path is still the last line
    assert cfg == target / "anyhsm.toml"
    assert f'tcti = "{tcti}"' in cfg.read_text()
    code, data = run(capsys, "--config", str(cfg), "config", "check", "--json")
    assert code == 0 and data["ok"] is True, data

    monkeypatch.delenv("ANYHSM_PASSPHRASE")  # it opens through the TPM, no passphrase
    code, data = run(capsys, "--config", str(cfg), "health", "--json")
    assert code == 0 and data["active_provider"] == "tpm", data
    code, data = run(capsys, "--config", str(cfg), "key", "create", "--label", "hot", "--json")
    assert code == 0 and data["provider"] == "tpm"
    code, data = run(capsys, "--config", str(cfg), "audit", "verify", "--json")
    assert code == 0 and data["ok"] is True
    entries = audit_entries(cfg)
    first = entries[0]
    assert first["op"] == "open" and first["detail"]["purpose"] == "enrolment"  # type: ignore[index]
    assert any(e["op"] == "tpm_enroll" and e["outcome"] == "ok" for e in entries)


def test_init_tpm_chain_without_tpm_leaves_nothing(
    tmp_path: Path, tpm: object, passphrase_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The TPM does not answer: init fails after the keystore existed, and removes it."""
    code = main(
        [
            *("init", "--dir", str(tmp_path / "prod"), *PROD),
            *("--chain", "tpm,software", "--tcti", "swtpm:host=127.0.0.1,port=9"),
        ]
    )
    assert code != 0
    assert list(tmp_path.iterdir()) == []


def _unenrolled_tpm_production(tmp_path: Path, tcti: str) -> Path:
    """A production mainnet deployment with the chain tpm,software, nothing enrolled yet
    (as one made before init took the chain, following the old guide)."""
    code = main(["init", "--dir", str(tmp_path / "d"), *PROD, "--allow-below-minimum"])
    assert code == 0
    cfg = tmp_path / "d" / "anyhsm.toml"
    text = cfg.read_text().replace('chain = ["software"]', 'chain = ["tpm", "software"]')
    text = text.replace("allow_below_minimum = true", "allow_below_minimum = false")
    cfg.write_text(text + f'\n[providers.tpm]\ntcti = "{tcti}"\n')
    return cfg


def test_tpm_enroll_on_fresh_production_is_not_circular(
    tmp_path: Path, tpm: object, passphrase_env: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    cfg = _unenrolled_tpm_production(tmp_path, tpm.tcti)  # type: ignore[attr-defined]
    capsys.readouterr()
    c = ("--config", str(cfg))
    code, data = run(capsys, *c, "key", "create", "--label", "k", "--json")
    assert code == 7  # the floor holds: no key below it
    code, data = run(capsys, *c, "tpm", "status", "--json")
    assert code == 4 and data["enrolled"] is False and data["reachable"] is True
    code, data = run(capsys, *c, "tpm", "enroll", "--json")
    assert code == 0 and data["enrolled"] is True, data
    code, data = run(capsys, *c, "tpm", "status", "--json")
    assert code == 0 and data["opens_keystore"] is True and data["handle"] == "normal"
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    code, data = run(capsys, *c, "key", "create", "--label", "k", "--json")
    assert code == 0 and data["provider"] == "tpm"
    code, data = run(capsys, *c, "audit", "verify", "--json")
    assert code == 0
    entries = audit_entries(cfg)
    enrol_open = [e for e in entries if e["op"] == "open" and "purpose" in e["detail"]]  # type: ignore[operator]
    assert enrol_open and enrol_open[0]["detail"]["below_floor"] == "yes"  # type: ignore[index]
    enrols = [e["outcome"] for e in entries if e["op"] == "tpm_enroll"]
    assert enrols == ["started", "ok"]


def _pkcs11_args(token: object) -> list[str]:
    return [
        *("--pkcs11-module", token.module),  # type: ignore[attr-defined]
        *("--token-label", token.label),  # type: ignore[attr-defined]
    ]


def test_init_pkcs11_chain_production(
    tmp_path: Path,
    token: object,
    passphrase_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)  # type: ignore[attr-defined]
    target = tmp_path / "prod"
    code = main(["init", "--dir", str(target), *PROD, "--chain", "pkcs11,software",
                 *_pkcs11_args(token)])  # fmt: skip
    assert code == 0
    cfg = Path(capsys.readouterr().out.splitlines()[-1])
    code, data = run(capsys, "--config", str(cfg), "config", "check", "--json")
    assert code == 0 and data["ok"] is True, data
    # config check says what behaviour shows: the keystore needs the passphrase here
    (note,) = [p for p in data["problems"] if "wrap" in p["setting"]]  # type: ignore[attr-defined]
    assert "only with the passphrase" in note["message"] and note["severity"] == "warning"
    code, data = run(capsys, "--config", str(cfg), "key", "create", "--label", "cold", "--json")
    assert code == 0 and data["provider"] == "pkcs11"
    with open_hsm(cfg) as hsm:  # the keystore (audit key, directory) with the passphrase
        assert hsm.active_provider == "pkcs11" and hsm.keystore.unlocked_by == "passphrase"
        assert hsm.verify_audit().ok


def test_wrap_enroll_then_pkcs11_chain_opens_through_the_token(
    tmp_path: Path,
    token: object,
    passphrase_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Item 3: after ``pkcs11 wrap-enroll``, the chain ["pkcs11", "software"] opens the
    keystore through the token wrap; no passphrase is asked for or needed."""
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)  # type: ignore[attr-defined]
    code = main(["init", "--dir", str(tmp_path / "d"), *PROD, "--chain", "pkcs11,software",
                 *_pkcs11_args(token)])  # fmt: skip
    assert code == 0
    cfg = Path(capsys.readouterr().out.splitlines()[-1])
    cfg.write_text(cfg.read_text() + 'wrap_key_label = "operator-path-wrap"\n')
    c = ("--config", str(cfg))
    code, data = run(capsys, *c, "config", "check", "--json")
    assert code == 0, data
    (warning,) = [p for p in data["problems"] if "wrap" in p["setting"]]  # type: ignore[attr-defined]
    assert "not wrapped" in warning["message"] and "wrap-enroll" in warning["fix"]
    code, data = run(capsys, *c, "pkcs11", "wrap-enroll", "--json")
    assert code == 0 and data["enrolled"] is True, data
    code, data = run(capsys, *c, "config", "check", "--json")
    assert code == 0 and not [p for p in data["problems"] if "wrap" in p["setting"]], data  # type: ignore[attr-defined]
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    code, data = run(capsys, *c, "key", "create", "--label", "cold-wrapped", "--json")
    assert code == 0 and data["provider"] == "pkcs11", data
    code, data = run(capsys, *c, "key", "list", "--json")
    assert code == 0 and [k["label"] for k in data["keys"]] == ["cold-wrapped"]  # type: ignore[attr-defined]
    from anyhsm.config import Config
    from anyhsm.ops.session import unattended

    assert unattended(Config.load(cfg))  # so the CLI does not prompt for the passphrase
    with open_hsm(cfg) as hsm:
        assert hsm.keystore.unlocked_by == "pkcs11"  # the token wrap, not the passphrase
    code, data = run(capsys, *c, "audit", "verify", "--json")
    assert code == 0
    entries = audit_entries(cfg)
    assert [e["outcome"] for e in entries if e["op"] == "pkcs11_wrap_enroll"] == ["started", "ok"]


def test_init_wrapped_chain_production_enrols_the_wrap(
    tmp_path: Path,
    token: object,
    passphrase_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``init --chain pkcs11-wrapped,software --wrap-key-label L``: the wrap is enrolled by
    init through the enrolment-only handle (nothing else reaches the floor before it)."""
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)  # type: ignore[attr-defined]
    code = main(["init", "--dir", str(tmp_path / "d"), *PROD, "--chain",
                 "pkcs11-wrapped,software", *_pkcs11_args(token),
                 "--wrap-key-label", "operator-path-wrap2"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    cfg = Path(out.splitlines()[-1])
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    code, data = run(capsys, "--config", str(cfg), "health", "--json")
    assert code == 0 and data["active_provider"] == "pkcs11-wrapped", data
    code, data = run(capsys, "--config", str(cfg), "config", "check", "--json")
    assert code == 0, data


def test_wrap_enroll_on_fresh_production_wrapped_chain(
    tmp_path: Path,
    token: object,
    passphrase_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``["pkcs11-wrapped", "software"]`` on production mainnet, not wrapped yet: nothing
    reaches the floor, so ``wrap-enroll`` opens the enrolment-only handle; afterwards the
    chain opens through the token with no passphrase."""
    monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)  # type: ignore[attr-defined]
    code = main(["init", "--dir", str(tmp_path / "d"), *PROD, "--allow-below-minimum"])
    assert code == 0
    cfg = Path(capsys.readouterr().out.splitlines()[-1])
    text = cfg.read_text().replace('chain = ["software"]', 'chain = ["pkcs11-wrapped", "software"]')
    text = text.replace("allow_below_minimum = true", "allow_below_minimum = false")
    cfg.write_text(
        text + f'\n[providers.pkcs11]\nmodule = "{token.module}"\n'  # type: ignore[attr-defined]
        f'token_label = "{token.label}"\nwrap_key_label = "operator-path-wrap3"\n'  # type: ignore[attr-defined]
    )
    c = ("--config", str(cfg))
    code, data = run(capsys, *c, "key", "create", "--label", "w", "--json")
    assert code == 7  # below the floor: refused
    code, data = run(capsys, *c, "pkcs11", "wrap-enroll", "--json")
    assert code == 0 and data["enrolled"] is True, data
    monkeypatch.delenv("ANYHSM_PASSPHRASE")
    code, data = run(capsys, *c, "key", "create", "--label", "w", "--type", "bip32", "--json")
    assert code == 0 and data["provider"] == "pkcs11-wrapped", data
    entries = audit_entries(cfg)
    opens = [e["detail"].get("purpose") for e in entries if e["op"] == "open"]  # type: ignore[union-attr]
    assert opens == [None, "enrolment", None]  # init (with consent), wrap-enroll, key create
    assert [e["outcome"] for e in entries if e["op"] == "pkcs11_wrap_enroll"] == ["started", "ok"]


def test_failed_init_undefines_the_tpm_counter_it_defined(
    tmp_path: Path, tpm: object, passphrase_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the TPM enrolment (the final health check, injected) removes the
    deployment and the NV counter init defined for it: nothing is left on the TPM."""
    import anyhsm.enrol
    from anyhsm.errors import AnchorMissing, HsmError
    from anyhsm.hsm import Hsm
    from anyhsm.tpm.counter import TpmCounter
    from anyhsm.tpm.settings import TpmSettings

    refs: list[str] = []
    real = anyhsm.enrol.enrol_tpm

    def spy(hsm: Hsm, *, force: bool = False) -> dict[str, object]:
        out = real(hsm, force=force)
        named = hsm.keystore.generation_anchor_ref()
        assert named is not None
        refs.append(named[1])
        return out

    def broken(self: Hsm) -> object:
        raise HsmError("injected health failure")

    monkeypatch.setattr(anyhsm.enrol, "enrol_tpm", spy)
    monkeypatch.setattr(Hsm, "health", broken)
    tcti = tpm.tcti  # type: ignore[attr-defined]
    code = main(["init", "--dir", str(tmp_path / "p"), *PROD, "--chain", "tpm,software",
                 "--tcti", tcti])  # fmt: skip
    assert code != 0 and list(tmp_path.iterdir()) == []
    assert len(refs) == 1
    with pytest.raises(AnchorMissing):
        TpmCounter.at(TpmSettings.from_mapping({"tcti": tcti}), refs[0]).read()
