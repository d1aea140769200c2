"""The operator's path: ``anyhsm service add-client`` writes the client (its token's hash
only) into the configuration file and prints the token once, as the last line;
``anyhsm serve`` then serves both clients with their rights; a client added later works
after SIGHUP."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.service.conftest import PASSPHRASE
from tests.service.test_lifecycle import serve_command, spawn

from anyhsm import open_hsm
from anyhsm.client import Client
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.errors import Forbidden
from anyhsm.secret import SecretBytes

DIGEST = hashlib.sha256(b"cli").digest()


def anyhsm(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANYHSM_PASSPHRASE": PASSPHRASE}
    return subprocess.run(
        [sys.executable, "-m", "anyhsm.cli.main", "--config", str(cfg), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_add_client_then_serve_two_clients_of_different_rights(tmp_path: Path) -> None:
    cfg = init_deployment(tmp_path / "dep", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    with open_hsm(cfg, passphrase=PASSPHRASE) as hsm:
        hsm.generate_key("hot-1")
    added = anyhsm(
        cfg, "service", "add-client", "treasury", "--keys", "hot-*", "--ops", "read,sign-digest"
    )
    assert added.returncode == 0, added.stderr
    treasury = added.stdout.strip().splitlines()[-1]
    assert treasury.startswith("ahs_") and treasury not in cfg.read_text()
    monitor = anyhsm(cfg, "service", "add-client", "monitor", "--keys", "*", "--ops", "read")
    monitor_token = monitor.stdout.strip().splitlines()[-1]
    again = anyhsm(
        cfg, "--json", "service", "add-client", "monitor", "--keys", "*", "--ops", "read"
    )
    assert again.returncode == 2 and json.loads(again.stdout)["error"]["code"] == "usage_error"
    listed = json.loads(anyhsm(cfg, "--json", "service", "list-clients").stdout)
    assert [c["name"] for c in listed["clients"]] == ["treasury", "monitor"]
    assert "token" not in json.dumps(listed)

    child = spawn(serve_command(cfg), cfg, treasury)
    proc, url = child.proc, child.url
    deadline = time.monotonic() + 60
    try:
        assert Client(url, treasury).sign("hot-1", DIGEST)
        with pytest.raises(Forbidden):
            Client(url, monitor_token).sign("hot-1", DIGEST)
        assert Client(url, monitor_token).list_keys()
        late = anyhsm(cfg, "service", "add-client", "late", "--keys", "hot-1", "--ops", "read")
        late_token = late.stdout.strip().splitlines()[-1]
        proc.send_signal(signal.SIGHUP)
        while not child.events("reloaded"):
            assert time.monotonic() < deadline + 30, child.log
            time.sleep(0.05)
        assert Client(url, late_token).get_key("hot-1").label == "hot-1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        child.reader.join(10)
    for line in child.log:  # no token in any log line
        assert treasury not in json.dumps(line) and monitor_token not in json.dumps(line)


def test_the_op_vocabulary_is_config_s() -> None:
    import anyhsm.config
    from anyhsm.service.settings import Op

    assert tuple(o.value for o in Op) == anyhsm.config.SERVICE_OPS
