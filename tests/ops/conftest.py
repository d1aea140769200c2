"""Handles the operations are tested on: real software keystores on disk (cheap KDF), on
regtest and on mainnet, with the BIP39 'abandon ... about' wallet imported as ``w``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.bitcoin.test_signer import Wallet, software_hsm

from anyhsm.bitcoin.bip39 import mnemonic_to_seed
from anyhsm.hsm import Hsm
from anyhsm.ops.keys import import_mnemonic
from anyhsm.types import Network

MNEMONIC = "abandon " * 11 + "about"


def wallet() -> Wallet:
    with mnemonic_to_seed(MNEMONIC) as seed:
        return Wallet("w", bytes(seed.buffer))


@pytest.fixture
def hsm(tmp_path: Path) -> Iterator[Hsm]:
    h = software_hsm(tmp_path / "regtest")
    import_mnemonic(h, "w", MNEMONIC)
    yield h
    h.close()


@pytest.fixture
def mainnet(tmp_path: Path) -> Iterator[Hsm]:
    h = software_hsm(tmp_path / "mainnet", Network.MAINNET)
    import_mnemonic(h, "w", MNEMONIC)
    yield h
    h.close()
