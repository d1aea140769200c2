"""A real software-keystore deployment with one HD key ("hot", an embit wallet's seed)
and three approver keys, for the spending policy tests."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE
from tests.policy.embit_psbt import Approver, EmbitWallet

from anyhsm.config import Config
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.hsm import Hsm, open_hsm
from anyhsm.secret import SecretBytes
from anyhsm.types import KeyType, Network

SEED = bytes(range(32))
APPROVERS = [Approver(bytes([n]) * 32) for n in (1, 2, 3)]


@dataclass
class Deployment:
    config: Path
    hsm: Hsm
    wallet: EmbitWallet

    def policy(self, text: str, name: str = "spending.toml") -> Path:
        """Write a policy file beside the config; returns its path (not yet set)."""
        path = self.config.parent / name
        path.write_text(textwrap.dedent(text))
        return path

    def set(self, text: str, name: str = "spending.toml") -> Path:
        from anyhsm.ops.policy import set_policy

        path = self.policy(text, name)
        set_policy(self.hsm, path)
        return path

    def reopen(self, **policy: object) -> Hsm:
        """A new handle on the same deployment (the config re-read)."""
        import dataclasses

        self.hsm.close()
        cfg = Config.load(self.config, env={})
        if policy:
            cfg = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, **policy))  # type: ignore[arg-type]
        self.hsm = open_hsm(cfg, passphrase=PASSPHRASE)
        return self.hsm


def open_deployment(directory: Path, config_extra: str = "") -> Deployment:
    cfg_path = init_deployment(
        directory, SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF, network=Network.REGTEST
    )
    if config_extra:
        text = cfg_path.read_text()
        cfg_path.write_text(text + "\n" + textwrap.dedent(config_extra))
    hsm = open_hsm(Config.load(cfg_path, env={}), passphrase=PASSPHRASE)
    wallet = EmbitWallet("hot", SEED)
    hsm.import_key("hot", SEED, KeyType.BIP32)
    return Deployment(cfg_path, hsm, wallet)


@pytest.fixture
def dep(tmp_path: Path, passphrase_env: str) -> Iterator[Deployment]:
    d = open_deployment(tmp_path / "dep")
    yield d
    d.hsm.close()


@pytest.fixture
def approvers() -> list[Approver]:
    return APPROVERS


def approvals_table(m: int, keys: list[Approver] | None = None) -> str:
    keys = APPROVERS if keys is None else keys
    listed = ", ".join(f'"{a.hex}"' for a in keys)
    return f"{{ m = {m}, approvers = [{listed}] }}"


AuditOps = Callable[[Path], list[dict[str, object]]]


def audit_entries(config: Path) -> list[dict[str, object]]:
    import json

    log = config.parent / "audit.log"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
