"""The service as a process: ``anyhsm serve``'s run loop in a child, sent real signals.

- SIGTERM with requests in flight: every request the server took is answered, none is
  lost (each signature made is one a client received), the handle closes (its last audit
  entry), the process exits 0, and the log verifies.
- kill -9 under load: every signature a client received has its audit entry (written
  before the answer is sent), and the log verifies.
- SIGHUP: the configuration is reloaded through Hsm.reload(); the audit chain goes on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.service.conftest import PASSPHRASE

from anyhsm import open_hsm
from anyhsm.client import Client
from anyhsm.crypto import secp256k1 as curve
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.errors import HsmError
from anyhsm.secret import SecretBytes
from anyhsm.service.tokens import hash_token, new_token

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    url: str
    token: str
    config: Path
    log: list[dict[str, object]] = field(default_factory=list)
    reader: threading.Thread = field(init=False)

    def client(self) -> Client:
        return Client(self.url, self.token, timeout=30)

    def events(self, name: str) -> list[dict[str, object]]:
        return [e for e in self.log if e.get("event") == name]


def _read_log(child: Child) -> None:
    assert child.proc.stderr is not None
    for raw in child.proc.stderr:
        try:
            child.log.append(json.loads(raw))
        except ValueError:
            child.log.append({"event": "text", "line": raw.decode(errors="replace")})


def spawn(args: list[str], config: Path, token: str = "") -> Child:
    """A service child (``python ARGS``) with its JSON log read in a thread; returns once
    it logs "listening" (its ``url`` set from the address)."""
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    env = {**os.environ, "ANYHSM_PASSPHRASE": PASSPHRASE, "PYTHONPATH": path}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    c = Child(proc, "", token, config)
    c.reader = threading.Thread(target=_read_log, args=(c,), daemon=True)
    c.reader.start()
    deadline = time.monotonic() + 60
    while not c.events("listening"):
        assert proc.poll() is None, c.log
        assert time.monotonic() < deadline, c.log
        time.sleep(0.05)
    c.url = f"http://{c.events('listening')[0]['address']}"
    return c


def stop_child(child: Child) -> None:
    """SIGTERM, then kill if it has not stopped within a minute."""
    child.proc.send_signal(signal.SIGTERM)
    try:
        child.proc.wait(60)
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
        child.reader.join(10)


def serve_command(config: Path) -> list[str]:
    """``anyhsm --config CONFIG serve --listen 127.0.0.1:0`` (as python -m arguments)."""
    return ["-m", "anyhsm.cli.main", "--config", str(config), "serve", "--listen", "127.0.0.1:0"]


@pytest.fixture
def deployment_config(tmp_path: Path) -> Path:
    cfg = init_deployment(tmp_path / "dep", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    with open_hsm(cfg, passphrase=PASSPHRASE) as hsm:
        hsm.generate_key("hot-1")
    return cfg


@pytest.fixture
def child(deployment_config: Path, tmp_path: Path) -> Iterator[Child]:
    token = new_token()
    settings = tmp_path / "service.json"
    settings.write_text(
        json.dumps(
            {
                "clients": [
                    {
                        "name": "signer",
                        "token_hash": hash_token(token),
                        "keys": ["hot-*"],
                        "ops": ["read", "sign-digest", "admin"],
                    }
                ],
                "rate_limit_per_s": 0,
                "max_concurrency": 4,
            }
        )
    )
    c = spawn(
        ["-m", "tests.service.serve_child", str(deployment_config), str(settings)],
        deployment_config,
        token,
    )
    proc = c.proc
    yield c
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)
    c.reader.join(10)


def audit_entries(cfg: Path) -> list[dict[str, object]]:
    path = cfg.parent / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verify_log(cfg: Path) -> None:
    with open_hsm(cfg, passphrase=PASSPHRASE, verify_only=True) as hsm:
        res = hsm.verify_audit()
    assert res.ok, res


class Load:
    """Threads signing unique digests as fast as they can; what each client received."""

    def __init__(self, child: Child, threads: int) -> None:
        self.child = child
        self.received: dict[bytes, bytes] = {}
        self.failures: list[HsmError] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(threads)]
        self.pub = b""

    def _run(self, n: int) -> None:
        c = self.child.client()
        i = 0
        try:
            while not self.stop.is_set():
                digest = hashlib.sha256(f"{n}:{i}".encode()).digest()
                i += 1
                try:
                    sig = c.sign("hot-1", digest)
                except HsmError as e:
                    with self._lock:
                        self.failures.append(e)
                    if e.code == "service_unreachable":
                        return
                    continue
                with self._lock:
                    self.received[digest] = sig
        finally:
            c.close()

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def signed_digests(cfg: Path) -> dict[str, dict[str, object]]:
    return {
        str(e["detail"]["digest"]): e  # type: ignore[index]
        for e in audit_entries(cfg)
        if e["op"] == "sign" and e["outcome"] == "ok" and e.get("principal") == "signer"
    }


def test_sigterm_finishes_in_flight_requests_and_loses_none(child: Child) -> None:
    pub = child.client().get_key("hot-1").public_key
    load = Load(child, 6)
    load.start()
    time.sleep(1.0)
    assert load.received, child.log
    child.proc.send_signal(signal.SIGTERM)
    assert child.proc.wait(60) == 0, child.log
    load.join()
    made = signed_digests(child.config)
    assert set(made) == {d.hex() for d in load.received}  # none made but not delivered
    for digest, sig in load.received.items():
        assert curve.ecdsa_verify(pub, digest, sig)
    assert all(e.code in ("service_unreachable", "service_busy") for e in load.failures)
    entries = audit_entries(child.config)
    assert entries[-1]["op"] == "close" and entries[-1]["principal"] == "(service)"
    assert child.events("stopping") and child.events("stopped")
    verify_log(child.config)


def test_kill_9_under_load_every_received_signature_is_audited(child: Child) -> None:
    load = Load(child, 6)
    load.start()
    time.sleep(1.0)
    child.proc.kill()
    child.proc.wait(30)
    load.join()
    assert load.received
    made = signed_digests(child.config)
    missing = [d.hex() for d in load.received if d.hex() not in made]
    assert not missing
    verify_log(child.config)


def test_sighup_reloads_and_the_chain_goes_on(child: Child) -> None:
    c = child.client()
    c.sign("hot-1", hashlib.sha256(b"before").digest())
    chain = audit_entries(child.config)
    child.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while not child.events("reloaded"):
        assert time.monotonic() < deadline, child.log
        time.sleep(0.05)
    c.sign("hot-1", hashlib.sha256(b"after").digest())
    entries = audit_entries(child.config)
    assert entries[: len(chain)] == chain
    reloads = [e for e in entries if e["op"] == "reload"]
    assert [e["outcome"] for e in reloads] == ["started", "ok"]
    assert all(e["principal"] == "(service)" for e in reloads)
    assert c.verify_audit().ok
    assert child.client().ready().ready
    child.proc.send_signal(signal.SIGTERM)
    assert child.proc.wait(60) == 0
    verify_log(child.config)


def test_anyhsm_serve_runs_until_sigterm(deployment_config: Path) -> None:
    c = spawn(serve_command(deployment_config), deployment_config)
    try:
        event = c.events("listening")[0]
        assert event["clients"] == 0 and event["tls"] is False
        # the server extra brings uvloop, and anyhsm serve runs on it when it is there
        uv = importlib.util.find_spec("uvloop") is not None
        assert event["event_loop"] == ("uvloop" if uv else "asyncio")
        assert Client(c.url).ready().ready
        c.proc.send_signal(signal.SIGTERM)
        assert c.proc.wait(60) == 0
    finally:
        if c.proc.poll() is None:
            c.proc.kill()
        c.reader.join(10)
    assert audit_entries(deployment_config)[-1]["op"] == "close"


def test_anyhsm_serve_refuses_another_address_without_tls(deployment_config: Path) -> None:
    env = {**os.environ, "ANYHSM_PASSPHRASE": PASSPHRASE}
    argv = [sys.executable, "-m", "anyhsm.cli.main", "--config", str(deployment_config)]
    proc = subprocess.run(
        [*argv, "--json", "serve", "--listen", "0.0.0.0:0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    err = json.loads(proc.stdout)["error"]
    assert err["code"] == "config_error" and "loopback" in err["message"]
