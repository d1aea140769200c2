"""Creating a deployment: keystore, config file and audit log in one directory.

``init`` is all or nothing: everything is built in a private temporary directory beside
the target and renamed into place once the deployment has opened through its chain, so
a refused or failed ``init`` leaves nothing behind (see :func:`init_deployment`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from anyhsm import registry
from anyhsm.config import KNOWN_PROVIDERS, Config, default_min_level
from anyhsm.errors import ConfigError, HsmError
from anyhsm.fsutil import fsync_dir, read_secret_file
from anyhsm.keystore import KdfParams, Keystore
from anyhsm.providers.software import passphrase_problems
from anyhsm.secret import SecretBytes
from anyhsm.types import Environment, Network, SecurityLevel

CONFIG_NAME = "anyhsm.toml"
KEYSTORE_NAME = "keystore"
AUDIT_NAME = "audit.log"
DEPLOYMENT_FILES = (KEYSTORE_NAME, AUDIT_NAME, CONFIG_NAME)
"""What ``init`` creates in the target directory (the config last)."""

DEFAULT_TCTI = "device:/dev/tpmrm0"
"""The TPM ``init --chain tpm,...`` uses without ``--tcti``: the kernel's resource manager."""

_Counter = tuple[Config, tuple[str, str] | None]
"""A TPM counter a failed init must undefine: the config naming the TPM, the anchor ref."""

FAST_DEV_KDF = KdfParams("argon2id", memory_kib=1024, iterations=1)
"""Cheap KDF for tests and demos; refused in production."""

_TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "tpm": ("tcti", "pcrs", "pcr_bank"),
    "pkcs11": ("module", "token_label", "token_serial", "pin_file", "wrap_key_label"),
}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def render_config(
    environment: Environment,
    network: Network,
    chain: Sequence[str],
    providers: Mapping[str, Mapping[str, object]] | None = None,
    *,
    allow_below_minimum: bool = False,
) -> str:
    """The config ``init`` writes: the chain, the keystore, the audit log, and a table
    for each hardware provider the chain names (``providers``)."""
    chain_toml = ", ".join(_toml_value(c) for c in chain)
    consent = _toml_value(allow_below_minimum)
    text = f"""# anyhsm configuration (see docs/configuration.md)
environment = "{environment.value}"   # development | staging | production
network = "{network.value}"           # mainnet | testnet | testnet4 | signet | regtest

[fallback]
chain = [{chain_toml}]   # providers tried in order
allow_below_minimum = {consent}          # explicit consent to fall below the environment's minimum

[providers.software]
path = "{KEYSTORE_NAME}"                    # relative to this file

[audit]
path = "{AUDIT_NAME}"
durability = "batched"               # batched | fsync
"""
    for name, table in (providers or {}).items():
        text += f"\n[providers.{name}]\n"
        for key, value in table.items():
            text += f"{key} = {_toml_value(value)}\n"
    return text


