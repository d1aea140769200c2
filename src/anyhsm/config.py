"""Configuration: a TOML file plus ``ANYHSM_*`` environment overrides, loaded into
typed objects, and a validator that reports every problem at once.

Environment overrides use double underscores for nesting, with values parsed as
TOML where possible: ``ANYHSM_NETWORK=signet``,
``ANYHSM_FALLBACK__CHAIN='["tpm","software"]'``,
``ANYHSM_PROVIDERS__PKCS11__TOKEN_LABEL=prod``. Secrets are never read from
the config file: the passphrase comes from ``ANYHSM_PASSPHRASE`` or a
passphrase file, the PKCS#11 PIN from ``ANYHSM_PKCS11_PIN`` or a PIN file.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from anyhsm import registry
from anyhsm.errors import ConfigError
from anyhsm.fsutil import readable_by_others
from anyhsm.types import Environment, Network, SecurityLevel

KNOWN_PROVIDERS = registry.NAMES

_PROVIDER_KEYS: dict[str, Mapping[str, tuple[type, ...]]] = {
    spec.name: spec.settings for spec in registry.SPECS
}
_KDF_KEYS = {"name": (str,), "memory_kib": (int,), "iterations": (int,), "lanes": (int,)} | {
    "n": (int,),
    "r": (int,),
    "p": (int,),
}
_TOP_KEYS = {
    "environment": (str,),
    "network": (str,),
    "min_security_level": (str,),
    "fallback": (dict,),
    "providers": (dict,),
    "audit": (dict,),
    "policy": (dict,),
    "signer": (dict,),
    "service": (dict,),
}
_SIGNER_KEYS = {"key": (str,), "public_file": (str,)}
SERVICE_OPS = ("read", "sign-digest", "sign-message", "sign-psbt", "admin", "approve")
"""What a ``[[service.clients]]`` entry may be allowed (``ops``)."""
DEFAULT_SERVICE_LISTEN = "127.0.0.1:8420"
_SERVICE_KEYS = {
    "listen": (str,),
    "tls_cert": (str,),
    "tls_key": (str,),
    "tls_client_ca": (str,),
    "max_body_bytes": (int,),
    "max_batch": (int,),
    "max_concurrency": (int,),
    "max_pending": (int,),
    "request_timeout_ms": (int,),
    "rate_limit_per_s": (int, float),
    "rate_limit_burst": (int,),
    "idempotency_entries": (int,),
    "idempotency_ttl_s": (int,),
    "metrics_max_keys": (int,),
    "public_metrics": (bool,),
    "clients": (list,),
}
_SERVICE_CLIENT_KEYS = {
    "name": (str,),
    "token_hash": (str,),
    "keys": (list,),
    "ops": (list,),
    "cert_sha256": (str,),
    "rate_limit_per_s": (int, float),
    "rate_limit_burst": (int,),
}
_SERVICE_MINIMUMS = {
    "max_batch": 1,
    "max_concurrency": 1,
    "request_timeout_ms": 1,
    "rate_limit_burst": 1,
    "idempotency_ttl_s": 1,
    "max_body_bytes": 0,
    "max_pending": 0,
    "idempotency_entries": 0,
    "metrics_max_keys": 0,
}
_FALLBACK_KEYS = {"chain": (list,), "allow_below_minimum": (bool,), "timeout_ms": (int,)}
_AUDIT_KEYS = {
    "path": (str,),
    "durability": (str,),
    "flush_interval_ms": (int,),
    "forward": (str,),
    "syslog_address": (str,),
    "forward_required": (bool,),
}
_POLICY_KEYS = {
    "allow_export": (bool,),
    "allowed_sighash_types": (list,),
    "max_fee_sat": (int,),
    "max_fee_rate_sat_vb": (int, float),
    "deterministic_schnorr": (bool,),
    "require_previous_tx_segwit_v0": (bool,),
    "allowed_input_paths": (list,),
    "key_input_paths": (dict,),
    "max_change_index": (int,),
    "max_psbt_bytes": (int,),
    "max_inputs": (int,),
    "max_outputs": (int,),
    "max_derivations_per_map": (int,),
    "max_path_depth": (int,),
    "max_tx_weight": (int,),
    "max_key_derivations": (int,),
    "max_legacy_sighash_bytes": (int,),
    "spending_policy": (str,),
    "spending_state_dir": (str,),
}
_POLICY_LIMITS = (
    "max_change_index",
    "max_psbt_bytes",
    "max_inputs",
    "max_outputs",
    "max_derivations_per_map",
    "max_path_depth",
    "max_tx_weight",
    "max_key_derivations",
    "max_legacy_sighash_bytes",
)
_SECRET_NAMES = ("pin", "passphrase", "password", "secret")
_NOT_OVERRIDES = {"ANYHSM_PASSPHRASE", "ANYHSM_PKCS11_PIN", "ANYHSM_CONFIG"}


CONFIG_FILE_NAME = "anyhsm.toml"
SYSTEM_CONFIG_DIR = Path("/etc/anyhsm")


def config_search_path(
    env: Mapping[str, str] | None = None,
    *,
    cwd: Path | None = None,
    system_dir: Path = SYSTEM_CONFIG_DIR,
) -> list[Path]:
    """Where a config file is looked for when none is named, in order: the working
    directory, the user's ($XDG_CONFIG_HOME, default ~/.config, per the XDG base
    directory spec: a relative value is ignored), the system's."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_CONFIG_HOME", "")
    if not xdg or not os.path.isabs(xdg):
        home = env.get("HOME") or str(Path.home())
        xdg = os.path.join(home, ".config")
    return [
        (cwd or Path.cwd()) / CONFIG_FILE_NAME,
        Path(xdg) / "anyhsm" / CONFIG_FILE_NAME,
        system_dir / CONFIG_FILE_NAME,
    ]


