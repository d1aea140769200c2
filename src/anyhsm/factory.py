"""Provider registry, the fallback chain and the security policy.

:func:`open_hsm` walks the configured chain in order. Each provider's open,
health check and signing probe run in a worker thread bounded by a timeout;
the first provider that passes and meets the minimum security level becomes
active. Anything below the minimum fails closed unless the configuration
gives explicit consent (``fallback.allow_below_minimum``), and every skip is
logged as a warning and written to the audit log.
"""

from __future__ import annotations

import importlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from anyhsm import fsutil, registry
from anyhsm.config import Config, default_min_level
from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import (
    AllProvidersFailed,
    AnchorMismatch,
    AuthenticationFailed,
    ConfigError,
    HsmError,
    KeystoreRolledBack,
    LockTimeout,
    ManifestMissing,
    ProviderNotInstalled,
    ProviderTimeout,
    ProviderUnavailable,
    SecurityLevelTooLow,
    SigningFailed,
)
from anyhsm.hardening import harden_process
from anyhsm.provider import Provider, ProviderContext
from anyhsm.secret import SecretBytes
from anyhsm.types import (
    HEALTH_PROBE_LABEL,
    Environment,
    KeySpec,
    SecurityLevel,
    SigScheme,
)

log = logging.getLogger("anyhsm")

PROVIDERS: dict[str, str] = {spec.name: spec.target for spec in registry.SPECS}
"""Provider name -> import string (from the registry). Imported only when the chain names it."""

PROVIDER_LEVELS: dict[str, SecurityLevel] = {spec.name: spec.level for spec in registry.SPECS}
"""Declared levels, known without importing or opening a provider."""

_EXTRAS = {spec.name: spec.extra for spec in registry.SPECS if spec.extra}

T = TypeVar("T")

STORE_VERDICTS: tuple[type[HsmError], ...] = (
    KeystoreRolledBack,
    AnchorMismatch,
    ManifestMissing,
)
"""Errors that end the chain walk: they judge the store, which every later provider of a
keystore-based chain would open too (a fallback must never be a way around them)."""

COMMON_CAUSES: tuple[type[HsmError], ...] = (AuthenticationFailed, LockTimeout)
"""Kinds of failure that, when every provider tried failed of one of them, are the
chain's error (with its exit status: 5 for a credential, 10 for the lock) instead of
:class:`AllProvidersFailed` (4) or :class:`SecurityLevelTooLow` (7)."""


def common_cause(failures: Sequence[HsmError]) -> HsmError | None:
    """The first failure when all of ``failures`` are of one kind of
    :data:`COMMON_CAUSES` (a wrong, missing or locked credential; the keystore lock),
    else None. Providers skipped by policy (below the floor, refused) were not tried and
    are not in ``failures``: a wrong PIN on the only provider the floor allows is an
    authentication failure, not a security level too low."""
    if not failures:
        return None
    for kind in COMMON_CAUSES:
        if all(isinstance(f, kind) for f in failures):
            return failures[0]
    return None


def restate(cause: HsmError, message: str) -> HsmError:
    """An error of ``cause``'s class (same ``code``, ``exit_code``, hint and attributes,
    such as :attr:`LockTimeout.holder_pid`) with another message and no details."""
    err = type(cause).__new__(type(cause))
    err.__dict__.update(cause.__dict__)
    HsmError.__init__(err, message, hint=cause.hint)
    return err


def load_provider_class(name: str) -> Callable[[ProviderContext], Provider]:
    target = PROVIDERS.get(name)
    if target is None:
        raise ConfigError(f"unknown provider {name!r}", hint="use one of: " + ", ".join(PROVIDERS))
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        extra = _EXTRAS.get(name, "all")
        raise ProviderNotInstalled(
            f"provider {name!r} is not available: {e.name} is not installed",
            hint=f"pip install 'anyhsm[{extra}]'",
        ) from None
    cls: Callable[[ProviderContext], Provider] = getattr(module, attr)
    return cls


