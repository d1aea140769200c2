"""Each provider's config checks live beside its settings parser and are reached through
its registry spec (issue 10): config.py names no provider module, and importing it
imports neither the factory nor any provider."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anyhsm import registry
from anyhsm.config import Config, Problem, semantic_problems
from anyhsm.errors import ConfigError
from anyhsm.registry import ProviderSpec
from anyhsm.types import SecurityLevel


def _modules_after(code: str) -> list[str]:
    probe = (
        f"import sys; {code}; "
        "print(__import__('json').dumps(sorted(m for m in sys.modules "
        "if m.startswith(('anyhsm.providers', 'anyhsm.tpm', 'anyhsm.factory', 'anyhsm.hsm')) "
        "or m in ('pkcs11', 'tpm2_pytss'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout))


def test_importing_config_imports_no_factory_and_no_provider() -> None:
    assert _modules_after("import anyhsm.config") == []


def test_checking_a_software_config_imports_only_the_software_checks(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[fallback]\nchain = ["software"]\n[audit]\npath = "audit.log"\n')
    loaded = _modules_after(f"from anyhsm.config import Config; Config.load({str(path)!r}).check()")
    assert loaded == ["anyhsm.providers", "anyhsm.providers.software_settings"]


def test_every_check_target_resolves_beside_its_settings() -> None:
    homes = {
        "pkcs11": "anyhsm.providers.pkcs11.settings",
        "pkcs11-wrapped": "anyhsm.providers.pkcs11.settings",
        "tpm": "anyhsm.tpm.settings",
        "software": "anyhsm.providers.software_settings",
        "simulator": "anyhsm.providers.simulator_settings",
    }
    for spec in registry.SPECS:
        assert spec.config_checks is not None
        assert spec.config_checks.partition(":")[0] == homes[spec.name]
        assert callable(spec.load_config_checks())


def test_involvement() -> None:
    by = registry.BY_NAME
    assert registry.involved(by["pkcs11"], ["pkcs11", "software"], [])
    assert registry.involved(by["pkcs11"], ["software"], ["pkcs11"])  # its table: pin_file
    assert not registry.involved(by["pkcs11"], ["software"], ["software"])
    assert registry.involved(by["software"], ["tpm"], [])  # the keystore the TPM opens
    assert not registry.involved(by["software"], ["pkcs11", "simulator"], [])
    assert not registry.involved(by["tpm"], ["software"], ["software"])


def test_config_calls_the_checks_of_each_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider added to the registry gets its checks run with no change to config.py."""
    seen: list[str] = []

    def check(cfg: Config) -> list[Problem]:
        seen.append("called")
        return [Problem("providers.extra.x", "1", "checked by its spec", "none", "warning")]

    mod = type(sys)("_h3_extra_checks")
    mod.check = check  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "_h3_extra_checks", mod)
    extra = ProviderSpec(
        "extra", "x:Y", SecurityLevel.SOFTWARE, config_checks="_h3_extra_checks:check"
    )
    monkeypatch.setattr(registry, "SPECS", (*registry.SPECS, extra))
    cfg = Config.from_mapping({"fallback": {"chain": ["software"]}}, env={})
    assert semantic_problems(cfg) == semantic_problems(cfg)  # not involved: never called
    assert seen == []
    cfg = Config(fallback=cfg.fallback, providers={"extra": {}})
    assert any(p.message == "checked by its spec" for p in semantic_problems(cfg))
    assert seen


def _problems(tmp_path: Path, body: str) -> dict[tuple[str, str], Problem]:
    path = tmp_path / "c.toml"
    path.write_text(body)
    cfg = Config.load(path, env={})
    return {(p.setting, p.message): p for p in cfg.check()}


def _find(problems: dict[tuple[str, str], Problem], setting: str, needle: str) -> Problem:
    found = [p for (s, m), p in problems.items() if s == setting and needle in m]
    assert found, f"{setting}: {needle!r} not in {sorted(problems)}"
    return found[0]


def test_pkcs11_and_tpm_checks(tmp_path: Path) -> None:
    (tmp_path / "pin").write_text("1234")
    os.chmod(tmp_path / "pin", 0o644)
    problems = _problems(
        tmp_path,
        """
environment = "staging"
network = "signet"
[fallback]
chain = ["pkcs11", "tpm", "pkcs11-wrapped", "software"]
[providers.pkcs11]
pin_file = "pin"
[audit]
path = "audit.log"
""",
    )
    assert _find(problems, "providers.pkcs11.module", "no module is configured").severity == "error"
    assert _find(problems, "providers.pkcs11.token_label", "no token selected").severity == "error"
    assert _find(problems, "providers.pkcs11.pin_file", "accessible to group/others").severity == (
        "error"
    )
    _find(problems, "providers.tpm.tcti", "no TCTI is configured")
    _find(problems, "providers.pkcs11.wrap_key_label", "it can never open")
    _find(problems, "providers.software.path", "the keystore does not exist")


def test_pkcs11_module_missing_and_wrap_not_enrolled(deployment: Path, tmp_path: Path) -> None:
    body = deployment.read_text()
    body = body.replace('environment = "development"', 'environment = "staging"')
    body = body.replace('chain = ["software"]', 'chain = ["pkcs11", "software"]')
    body += f"""
[providers.pkcs11]
module = "{tmp_path / "absent.so"}"
token_label = "t"
wrap_key_label = "anyhsm-wrap"
pin_file = "no-such-pin"
"""
    problems = _problems(deployment.parent, body)
    missing = _find(problems, "providers.pkcs11.module", "does not exist on this machine")
    assert missing.severity == "warning"
    unwrapped = _find(problems, "providers.pkcs11.wrap_key_label", "not wrapped by the token yet")
    assert unwrapped.severity == "warning"
    _find(problems, "providers.pkcs11.pin_file", "file does not exist")
    no_wrap = body.replace('wrap_key_label = "anyhsm-wrap"\n', "")
    problems = _problems(deployment.parent, no_wrap)
    _find(problems, "providers.pkcs11.wrap_key_label", "opens only with the passphrase")


def test_simulator_refused_where_it_may_not_run(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        'environment = "staging"\nnetwork = "mainnet"\n[fallback]\nchain = ["simulator"]\n',
    )
    refused = _find(problems, "fallback.chain", "the simulator is refused in staging on mainnet")
    assert refused.fix == "remove 'simulator' from the chain" and refused.severity == "error"


def test_signer_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[signer]\nkey = "core"\npublic_file = "pub/signer.json"\n')
    cfg = Config.load(path, env={})
    assert cfg.signer.key == "core"
    assert cfg.signer.public_file == tmp_path / "pub" / "signer.json"
    assert Config.load(path, env={"ANYHSM_SIGNER__KEY": "other"}).signer.key == "other"
    assert Config.from_mapping({}, env={}).signer.public_file is None
    path.write_text('[signer]\nkey = 1\nkeys = "x"\n')
    with pytest.raises(ConfigError) as e:
        Config.load(path, env={})
    assert "signer.key" in str(e.value) and "signer.keys" in str(e.value)