def find_config(
    explicit: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    cwd: Path | None = None,
    system_dir: Path = SYSTEM_CONFIG_DIR,
) -> Path:
    """The config file to use: ``explicit`` (``--config``), else ``ANYHSM_CONFIG``, else
    the first file that exists on :func:`config_search_path`. A named file is returned
    even if missing (loading it then says so): naming one never falls back elsewhere."""
    env = os.environ if env is None else env
    named = explicit or env.get("ANYHSM_CONFIG")
    if named:
        return Path(named).expanduser()
    searched = config_search_path(env, cwd=cwd, system_dir=system_dir)
    for candidate in searched:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        "no configuration file given or found (searched: "
        + ", ".join(str(p) for p in searched)
        + ")",
        hint="pass --config PATH, set ANYHSM_CONFIG, or create one with 'anyhsm init --dir DIR'",
    )


def default_min_level(environment: Environment, network: Network) -> SecurityLevel:
    """Development: anything; staging and production on test networks: software;
    production on mainnet: hardware-backed (tpm or better)."""
    if environment is Environment.DEVELOPMENT:
        return SecurityLevel.SIMULATOR
    if environment is Environment.PRODUCTION and network is Network.MAINNET:
        return SecurityLevel.TPM
    return SecurityLevel.SOFTWARE


