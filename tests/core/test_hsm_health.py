"""The handle's health report names every level, the lowest too (SecurityLevel is an
IntEnum whose SIMULATOR is 0: a truth test would print it as null)."""

from __future__ import annotations

from pathlib import Path

from anyhsm import open_hsm


def test_a_simulator_handle_reports_its_level(deployment: Path, make_config: object) -> None:
    cfg = deployment.read_text().replace('chain = ["software"]', 'chain = ["simulator"]')
    with open_hsm(make_config(cfg)) as hsm:  # type: ignore[operator]
        report = hsm.health().to_dict()
    assert report["active_provider"] == "simulator"
    assert report["security_level"] == "simulator"
    rows = {p["name"]: p for p in report["providers"]}  # type: ignore[union-attr]
    assert rows["simulator"]["security_level"] == "simulator"


def test_the_last_audit_sequence_is_live(deployment: Path) -> None:
    with open_hsm(deployment) as hsm:
        before = hsm.audit_last_seq
        hsm.generate_key("counted")
        assert hsm.audit_last_seq == before + 2  # started, ok