def run_bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run ``fn`` in a daemon thread; raise ProviderTimeout if it takes longer.

    A hung device call cannot be interrupted from Python; the thread is left
    behind (daemon) and the provider is abandoned, which is the best any
    caller of a blocking C library can do.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    t = threading.Thread(target=target, name=f"anyhsm-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise ProviderTimeout(
            f"{what} did not answer within {timeout_s * 1000:.0f} ms",
            hint="check the device or raise its timeout_ms",
        )
    if error:
        raise error[0]
    return result[0]


@dataclass
class Attempt:
    """What happened to one provider of the chain when the chain was walked."""

    name: str
    status: str  # "ok" | "unavailable" | "timeout" | "below_minimum" | "refused" | "not_tried"
    reason: str = ""
    elapsed_ms: float = 0.0
    security_level: SecurityLevel | None = None
    error_code: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason or None,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "security_level": (
                self.security_level.label if self.security_level is not None else None
            ),
            "error_code": self.error_code or None,
        }


def resolve_passphrase(
    config: Config, given: SecretBytes | str | bytes | None
) -> SecretBytes | None:
    """Passphrase from the caller, ANYHSM_PASSPHRASE or the configured passphrase file:
    :func:`anyhsm.credentials.resolve_passphrase`, the one resolver (it hardens the
    process first and reads files under the one secret-file rule)."""
    from anyhsm.credentials import resolve_passphrase as resolve

    return resolve(config, given)


def read_secret_file(
    path: Path, what: str, environment: Environment = Environment.PRODUCTION
) -> SecretBytes:
    """The one rule for secret files (:func:`anyhsm.fsutil.read_secret_file`); without an
    environment, the strictest (production's)."""
    return fsutil.read_secret_file(path, what, environment)


def floor_lowered(config: Config) -> bool:
    """True when ``min_security_level`` (file or ``ANYHSM_MIN_SECURITY_LEVEL``) is below
    the environment's default floor (:func:`anyhsm.config.default_min_level`)."""
    level = config.min_security_level
    return level is not None and level < default_min_level(config.environment, config.network)


def check_floor(config: Config) -> None:
    """Lowering the security floor below the environment's default needs the explicit
    consent ``fallback.allow_below_minimum = true``; without it the open fails closed.
    With it, the lowering is logged as a warning (and recorded in the audit log's
    ``open`` entry, see :func:`floor_detail`)."""
    if not floor_lowered(config):
        return
    assert config.min_security_level is not None
    default = default_min_level(config.environment, config.network)
    what = (
        f"min_security_level {config.min_security_level.label} is below the default minimum "
        f"{default.label} for {config.environment.value} on {config.network.value}"
    )
    if not config.fallback.allow_below_minimum:
        raise SecurityLevelTooLow(
            f"{what}; refused without consent",
            hint="remove the override (ANYHSM_MIN_SECURITY_LEVEL or min_security_level), or "
            "give explicit consent with fallback.allow_below_minimum = true",
        )
    log.warning("anyhsm: %s (consented by fallback.allow_below_minimum)", what)


def floor_detail(config: Config) -> dict[str, str]:
    """The floor in force and the environment's default, for the audit log's open entry."""
    return {
        "min_security_level": config.effective_min_level.label,
        "default_min_security_level": default_min_level(config.environment, config.network).label,
        "floor_lowered": "yes" if floor_lowered(config) else "no",
    }


