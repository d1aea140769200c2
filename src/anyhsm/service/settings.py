"""What the signing service is told: where to listen, TLS, its clients and its limits.

The ``[service]`` table and its ``[[service.clients]]`` are typed by :mod:`anyhsm.config`
(``Config.service``); :func:`from_config` turns them into :class:`ServiceSettings`, the
one object the service reads. Tests and programs that embed the service may build
:class:`ServiceSettings` directly.
"""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from anyhsm.config import ServiceConfig
from anyhsm.errors import ConfigError

if TYPE_CHECKING:
    from anyhsm.config import Config, PolicyConfig

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8420
SERVICE_PRINCIPAL = "(service)"
"""The audit principal of the service's own entries (readiness checks, reload, open,
close): no client name can be it (names are ``[A-Za-z0-9._-]``)."""
UNAUTHENTICATED_PRINCIPAL = "(unauthenticated)"
"""The audit principal of a refused request without valid credentials."""

CLIENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
TOKEN_HASH = re.compile(r"sha256:[0-9a-f]{64}:[0-9a-f]{64}")
CERT_SHA256 = re.compile(r"[0-9a-f]{64}")


class Op(enum.StrEnum):
    """What a client may be allowed (``ops`` of ``[[service.clients]]``)."""

    READ = "read"  # keys, public data, verify, finalize, health, metrics
    SIGN_DIGEST = "sign-digest"  # a raw 32-byte digest: the most powerful right
    SIGN_MESSAGE = "sign-message"  # BIP137 / BIP322 messages
    SIGN_PSBT = "sign-psbt"  # PSBTs, under the signing policy
    ADMIN = "admin"  # the audit log's tail and verification
    APPROVE = "approve"  # submit spending policy approvals (docs/policy.md)


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Listen:
        """``HOST:PORT``, ``[IPv6]:PORT``; ConfigError naming the setting otherwise."""
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", text.strip())
        if m is None:
            raise ConfigError(
                f"service.listen {text!r} is not HOST:PORT",
                hint="e.g. 127.0.0.1:8420 or [::1]:8420",
            )
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4))
        if not 0 <= port <= 65535:  # 0: any free port (the "listening" log line says which)
            raise ConfigError(f"service.listen {text!r}: port must be 0 to 65535")
        return cls(host, port)

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a name other than localhost may resolve anywhere

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ClientSpec:
    """One client: a name, the salted hash of its token, the keys (ids, labels or label
    patterns) and the operations it may use, and optionally the certificate its token is
    bound to and its own rate limit."""

    name: str
    token_hash: str
    keys: tuple[str, ...]
    ops: frozenset[Op]
    cert_sha256: str | None = None
    rate_limit_per_s: float | None = None
    rate_limit_burst: int | None = None

    def __post_init__(self) -> None:
        if not CLIENT_NAME.fullmatch(self.name):
            raise ConfigError(
                f"service client name {self.name!r} must be 1 to 64 of A-Z a-z 0-9 . _ -"
            )
        if not TOKEN_HASH.fullmatch(self.token_hash):
            raise ConfigError(
                f"service client {self.name!r}: token_hash is not sha256:<salt>:<hash>",
                hint="make clients with 'anyhsm service add-client'",
            )
        if not self.keys or not self.ops:
            raise ConfigError(f"service client {self.name!r} needs at least one key and one op")
        if self.cert_sha256 is not None and not CERT_SHA256.fullmatch(self.cert_sha256):
            raise ConfigError(
                f"service client {self.name!r}: cert_sha256 must be 64 hex digits",
                hint="openssl x509 -in CERT -outform der | sha256sum",
            )

    def may(self, op: Op) -> bool:
        return op in self.ops

    def may_use(self, key_id: str, label: str) -> bool:
        """The key (id and label) is one of this client's: its id listed, or its label
        listed or matched by a pattern (``fnmatch``, case-sensitive: ``hot-*``)."""
        return any(p == key_id or fnmatch.fnmatchcase(label, p) for p in self.keys)

    def may_name(self, name: str) -> bool:
        """``name`` (as a request gave it) would be one of this client's keys: used to say
        "not found" only to a client that could have used such a key, and "forbidden"
        to every other, so that nobody learns which keys exist outside its own."""
        return self.may_use(name, name)


_DEFAULTS = ServiceConfig()
"""The ``[service]`` table's defaults: one place for them (anyhsm.config)."""


