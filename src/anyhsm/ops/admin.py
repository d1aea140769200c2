"""Administration: init, health, the audit log (verify, show, export, recover), config check,
the keystore's passphrase and master key (passwd, rotate).

Operations that must report a failure in their own shape take an *opener* (a callable
that opens the handle) instead of an open handle: ``health`` prints the health object
even when nothing opens, ``audit_recover`` opens the handle that starts the new chain.
Audit reading (``audit_verify``, ``audit_show``, ``audit_export``) wants a read-only
handle (``verify_only=True``): it appends nothing and works on a damaged log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from anyhsm.errors import ConfigError, HsmError
from anyhsm.ops.data import Data
from anyhsm.types import Environment, Network

if TYPE_CHECKING:
    from anyhsm.audit import VerifyResult
    from anyhsm.audit_query import AuditQuery
    from anyhsm.config import Config, Problem
    from anyhsm.hsm import HealthReport, Hsm
    from anyhsm.keystore.kdf import KdfParams
    from anyhsm.secret import SecretBytes

MIN_RECOVERY_REASON = 8


# --- init --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitResult(Data):
    config: Path  # the config file written (text mode prints it last)
    keystore: Path
    audit_log: Path
    chain: tuple[str, ...]
    enrolled: tuple[str, ...]  # unlock paths enrolled by init: "tpm", "pkcs11-wrap"


def parse_chain(text: str) -> tuple[str, ...]:
    """``tpm,software`` as provider names (blanks ignored)."""
    return tuple(c.strip() for c in text.split(",") if c.strip())


def check_init(
    chain: Sequence[str],
    *,
    environment: Environment,
    network: Network,
    providers: Mapping[str, Mapping[str, object]],
    allow_below_minimum: bool = False,
    insecure_fast_kdf: bool = False,
) -> None:
    """Every refusal ``init`` can make before it needs the passphrase or a device (a chain
    below the floor, a token without its module, the cheap KDF in production): a front
    end asks for the passphrase only after this passes."""
    from anyhsm.deploy import plan_providers

    if insecure_fast_kdf and environment is Environment.PRODUCTION:
        raise ConfigError("--insecure-fast-kdf is refused in production")
    plan_providers(
        list(chain), environment, network, providers, allow_below_minimum=allow_below_minimum
    )


def init(
    directory: Path,
    passphrase: SecretBytes,
    *,
    chain: Sequence[str] = ("software",),
    environment: Environment = Environment.DEVELOPMENT,
    network: Network = Network.REGTEST,
    providers: Mapping[str, Mapping[str, object]] | None = None,
    allow_below_minimum: bool = False,
    insecure_fast_kdf: bool = False,
) -> InitResult:
    """Create a deployment (keystore, config, audit log; the chain's unlock paths
    enrolled) in ``directory``, all or nothing (:func:`anyhsm.deploy.init_deployment`).
    ``providers``: the ``[providers.tpm]`` / ``[providers.pkcs11]`` settings to write
    (values None are left out). The caller keeps (and wipes) ``passphrase``."""
    from anyhsm.deploy import AUDIT_NAME, FAST_DEV_KDF, KEYSTORE_NAME, init_deployment

    tables = providers or {}
    check_init(
        chain,
        environment=environment,
        network=network,
        providers=tables,
        allow_below_minimum=allow_below_minimum,
        insecure_fast_kdf=insecure_fast_kdf,
    )
    path = init_deployment(
        directory,
        passphrase,
        network=network,
        environment=environment,
        kdf=FAST_DEV_KDF if insecure_fast_kdf else None,
        chain=list(chain),
        providers=tables,
        allow_below_minimum=allow_below_minimum,
    )
    enrolled = ["tpm"] if "tpm" in chain else []
    if tables.get("pkcs11", {}).get("wrap_key_label"):
        enrolled.append("pkcs11-wrap")
    return InitResult(
        config=path,
        keystore=path.parent / KEYSTORE_NAME,
        audit_log=path.parent / AUDIT_NAME,
        chain=tuple(chain),
        enrolled=tuple(enrolled),
    )


# --- health ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthOutcome:
    """The health object in every case; ``error`` is the open's failure, when nothing
    could be opened (or the check itself failed): the report then has ``ok`` false and
    every provider's reason, and the error's JSON as its ``error`` member."""

    report: HealthReport
    error: HsmError | None = None

    def to_dict(self) -> dict[str, object]:
        return self.report.to_dict()


def health(open_handle: Callable[[], Hsm], config: Config | None) -> HealthOutcome:
    """The deployment's health (:meth:`Hsm.health`) through the handle ``open_handle``
    opens; when that (or the check) fails, the same shape built from the failure
    (:func:`anyhsm.hsm.health_from_failure`), never an exception for an HsmError."""
    from anyhsm.hsm import health_from_failure

    hsm: Hsm | None = None
    try:
        hsm = open_handle()
        return HealthOutcome(hsm.health())
    except HsmError as e:
        attempts = hsm.attempts if hsm is not None else None
        return HealthOutcome(health_from_failure(e, config, attempts), e)


# --- audit -------------------------------------------------------------------------------------


def audit_verify(hsm: Hsm) -> VerifyResult:
    """Verify the audit chain (a read-only handle: works on a damaged log)."""
    return hsm.verify_audit()


@dataclass(frozen=True)
class AuditShow:
    """The matching entries (as written in the log, ``mac`` included), in log order,
    after the chain was verified; shown even when it does not verify (flagged)."""

    entries: tuple[dict[str, object], ...]
    verify: VerifyResult
    scanned: int
    unreadable_lines: tuple[int, ...] = ()

    @property
    def verified(self) -> bool:
        return self.verify.ok

    def summary(self) -> dict[str, object]:
        """The last object of ``audit show --json`` (JSON lines), with an ``error`` member
        when the chain does not verify."""
        out: dict[str, object] = {
            "summary": {
                "verified": self.verify.ok,
                "verify": self.verify.to_dict(),
                "matched": len(self.entries),
                "scanned": self.scanned,
                "unreadable_lines": list(self.unreadable_lines),
            }
        }
        if not self.verify.ok:
            from anyhsm.errors import AuditTampered

            out["error"] = AuditTampered(
                f"the audit chain does not verify: {self.verify.reason}",
                hint="run 'anyhsm audit verify'; the entries shown are unverified",
            ).to_dict()
        return out

    def to_dict(self) -> dict[str, object]:
        return {"entries": list(self.entries), **self.summary()}


def audit_show(hsm: Hsm, query: AuditQuery) -> AuditShow:
    """The entries ``query`` matches, after verifying the chain (read-only handle)."""
    from anyhsm.audit_query import select

    res = hsm.verify_audit()
    found = select(hsm.audit_path, query)
    return AuditShow(tuple(found.entries), res, found.scanned, tuple(found.unreadable_lines))


@dataclass(frozen=True)
class AuditExport:
    """What ``audit export`` wrote: the summary also written to ``FILE.summary.json``."""

    summary: Mapping[str, object]
    verify: VerifyResult

    def to_dict(self) -> dict[str, object]:
        return dict(self.summary)


def audit_export(hsm: Hsm, out: Path) -> AuditExport:
    """A byte-exact copy of the log (the verified entries, or the whole log as evidence
    when the chain does not verify) and its summary, each 0600 and atomically."""
    from anyhsm.audit_query import export_log

    res = hsm.verify_audit()
    return AuditExport(export_log(hsm.audit_path, out, res), res)


@dataclass(frozen=True)
class AuditRecovery(Data):
    """The new chain started after an accepted loss (what was found, what was lost)."""

    recovered: bool
    detail: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"recovered": self.recovered, **self.detail}


def audit_recover(reason: str, open_with_recovery: Callable[[str], Hsm]) -> AuditRecovery:
    """Start a new audit chain after an operator accepted a loss (the log missing,
    shorter, swapped or replaced); the new chain's first entry records what was lost and
    ``reason``. ``open_with_recovery(reason)`` opens the handle with
    ``audit_recovery=reason``; it refuses (exit 8) when the log matches the record."""
    why = (reason or "").strip()
    if len(why) < MIN_RECOVERY_REASON:
        raise HsmError(
            "say why the loss is accepted", hint="--reason 'TEXT' (recorded in the new chain)"
        )
    hsm = open_with_recovery(why)
    return AuditRecovery(True, dict(hsm.audit_recovery or {}))


# --- config check ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigCheck(Data):
    ok: bool  # no problem of severity "error"
    problems: tuple[Problem, ...]

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")


def config_check(path: Path, env: Mapping[str, str] | None = None) -> ConfigCheck:
    """Every problem of the configuration file at ``path`` at once (structural, then,
    when it builds, the environment's rules and the KDF's open time); a file that is
    missing or not TOML is a ConfigError."""
    from anyhsm.config import check_file

    problems = check_file(path, env)
    return ConfigCheck(not [p for p in problems if p.severity == "error"], tuple(problems))


# --- keystore: passphrase, rotation ---------------------------------------------------------------


@dataclass(frozen=True)
class Rotation:
    """A rotation to a fresh master key: ``epoch``, ``generation``, ``keys`` (how many
    re-encrypted), ``audit_key``; ``changed`` for a passphrase change."""

    summary: Mapping[str, object]
    changed: bool = False

    def to_dict(self) -> dict[str, object]:
        return {"changed": True, **self.summary} if self.changed else dict(self.summary)


def passwd_kdf(config: Config) -> KdfParams:
    """The KDF a new passphrase is derived with: ``[providers.software.kdf]``."""
    from anyhsm.keystore.kdf import KdfParams

    return KdfParams.from_settings(config.provider_settings("software").get("kdf"))


def check_passwd(
    config: Config, new: SecretBytes | None, *, allow_slow_open: bool = False
) -> str | None:
    """The refusals of ``keystore passwd`` that need no open keystore: the production
    rules of ``init`` for the new passphrase and the KDF, and a KDF that would make every
    later open time out (unless ``allow_slow_open``). Returns a note for a slow KDF (over
    a second) for the front end to show, else None."""
    from anyhsm.deploy import require_keystore_rules
    from anyhsm.keystore.kdf import estimate_ms, open_time_problem

    kdf = passwd_kdf(config)
    require_keystore_rules(config.environment, new, kdf, action="re-key")
    why = open_time_problem(kdf, config.open_timeout_ms("software"))
    if why is not None and not allow_slow_open:
        raise ConfigError(
            f"refusing the new KDF parameters: {why}",
            hint="raise providers.software.timeout_ms first, choose a cheaper "
            "[providers.software.kdf], or pass --allow-slow-open",
        )
    est = estimate_ms(kdf)
    if est < 1000:
        return None
    return f"deriving the new passphrase key takes about {est / 1000:.1f} s (please wait)"


def change_passphrase(
    hsm: Hsm,
    current: SecretBytes | None,
    new: SecretBytes,
    *,
    allow_slow_open: bool = False,
    on_slow: Callable[[str], None] | None = None,
) -> Rotation:
    """Change the passphrase and/or raise the KDF cost (``keystore_passwd``): a rotation
    to a fresh master key wrapped by ``new`` under ``[providers.software.kdf]``, so the
    old passphrase and old header copies open nothing created after it. ``current`` is
    checked (AuthenticationFailed when None). ``on_slow`` is told when the KDF takes over
    a second. The caller keeps (and wipes) both secrets."""
    note = check_passwd(hsm.config, new, allow_slow_open=allow_slow_open)
    if note is not None and on_slow is not None and current is not None:
        on_slow(note)  # (without the current passphrase the handle refuses at once)
    return Rotation(hsm.change_passphrase(current, new, kdf=passwd_kdf(hsm.config)), True)


def rotate_master_key(hsm: Hsm, current: SecretBytes | None) -> Rotation:
    """A fresh master key, same passphrase (``rotate_master_key``): every key and unlock
    blob made again, the audit key retired; copies of the old master key (a leaked backup
    plus the passphrase) open nothing created after it. ``current`` is checked."""
    return Rotation(hsm.rotate_master_key(current))
