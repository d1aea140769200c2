"""Process hardening (issue 9, item 18): a crash core of a production process held the
keystore master key. Opened in staging or production, the process is non-dumpable with a
zero core limit, secret buffers are MADV_DONTDUMP, and ``health`` says so. Each check runs
in a fresh process (the kernel's own answers: prctl, getrlimit, /proc/self/smaps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE

CHILD = r"""
import ctypes, json, os, resource, sys

# Start as permissive as this process may be, so the open is what lowers it.
soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
libc = ctypes.CDLL(None, use_errno=True)
PR_GET_DUMPABLE = 3
before = {"dumpable": libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0),
          "core": list(resource.getrlimit(resource.RLIMIT_CORE))}

from anyhsm import open_hsm
from anyhsm.secret import SecretBytes


def address(buf):
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


def vmflags(addr):
    # The VmFlags of the mapping that holds addr ("dd": do not dump).
    inside = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()[0] if line.strip() else ""
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    return None


with open_hsm(sys.argv[1]) as hsm:
    after = {"dumpable": libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0),
             "core": list(resource.getrlimit(resource.RLIMIT_CORE))}
    fresh = SecretBytes(os.urandom(32))
    flags = {"fresh": vmflags(address(fresh.buffer))}
    master = getattr(hsm.keystore, "_master", None)
    if isinstance(master, SecretBytes) and not master.wiped:
        flags["master"] = vmflags(address(master.buffer))
    process = hsm.health().to_dict().get("process", {})
print(json.dumps({"before": before, "after": after, "flags": flags, "process": process}))
"""


def _env(extra: dict[str, str]) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("ANYHSM_")}
    return e | extra


def _deployment(tmp_path: Path, environment: str) -> Path:
    """A real deployment built by ``anyhsm init`` in a child process (so the test process
    itself is not hardened by it)."""
    pw = tmp_path / "pw"
    pw.write_text(PASSPHRASE)
    pw.chmod(0o600)
    args = ["--passphrase-file", str(pw), "init", "--dir", str(tmp_path / environment)]
    args += ["--environment", environment, "--network", "signet"]
    if environment != "production":
        args.append("--insecure-fast-kdf")
    r = subprocess.run(
        [sys.executable, "-m", "anyhsm.cli.main", *args],
        capture_output=True,
        text=True,
        env=_env({}),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return tmp_path / environment / "anyhsm.toml"


def _child(cfg: Path) -> dict[str, dict[str, object]]:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(cfg)],
        capture_output=True,
        text=True,
        env=_env({"ANYHSM_PASSPHRASE": PASSPHRASE}),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    data: dict[str, dict[str, object]] = json.loads(r.stdout.strip().splitlines()[-1])
    return data


def _smaps_has_vmflags() -> bool:
    try:
        return "VmFlags:" in Path("/proc/self/smaps").read_text()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux prctl/smaps")


@pytest.mark.parametrize("environment", ["production", "staging"])
def test_open_makes_the_process_non_dumpable(tmp_path: Path, environment: str) -> None:
    out = _child(_deployment(tmp_path, environment))
    assert out["before"]["dumpable"] == 1  # a fresh process is dumpable ...
    assert out["after"]["dumpable"] == 0  # ... the open made it non-dumpable
    assert out["after"]["core"] == [0, 0]  # and no core file, ever (hard limit too)
    process = out["process"]
    assert process["dumpable"] is False and process["core_limit"] == 0
    assert process["hardening"] == "required" and process["ok"] is True
    assert process["dontdump_secrets"] == "marked"


@pytest.mark.skipif(not _smaps_has_vmflags(), reason="this kernel does not expose VmFlags")
def test_secret_pages_are_excluded_from_core_dumps(tmp_path: Path) -> None:
    out = _child(_deployment(tmp_path, "production"))
    flags = out["flags"]
    assert flags["fresh"] is not None and "dd" in flags["fresh"]  # type: ignore[operator]
    assert "master" in flags, "the keystore master key buffer was not found"
    assert "dd" in flags["master"]  # type: ignore[operator]


def test_development_is_left_alone_and_says_so(tmp_path: Path) -> None:
    out = _child(_deployment(tmp_path, "development"))
    assert out["after"]["dumpable"] == out["before"]["dumpable"] == 1
    process = out["process"]
    assert process["hardening"] == "not required" and process["dumpable"] is True
    assert process["ok"] is True


def test_health_cli_reports_the_process_section(tmp_path: Path) -> None:
    cfg = _deployment(tmp_path, "production")
    r = subprocess.run(
        [sys.executable, "-m", "anyhsm.cli.main", "--config", str(cfg), "health"],
        capture_output=True,
        text=True,
        env=_env({"ANYHSM_PASSPHRASE": PASSPHRASE}),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("process:"))
    assert "dumpable no" in line and "core limit 0" in line and "secrets dontdump" in line
