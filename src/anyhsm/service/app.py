"""The service over one open handle: authentication, limits, the worker pool, errors.

:func:`create_app` builds the aiohttp application; :mod:`anyhsm.service.routes` holds the
endpoints, each a thin shell over one operation of :mod:`anyhsm.ops`.

The handle is synchronous, so every call into it runs in a bounded pool of worker threads
(``max_concurrency``), admitted through :class:`~anyhsm.service.limits.Gate`. Concurrent
signing on one handle is what the handle is built for (the audit log appends under its
own lock, the keystore decrypts into per-thread buffers, PKCS#11 sessions come from a
pool and a module that is not thread-safe is serialised by the provider); a reload
(SIGHUP) is the one operation that must run alone, and :meth:`Service.exclusive` waits
for the running operations to finish and holds new ones back while it runs.

Each worker call runs with the audit principal (:data:`anyhsm.audit.principal`) set to
the client's name, so every audit entry made for a request names its client; the
service's own entries name ``(service)``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from aiohttp import web

from anyhsm import audit
from anyhsm.errors import (
    AuditError,
    EndpointNotFound,
    Forbidden,
    HsmError,
    InvalidRequest,
    KeyNotFound,
    MethodNotAllowed,
    ProviderError,
    RateLimited,
    RequestTimedOut,
    RequestTooLarge,
    Unauthenticated,
)
from anyhsm.ops import SCHEMA_VERSION
from anyhsm.service.limits import Gate, IdempotencyStore, Stored, TokenBucket
from anyhsm.service.metrics import Metrics
from anyhsm.service.settings import (
    SERVICE_PRINCIPAL,
    UNAUTHENTICATED_PRINCIPAL,
    ClientSpec,
    Op,
    ServiceSettings,
)
from anyhsm.service.status import retry_after, status_for
from anyhsm.service.tokens import TokenVerifier

if TYPE_CHECKING:
    from anyhsm.hsm import Hsm
    from anyhsm.types import KeyInfo

T = TypeVar("T")
log = logging.getLogger("anyhsm.service")

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_JSON = "application/json"


@dataclass(frozen=True)
class Caller:
    """Who is asking (None: a public endpoint) and which request this is."""

    client: ClientSpec | None
    request_id: str
    route: str
    anonymous: str = SERVICE_PRINCIPAL  # the audit principal when there is no client

    @property
    def name(self) -> str | None:
        return self.client.name if self.client is not None else None

    @property
    def principal(self) -> str:
        return self.client.name if self.client is not None else self.anonymous


class Service:
    """The state behind the endpoints: the handle, its settings, clients, limits, metrics."""

    def __init__(
        self,
        hsm: Hsm,
        settings: ServiceSettings,
        *,
        version: str = "0+unknown",
        reload: Callable[[], ServiceSettings | None] | None = None,
    ) -> None:
        self.hsm = hsm
        self.settings = settings
        self.version = version
        self._reload_fn = reload
        self.metrics = Metrics(version, settings.metrics_max_keys)
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix="anyhsm-op"
        )
        # Longer work on keys held in this process (PSBTs, batches) runs here, one at a
        # time: it holds the GIL, so more threads only added hand-offs of it (+30-70 % CPU
        # per PSBT measured with 2-4 workers); devices' calls overlap in the pool above.
        self.local_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="anyhsm-local"
        )
        self.gate = Gate(settings.max_concurrency, settings.max_pending)
        self.idempotency = IdempotencyStore(
            settings.idempotency_entries, settings.idempotency_ttl_s
        )
        self._tasks: set[asyncio.Task[None]] = set()  # idempotent operations still running
        self.anonymous = TokenBucket(
            settings.unauthenticated_per_s, max(1, int(settings.unauthenticated_per_s * 2))
        )
        self.stopping = False
        self._apply(settings)
        self._paused: asyncio.Event | None = None
        self._ready: tuple[float, bool, list[str]] | None = None
        self._ready_lock: asyncio.Lock | None = None
        self._ready_stale = False

    def _apply(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.verifier = TokenVerifier(settings.clients)
        self.buckets = {
            c.name: TokenBucket(
                c.rate_limit_per_s if c.rate_limit_per_s is not None else settings.rate_limit_per_s,
                c.rate_limit_burst if c.rate_limit_burst is not None else settings.rate_limit_burst,
            )
            for c in settings.clients
        }
        self.timeout = settings.request_timeout_ms / 1000

    @property
    def paused(self) -> asyncio.Event:
        if self._paused is None:
            self._paused = asyncio.Event()
            self._paused.set()
        return self._paused

    # --- running operations -------------------------------------------------------------------

    async def run(
        self,
        caller: Caller | None,
        fn: Callable[[], T],
        *,
        timeout: float | None = -1.0,
        inline: bool = False,
        local: bool = False,
    ) -> T:
        """Run ``fn`` (a call into the handle) in a worker thread with the audit principal
        of ``caller``; :class:`ServiceBusy` when the gate is full, :class:`RequestTimedOut`
        past the request timeout (``timeout``: seconds, None: no bound, default the
        service's). An operation no worker has started when its time is up never starts.

        ``inline``: run ``fn`` on the event loop itself, for an operation the handle says
        finishes in this process without waiting (:meth:`anyhsm.hsm.Hsm.runs_in_process`:
        a software signature, tens of microseconds). The hand-off to a worker and back
        cost more than that, and the worker and the loop taking the GIL from each other
        halved the service's rate; the gate still counts it. ``local``: longer work on
        keys held in this process goes to the one local worker (see ``local_executor``)."""
        bound = self.timeout if timeout is not None and timeout < 0 else timeout
        if not self.paused.is_set():  # a reload is running: wait for it
            try:
                await asyncio.wait_for(self.paused.wait(), bound)
            except TimeoutError:
                raise RequestTimedOut("the service is reloading its configuration") from None
        self.gate.admit()
        who = caller.principal if caller is not None else SERVICE_PRINCIPAL
        if inline:
            try:
                return as_principal(who, fn)
            except HsmError as e:
                self._observe_failure(e)
                raise
            finally:
                self.gate.done()
        loop = asyncio.get_running_loop()
        # One plain future, completed by one call back into the loop (which also releases
        # the gate), and a timer: what wait_for(shield(wrap_future(...))) did with three
        # futures, two wake-ups of the loop and a task per request. The operation is
        # never cancelled once a worker runs it, whatever happens to the request.
        afut: asyncio.Future[T] = loop.create_future()
        gate = self.gate

        def finished(cfut: concurrent.futures.Future[T]) -> None:
            loop.call_soon_threadsafe(_deliver, cfut, afut, gate)

        try:
            pool = self.local_executor if local else self.executor
            cfut = pool.submit(as_principal, who, fn)
        except RuntimeError:  # the pool is shut down
            gate.done()
            raise
        cfut.add_done_callback(finished)
        timer = loop.call_later(bound, _expire, afut) if bound is not None else None
        try:
            return await afut
        except _Expired:
            if cfut.cancel():
                raise RequestTimedOut(
                    f"no worker was free within {bound:g} s; nothing was done",
                    hint="retry later, or raise service.max_concurrency",
                    retry_after=1.0,
                ) from None
            raise RequestTimedOut(
                f"the operation did not finish within {bound:g} s; it may still finish "
                "(the audit log will say)",
                hint="retry with the same Idempotency-Key to get its result",
                retry_after=1.0,
            ) from None
        except HsmError as e:
            self._observe_failure(e)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def in_process(self, names: Sequence[str]) -> bool:
        """Whether operations on the keys ``names`` finish in this process without waiting
        on a device, the network or the disk (:meth:`anyhsm.hsm.Hsm.runs_in_process`)."""
        return bool(names) and all(self.hsm.runs_in_process(n) for n in names)

    def may_run_inline(self, names: Sequence[str]) -> bool:
        """:meth:`in_process`, and no spending policy is bound or required: signing under
        one takes the policy state's lock, which another process may hold, and the event
        loop must never wait on it (such operations go to the local worker). Only the
        binding is read (from the manifest, cheap while the keystore is unchanged): the
        policy itself is loaded and checked once, by the operation."""
        from anyhsm.policy.anchor import ManifestAnchor

        if not self.in_process(names) or self.hsm.config.policy.spending_policy is not None:
            return False
        return ManifestAnchor(self.hsm).binding() is None

    def _observe_failure(self, e: HsmError) -> None:
        if isinstance(e, AuditError):
            self.metrics.audit_failures.inc()
        if isinstance(e, ProviderError):
            self._ready_stale = True  # readiness checks the provider again

    async def exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` with no other operation running (reload): new operations wait, the
        running ones finish first."""
        self.paused.clear()
        try:
            while self.gate.admitted:
                await asyncio.sleep(0.005)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, as_principal, SERVICE_PRINCIPAL, fn)
        finally:
            self.paused.set()

    # --- who is asking ----------------------------------------------------------------------

    async def authenticate(self, request: web.Request, op: Op | None) -> Caller:
        """The caller of ``request``, allowed ``op`` (None: a public endpoint). 401 without
        valid credentials, 403 when the client may not do ``op``: both audited with what
        is known (the client's name for 403) before answering, and neither touches a key."""
        rid = request[REQUEST_ID_KEY]
        route = request.get(ROUTE_KEY) or route_of(request)
        if op is None:
            return Caller(None, rid, route)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        client = self.verifier.client(token.strip()) if scheme.lower() == "bearer" else None
        reason = "no bearer token" if not token else "unknown token"
        if client is not None and client.cert_sha256 is not None:
            seen = peer_cert_sha256(request)
            if seen is None or not secrets.compare_digest(seen, client.cert_sha256):
                client, reason = None, "token used without its client certificate"
        if client is None:
            self.metrics.auth_failures.labels("unauthenticated").inc()
            if self.anonymous.take() is None:  # past the bound: counted, not audited
                await self.audit_refusal(
                    Caller(None, rid, route, UNAUTHENTICATED_PRINCIPAL),
                    "unauthenticated",
                    {"reason": reason, "remote": remote_of(request)},
                )
            raise Unauthenticated(
                "a valid bearer token is required",
                hint="send 'Authorization: Bearer <token>' (anyhsm service add-client makes one)",
            )
        caller = Caller(client, rid, route)
        if not client.may(op):
            self.metrics.auth_failures.labels("forbidden").inc()
            await self.audit_refusal(caller, "forbidden", {"op": op.value})
            raise Forbidden(f"client {client.name!r} may not {op.value}")
        wait = self.buckets[client.name].take()
        if wait is not None:
            self.metrics.auth_failures.labels("rate_limited").inc()
            raise RateLimited(
                f"client {client.name!r} exceeded its rate limit",
                hint="slow down; Retry-After says when to retry",
                retry_after=wait,
            )
        return caller

    async def audit_refusal(self, caller: Caller, code: str, detail: Mapping[str, str]) -> None:
        entry = {"route": caller.route, "request_id": caller.request_id, **detail}
        await self.run(
            caller,
            lambda: self.hsm.record_event("service_auth", "refused", entry, error=code),
        )

    def authorized_key(self, caller: Caller, name: str, *, fresh: bool = False) -> KeyInfo:
        """The key ``name`` (label or id) if ``caller`` may use it (in the operation's
        thread: a worker, or the loop for an inline one).
        Forbidden (audited) for a key outside the client's list, and for a name that is not
        a key when the client could not have had such a key either: a client learns
        nothing about keys that are not its own."""
        client = caller.client
        assert client is not None
        try:
            # From the routing, unless ``fresh`` (the answer is the key's description):
            # the operations that follow go by info.id (see Hsm.key_info).
            info = self.hsm.get_key(name) if fresh else self.hsm.key_info(name)
        except KeyNotFound:
            if client.may_name(name):
                raise
            info = None
        if info is not None and client.may_use(info.id, info.label):
            return info
        detail = {"route": caller.route, "request_id": caller.request_id, "key_ref": name[:128]}
        self.hsm.record_event(
            "service_auth",
            "refused",
            detail,
            key_id=info.id if info is not None else None,
            error="forbidden",
        )
        self.metrics.auth_failures.labels("forbidden").inc()
        raise Forbidden(f"client {client.name!r} may not use key {name[:128]!r}")

    # --- readiness ---------------------------------------------------------------------------

    async def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons): the active provider passed its last check (made at most every
        ``ready_interval_s``, and again after a provider failure), and not shutting down."""
        if self.stopping:
            return False, ["the service is shutting down"]
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            now = time.monotonic()
            state = self._ready
            if (
                state is None
                or self._ready_stale
                or now - state[0] >= self.settings.ready_interval_s
            ):
                self._ready_stale = False
                try:
                    report = await self.run(None, self.hsm.health, timeout=None)
                    state = (now, report.ok, _unready_reasons(report.to_dict()))
                    self.observe_health(report.to_dict())
                except HsmError as e:
                    state = (now, False, [f"{e.code}: {e.message}"])
                self._ready = state
                self.metrics.ready.set(1 if state[1] else 0)
        return state[1], list(state[2])

    def observe_health(self, report: Mapping[str, object]) -> None:
        providers = report.get("providers")
        if isinstance(providers, list):
            for row in providers:
                if isinstance(row, dict) and row.get("active"):
                    up = row.get("status") == "ok"
                    self.metrics.provider_up.labels(str(row.get("name"))).set(1 if up else 0)
        audit_part = report.get("audit")
        if isinstance(audit_part, dict) and isinstance(audit_part.get("last_seq"), int):
            self.metrics.audit_seq.set(audit_part["last_seq"])

    def observe_chain(self) -> None:
        hsm = self.hsm
        attempts = [(a.name, a.status == "ok") for a in hsm.attempts if a.status != "not_tried"]
        first = hsm.config.fallback.chain[0]
        self.metrics.chain(hsm.active_provider, hsm.security_level.label, first, attempts)

    async def reload(self) -> None:
        """SIGHUP: reload the configuration through ``Hsm.reload()`` (the audit chain goes
        on) and, when it comes from a file, the service's clients and limits."""
        try:
            new = await self.exclusive(self._reload_sync)
        except HsmError as e:
            self.metrics.reloads.labels("error").inc()
            log_event(logging.ERROR, "reload_failed", code=e.code, message=e.message)
            return
        if new is not None:
            if new.listen != self.settings.listen or new.tls_cert != self.settings.tls_cert:
                log_event(logging.WARNING, "reload_needs_restart", setting="listen/tls")
            self._apply(new)
        self._ready_stale = True
        self.observe_chain()
        self.metrics.reloads.labels("ok").inc()
        log_event(logging.INFO, "reloaded", active_provider=self.hsm.active_provider)

    def _reload_sync(self) -> ServiceSettings | None:
        self.hsm.reload()
        return self._reload_fn() if self._reload_fn is not None else None

    # --- idempotency ------------------------------------------------------------------------

    async def idempotent(
        self,
        request: web.Request,
        caller: Caller,
        body: bytes,
        compute: Callable[[], Awaitable[web.Response]],
    ) -> web.Response:
        """Answer with ``compute`` once per (client, Idempotency-Key): a retry with the
        same key and request gets the stored answer, or waits for the first one still
        running; another request under the same key is refused (422). The operation runs
        to its end even when the request that started it times out, so its result is
        there for the retry. Answers a retry should not inherit (busy, unavailable,
        timed out: 5xx and 429) are not kept."""
        key = request.headers.get("Idempotency-Key")
        if key is None:
            return await compute()
        if not _IDEMPOTENCY_KEY.fullmatch(key):
            raise InvalidRequest("Idempotency-Key must be 1 to 255 visible ASCII characters")
        assert caller.client is not None
        h = hashlib.sha256()
        for part in (request.method.encode(), request.path.encode(), body):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        fut, first = self.idempotency.claim(caller.client.name, key, h.digest())
        if first:
            task = asyncio.ensure_future(self._fill(caller.client.name, key, fut, compute))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            status, data = await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except TimeoutError:
            raise RequestTimedOut(
                f"the operation did not finish within {self.timeout:g} s; it goes on",
                hint="retry with the same Idempotency-Key to get its result",
                retry_after=1.0,
            ) from None
        resp = web.Response(body=data, status=status, content_type=_JSON)
        if not first:
            resp.headers["Idempotent-Replayed"] = "true"
        return resp

    async def _fill(
        self,
        client: str,
        key: str,
        fut: asyncio.Future[Stored],
        compute: Callable[[], Awaitable[web.Response]],
    ) -> None:
        try:
            resp = await compute()
            stored: Stored = (resp.status, bytes(resp.body or b""))  # type: ignore[arg-type]
        except HsmError as e:
            stored = (status_for(e), error_body(e))
        except Exception as e:  # reported by the request that waits, as any failure
            stored = (500, internal_error_body(e))
        if stored[0] >= 500 or stored[0] == 429:
            self.idempotency.forget(client, key, fut)
        if not fut.done():
            fut.set_result(stored)