def provider_context(
    config: Config, name: str, passphrase: SecretBytes | None, pin: SecretBytes | None = None
) -> ProviderContext:
    """What provider ``name`` is told: its settings, the passphrase, and the token PIN the
    caller gave (only to the providers that use the token)."""
    settings = config.provider_settings(name)
    if name == "pkcs11-wrapped":
        # The wrapped keystore reaches the token configured under [providers.pkcs11].
        settings = {**config.provider_settings("pkcs11"), **settings}
    timeout_ms = settings.get("timeout_ms", config.fallback.timeout_ms)
    return ProviderContext(
        environment=config.environment,
        network=config.network,
        config_dir=config.config_dir,
        settings=settings,
        software_settings=config.provider_settings("software"),
        passphrase=passphrase,
        pin=pin if registry.uses_token([name]) else None,
        allow_export=config.policy.allow_export,
        timeout_s=float(timeout_ms) / 1000 if isinstance(timeout_ms, int | float) else 2.0,
    )


def refusal(config: Config, name: str) -> str | None:
    """Why policy forbids a provider outright in this deployment, or None (the one rule:
    :func:`anyhsm.providers.simulator_settings.refusal`)."""
    if name == "simulator":
        from anyhsm.providers.simulator_settings import refusal as simulator_refusal

        return simulator_refusal(config.environment, config.network)
    return None


def probe_key(provider: Provider) -> bytes:
    """The public key of the provider's health-probe key, created on first use."""
    for info in provider.list_keys():
        if info.label == HEALTH_PROBE_LABEL:
            return info.public_key
    return provider.generate_key(KeySpec(HEALTH_PROBE_LABEL)).public_key


def signing_probe(provider: Provider, public_key: bytes) -> None:
    """Sign a fresh random digest and verify it against the key we already hold,
    so a provider returning constant or garbage signatures never passes."""
    digest = secrets.token_bytes(32)
    sig = provider.sign_digest(HEALTH_PROBE_LABEL, digest, SigScheme.ECDSA)
    if not curve.ecdsa_verify(public_key, digest, sig):
        raise SigningFailed(
            f"provider {provider.name!r} returned a signature that does not verify",
            hint="the device is faulty or not the one expected; do not use it",
        )


def open_provider(
    config: Config, name: str, passphrase: SecretBytes | None, pin: SecretBytes | None = None
) -> tuple[Provider, bytes]:
    """Construct, open, health-check and probe one provider (unbounded)."""
    cls = load_provider_class(name)
    provider = cls(provider_context(config, name, passphrase, pin))
    try:
        provider.open()
        h = provider.health()
        # "degraded" (e.g. one damaged key record) still serves its intact keys;
        # health keeps reporting it, and the damaged keys fail with their own error.
        if not h.ok and h.status != "degraded":
            raise ProviderUnavailable(
                f"provider {name!r} is unhealthy: {h.reason or h.status}",
                hint="see 'anyhsm health' for details",
            )
        pub = probe_key(provider)
        signing_probe(provider, pub)
    except BaseException:
        try:
            provider.close()
        except HsmError:
            log.debug("closing failed provider %s raised", name)
        raise
    return provider, pub


@dataclass
class ChainResult:
    provider: Provider
    probe_public_key: bytes
    attempts: list[Attempt]


ENROLMENT_REASON = "enrolment only: the keystore opened with the passphrase, below the floor"


def enrolment_chain(config: Config, passphrase: SecretBytes | None) -> ChainResult:
    """The keystore opened with the passphrase whatever the floor, for a handle that may
    only enrol an unlock path (:data:`anyhsm.hsm.ENROLMENT`): on a fresh production
    mainnet deployment nothing reaches the ``tpm`` floor until the TPM (or a token wrap)
    is enrolled. The floor itself is not lowered: the handle refuses every key operation.
    A lowered floor without consent is still refused (:func:`check_floor`)."""
    harden_process(config.environment)
    check_floor(config)
    if passphrase is None:
        from anyhsm.errors import AuthenticationFailed

        raise AuthenticationFailed(
            "opening the keystore to enrol an unlock path (or report its status) below the "
            "floor needs the keystore passphrase",
            hint="set ANYHSM_PASSPHRASE or pass --passphrase-file",
        )
    timeout = provider_context(config, "software", None).timeout_s
    t0 = time.perf_counter()
    provider, pub = run_bounded(
        lambda: open_provider(config, "software", passphrase), timeout, "keystore (enrolment)"
    )
    elapsed = (time.perf_counter() - t0) * 1000
    attempt = Attempt("software", "ok", ENROLMENT_REASON, elapsed, SecurityLevel.SOFTWARE)
    return ChainResult(provider, pub, [attempt])