@dataclass(frozen=True)
class ServiceSettings:
    listen: Listen = field(default_factory=lambda: Listen(DEFAULT_HOST, DEFAULT_PORT))
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    max_body_bytes: int = _DEFAULTS.max_body_bytes  # 0: from policy.max_psbt_bytes (body_limit)
    max_batch: int = _DEFAULTS.max_batch
    max_concurrency: int = _DEFAULTS.max_concurrency
    max_pending: int = _DEFAULTS.max_pending
    request_timeout_ms: int = _DEFAULTS.request_timeout_ms
    rate_limit_per_s: float = _DEFAULTS.rate_limit_per_s
    rate_limit_burst: int = _DEFAULTS.rate_limit_burst
    idempotency_entries: int = _DEFAULTS.idempotency_entries
    idempotency_ttl_s: int = _DEFAULTS.idempotency_ttl_s
    metrics_max_keys: int = _DEFAULTS.metrics_max_keys
    public_metrics: bool = _DEFAULTS.public_metrics
    ready_interval_s: float = 2.0  # readiness re-checks the provider at most this often
    unauthenticated_per_s: float = 20.0  # audited 401s per second (more: 429, not audited)
    shutdown_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may finish
    access_log: bool = True  # one JSON log line per request
    clients: tuple[ClientSpec, ...] = ()

    def __post_init__(self) -> None:
        names = [c.name for c in self.clients]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"service clients named twice: {', '.join(dup)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("service.tls_cert and service.tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("service.tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        bound = [c.name for c in self.clients if c.cert_sha256 is not None]
        if bound and self.tls_client_ca is None:
            raise ConfigError(
                f"service clients {', '.join(bound)} are bound to a certificate, but "
                "service.tls_client_ca is not set: the binding could never be checked",
                hint="set tls_client_ca (mutual TLS) or remove cert_sha256",
            )
        for name in ("max_batch", "max_concurrency", "request_timeout_ms", "rate_limit_burst"):
            if getattr(self, name) < 1:
                raise ConfigError(f"service.{name} must be at least 1")
        for name in ("max_body_bytes", "max_pending", "idempotency_entries", "metrics_max_keys"):
            if getattr(self, name) < 0:
                raise ConfigError(f"service.{name} must not be negative")
        if self.rate_limit_per_s < 0:
            raise ConfigError("service.rate_limit_per_s must not be negative (0: no limit)")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def body_limit(self, policy: PolicyConfig) -> int:
        """The largest request body: ``max_body_bytes``, else room for the largest PSBT the
        policy accepts, in base64 (4/3), plus 64 KiB for the rest of the JSON."""
        if self.max_body_bytes:
            return self.max_body_bytes
        return 4 * ((policy.max_psbt_bytes + 2) // 3) + 65_536

    def refusal(self) -> str | None:
        """Why this service must not start (None: it may): another address than loopback
        without TLS, or without any client."""
        if self.listen.loopback:
            return None
        if not self.tls:
            return (
                f"service.listen {self.listen} is not a loopback address and TLS is not "
                "configured (service.tls_cert, service.tls_key)"
            )
        if not self.clients:
            return (
                f"service.listen {self.listen} is not a loopback address and no client is "
                "declared ([[service.clients]])"
            )
        return None


def from_config(cfg: Config, listen: str | None = None) -> ServiceSettings:
    """The service's settings from the configuration's ``[service]`` table (defaults when
    it has none); ``listen`` (``--listen``) overrides ``service.listen``."""
    sc = cfg.service
    clients = tuple(
        ClientSpec(
            name=c.name,
            token_hash=c.token_hash,
            keys=tuple(c.keys),
            ops=frozenset(_op(c.name, o) for o in c.ops),
            cert_sha256=c.cert_sha256,
            rate_limit_per_s=c.rate_limit_per_s,
            rate_limit_burst=c.rate_limit_burst,
        )
        for c in sc.clients
    )
    return ServiceSettings(
        listen=Listen.parse(listen or sc.listen),
        tls_cert=sc.tls_cert,
        tls_key=sc.tls_key,
        tls_client_ca=sc.tls_client_ca,
        max_body_bytes=sc.max_body_bytes,
        max_batch=sc.max_batch,
        max_concurrency=sc.max_concurrency,
        max_pending=sc.max_pending,
        request_timeout_ms=sc.request_timeout_ms,
        rate_limit_per_s=float(sc.rate_limit_per_s),
        rate_limit_burst=sc.rate_limit_burst,
        idempotency_entries=sc.idempotency_entries,
        idempotency_ttl_s=sc.idempotency_ttl_s,
        metrics_max_keys=sc.metrics_max_keys,
        public_metrics=sc.public_metrics,
        clients=clients,
    )


def _op(client: str, text: str) -> Op:
    try:
        return Op(text)
    except ValueError:
        raise ConfigError(
            f"service client {client!r}: unknown op {text!r}",
            hint="use " + ", ".join(o.value for o in Op),
        ) from None
