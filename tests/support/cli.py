"""Run the real ``anyhsm`` command in a child process, with none of the developer's
``ANYHSM_*`` variables (only those a test gives)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("ANYHSM_")}
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "anyhsm.cli.main", *args],
        capture_output=True,
        text=True,
        env=e,
        input=stdin,
        cwd=cwd,
        timeout=timeout,
    )
