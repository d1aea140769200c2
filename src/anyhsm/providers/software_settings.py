"""The ``[providers.software]`` table configures the keystore (path, passphrase file,
KDF): its config checks, run by ``anyhsm config check`` whenever a provider in the
chain opens the keystore (``software``, ``tpm``, ``pkcs11-wrapped``) or the table is
written. Named by the software provider's registry spec; imports nothing heavy until a
check needs the keystore."""

from __future__ import annotations

from anyhsm.config import Config, Problem, keystore_path, secret_file_problems
from anyhsm.errors import ConfigError, HsmError
from anyhsm.fsutil import readable_by_others
from anyhsm.types import Environment

_MAX_EXPOSED_REPORTED = 10


def config_problems(cfg: Config) -> list[Problem]:
    """The KDF's strength (production), the keystore's permissions and existence, the
    passphrase file, and whether the KDF fits in the time the passphrase path may take."""
    out = _kdf_problems(cfg) + _path_problems(cfg)
    out += secret_file_problems(cfg, "software", "passphrase_file")
    return out + kdf_time_problems(cfg)


def _kdf_problems(cfg: Config) -> list[Problem]:
    kdf = cfg.provider_settings("software").get("kdf")
    if cfg.environment is not Environment.PRODUCTION or not isinstance(kdf, dict):
        return []
    from anyhsm.keystore.kdf import KdfParams

    try:
        weak = KdfParams.from_settings(kdf).weaknesses()
    except ConfigError as e:
        weak = [e.message]
    return [
        Problem(
            "providers.software.kdf",
            repr(kdf),
            w,
            "raise the KDF cost (defaults are production grade)",
        )
        for w in weak
    ]


def _path_problems(cfg: Config) -> list[Problem]:
    ks_path = keystore_path(cfg)
    if not ks_path.exists():
        if cfg.environment is Environment.DEVELOPMENT:
            return []
        return [
            Problem(
                "providers.software.path",
                str(ks_path),
                "the keystore does not exist",
                "create it with 'anyhsm init'",
            )
        ]
    exposed = [ks_path] if readable_by_others(ks_path) else []
    for sub in sorted(ks_path.rglob("*")):
        if sub.is_file() and readable_by_others(sub):
            exposed.append(sub)
    return [
        Problem(
            "providers.software.path",
            str(p),
            "keystore file or directory is accessible to group/others",
            f"chmod go-rwx {p}",
        )
        for p in exposed[:_MAX_EXPOSED_REPORTED]
    ]


def kdf_time_problems(cfg: Config) -> list[Problem]:
    """The passphrase path opens the keystore through its KDF within the provider's
    timeout: a KDF raised past it (``keystore passwd``) makes every open time out. Measured
    here (a scaled-down run, extrapolated) against the KDF the keystore really uses."""
    if "software" not in cfg.fallback.chain:
        return []
    from anyhsm.keystore import Keystore
    from anyhsm.keystore.kdf import open_time_problem

    try:
        params = Keystore.load(keystore_path(cfg)).kdf
    except HsmError:
        return []  # no keystore (yet), or unreadable: reported by the other checks
    timeout = cfg.open_timeout_ms("software")
    why = open_time_problem(params, timeout)
    if why is None:
        return []
    return [
        Problem(
            "providers.software.timeout_ms",
            f"{timeout:.0f}",
            why,
            "raise providers.software.timeout_ms (or fallback.timeout_ms) above the KDF time, "
            "or lower the KDF cost with 'anyhsm keystore passwd'",
        )
    ]
