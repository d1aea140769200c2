"""The README's Quick start and its Python snippet run as written (issue 10 item 11): the
shell block (but its bootstrap line) in a fresh directory, with `.venv/bin/anyhsm` this
interpreter's anyhsm, then the Python block in the same directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _block(after: str, lang: str) -> str:
    text = README.read_text()
    start = text.index(after)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert m is not None, f"no {lang} block after {after!r}"
    return m.group(1)


def test_quick_start_and_python_snippet_run_as_written(tmp_path: Path) -> None:
    shell = _block("## Quick start", "sh")
    lines = [line for line in shell.splitlines() if "bootstrap.sh" not in line]
    assert lines, "the Quick start lost its commands"
    wrapper = tmp_path / ".venv" / "bin" / "anyhsm"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m anyhsm.cli.main "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYHSM_")}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "\n".join(lines)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "hsm" / "anyhsm.toml").exists()

    snippet = _block("From Python:", "python")
    env["ANYHSM_PASSPHRASE"] = "a long passphrase, 32+ characters in production"
    ran = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.split() == ["software", "software"]  # labels, not numbers
