"""Prometheus metrics of the service (``GET /metrics``), in a registry of its own.

Names follow Prometheus' rules: ``anyhsm_`` prefix, base units (seconds), ``_total`` on
counters (added by prometheus-client), ``_info`` for info metrics. Label values come from
small fixed sets (route templates, never raw paths; providers; schemes; outcomes; error
codes), except ``key``, which exists only while the deployment has fewer keys than
``metrics_max_keys``: an unbounded label would break the Prometheus server.
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from anyhsm.policy.engine import Decision

CONTENT_TYPE = CONTENT_TYPE_LATEST
_CACHED_SERIES = 256
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, version: str, max_keys: int) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.max_keys = max_keys
        self.key_series = False  # set by the service while the key count is under the bound
        # the label children of the per-request series, looked up once (labels() takes a
        # lock and builds a tuple each time); never removed from the registry
        self._per_request: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._per_signature: dict[tuple[str, str, str], Counter] = {}
        self.requests = Counter(
            "anyhsm_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "anyhsm_http_request_duration_seconds",
            "Time from receiving a request to answering it",
            ["route"],
            buckets=_LATENCY,
            registry=r,
        )
        self.in_flight = Gauge(
            "anyhsm_http_requests_in_flight", "Requests being answered now", registry=r
        )
        self.signatures = Counter(
            "anyhsm_signatures",
            "Signing operations (one digest, a batch's digests, a PSBT's signatures), by "
            "provider, scheme and outcome (ok, refused, error)",
            ["provider", "scheme", "outcome"],
            registry=r,
        )
        self.key_signatures = Counter(
            "anyhsm_key_signatures",
            "Signatures by key id (only while the deployment has fewer keys than "
            "service.metrics_max_keys)",
            ["key"],
            registry=r,
        )
        self.signing_seconds = Histogram(
            "anyhsm_signing_duration_seconds",
            "Time the handle took to sign, by operation (sign, sign-batch, psbt-sign, "
            "message-sign)",
            ["operation"],
            buckets=_LATENCY,
            registry=r,
        )
        self.policy = Counter(
            "anyhsm_policy_decisions",
            "PSBT signing and spending policy decisions, by rule and decision (allow, refuse, "
            "warn, approved)",
            ["rule", "decision"],
            registry=r,
        )
        self.budget_used = Gauge(
            "anyhsm_policy_budget_used_sat",
            "Spending policy: satoshis counted in each period rule's window, as of its last "
            "decision",
            ["rule"],
            registry=r,
        )
        self.budget_limit = Gauge(
            "anyhsm_policy_budget_limit_sat",
            "Spending policy: each period rule's limit (max_per_period_sat)",
            ["rule"],
            registry=r,
        )
        self.auth_failures = Counter(
            "anyhsm_auth_failures",
            "Requests refused before any work: unauthenticated, forbidden, rate_limited",
            ["reason"],
            registry=r,
        )
        self.provider_up = Gauge(
            "anyhsm_provider_up",
            "1 when the provider passed its last check (the active one) or opened, else 0",
            ["provider"],
            registry=r,
        )
        self.active = Info(
            "anyhsm_active_provider", "The active provider and its security level", registry=r
        )
        self.fallback_active = Gauge(
            "anyhsm_fallback_active",
            "1 while the active provider is not the first of the fallback chain",
            registry=r,
        )
        self.fallbacks = Counter(
            "anyhsm_fallbacks",
            "Opens and reloads of the handle that fell back past the first provider",
            registry=r,
        )
        self.audit_failures = Counter(
            "anyhsm_audit_append_failures",
            "Requests that failed because their audit entry could not be written",
            registry=r,
        )
        self.audit_seq = Gauge(
            "anyhsm_audit_last_sequence",
            "Sequence number of the last audit entry this process knows of",
            registry=r,
        )
        self.ready = Gauge("anyhsm_ready", "1 while the service is ready", registry=r)
        self.reloads = Counter(
            "anyhsm_reloads", "Configuration reloads (SIGHUP), by outcome", ["outcome"], registry=r
        )
        build = Info("anyhsm_build", "anyhsm version and Python", registry=r)
        build.info({"version": version, "python": platform.python_version()})

    def policy_decision(self, decision: Decision) -> None:
        """A spending policy decision (anyhsm.policy.events): warned and approved rules
        (refusals and allows are counted around the PSBT signing), and the budgets."""
        for rule in decision.rules:
            if rule.decision == "warn":
                self.policy.labels(rule.name, "warn").inc()
            elif rule.approved_by:
                self.policy.labels(rule.name, "approved").inc()
        for b in decision.budgets:
            used = b.used + (b.amount if not decision.refused else 0)
            self.budget_used.labels(b.rule).set(used)
            self.budget_limit.labels(b.rule).set(b.limit)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def chain(self, active: str, level: str, first: str, attempts: list[tuple[str, bool]]) -> None:
        """The handle as opened or reloaded: active provider, level, fallback, providers."""
        self.active.info({"provider": active, "security_level": level})
        fell_back = active != first
        self.fallback_active.set(1 if fell_back else 0)
        if fell_back:
            self.fallbacks.inc()
        for name, up in attempts:
            self.provider_up.labels(name).set(1 if up else 0)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request: its count and its duration."""
        key = (route, method, status)
        pair = self._per_request.get(key)
        if pair is None:
            pair = (
                self.requests.labels(route, method, str(status)),
                self.request_seconds.labels(route),
            )
            if len(self._per_request) < _CACHED_SERIES:  # methods are the client's text
                self._per_request[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)

    def signed(self, key_id: str, provider: str, scheme: str, outcome: str, n: int = 1) -> None:
        key = (provider, scheme, outcome)
        child = self._per_signature.get(key)
        if child is None:
            child = self._per_signature[key] = self.signatures.labels(provider, scheme, outcome)
        child.inc(n)
        if self.key_series and outcome == "ok":
            self.key_signatures.labels(key_id).inc(n)
