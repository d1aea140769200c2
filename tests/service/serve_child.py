"""``anyhsm serve``'s run loop in a child process, with the service's settings given as a
JSON file (clients with their token hashes): the lifecycle tests send it real signals.

Usage: python -m tests.service.serve_child CONFIG SETTINGS_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from anyhsm.config import Config
from anyhsm.service.app import configure_logging
from anyhsm.service.server import run
from anyhsm.service.settings import ClientSpec, Listen, Op, ServiceSettings


def settings_from(path: Path) -> ServiceSettings:
    raw = json.loads(path.read_text())
    clients = tuple(
        ClientSpec(c["name"], c["token_hash"], tuple(c["keys"]), frozenset(Op(o) for o in c["ops"]))
        for c in raw.pop("clients")
    )
    listen = Listen.parse(raw.pop("listen", "127.0.0.1:0"))
    return ServiceSettings(listen=listen, clients=clients, **raw)


def main() -> int:
    configure_logging()
    cfg = Config.load(sys.argv[1])
    settings_path = Path(sys.argv[2])
    return run(cfg, settings_from(settings_path), lambda: settings_from(settings_path))


if __name__ == "__main__":
    sys.exit(main())