def walk_chain(
    config: Config, passphrase: SecretBytes | None, pin: SecretBytes | None = None
) -> ChainResult:
    """Open the first healthy provider of the chain that policy allows (``pin``: the
    token PIN the caller gave, for the providers that use the token)."""
    harden_process(config.environment)
    check_floor(config)
    minimum = config.effective_min_level
    attempts: list[Attempt] = []
    failures: list[HsmError] = []  # the errors of the providers actually tried...
    tried: list[str] = []  # ...and their names
    chosen: tuple[Provider, bytes] | None = None
    below: list[str] = []
    for name in config.fallback.chain:
        level = PROVIDER_LEVELS.get(name, SecurityLevel.SIMULATOR)
        if chosen is not None:
            attempts.append(Attempt(name, "not_tried", "an earlier provider is active", 0, level))
            continue
        refused = refusal(config, name)
        if refused:
            attempts.append(Attempt(name, "refused", refused, 0, level, "policy_violation"))
            continue
        if level < minimum and not config.fallback.allow_below_minimum:
            reason = (
                f"security level {level.label} is below the minimum {minimum.label} for "
                f"{config.environment.value} on {config.network.value}"
            )
            attempts.append(
                Attempt(name, "below_minimum", reason, 0, level, "security_level_too_low")
            )
            below.append(name)
            continue
        ctx_timeout = provider_context(config, name, None).timeout_s
        t0 = time.perf_counter()
        try:
            chosen = run_bounded(
                lambda n=name: open_provider(config, n, passphrase, pin),  # type: ignore[misc]
                ctx_timeout,
                f"provider {name!r}",
            )
            attempts.append(Attempt(name, "ok", "", (time.perf_counter() - t0) * 1000, level))
        except ProviderTimeout as e:
            failures.append(e)
            tried.append(name)
            attempts.append(
                Attempt(
                    name, "timeout", e.message, (time.perf_counter() - t0) * 1000, level, e.code
                )
            )
        except STORE_VERDICTS:
            # A verdict on the keystore itself, not on this way of opening it: the next
            # provider would open the same rolled-back or altered store. Fail closed.
            raise
        except HsmError as e:
            failures.append(e)
            tried.append(name)
            attempts.append(
                Attempt(
                    name,
                    "unavailable",
                    e.message + (f" ({e.hint})" if e.hint else ""),
                    (time.perf_counter() - t0) * 1000,
                    level,
                    e.code,
                )
            )
    if chosen is None:
        reasons = "; ".join(f"{a.name}: {a.reason}" for a in attempts)
        err: HsmError
        cause = common_cause(failures)
        if cause is not None:
            # Every provider tried failed for the same reason (a credential, the lock):
            # that is the error, whatever the providers skipped by policy.
            where = next(n for n, f in zip(tried, failures, strict=True) if f is cause)
            others = "; ".join(f"{a.name}: {a.reason}" for a in attempts if a.name != where)
            err = restate(cause, f"{where}: {cause.message}" + (f"; {others}" if others else ""))
        elif below:
            err = SecurityLevelTooLow(
                f"no provider at or above {minimum.label} could be opened ({reasons})",
                hint="fix the hardware provider, or give explicit consent with "
                "fallback.allow_below_minimum = true",
            )
        else:
            err = AllProvidersFailed(
                f"every provider in the chain failed ({reasons})",
                hint="see 'anyhsm health --json' for each provider's reason",
            )
        err.details = [a.to_dict() for a in attempts]
        raise err
    return ChainResult(chosen[0], chosen[1], attempts)
