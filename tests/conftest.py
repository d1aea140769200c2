"""Fixtures shared by every test directory: fresh deployments on the real software
keystore (with a cheap KDF, so tests stay fast), and helpers to build configs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.secret import SecretBytes

PASSPHRASE = "correct horse battery staple, long enough for production"


@pytest.fixture(autouse=True)
def _clean_anyhsm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's ANYHSM_* variables."""
    for name in list(os.environ):
        if name.startswith("ANYHSM_"):
            monkeypatch.delenv(name)


@pytest.fixture
def passphrase_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ANYHSM_PASSPHRASE", PASSPHRASE)
    return PASSPHRASE


@pytest.fixture
def deployment(tmp_path: Path, passphrase_env: str) -> Path:
    """A fresh development deployment (keystore, config, audit log); returns the config path."""
    return init_deployment(tmp_path / "dep", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)


def write_config(directory: Path, body: str) -> Path:
    """A config file next to an existing keystore directory ``directory/keystore``."""
    path = directory / "anyhsm.toml"
    path.write_text(body)
    return path


@pytest.fixture
def make_config(deployment: Path) -> Iterator[object]:
    """Write another config in the deployment's directory (same keystore, same audit log)."""
    created: list[Path] = []

    def make(body: str, name: str = "alt.toml") -> Path:
        p = deployment.parent / name
        p.write_text(body)
        created.append(p)
        return p

    yield make
