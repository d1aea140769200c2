"""``anyhsm serve``: open the handle, serve the application until SIGTERM.

Safe defaults: loopback unless TLS and at least one client are configured; in production
no start while ``config check`` reports an error; the process is made non-dumpable (no
core file or ptrace-readable memory with keys in it) whatever the environment.

Signals: SIGTERM (and SIGINT) stop accepting connections, let the requests in flight
finish (up to ``shutdown_timeout_s``), then close the handle, which writes its last audit
entry, fsyncs the log and closes the providers. SIGHUP reloads the configuration through
``Hsm.reload()`` (the audit chain goes on) and the service's clients and limits with it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, cast

from anyhsm.errors import ConfigError
from anyhsm.service.app import SERVICE, as_principal, configure_logging, create_app, log_event
from anyhsm.service.settings import SERVICE_PRINCIPAL, ServiceSettings, from_config
from anyhsm.types import Environment

if TYPE_CHECKING:
    from aiohttp import web

    from anyhsm.config import Config
    from anyhsm.hsm import Hsm


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("anyhsm")
    except PackageNotFoundError:
        return "0+unknown"


def check_startup(cfg: Config, settings: ServiceSettings) -> None:
    """Refuse to start where the service would be unsafe (ConfigError with every reason)."""
    why = settings.refusal()
    if why is not None:
        raise ConfigError(
            f"refusing to serve: {why}",
            hint="listen on 127.0.0.1 (the default), or configure TLS and [[service.clients]]",
        )
    if cfg.environment is Environment.PRODUCTION:
        from anyhsm.ops.admin import config_check

        if cfg.source is None:
            raise ConfigError("refusing to serve: production needs a configuration file")
        errors = config_check(cfg.source).errors
        if errors:
            raise ConfigError(
                f"refusing to serve in production: 'config check' reports {len(errors)} error(s)",
                hint="run 'anyhsm config check' and fix them",
                problems=[str(p) for p in errors],
            )


def tls_context(settings: ServiceSettings) -> ssl.SSLContext | None:
    """The server's TLS context (TLS 1.2+); with ``tls_client_ca``, client certificates are
    asked for and verified against it (optional for clients not bound to one; a bound
    client without its certificate is refused at authentication)."""
    if settings.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
        if settings.tls_client_ca is not None:
            ctx.load_verify_locations(cafile=str(settings.tls_client_ca))
            ctx.verify_mode = ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"cannot load the service's TLS files: {e}",
            hint="check service.tls_cert, service.tls_key and service.tls_client_ca",
        ) from None
    return ctx


def open_service_handle(cfg: Config) -> Hsm:
    """The handle, opened non-interactively (no prompt: the passphrase and PIN come from
    the environment or the configured files), its entries naming ``(service)``."""
    from anyhsm.ops.session import open_handle

    return as_principal(SERVICE_PRINCIPAL, lambda: open_handle(cfg, prompt=None))


def serve(config_path: Path, listen: str | None = None) -> int:
    """``anyhsm serve``: run the service of the configuration at ``config_path`` in the
    foreground until SIGTERM/SIGINT; the exit status."""
    from anyhsm.config import Config

    undo_logging = configure_logging()
    try:
        cfg = Config.load(config_path)

        def reload_settings() -> ServiceSettings:
            return from_config(Config.load(config_path), listen)

        return run(cfg, from_config(cfg, listen), reload_settings)
    finally:
        undo_logging()


def run(
    cfg: Config,
    settings: ServiceSettings,
    reload_settings: Callable[[], ServiceSettings | None] | None = None,
) -> int:
    """Serve ``cfg``'s deployment with ``settings`` until SIGTERM/SIGINT (SIGHUP: reload,
    and ``reload_settings`` for the service's own settings)."""
    from anyhsm.hardening import harden_process

    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.access"):
        logging.getLogger(name).addFilter(_no_exception_text)
    harden_process(Environment.PRODUCTION)  # non-dumpable in every environment
    check_startup(cfg, settings)
    ctx = tls_context(settings)
    hsm = open_service_handle(cfg)
    try:
        event_loop_runner()(_serve(hsm, cfg, settings, ctx, reload_settings))
    finally:
        as_principal(SERVICE_PRINCIPAL, hsm.close)  # close entry, log fsynced, providers closed
    log_event(logging.INFO, "stopped")
    return 0


def event_loop_runner() -> Callable[[Coroutine[object, object, None]], None]:
    """``uvloop.run`` where uvloop is installed (the ``server`` extra brings it on Linux and
    macOS), else ``asyncio.run``. uvloop's loop and sockets in C take about half the CPU
    time per request of asyncio's (benchmarks/bench_service.py); nothing else changes."""
    if loop_name() == "uvloop":
        import uvloop

        return cast("Callable[[Coroutine[object, object, None]], None]", uvloop.run)
    return asyncio.run


def loop_name() -> str:
    """Which event loop :func:`event_loop_runner` runs: "uvloop" or "asyncio"."""
    import importlib.util

    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def _no_exception_text(record: logging.LogRecord) -> bool:
    """aiohttp's own error lines may quote a malformed request line or header (an
    Authorization header included): keep only that there was one, never its text."""
    record.exc_info = None
    record.exc_text = None
    record.msg, record.args = "bad HTTP request (not logged)", ()
    return True


async def _serve(
    hsm: Hsm,
    cfg: Config,
    settings: ServiceSettings,
    ctx: ssl.SSLContext | None,
    reload_settings: Callable[[], ServiceSettings | None] | None,
) -> None:
    from aiohttp import web

    app = create_app(hsm, settings, version=version(), reload=reload_settings)
    svc = app[SERVICE]
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=settings.shutdown_timeout_s
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.listen.host, settings.listen.port, ssl_context=ctx)
    await site.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(svc.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    log_event(
        logging.INFO,
        "listening",
        address=_bound(site, settings),
        tls=ctx is not None,
        mutual_tls=settings.tls_client_ca is not None,
        clients=len(settings.clients),
        active_provider=hsm.active_provider,
        security_level=hsm.security_level.label,
        environment=cfg.environment.value,
        event_loop=loop_name(),
        version=version(),
    )
    try:
        await stop.wait()
    finally:
        log_event(logging.INFO, "stopping", in_flight=svc.gate.admitted)
        svc.stopping = True
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await runner.cleanup()  # stop accepting, finish in-flight requests, then the pool
        for task in list(reloads):
            await task


def _bound(site: web.TCPSite, settings: ServiceSettings) -> str:
    """HOST:PORT actually bound (port 0 asks the kernel for a free one)."""
    server = cast("asyncio.Server | None", site._server)
    for s in server.sockets if server is not None else ():
        host, port = s.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(settings.listen)
