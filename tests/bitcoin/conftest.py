"""The handle most Bitcoin tests sign with: a software keystore on disk (regtest), and the
BIP32 wallet ``w`` in it. A test module that needs another policy defines its own ``hsm``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.bitcoin.test_signer import Wallet, add_wallet, software_hsm

from anyhsm.hsm import Hsm


@pytest.fixture
def hsm(tmp_path: Path) -> Iterator[Hsm]:
    h = software_hsm(tmp_path / "dep")
    yield h
    h.close()


@pytest.fixture
def wallet(hsm: Hsm) -> Wallet:
    return add_wallet(hsm, "w", bytes(range(32)))
