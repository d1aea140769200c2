"""A real deployment (software keystore on disk, cheap KDF) with HD keys, and a
:class:`~tests.signer.core.Core` pointed at it, for each protocol style."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.signer.core import STYLES, Core

from anyhsm.config import Config
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.hsm import Hsm, open_hsm
from anyhsm.ops.keys import import_mnemonic
from anyhsm.secret import SecretBytes
from anyhsm.types import KeyType, Network

PASSPHRASE = "a passphrase long enough for the signer's test keystore"
ABANDON = " ".join(["abandon"] * 11 + ["about"])  # BIP84/86/49/44 test vectors' words
ABANDON_FP = "73c5da0a"
CHAINS = {
    Network.MAINNET: "main",
    Network.TESTNET: "test",
    Network.TESTNET4: "testnet4",
    Network.SIGNET: "signet",
    Network.REGTEST: "regtest",
}


@dataclass
class Deployment:
    directory: Path
    config: Path
    network: Network

    def open(self) -> Hsm:
        return open_hsm(Config.load(self.config, env={}), passphrase=PASSPHRASE)

    def env(self, **extra: str) -> dict[str, str]:
        return {"ANYHSM_CONFIG": str(self.config), "ANYHSM_PASSPHRASE": PASSPHRASE, **extra}

    def core(self, style: str, *, chain: str | None = None, **env: str) -> Core:
        return Core(
            style, chain or CHAINS[self.network], self.env(**env), cwd=self.directory.parent
        )

    def add_config(self, text: str) -> None:
        with self.config.open("a") as f:
            f.write("\n" + text + "\n")


def make_deployment(
    directory: Path, network: Network = Network.REGTEST, keys: Sequence[str] = ("core",)
) -> Deployment:
    """A deployment with BIP32 keys: the first from the BIP39 test words, the others from
    fixed seeds."""
    cfg = init_deployment(
        directory, SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF, network=network
    )
    # a generous bound on each provider's open: on a loaded test machine the default 2 s
    # can pass, and the signer would then (rightly) answer provider_timeout
    text = cfg.read_text()
    assert "[fallback]\n" in text
    cfg.write_text(text.replace("[fallback]\n", "[fallback]\ntimeout_ms = 60000\n", 1))
    dep = Deployment(directory, cfg, network)
    hsm = dep.open()
    try:
        for n, label in enumerate(keys):
            if n == 0:
                import_mnemonic(hsm, label, ABANDON)
            else:
                hsm.import_key(label, bytes([n]) * 32, KeyType.BIP32)
    finally:
        hsm.close()
    return dep


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    return make_deployment(tmp_path / "dep")


@pytest.fixture(params=STYLES)
def style(request: pytest.FixtureRequest) -> Iterator[str]:
    yield str(request.param)


@pytest.fixture
def core(dep: Deployment, style: str) -> Core:
    return dep.core(style)