def plan_providers(
    chain: Sequence[str],
    environment: Environment,
    network: Network,
    settings: Mapping[str, Mapping[str, object]] | None = None,
    *,
    allow_below_minimum: bool = False,
) -> dict[str, dict[str, object]]:
    """Check the chain ``init`` was given and return the provider tables to write,
    before anything exists on disk. Refused: an empty or unknown chain, the simulator
    where policy forbids it, a chain that cannot reach the environment's floor (unless
    ``allow_below_minimum``), a token without its module and token, ``pkcs11-wrapped``
    without ``wrap_key_label``. A TPM without a tcti gets :data:`DEFAULT_TCTI`."""
    from anyhsm.factory import PROVIDER_LEVELS

    given = {k: dict(v) for k, v in (settings or {}).items()}
    if not chain:
        raise ConfigError("the chain is empty", hint="e.g. --chain software")
    unknown = [c for c in chain if c not in KNOWN_PROVIDERS]
    if unknown:
        raise ConfigError(
            f"unknown provider(s) in --chain: {', '.join(unknown)}",
            hint="use: " + ", ".join(KNOWN_PROVIDERS),
        )
    if len(set(chain)) != len(chain):
        raise ConfigError("a provider is named twice in --chain")
    if "simulator" in chain and (
        environment is Environment.PRODUCTION or network is Network.MAINNET
    ):
        raise ConfigError(
            f"the simulator is refused in {environment.value} on {network.value}",
            hint="remove it from --chain",
        )
    floor = default_min_level(environment, network)
    best = max(PROVIDER_LEVELS.get(c, SecurityLevel.SIMULATOR) for c in chain)
    if best < floor and not allow_below_minimum:
        raise ConfigError(
            f"refusing to create a {environment.value} {network.value} deployment whose "
            f"chain {','.join(chain)} cannot reach the minimum security level "
            f"{floor.label}: it would never open",
            hint="seal the keystore to this machine's TPM with --chain tpm,software "
            "(add --tcti if not /dev/tpmrm0), or keep keys in a token with --chain "
            "pkcs11,software --pkcs11-module LIB --token-label L; to run below the "
            "minimum, give the explicit consent --allow-below-minimum "
            "(fallback.allow_below_minimum = true)",
        )
    out: dict[str, dict[str, object]] = {}
    if "tpm" in chain:
        tpm = {k: v for k, v in given.get("tpm", {}).items() if v is not None}
        tpm.setdefault("tcti", DEFAULT_TCTI)
        out["tpm"] = {k: tpm[k] for k in _TABLE_KEYS["tpm"] if k in tpm}
    token = {k: v for k, v in given.get("pkcs11", {}).items() if v is not None}
    if registry.uses_token(chain) or token:
        if "module" not in token:
            raise ConfigError(
                "a PKCS#11 chain needs the vendor's module", hint="--pkcs11-module /path/lib.so"
            )
        if "token_label" not in token and "token_serial" not in token:
            raise ConfigError(
                "a PKCS#11 chain needs the token", hint="--token-label L (or --token-serial S)"
            )
        if "pkcs11-wrapped" in chain and "wrap_key_label" not in token:
            raise ConfigError(
                "the chain names pkcs11-wrapped but no wrap key",
                hint="--wrap-key-label anyhsm-wrap (the AES key is made in the token)",
            )
        for key in ("module", "pin_file"):  # absolute: the config lives elsewhere
            if key in token:
                token[key] = str(Path(str(token[key])).expanduser().resolve())
        out["pkcs11"] = {k: token[k] for k in _TABLE_KEYS["pkcs11"] if k in token}
    return out


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
    chain: Sequence[str] | None = None,
    providers: Mapping[str, Mapping[str, object]] | None = None,
    allow_below_minimum: bool = False,
) -> Path:
    """Create keystore, config and audit log in ``directory``; return the config path.

    All checks that need no device run first (:func:`plan_providers`, the production
    passphrase and KDF rules, an existing deployment), so a refusal writes nothing.
    Then the deployment is built in a private temporary directory beside ``directory``:
    the keystore, the config (which ``config check`` must accept), the enrolment of the
    unlock paths the chain needs (a TPM seal for ``tpm``, a token wrap when
    ``wrap_key_label`` is given) through the audited enrolment-only handle, and a normal
    open through the chain with a health check, which writes the audit log and the
    keystore's record of it together. Only then is it renamed into place; on any failure
    the temporary directory is removed (and a TPM counter defined for it undefined).
    """
    named = Path(directory).expanduser().absolute()
    target = named.resolve()  # a symlinked directory: build beside what it points to
    names = list(chain) if chain is not None else ["software"]
    params = kdf or KdfParams()
    tables = plan_providers(
        names, environment, network, providers, allow_below_minimum=allow_below_minimum
    )
    require_keystore_rules(environment, passphrase, params, action="create")
    _refuse_existing(target)
    created_parent = _missing_ancestor(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.init-", dir=target.parent))
    undo: list[_Counter] = []
    try:
        _build(
            tmp, passphrase, params, environment, network, names, tables, allow_below_minimum, undo
        )
        _place(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _undo_devices(undo)
        if created_parent is not None:
            shutil.rmtree(created_parent, ignore_errors=True)
        if isinstance(e, HsmError):
            e.hint = (f"{e.hint}; " if e.hint else "") + f"init created nothing in {named}"
        raise
    fsync_dir(target.parent)
    return named / CONFIG_NAME


def _refuse_existing(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target} exists and is not a directory")
    for name in DEPLOYMENT_FILES:
        if (target / name).exists():
            raise ConfigError(
                f"{target / name} already exists",
                hint="choose an empty directory (init never overwrites a deployment)",
            )


def _missing_ancestor(path: Path) -> Path | None:
    """The topmost directory of ``path`` that does not exist yet (removed on failure)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _build(
    tmp: Path,
    passphrase: SecretBytes,
    params: KdfParams,
    environment: Environment,
    network: Network,
    chain: list[str],
    tables: dict[str, dict[str, object]],
    allow_below_minimum: bool,
    undo: list[_Counter],
) -> None:
    from anyhsm.hsm import open_for_enrolment, open_hsm

    Keystore.create(tmp / KEYSTORE_NAME, passphrase, kdf=params).close()
    cfg_path = tmp / CONFIG_NAME
    text = render_config(
        environment, network, chain, tables, allow_below_minimum=allow_below_minimum
    )
    cfg_path.write_bytes(text.encode())
    os.chmod(cfg_path, 0o600)
    cfg = Config.load(cfg_path)
    errors = [p for p in cfg.check() if p.severity == "error"]
    if errors:
        raise ConfigError(
            "the configuration init would write does not pass 'config check': "
            + "; ".join(str(p) for p in errors)
        )
    wrap = "wrap_key_label" in tables.get("pkcs11", {})
    if "tpm" in chain or wrap:
        from anyhsm.enrol import enrol_token_wrap, enrol_tpm

        with open_for_enrolment(cfg, passphrase=SecretBytes(passphrase.buffer)) as admin:
            if "tpm" in chain:
                enrol_tpm(admin)
                undo.append((cfg, admin.keystore.generation_anchor_ref()))
            if wrap:
                enrol_token_wrap(admin)
    with open_hsm(cfg, passphrase=SecretBytes(passphrase.buffer)) as hsm:
        report = hsm.health()
        if not report.ok:
            raise HsmError(
                "the new deployment opened but its health check failed",
                hint="see 'anyhsm health' once the device is fixed; nothing was created",
            )


def _place(tmp: Path, target: Path) -> None:
    """Rename the built deployment into place: the whole directory when ``target`` is
    missing or empty (one atomic rename), else its entries one by one, the config last
    (an entry that cannot be moved takes the moved ones back out)."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if not target.is_dir():
            raise
    moved: list[Path] = []
    try:
        for name in DEPLOYMENT_FILES:
            dest = target / name
            if dest.exists():
                raise ConfigError(f"{dest} appeared while init ran; nothing was created")
            os.rename(tmp / name, dest)
            moved.append(dest)
    except BaseException:
        for dest in reversed(moved):
            with contextlib.suppress(OSError):
                os.rename(dest, tmp / dest.name)
        raise
    os.rmdir(tmp)


def _undo_devices(undo: list[_Counter]) -> None:
    """Undefine the TPM counter a failed init defined (the sealed blob went with the
    temporary directory). A token's wrap key is kept: a retry finds it by its label."""
    for item in undo:
        cfg, ref = item
        if ref is None or ref[0] != "tpm-nv-counter":
            continue
        from anyhsm.tpm.counter import TpmCounter
        from anyhsm.tpm.settings import TpmSettings

        with contextlib.suppress(HsmError):
            TpmCounter.at(TpmSettings.from_mapping(cfg.provider_settings("tpm")), ref[1]).undefine()
