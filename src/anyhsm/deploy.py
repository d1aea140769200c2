"""Creating a deployment: keystore, config file and audit log in one directory."""

from __future__ import annotations

from pathlib import Path

from anyhsm.config import Config
from anyhsm.errors import ConfigError
from anyhsm.fsutil import atomic_write, make_private_dir, read_secret_file
from anyhsm.hsm import open_hsm
from anyhsm.keystore import KdfParams, Keystore
from anyhsm.providers.software import passphrase_problems
from anyhsm.secret import SecretBytes
from anyhsm.types import Environment, Network

CONFIG_NAME = "anyhsm.toml"

FAST_DEV_KDF = KdfParams("argon2id", memory_kib=1024, iterations=1)
"""Cheap KDF for tests and demos; refused in production."""


def render_config(environment: Environment, network: Network, chain: list[str]) -> str:
    chain_toml = ", ".join(f'"{c}"' for c in chain)
    return f"""# anyhsm configuration (see docs/configuration.md)
environment = "{environment.value}"   # development | staging | production
network = "{network.value}"           # mainnet | testnet | testnet4 | signet | regtest

[fallback]
chain = [{chain_toml}]   # providers tried in order
allow_below_minimum = false          # explicit consent to fall below the environment's minimum

[providers.software]
path = "keystore"                    # relative to this file

[audit]
path = "audit.log"
durability = "batched"               # batched | fsync
"""


def require_keystore_rules(
    environment: Environment,
    passphrase: SecretBytes | None,
    kdf: KdfParams,
    *,
    action: str,
) -> None:
    """The production rules for a keystore's passphrase and KDF, in ONE place: applied
    when a keystore is created (``init``) and when its passphrase or KDF changes
    (``keystore passwd``), so neither can leave a production store weaker than the other
    (a 32+ character passphrase, KDF cost at least the production minimum)."""
    if environment is not Environment.PRODUCTION:
        return
    problems = passphrase_problems(passphrase, kdf)
    if problems:
        raise ConfigError(
            f"refusing to {action} a production keystore: " + "; ".join(problems),
            hint="use a passphrase of 32+ characters and the default KDF "
            "(or raise [providers.software.kdf])",
        )


def check_passwd(config: Config, new_passphrase_file: str | Path | None) -> None:
    """Refuse a ``keystore passwd`` that would break the production rules of ``init``:
    the new passphrase (read from its file under the secret-file rule) and the KDF the
    configuration asks for. Called before anything is unlocked or written."""
    params = KdfParams.from_settings(config.provider_settings("software").get("kdf"))
    if new_passphrase_file is None:
        require_keystore_rules(config.environment, None, params, action="re-key")
        return
    new = read_secret_file(Path(new_passphrase_file), "new passphrase", config.environment)
    try:
        require_keystore_rules(config.environment, new, params, action="re-key")
    finally:
        new.wipe()


def init_deployment(
    directory: Path,
    passphrase: SecretBytes,
    *,
    network: Network = Network.REGTEST,
    environment: Environment = Environment.DEVELOPMENT,
    kdf: KdfParams | None = None,
    chain: list[str] | None = None,
) -> Path:
    """Create keystore, config and audit log in ``directory``; return the config path."""
    params = kdf or KdfParams()
    require_keystore_rules(environment, passphrase, params, action="create")
    make_private_dir(directory)
    cfg_path = directory / CONFIG_NAME
    if cfg_path.exists():
        raise ConfigError(f"{cfg_path} already exists", hint="choose an empty directory")
    Keystore.create(directory / "keystore", passphrase, kdf=params).close()
    atomic_write(cfg_path, render_config(environment, network, chain or ["software"]).encode())
    with open_hsm(Config.load(cfg_path), passphrase=SecretBytes(passphrase.buffer)) as hsm:
        hsm.health()
    return cfg_path
