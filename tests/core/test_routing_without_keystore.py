"""Bare development (the simulator, no keystore): there is no key directory, so names
go to the active provider alone (issue 9, item 9)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from anyhsm import open_hsm
from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import KeyNotFound


def test_without_a_keystore_the_active_provider_answers(tmp_path: Path) -> None:
    cfg = tmp_path / "anyhsm.toml"
    cfg.write_text(
        'environment = "development"\nnetwork = "regtest"\n'
        '[fallback]\nchain = ["simulator"]\n[audit]\npath = "audit.log"\n'
    )
    with open_hsm(cfg) as hsm:
        assert hsm.active_provider == "simulator"
        info = hsm.generate_key("dev")
        digest = os.urandom(32)
        for ref in ("dev", info.id):
            assert curve.ecdsa_verify(info.public_key, digest, hsm.sign(ref, digest))
        assert [k.id for k in hsm.list_keys()] == [info.id]
        hsm.delete_key("dev")
        with pytest.raises(KeyNotFound):
            hsm.get_key(info.id)
