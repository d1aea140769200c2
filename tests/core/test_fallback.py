"""Every fallback scenario: primary missing, timing out, failing its health check or
signing probe, below the minimum level, all failing; runtime failure; reload.

The faulty primary is the simulator with injected faults (its purpose); the
fallback target is the real software keystore.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE

from anyhsm import SecurityLevel, open_hsm
from anyhsm.cli.main import main
from anyhsm.errors import (
    AllProvidersFailed,
    ProviderUnavailable,
    SecurityLevelTooLow,
)
from anyhsm.keystore import KdfParams, Keystore
from anyhsm.secret import SecretBytes

BASE = """
environment = "{env}"
network = "{net}"
[fallback]
chain = {chain}
allow_below_minimum = {allow}
timeout_ms = 300
[providers.software]
path = "keystore"
[audit]
path = "audit.log"
"""


def cfg(
    make_config: object,
    *,
    chain: str = '["simulator", "software"]',
    env: str = "development",
    net: str = "regtest",
    allow: str = "false",
    sim: str = "",
) -> Path:
    body = BASE.format(env=env, net=net, chain=chain, allow=allow)
    if sim:
        body += "[providers.simulator]\n" + sim + "\n"
    return make_config(body)  # type: ignore[operator, no-any-return]


def statuses(hsm: object) -> dict[str, str]:
    return {a.name: a.status for a in hsm.attempts}  # type: ignore[attr-defined]


def audit_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_primary_healthy_is_chosen(make_config: object) -> None:
    with open_hsm(cfg(make_config)) as hsm:
        assert hsm.active_provider == "simulator"
        assert hsm.security_level is SecurityLevel.SIMULATOR
        assert statuses(hsm) == {"simulator": "ok", "software": "not_tried"}


def test_primary_missing_falls_back(make_config: object, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="anyhsm"),
        open_hsm(cfg(make_config, sim="offline = true")) as hsm,
    ):
        assert hsm.active_provider == "software"
        assert statuses(hsm)["simulator"] == "unavailable"
        assert "offline" in hsm.attempts[0].reason
        log = audit_lines(hsm.audit_path)
    assert "fell back from simulator to software" in caplog.text
    skip = [e for e in log if e["op"] == "fallback_skip"]
    assert skip and skip[-1]["provider"] == "simulator"
    opened = [e for e in log if e["op"] == "open"]
    assert opened[-1]["detail"]["fallback"] == "yes"  # type: ignore[index]


def test_primary_hanging_times_out(make_config: object) -> None:
    with open_hsm(cfg(make_config, sim="hang = true")) as hsm:
        assert hsm.active_provider == "software"
        assert statuses(hsm)["simulator"] == "timeout"
        assert "did not answer within 300 ms" in hsm.attempts[0].reason


def test_primary_failing_health(make_config: object) -> None:
    with open_hsm(cfg(make_config, sim="failure_rate = 1.0")) as hsm:
        assert hsm.active_provider == "software"
        assert statuses(hsm)["simulator"] == "unavailable"


def test_garbage_signatures_never_pass_as_healthy(make_config: object) -> None:
    with open_hsm(cfg(make_config, sim="corrupt_signatures = true")) as hsm:
        assert hsm.active_provider == "software"
        assert "does not verify" in hsm.attempts[0].reason


def test_all_failing(make_config: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANYHSM_PASSPHRASE", "wrong passphrase")
    with pytest.raises(AllProvidersFailed) as e:
        open_hsm(cfg(make_config, sim="offline = true"))
    names = [d["name"] for d in e.value.details]
    assert names == ["simulator", "software"]
    assert "passphrase" in str(e.value)


def test_below_minimum_fails_closed(make_config: object) -> None:
    # staging needs at least "software": the simulator is below it
    with pytest.raises(SecurityLevelTooLow) as e:
        open_hsm(cfg(make_config, chain='["simulator"]', env="staging"))
    assert e.value.details[0]["status"] == "below_minimum"


def test_production_mainnet_needs_hardware(make_config: object) -> None:
    with pytest.raises(SecurityLevelTooLow) as e:
        open_hsm(cfg(make_config, chain='["software"]', env="production", net="mainnet"))
    assert "tpm" in str(e.value)


def test_software_fallback_with_explicit_consent(
    make_config: object, caplog: pytest.LogCaptureFixture
) -> None:
    path = cfg(make_config, chain='["software"]', env="production", net="mainnet", allow="true")
    with pytest.raises(AllProvidersFailed) as e:  # the test deployment's cheap KDF is refused
        open_hsm(path)
    assert "memory_kib" in str(e.value)
    ks = Keystore.load(path.parent / "keystore")
    pw = SecretBytes(PASSPHRASE.encode())
    ks.unlock_with_passphrase(pw)
    ks.rotate(pw, kdf=KdfParams())  # production-grade Argon2id
    ks.close()
    # that KDF alone takes ~0.3-0.6 s, more on a loaded machine: not this file's 300 ms
    path.write_text(path.read_text().replace("timeout_ms = 300", "timeout_ms = 20000"))
    with open_hsm(path) as hsm:
        assert hsm.active_provider == "software"
        assert hsm.security_level is SecurityLevel.SOFTWARE


def test_simulator_refused_on_mainnet_even_with_consent(make_config: object) -> None:
    path = cfg(
        make_config,
        chain='["simulator", "software"]',
        env="development",
        net="mainnet",
        allow="true",
    )
    with open_hsm(path) as hsm:
        assert hsm.active_provider == "software"
        assert statuses(hsm)["simulator"] == "refused"


def test_runtime_failure_marks_unhealthy(make_config: object) -> None:
    with open_hsm(cfg(make_config, sim="fail_after = 8")) as hsm:
        assert hsm.active_provider == "simulator"
        info = hsm.generate_key("k")
        with pytest.raises(ProviderUnavailable):
            for _ in range(20):
                hsm.sign(info.id, os.urandom(32))
        report = hsm.health()
        assert not report.ok
        row = next(r for r in report.providers if r["name"] == "simulator")
        assert row["status"] == "unhealthy"


def test_key_never_swapped(make_config: object) -> None:
    """A key recorded as living in another store fails with ProviderUnavailable naming it."""
    with open_hsm(cfg(make_config, chain='["software"]')) as hsm:
        ks = hsm._anchor.keystore  # the real keystore of this deployment
        assert ks is not None
        pub = hsm.generate_key("tmp").public_key
        hsm.delete_key("tmp")
        ks.add_reference("b" * 32, "cold-wallet", pub, "pkcs11", "pkcs11:1234")
    with open_hsm(cfg(make_config, chain='["software"]')) as hsm:
        with pytest.raises(ProviderUnavailable) as e:
            hsm.sign("cold-wallet", os.urandom(32))
        assert "pkcs11" in str(e.value) and "cold-wallet" in str(e.value)


def test_reload_keeps_keys_and_audit_chain(make_config: object) -> None:
    first = cfg(make_config, sim="offline = true")
    hsm = open_hsm(first)
    info = hsm.generate_key("persistent")
    assert hsm.active_provider == "software"
    # the operator fixes the primary and reloads
    first.write_text(first.read_text().replace("offline = true", "offline = false"))
    hsm.reload()
    assert hsm.active_provider == "simulator"
    # keys in the keystore stay reachable: the keystore is still open as the audit anchor
    assert hsm.get_key("persistent").id == info.id
    hsm.sign("persistent", os.urandom(32))
    assert hsm.verify_audit().ok
    ops = [e["op"] for e in audit_lines(hsm.audit_path)]
    assert "reload" in ops
    hsm.close()


def test_health_json_shape(make_config: object, capsys: pytest.CaptureFixture[str]) -> None:
    path = cfg(make_config, sim="offline = true")
    assert main(["--config", str(path), "health", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["active_provider"] == "software"
    assert out["security_level"] == "software"
    names = [p["name"] for p in out["providers"]]
    assert names == ["simulator", "software"]
    for p in out["providers"]:
        assert {"name", "status", "reason", "elapsed_ms"} <= set(p)
    assert out["providers"][0]["status"] == "unavailable"
    assert out["providers"][1]["status"] == "ok"


def test_simulator_refuses_mainnet_when_built_directly(tmp_path: Path) -> None:
    from anyhsm.errors import PolicyViolation
    from anyhsm.provider import ProviderContext
    from anyhsm.providers.simulator import SimulatorProvider
    from anyhsm.types import Environment, Network

    for env, net in (
        (Environment.PRODUCTION, Network.REGTEST),
        (Environment.DEVELOPMENT, Network.MAINNET),
    ):
        sim = SimulatorProvider(ProviderContext(env, net, tmp_path))
        with pytest.raises(PolicyViolation):
            sim.open()
