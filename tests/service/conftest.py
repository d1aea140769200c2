"""A real signing service for the tests: the application of ``anyhsm serve`` over a real
software-keystore deployment, served by aiohttp on a free loopback port in a thread of
this process (its own event loop), and called through :class:`anyhsm.client.Client`
over real HTTP. The lifecycle tests (signals, kill -9) run ``anyhsm serve`` as a child
process instead (tests/service/test_lifecycle.py).

Clients of the standard service (name: keys, ops):

- ``admin``: every key, every op;
- ``signer``: ``hot-*`` and the wallet ``w``: read, sign-digest, sign-psbt, sign-message;
- ``reader``: every key: read;
- ``psbt``: the wallet ``w`` only: sign-psbt.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from tests.bitcoin.test_signer import Wallet, add_wallet

pytest.importorskip("aiohttp", reason="the server extra is not installed")

from aiohttp import web

from anyhsm import open_hsm
from anyhsm.client import Client
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.hsm import Hsm
from anyhsm.secret import SecretBytes
from anyhsm.service.app import SERVICE, Service, create_app
from anyhsm.service.settings import ClientSpec, Op, ServiceSettings
from anyhsm.service.tokens import hash_token, new_token
from anyhsm.types import Network

PASSPHRASE = "a passphrase long enough for the service tests"
ALL_OPS = frozenset(Op)
CLIENTS: dict[str, tuple[tuple[str, ...], frozenset[Op]]] = {
    "admin": (("*",), ALL_OPS),
    "signer": (
        ("hot-*", "w"),
        frozenset({Op.READ, Op.SIGN_DIGEST, Op.SIGN_PSBT, Op.SIGN_MESSAGE}),
    ),
    "reader": (("*",), frozenset({Op.READ})),
    "psbt": (("w",), frozenset({Op.SIGN_PSBT})),
}
KEYS = ("hot-1", "hot-2", "cold-1")
SEED = bytes(range(32))


@dataclass
class Running:
    """A service being served: its address, handle, client tokens, and the app's state."""

    url: str
    hsm: Hsm
    tokens: dict[str, str]
    service: Service
    wallet: Wallet | None
    _stop: Callable[[], None]
    clients: list[Client] = field(default_factory=list)

    def client(self, name: str | None, token: str | None = None) -> Client:
        """A client authenticating as ``name`` (None: no token, or ``token`` as given)."""
        c = Client(self.url, token if name is None else self.tokens[name], timeout=30)
        self.clients.append(c)
        return c

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        self._stop()


def make_settings(tokens: dict[str, str], **overrides: object) -> ServiceSettings:
    clients = tuple(
        ClientSpec(name, hash_token(tokens[name]), keys, ops)
        for name, (keys, ops) in CLIENTS.items()
    )
    base = ServiceSettings(rate_limit_per_s=0, clients=clients, ready_interval_s=0.2)
    return replace(base, **overrides)  # type: ignore[arg-type]


def serve(hsm: Hsm, settings: ServiceSettings) -> tuple[str, Service, Callable[[], None]]:
    """Serve the app over ``hsm`` on a free loopback port in a thread; (url, state, stop)."""
    from anyhsm.service.server import tls_context

    app = create_app(hsm, settings, version="test")
    ctx = tls_context(settings)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    started = threading.Event()
    port: list[int] = []
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
            loop.run_until_complete(site.start())
            server = site._server
            assert server is not None
            port.append(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        except BaseException as e:
            failure.append(e)
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="anyhsm-test-service", daemon=True)
    thread.start()
    started.wait(30)
    if failure:
        raise failure[0]

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)

    scheme = "https" if ctx is not None else "http"
    return f"{scheme}://127.0.0.1:{port[0]}", app[SERVICE], stop


def new_deployment(directory: Path) -> Hsm:
    cfg = init_deployment(
        directory, SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF, network=Network.REGTEST
    )
    return open_hsm(cfg, passphrase=PASSPHRASE)


@pytest.fixture(autouse=True)
def _answers_match_the_openapi_document(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every answer any client in these tests receives is checked against the committed
    OpenAPI document: its status is declared for the operation and its body validates."""
    from tests.service.openapi_check import check_response

    original = Client._send

    def checked(
        self: Client, method: str, target: str, data: bytes | None, headers: Mapping[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        status, body, out = original(self, method, target, data, headers)
        check_response(method, target, status, body, out.get("content-type", ""))
        return status, body, out

    monkeypatch.setattr(Client, "_send", checked)


def simulator(directory: Path, **faults: object) -> Hsm:
    """The simulator provider (in-memory keys) with injected faults (latency_ms, ...)."""
    from tests.bitcoin.test_signer import simulator_hsm

    return simulator_hsm(directory, **faults)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start a service (keys hot-1, hot-2, cold-1 and the wallet w) with settings
    overrides; ``handle`` makes the handle from a directory (default: a software
    keystore deployment)."""
    running: list[Running] = []

    def make(handle: Callable[[Path], Hsm] | None = None, **overrides: object) -> Running:
        hsm = (handle or new_deployment)(tmp_path / f"dep{len(running)}")
        for label in KEYS:
            hsm.generate_key(label)
        wallet = add_wallet(hsm, "w", SEED)
        tokens = {name: new_token() for name in CLIENTS}
        url, svc, stop = serve(hsm, make_settings(tokens, **overrides))
        r = Running(url, hsm, tokens, svc, wallet, stop)
        running.append(r)
        return r

    yield make
    for r in running:
        r.stop()
        r.hsm.close()


@pytest.fixture
def service(start: Callable[..., Running]) -> Running:
    return start()