def as_principal(who: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` (in a worker thread) with every audit entry it makes naming ``who``."""
    token = audit.principal.set(who)
    try:
        return fn()
    finally:
        audit.principal.reset(token)


class _Expired(Exception):
    """The request timeout of :meth:`Service.run` (never raised by an operation)."""


def _expire(afut: asyncio.Future[T]) -> None:
    if not afut.done():
        afut.set_exception(_Expired())


def _deliver(cfut: concurrent.futures.Future[T], afut: asyncio.Future[T], gate: Gate) -> None:
    """In the loop: the worker's outcome to the request still waiting for it (if any)."""
    gate.done()
    if afut.done():  # timed out, or the request went away: the outcome is the audit log's
        return
    if cfut.cancelled():
        afut.cancel()
        return
    exc = cfut.exception()
    if exc is not None:
        afut.set_exception(exc)
    else:
        afut.set_result(cfut.result())


def _unready_reasons(report: Mapping[str, object]) -> list[str]:
    out: list[str] = []
    providers = report.get("providers")
    if isinstance(providers, list):
        for row in providers:
            if isinstance(row, dict) and row.get("active") and row.get("status") != "ok":
                out.append(f"{row.get('name')}: {row.get('reason') or row.get('status')}")
    if not report.get("ok") and not out:
        out.append("the active provider failed its check")
    return out


# --- request plumbing -------------------------------------------------------------------------

REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("anyhsm_request_id", str)
ROUTE_KEY: web.RequestKey[str] = web.RequestKey("anyhsm_route", str)
SERVICE: web.AppKey[Service] = web.AppKey("anyhsm_service", Service)


def service_of(request: web.Request) -> Service:
    return request.app[SERVICE]


def route_of(request: web.Request) -> str:
    """The route template (``/v1/keys/{key}/sign``), never the raw path: bounded labels."""
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


def remote_of(request: web.Request) -> str:
    return str(request.remote or "")[:64]


def peer_cert_sha256(request: web.Request) -> str | None:
    """SHA-256 (hex) of the client certificate presented in the TLS handshake, if any.
    aiohttp exposes the connection's SSL object through the transport (uvicorn does
    not hand the certificate to the application: its issues #400 and #745)."""
    obj = request.transport.get_extra_info("ssl_object") if request.transport else None
    if not isinstance(obj, ssl.SSLObject):
        return None
    der = obj.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest() if der else None


def dumps(obj: object) -> bytes:
    """A JSON object as the CLI prints it under --json: with the top-level
    ``schema_version`` (anyhsm.ops.SCHEMA_VERSION, docs/cli.md)."""
    if isinstance(obj, dict):
        obj = {"schema_version": SCHEMA_VERSION, **obj}
    return _encode(obj).encode()


# json.dumps with arguments builds an encoder per call: one, made once
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type=_JSON)


def error_body(e: HsmError) -> bytes:
    return dumps({"error": e.to_dict()})


def internal_error_body(e: BaseException) -> bytes:
    """The CLI's internal_error object: the exception's type only (its text may quote input)."""
    name = type(e).__name__
    return dumps(
        {
            "error": {
                "code": "internal_error",
                "error": name,
                "message": f"internal error: {name}",
                "hint": "the service log has this request's id",
            }
        }
    )


def error_response(e: HsmError) -> web.Response:
    status = status_for(e)
    resp = web.Response(body=error_body(e), status=status, content_type=_JSON)
    after = retry_after(e, status)
    if after is not None:
        resp.headers["Retry-After"] = str(after)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="anyhsm"'
    return resp


def _from_http(exc: web.HTTPException, max_body: int) -> HsmError:
    """aiohttp's own refusals (no route, wrong method, body too large...) as our errors."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return RequestTooLarge(
            f"the request body is larger than {max_body} bytes",
            hint="service.max_body_bytes sets the limit",
        )
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowed(f"this endpoint answers {allowed}, not {exc.method}")
    if isinstance(exc, web.HTTPNotFound):
        return EndpointNotFound("no such endpoint", hint="GET /openapi.json lists them")
    return InvalidRequest(exc.reason or "the request is not valid HTTP")


_ID_PREFIX = secrets.token_hex(4)  # per process: ids of two processes never collide
_ids = itertools.count(1)


def _request_id(request: web.Request) -> str:
    """The caller's ``X-Request-Id`` when it is sane, else ``<process>-<counter>`` (no
    system call per request)."""
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}-{next(_ids):x}"


@web.middleware
async def pipeline(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Request id, errors into the CLI's JSON shape, metrics, one log line per request."""
    svc = service_of(request)
    rid = _request_id(request)
    request[REQUEST_ID_KEY] = rid
    route = request[ROUTE_KEY] = route_of(request)
    t0 = time.perf_counter()
    svc.metrics.in_flight.inc()
    code: str | None = None
    try:
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            raise _from_http(exc, request.app._client_max_size) from None
    except HsmError as e:
        code = e.code
        resp = error_response(e)
    except Exception as e:
        code = "internal_error"
        name = type(e).__name__
        log_event(logging.ERROR, "internal_error", request_id=rid, route=route, error=name)
        if os.environ.get("ANYHSM_DEBUG"):
            log.exception("anyhsm.service: internal error")
        resp = web.Response(body=internal_error_body(e), status=500, content_type=_JSON)
    finally:
        svc.metrics.in_flight.dec()
    elapsed = time.perf_counter() - t0
    resp.headers[REQUEST_ID_HEADER] = rid
    svc.metrics.request(route, request.method, resp.status, elapsed)
    if svc.settings.access_log and log.isEnabledFor(logging.INFO):
        fields: dict[str, object] = {
            "request_id": rid,
            "method": request.method,
            "route": route,
            "status": resp.status,
            "duration_ms": round(elapsed * 1000, 3),
        }
        client = request.get(CLIENT_KEY)
        if client:
            fields["client"] = client
        if code:
            fields["code"] = code
        log_event(logging.INFO, "request", **fields)
    return resp


CLIENT_KEY: web.RequestKey[str] = web.RequestKey("anyhsm_client", str)


def log_event(level: int, event: str, **fields: object) -> None:
    """One structured log line (the service's JSON formatter prints it as one object)."""
    if log.isEnabledFor(level):
        log.log(level, event, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event (the message) and the fields of
    :func:`log_event`. Nothing here ever holds a token, a body or a header."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            body.update(fields)
        return json.dumps(body, sort_keys=True, default=str)


def configure_logging(level: int = logging.INFO) -> Callable[[], None]:
    """JSON lines on stderr for the service's logger (not propagated to the CLI's)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False

    def undo() -> None:
        log.removeHandler(handler)
        log.propagate = True

    return undo


def create_app(
    hsm: Hsm,
    settings: ServiceSettings,
    *,
    version: str = "0+unknown",
    reload: Callable[[], ServiceSettings | None] | None = None,
) -> web.Application:
    """The application over the open handle ``hsm`` (the caller keeps and closes it)."""
    from anyhsm.service.routes import add_routes

    svc = Service(hsm, settings, version=version, reload=reload)
    app = web.Application(
        middlewares=[pipeline], client_max_size=settings.body_limit(hsm.config.policy)
    )
    app[SERVICE] = svc
    add_routes(app)

    from anyhsm.policy import events

    unsubscribe: list[Callable[[], None]] = []

    async def startup(app: web.Application) -> None:
        unsubscribe.append(events.subscribe(svc.metrics.policy_decision))
        svc.observe_chain()
        await svc.readiness()
        from anyhsm.service.routes import count_keys, import_operations

        import_operations()
        await count_keys(svc)

    async def cleanup(app: web.Application) -> None:
        for stop in unsubscribe:
            stop()
        svc.stopping = True
        svc.gate.closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, svc.executor.shutdown, True)
        await loop.run_in_executor(None, svc.local_executor.shutdown, True)

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    return app