@dataclass(frozen=True)
class Problem:
    """One configuration finding: the setting, its value, what is wrong, the fix."""

    setting: str
    value: str
    message: str
    fix: str
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        return f"{self.severity}: {self.setting} = {self.value}: {self.message} (fix: {self.fix})"

    def to_dict(self) -> dict[str, str]:
        return {
            "severity": self.severity,
            "setting": self.setting,
            "value": self.value,
            "message": self.message,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class FallbackConfig:
    chain: tuple[str, ...] = ("software",)
    allow_below_minimum: bool = False
    timeout_ms: int = 2000


@dataclass(frozen=True)
class AuditConfig:
    path: Path | None = None
    durability: str = "batched"  # "batched" | "fsync"
    flush_interval_ms: int = 5
    forward: str = "none"  # "none" | "syslog": a copy of each entry as it is written
    syslog_address: str = ""  # a Unix datagram socket path, or host:port (UDP); "" = /dev/log
    forward_required: bool = False  # a failed forward fails the operation


@dataclass(frozen=True)
class PolicyConfig:
    allow_export: bool = False
    allowed_sighash_types: tuple[int, ...] = (0, 1)
    max_fee_sat: int = 10_000_000  # 0.1 BTC
    max_fee_rate_sat_vb: float = 1000.0
    deterministic_schnorr: bool = False
    # PSBT signing policy (docs/bitcoin.md, "Signing policy"): the previous transaction of
    # every segwit v0 input we sign (false is refused by 'config check' in production)
    require_previous_tx_segwit_v0: bool = True
    # BIP32 path prefixes an HD key may sign inputs under; empty: the network's defaults
    allowed_input_paths: tuple[str, ...] = ()
    key_input_paths: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # per label
    max_change_index: int = 100_000  # change index must be below this
    # resource limits, checked before any key is derived (anyhsm.bitcoin.limits)
    max_psbt_bytes: int = 4_000_000
    max_inputs: int = 2_500
    max_outputs: int = 2_500
    max_derivations_per_map: int = 20
    max_path_depth: int = 12
    max_tx_weight: int = 400_000
    max_key_derivations: int = 5_000
    max_legacy_sighash_bytes: int = 20_000_000
    # the spending policy (docs/policy.md): when set, signing needs an active policy (made
    # so by 'anyhsm policy set') equal to this file; None: only a policy set by that step
    spending_policy: Path | None = None
    # where the active policy, its binding and the velocity counters are kept; None:
    # beside the keystore (``<keystore>.policy``)
    spending_state_dir: Path | None = None


@dataclass(frozen=True)
class SignerConfig:
    """``[signer]``: what ``anyhsm-signer`` (the Bitcoin Core external signer) exposes.

    ``key``: the label (or id) of the HD key it offers (``ANYHSM_SIGNER_KEY``, read by
    the signer itself, takes precedence). ``public_file``: where it keeps its public key
    index (fingerprints and labels, nothing secret); None: the signer's default."""

    key: str | None = None
    public_file: Path | None = None


@dataclass(frozen=True)
class ServiceClient:
    """One ``[[service.clients]]`` entry: a name, the salted hash of its token (never the
    token), the keys (ids, labels or fnmatch label patterns) and ops it may use, an
    optional client-certificate binding and rate limit."""

    name: str
    token_hash: str
    keys: tuple[str, ...]
    ops: tuple[str, ...]
    cert_sha256: str | None = None
    rate_limit_per_s: float | None = None
    rate_limit_burst: int | None = None


@dataclass(frozen=True)
class ServiceConfig:
    """``[service]``: the signing service (``anyhsm serve``, docs/service.md)."""

    listen: str = DEFAULT_SERVICE_LISTEN
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    max_body_bytes: int = 0  # 0: derived from policy.max_psbt_bytes
    max_batch: int = 1000
    max_concurrency: int = 4
    max_pending: int = 64
    request_timeout_ms: int = 30_000
    rate_limit_per_s: float = 1000.0
    rate_limit_burst: int = 2000
    idempotency_entries: int = 10_000
    idempotency_ttl_s: int = 86_400
    metrics_max_keys: int = 100
    public_metrics: bool = False
    clients: tuple[ServiceClient, ...] = ()


@dataclass(frozen=True)
class Config:
    """Typed configuration. Build with :meth:`load` or :meth:`from_mapping`."""

    environment: Environment = Environment.DEVELOPMENT
    network: Network = Network.REGTEST
    min_security_level: SecurityLevel | None = None  # None: the environment's default
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    providers: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    audit: AuditConfig = field(default_factory=AuditConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    signer: SignerConfig = field(default_factory=SignerConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    config_dir: Path = field(default_factory=Path.cwd)
    source: Path | None = None
    raw: Mapping[str, object] = field(default_factory=dict, repr=False)

    @property
    def effective_min_level(self) -> SecurityLevel:
        if self.min_security_level is not None:
            return self.min_security_level
        return default_min_level(self.environment, self.network)

    def provider_settings(self, name: str) -> dict[str, object]:
        return dict(self.providers.get(name, {}))

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.config_dir / p

    # --- loading ----------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, env: Mapping[str, str] | None = None) -> Config:
        p, raw = _read_file(path)
        return cls.from_mapping(raw, config_dir=p.parent, source=p, env=env)

    @classmethod
    def from_mapping(
        cls,
        raw: Mapping[str, object],
        *,
        config_dir: Path | None = None,
        source: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Config:
        """Build a Config; raise ConfigError listing every structural problem."""
        merged = apply_env_overrides(dict(raw), os.environ if env is None else env)
        problems = structural_problems(merged)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise ConfigError(
                f"configuration has {len(errors)} problem(s): "
                + "; ".join(f"{p.setting}: {p.message}" for p in errors),
                hint="run 'anyhsm config check' for the full report",
                problems=[str(p) for p in errors],
            )
        return _build(merged, config_dir or Path.cwd(), source)

    def check(self) -> list[Problem]:
        """Every problem, structural and environment-specific (production rules), and
        whether the keystore's KDF fits in the time its provider has to open."""
        return structural_problems(self.raw) + semantic_problems(self)

    def open_timeout_ms(self, provider: str) -> float:
        """The bound on ``provider``'s open (its own timeout_ms, else the fallback's)."""
        value = self.provider_settings(provider).get("timeout_ms", self.fallback.timeout_ms)
        return float(value) if isinstance(value, int | float) else float(self.fallback.timeout_ms)


def _parse_env_value(text: str) -> object:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _read_file(path: str | Path) -> tuple[Path, dict[str, object]]:
    """The resolved path and the parsed TOML of a config file (ConfigError otherwise)."""
    p = Path(path).expanduser().resolve()
    try:
        return p, tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"config file {p} does not exist",
            hint="create one with 'anyhsm init --dir DIR' or pass --config",
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None


def check_file(path: str | Path, env: Mapping[str, str] | None = None) -> list[Problem]:
    """Every problem of the config file at ``path`` at once (``anyhsm config check``):
    the structural ones, and when none of them is an error, :meth:`Config.check`'s
    (which repeats them, with the environment's rules and the KDF's open time). A file
    that is missing or not TOML is a ConfigError, as for :meth:`Config.load`."""
    p, raw = _read_file(path)
    environ = os.environ if env is None else env
    problems = structural_problems(apply_env_overrides(dict(raw), environ))
    if any(pr.severity == "error" for pr in problems):
        return problems
    return Config.from_mapping(raw, config_dir=p.parent, source=p, env=environ).check()


def apply_env_overrides(raw: dict[str, object], env: Mapping[str, str]) -> dict[str, object]:
    out: dict[str, object] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for name, value in sorted(env.items()):
        if not name.startswith("ANYHSM_") or name in _NOT_OVERRIDES:
            continue
        parts = [p.lower() for p in name[len("ANYHSM_") :].split("__")]
        if parts[0] not in _TOP_KEYS:
            continue
        if parts[0] == "providers" and len(parts) > 1:
            parts[1] = parts[1].replace("_", "-") if parts[1] == "pkcs11_wrapped" else parts[1]
        node: dict[str, object] = out
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = _parse_env_value(value)
    return out


def _type_ok(value: object, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _check_table(
    table: Mapping[str, object],
    known: Mapping[str, tuple[type, ...]],
    prefix: str,
    problems: list[Problem],
) -> None:
    for key, value in table.items():
        setting = f"{prefix}{key}"
        if any(s in key.lower() for s in _SECRET_NAMES) and key not in known:
            problems.append(
                Problem(
                    setting,
                    "<hidden>",
                    "secrets must never be written in the config file",
                    "remove it; use ANYHSM_PASSPHRASE / ANYHSM_PKCS11_PIN or a 0600 file "
                    "named by passphrase_file / pin_file",
                )
            )
            continue
        if key not in known:
            problems.append(
                Problem(
                    setting,
                    repr(value),
                    "unknown setting",
                    "remove it or fix its spelling; known: " + ", ".join(sorted(known)),
                )
            )
            continue
        if not _type_ok(value, known[key]):
            want = " or ".join(t.__name__ for t in known[key])
            problems.append(
                Problem(setting, repr(value), f"must be of type {want}", f"write a {want}")
            )


def structural_problems(raw: Mapping[str, object]) -> list[Problem]:
    """Unknown keys, wrong types and invalid enumerations."""
    problems: list[Problem] = []
    _check_table(raw, _TOP_KEYS, "", problems)
    env = raw.get("environment", "development")
    if isinstance(env, str) and env not in {e.value for e in Environment}:
        problems.append(
            Problem(
                "environment",
                repr(env),
                "unknown environment",
                "use development, staging or production",
            )
        )
    net = raw.get("network", "regtest")
    if isinstance(net, str) and net not in {n.value for n in Network}:
        problems.append(
            Problem(
                "network",
                repr(net),
                "unknown network",
                "use mainnet, testnet, testnet4, signet or regtest",
            )
        )
    level = raw.get("min_security_level")
    if isinstance(level, str):
        try:
            SecurityLevel.parse(level)
        except ConfigError:
            problems.append(
                Problem(
                    "min_security_level",
                    repr(level),
                    "unknown security level",
                    "use simulator, software, tpm, hsm-wrapped or hsm",
                )
            )
    for name, known in (
        ("fallback", _FALLBACK_KEYS),
        ("audit", _AUDIT_KEYS),
        ("signer", _SIGNER_KEYS),
    ):
        table = raw.get(name, {})
        if isinstance(table, dict):
            _check_table(table, known, f"{name}.", problems)
    policy = raw.get("policy", {})
    if isinstance(policy, dict):
        _check_table(policy, _POLICY_KEYS, "policy.", problems)
    service = raw.get("service", {})
    if isinstance(service, dict):
        problems += _service_problems(service)
    fb = raw.get("fallback", {})
    if isinstance(fb, dict):
        chain = fb.get("chain", ["software"])
        if isinstance(chain, list):
            if not chain:
                problems.append(
                    Problem(
                        "fallback.chain", "[]", "the chain is empty", "list at least one provider"
                    )
                )
            for item in chain:
                if item not in KNOWN_PROVIDERS:
                    problems.append(
                        Problem(
                            "fallback.chain",
                            repr(item),
                            "unknown provider",
                            "use one of: " + ", ".join(KNOWN_PROVIDERS),
                        )
                    )
            if len(set(map(str, chain))) != len(chain):
                problems.append(
                    Problem(
                        "fallback.chain",
                        repr(chain),
                        "a provider is listed twice",
                        "list each provider once",
                    )
                )
    audit = raw.get("audit", {})
    if isinstance(audit, dict):
        dur = audit.get("durability", "batched")
        if isinstance(dur, str) and dur not in ("batched", "fsync"):
            problems.append(
                Problem("audit.durability", repr(dur), "unknown mode", "use batched or fsync")
            )
        fwd = audit.get("forward", "none")
        if fwd not in ("none", "syslog"):
            problems.append(
                Problem("audit.forward", repr(fwd), "unknown forwarding", "use none or syslog")
            )
    providers = raw.get("providers", {})
    if isinstance(providers, dict):
        for pname, table in providers.items():
            if pname not in _PROVIDER_KEYS:
                problems.append(
                    Problem(
                        f"providers.{pname}",
                        "{...}",
                        "unknown provider table",
                        "use one of: " + ", ".join(KNOWN_PROVIDERS),
                    )
                )
                continue
            if not isinstance(table, dict):
                problems.append(
                    Problem(f"providers.{pname}", repr(table), "must be a table", "write a table")
                )
                continue
            _check_table(table, _PROVIDER_KEYS[pname], f"providers.{pname}.", problems)
            kdf = table.get("kdf") if pname == "software" else None
            if isinstance(kdf, dict):
                _check_table(kdf, _KDF_KEYS, "providers.software.kdf.", problems)
    return problems


_CLIENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TOKEN_HASH = re.compile(r"sha256:[0-9a-f]{64}:[0-9a-f]{64}")
_LISTEN = re.compile(r"\[[0-9A-Fa-f:.]+\]:(\d{1,5})|[^:\[\]\s]+:(\d{1,5})")


def _service_problems(sv: Mapping[str, object]) -> list[Problem]:
    """``[service]`` and its ``[[service.clients]]``: keys, types, ranges, the client
    entries, and the TLS settings that only make sense together."""
    problems: list[Problem] = []
    _check_table(sv, _SERVICE_KEYS, "service.", problems)
    listen = sv.get("listen", DEFAULT_SERVICE_LISTEN)
    if isinstance(listen, str):
        m = _LISTEN.fullmatch(listen.strip())
        if m is None or int(m.group(1) or m.group(2)) > 65535:
            problems.append(
                Problem("service.listen", repr(listen), "not HOST:PORT", "e.g. 127.0.0.1:8420")
            )
    for name, low in _SERVICE_MINIMUMS.items():
        value = sv.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value < low:
            problems.append(
                Problem(f"service.{name}", repr(value), f"must be at least {low}", f"use >= {low}")
            )
    rate = sv.get("rate_limit_per_s")
    if isinstance(rate, int | float) and not isinstance(rate, bool) and rate < 0:
        problems.append(
            Problem("service.rate_limit_per_s", repr(rate), "must not be negative", "0: no limit")
        )
    if ("tls_cert" in sv) != ("tls_key" in sv):
        problems.append(
            Problem(
                "service.tls_cert",
                "<set>" if "tls_cert" in sv else "<unset>",
                "tls_cert and tls_key go together",
                "set both or neither",
            )
        )
    if "tls_client_ca" in sv and "tls_cert" not in sv:
        problems.append(
            Problem(
                "service.tls_client_ca",
                repr(sv["tls_client_ca"]),
                "mutual TLS needs TLS",
                "set tls_cert and tls_key",
            )
        )
    clients = sv.get("clients", [])
    if not isinstance(clients, list):
        return problems
    names: set[str] = set()
    for n, c in enumerate(clients):
        where = f"service.clients[{n}]"
        if not isinstance(c, dict):
            problems.append(Problem(where, repr(c), "must be a table", "write [[service.clients]]"))
            continue
        _check_table(c, _SERVICE_CLIENT_KEYS, f"{where}.", problems)
        for req in ("name", "token_hash", "keys", "ops"):
            if req not in c:
                problems.append(
                    Problem(f"{where}.{req}", "<missing>", "required", "anyhsm service add-client")
                )
        cname = c.get("name")
        if isinstance(cname, str):
            if not _CLIENT_NAME.fullmatch(cname):
                problems.append(
                    Problem(
                        f"{where}.name", repr(cname), "1 to 64 of A-Z a-z 0-9 . _ -", "rename it"
                    )
                )
            elif cname in names:
                problems.append(Problem(f"{where}.name", repr(cname), "named twice", "rename one"))
            names.add(cname)
        th = c.get("token_hash")
        if isinstance(th, str) and not _TOKEN_HASH.fullmatch(th):
            problems.append(
                Problem(
                    f"{where}.token_hash",
                    "<hidden>",
                    "not sha256:<salt>:<hash>",
                    "anyhsm service add-client",
                )
            )
        keys = c.get("keys")
        if isinstance(keys, list) and (not keys or not all(isinstance(k, str) and k for k in keys)):
            problems.append(
                Problem(
                    f"{where}.keys",
                    repr(keys),
                    "a non-empty list of key ids, labels or patterns",
                    "list keys",
                )
            )
        ops = c.get("ops")
        if isinstance(ops, list):
            bad = [o for o in ops if o not in SERVICE_OPS]
            if not ops or bad:
                problems.append(
                    Problem(
                        f"{where}.ops",
                        repr(ops),
                        "a non-empty list of known ops",
                        "use " + ", ".join(SERVICE_OPS),
                    )
                )
        cert = c.get("cert_sha256")
        if isinstance(cert, str):
            if not re.fullmatch(r"[0-9a-f]{64}", cert.replace(":", "").lower()):
                problems.append(
                    Problem(
                        f"{where}.cert_sha256",
                        repr(cert),
                        "not a SHA-256 (64 hex digits)",
                        "openssl x509 -outform der | sha256sum",
                    )
                )
            elif "tls_client_ca" not in sv:
                problems.append(
                    Problem(
                        f"{where}.cert_sha256",
                        repr(cert),
                        "bound to a certificate, but service.tls_client_ca is "
                        "not set: the binding could never be checked",
                        "set tls_client_ca (mutual TLS) or remove cert_sha256",
                    )
                )
    return problems


def _loopback(listen: str) -> bool:
    import ipaddress

    host = listen.strip().rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _service_semantics(cfg: Config) -> list[Problem]:
    """What makes ``anyhsm serve`` refuse to start: another address than loopback without
    TLS, or without any client; files named that are not there."""
    sv = cfg.service
    out: list[Problem] = []
    if not _loopback(sv.listen) and (sv.tls_cert is None or not sv.clients):
        out.append(
            Problem(
                "service.listen",
                repr(sv.listen),
                "not a loopback address, and TLS or a client is missing: the service "
                "refuses to start",
                "listen on 127.0.0.1, or set tls_cert, tls_key and [[service.clients]]",
            )
        )
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        p = getattr(sv, name)
        if p is not None and not p.is_file():
            out.append(Problem(f"service.{name}", str(p), "no such file", "fix the path"))
    key = sv.tls_key
    if key is not None and key.is_file() and readable_by_others(key):
        severity = "error" if cfg.environment is not Environment.DEVELOPMENT else "warning"
        out.append(
            Problem(
                "service.tls_key",
                str(key),
                "secret file is accessible to group/others",
                f"chmod 600 {key}",
                severity,
            )
        )
    return out


def _service(raw: Mapping[str, object], cfg: Config) -> ServiceConfig:
    sv = raw.get("service", {})
    assert isinstance(sv, dict)
    base = ServiceConfig()

    def num(name: str) -> int:
        v = sv.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) else getattr(base, name)

    def path(name: str) -> Path | None:
        v = sv.get(name)
        return cfg.resolve(v) if isinstance(v, str) and v else None

    rate = sv.get("rate_limit_per_s", base.rate_limit_per_s)
    clients: list[ServiceClient] = []
    for c in sv.get("clients", []):
        if not isinstance(c, dict):
            continue
        cr = c.get("rate_limit_per_s")
        cb = c.get("rate_limit_burst")
        cert = c.get("cert_sha256")
        clients.append(
            ServiceClient(
                name=str(c.get("name", "")),
                token_hash=str(c.get("token_hash", "")),
                keys=tuple(str(k) for k in c.get("keys", [])),
                ops=tuple(str(o) for o in c.get("ops", [])),
                cert_sha256=cert.replace(":", "").lower() if isinstance(cert, str) else None,
                rate_limit_per_s=float(cr) if isinstance(cr, int | float) else None,
                rate_limit_burst=cb if isinstance(cb, int) else None,
            )
        )
    return ServiceConfig(
        listen=str(sv.get("listen", base.listen)),
        tls_cert=path("tls_cert"),
        tls_key=path("tls_key"),
        tls_client_ca=path("tls_client_ca"),
        max_body_bytes=num("max_body_bytes"),
        max_batch=num("max_batch"),
        max_concurrency=num("max_concurrency"),
        max_pending=num("max_pending"),
        request_timeout_ms=num("request_timeout_ms"),
        rate_limit_per_s=float(rate) if isinstance(rate, int | float) else base.rate_limit_per_s,
        rate_limit_burst=num("rate_limit_burst"),
        idempotency_entries=num("idempotency_entries"),
        idempotency_ttl_s=num("idempotency_ttl_s"),
        metrics_max_keys=num("metrics_max_keys"),
        public_metrics=bool(sv.get("public_metrics", False)),
        clients=tuple(clients),
    )


def _limit(po: Mapping[str, object], name: str) -> int:
    """An integer [policy] limit, or its PolicyConfig default."""
    value = po.get(name)
    default: int = getattr(PolicyConfig, name)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _path_in(config_dir: Path, value: object) -> Path | None:
    """A path setting resolved against the config's directory; None when unset or empty."""
    if not isinstance(value, str) or not value:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else config_dir / p


def _build(raw: Mapping[str, object], config_dir: Path, source: Path | None) -> Config:
    fb = raw.get("fallback", {})
    au = raw.get("audit", {})
    po = raw.get("policy", {})
    pr = raw.get("providers", {})
    si = raw.get("signer", {})
    assert isinstance(fb, dict) and isinstance(au, dict)
    assert isinstance(po, dict) and isinstance(pr, dict) and isinstance(si, dict)
    level = raw.get("min_security_level")
    audit_path = au.get("path")
    cfg = Config(
        environment=Environment(str(raw.get("environment", "development"))),
        network=Network(str(raw.get("network", "regtest"))),
        min_security_level=SecurityLevel.parse(level) if isinstance(level, str) else None,
        fallback=FallbackConfig(
            chain=tuple(str(x) for x in fb.get("chain", ["software"])),
            allow_below_minimum=bool(fb.get("allow_below_minimum", False)),
            timeout_ms=int(fb.get("timeout_ms", 2000)),
        ),
        providers={str(k): dict(v) for k, v in pr.items() if isinstance(v, dict)},
        audit=AuditConfig(
            path=None,
            durability=str(au.get("durability", "batched")),
            flush_interval_ms=int(au.get("flush_interval_ms", 5)),
            forward=str(au.get("forward", "none")),
            syslog_address=str(au.get("syslog_address", "")),
            forward_required=bool(au.get("forward_required", False)),
        ),
        policy=PolicyConfig(
            allow_export=bool(po.get("allow_export", False)),
            allowed_sighash_types=tuple(int(x) for x in po.get("allowed_sighash_types", [0, 1])),
            max_fee_sat=int(po.get("max_fee_sat", 10_000_000)),
            max_fee_rate_sat_vb=float(po.get("max_fee_rate_sat_vb", 1000.0)),
            deterministic_schnorr=bool(po.get("deterministic_schnorr", False)),
            require_previous_tx_segwit_v0=bool(po.get("require_previous_tx_segwit_v0", True)),
            allowed_input_paths=tuple(str(x) for x in po.get("allowed_input_paths", [])),
            key_input_paths={
                str(k): tuple(str(x) for x in v)
                for k, v in dict(po.get("key_input_paths", {})).items()
                if isinstance(v, list)
            },
            max_change_index=_limit(po, "max_change_index"),
            max_psbt_bytes=_limit(po, "max_psbt_bytes"),
            max_inputs=_limit(po, "max_inputs"),
            max_outputs=_limit(po, "max_outputs"),
            max_derivations_per_map=_limit(po, "max_derivations_per_map"),
            max_path_depth=_limit(po, "max_path_depth"),
            max_tx_weight=_limit(po, "max_tx_weight"),
            max_key_derivations=_limit(po, "max_key_derivations"),
            max_legacy_sighash_bytes=_limit(po, "max_legacy_sighash_bytes"),
            spending_policy=_path_in(config_dir, po.get("spending_policy")),
            spending_state_dir=_path_in(config_dir, po.get("spending_state_dir")),
        ),
        signer=SignerConfig(key=si["key"] if isinstance(si.get("key"), str) else None),
        config_dir=config_dir,
        source=source,
        raw=dict(raw),
    )
    public_file = si.get("public_file")
    if isinstance(public_file, str) and public_file:
        cfg = replace(cfg, signer=replace(cfg.signer, public_file=cfg.resolve(public_file)))
    if isinstance(audit_path, str) and audit_path:
        cfg = _replace_audit_path(cfg, cfg.resolve(audit_path))
    if isinstance(raw.get("service"), dict):
        cfg = replace(cfg, service=_service(raw, cfg))
    return cfg


def _replace_audit_path(cfg: Config, path: Path) -> Config:
    return replace(cfg, audit=replace(cfg.audit, path=path))


def _policy_problems(cfg: Config, prod: bool) -> list[Problem]:
    """The PSBT signing policy: relaxations refused in production, limits and path
    patterns that cannot work."""
    from anyhsm.bitcoin.paths import pattern_problem

    out: list[Problem] = []
    po = cfg.policy
    if not po.require_previous_tx_segwit_v0:
        out.append(
            Problem(
                "policy.require_previous_tx_segwit_v0",
                "false",
                "segwit v0 inputs are signed without their previous transaction: a submitter "
                "can lie about their amounts and make the fee larger than shown",
                "set it to true (the default)",
                "error" if prod else "warning",
            )
        )
    for name in _POLICY_LIMITS:
        value = getattr(po, name)
        if value < 1:
            out.append(Problem(f"policy.{name}", str(value), "must be at least 1", "raise it"))
    if po.spending_policy is not None and not po.spending_policy.is_file():
        out.append(
            Problem(
                "policy.spending_policy",
                str(po.spending_policy),
                "the spending policy file does not exist: every signing is refused",
                "write it (docs/policy.md) and run 'anyhsm policy set' once",
            )
        )
    tables = [("policy.allowed_input_paths", po.allowed_input_paths)]
    tables += [(f"policy.key_input_paths.{k}", v) for k, v in po.key_input_paths.items()]
    for setting, patterns in tables:
        for pattern in patterns:
            why = pattern_problem(pattern)
            if why is not None:
                out.append(
                    Problem(
                        setting,
                        repr(pattern),
                        why,
                        "write an account prefix such as \"m/84'/0'/*'\"",
                    )
                )
    return out


def semantic_problems(cfg: Config) -> list[Problem]:
    """Rules that depend on the environment and network, and on files on disk: the
    deployment-wide ones here, then each provider's own checks (next to its settings
    parser, named by its registry spec) for every provider the config involves."""
    out = _deployment_problems(cfg) + _service_semantics(cfg)
    tables = list(cfg.providers)
    for spec in registry.SPECS:
        if registry.involved(spec, cfg.fallback.chain, tables):
            check = spec.load_config_checks()
            out += check(cfg) if check is not None else []
    return out


def _deployment_problems(cfg: Config) -> list[Problem]:
    """The floor, the audit log, the policy, the network: rules of no one provider."""
    out: list[Problem] = []
    prod = cfg.environment is Environment.PRODUCTION
    default = default_min_level(cfg.environment, cfg.network)
    chain = cfg.fallback.chain
    if cfg.min_security_level is not None and cfg.min_security_level < default:
        consented = cfg.fallback.allow_below_minimum
        out.append(
            Problem(
                "min_security_level",
                cfg.min_security_level.label,
                f"lowers the default minimum ({default.label}) for "
                f"{cfg.environment.value}/{cfg.network.value}"
                + (
                    " (consented by fallback.allow_below_minimum; recorded in the audit log)"
                    if consented
                    else "; opening is refused without consent"
                ),
                "remove the override (min_security_level or ANYHSM_MIN_SECURITY_LEVEL)"
                + ("" if consented else ", or consent with fallback.allow_below_minimum = true"),
                "warning" if consented else "error",
            )
        )
    if cfg.audit.path is None:
        out.append(
            Problem(
                "audit.path",
                "<unset>",
                "no audit log path is configured",
                'set [audit] path = "audit.log"',
                "error" if cfg.environment is not Environment.DEVELOPMENT else "warning",
            )
        )
    if prod and cfg.fallback.allow_below_minimum:
        out.append(
            Problem(
                "fallback.allow_below_minimum",
                "true",
                "production may fall back below its minimum security level",
                "set it to false unless a software fallback is an accepted risk",
                "warning",
            )
        )
    out += _policy_problems(cfg, prod)
    if prod and cfg.policy.allow_export:
        out.append(
            Problem(
                "policy.allow_export",
                "true",
                "private keys may be exported in production",
                "set it to false",
                "warning",
            )
        )
    levels = [registry.level(p) for p in chain]
    if levels and max(levels) < cfg.effective_min_level and not cfg.fallback.allow_below_minimum:
        out.append(
            Problem(
                "fallback.chain",
                repr(list(chain)),
                f"no provider in the chain reaches the minimum level "
                f"{cfg.effective_min_level.label} for {cfg.environment.value} on "
                f"{cfg.network.value}; opening will always fail",
                "add a tpm or pkcs11 provider, or give explicit consent with "
                "fallback.allow_below_minimum = true",
            )
        )
    uses_keystore = registry.opens_keystore(chain) or "software" in cfg.providers
    if not uses_keystore and cfg.environment is not Environment.DEVELOPMENT:
        out.append(
            Problem(
                "providers.software",
                "<unset>",
                "no keystore: the audit key would be kept in a plain file beside the log",
                "add [providers.software] path = \"keystore\" (created by 'anyhsm init')",
            )
        )
    if cfg.network is Network.MAINNET and cfg.environment is not Environment.PRODUCTION:
        out.append(
            Problem(
                "network",
                "mainnet",
                f"mainnet in {cfg.environment.value}: real funds under non-production rules",
                'use environment = "production" for mainnet, or a test network',
                "warning",
            )
        )
    return out


def secret_file_problems(cfg: Config, provider: str, key: str) -> list[Problem]:
    """A secret file named by ``[providers.<provider>] <key>``: it must exist and be
    closed to group and others (the rule applied at run time by
    :func:`anyhsm.fsutil.check_secret_mode`)."""
    f = cfg.provider_settings(provider).get(key)
    if not isinstance(f, str):
        return []
    fp = cfg.resolve(f)
    if not fp.exists():
        return [
            Problem(
                f"providers.{provider}.{key}",
                str(fp),
                "file does not exist",
                "create it (mode 0600) or fix the path",
            )
        ]
    if readable_by_others(fp):
        return [
            Problem(
                f"providers.{provider}.{key}",
                str(fp),
                "secret file is accessible to group/others",
                f"chmod 600 {fp}",
                "error" if cfg.environment is not Environment.DEVELOPMENT else "warning",
            )
        ]
    return []


def keystore_path(cfg: Config) -> Path:
    """Where the keystore of this deployment is (``[providers.software] path``)."""
    return cfg.resolve(str(cfg.provider_settings("software").get("path", "keystore")))
