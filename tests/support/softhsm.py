"""Real SoftHSM2 tokens for tests and benchmarks.

:func:`init_softhsm` writes a ``softhsm2.conf`` under a work directory, points
``SOFTHSM2_CONF`` at it (SoftHSM2 reads it when the module is initialised, so set it
before the module is first loaded in the process) and initialises a fresh token with
``softhsm2-util``. :func:`add_token` initialises
another token in the same configuration (a module that is already initialised sees
it after C_Finalize + C_Initialize, which the provider does when it cannot find a
token).
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
    "/usr/local/opt/softhsm/lib/softhsm/libsofthsm2.so",
)
_UTIL_TIMEOUT_S = 60


def find_softhsm_module() -> str | None:
    """Path of libsofthsm2.so (``ANYHSM_TEST_SOFTHSM_MODULE`` overrides), or None."""
    override = os.environ.get("ANYHSM_TEST_SOFTHSM_MODULE")
    if override:
        return override if os.path.isfile(override) else None
    for path in _MODULE_CANDIDATES:
        if os.path.isfile(path):
            return path
    for path in sorted(glob.glob("/usr/lib/*/softhsm/libsofthsm2.so")):
        return path
    return None


def softhsm_util() -> str | None:
    """Path of the ``softhsm2-util`` tool, or None."""
    return shutil.which("softhsm2-util")


def softhsm_available() -> bool:
    """Whether both the module and the tool needed to initialise tokens are installed."""
    return find_softhsm_module() is not None and softhsm_util() is not None


@dataclass(frozen=True)
class SoftHsmToken:
    """An initialised SoftHSM2 token and how to reach it."""

    module: str
    label: str
    pin: str
    so_pin: str
    conf: Path
    token_dir: Path
    serial: str


def _run_util(conf: Path, *args: str) -> str:
    util = softhsm_util()
    if util is None:
        raise RuntimeError("softhsm2-util is not installed (run scripts/install-softhsm.sh)")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    proc = subprocess.run(
        [util, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=_UTIL_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"softhsm2-util {args[0]} failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout


def _serial_of(conf: Path, label: str) -> str:
    """Serial number of the token labelled ``label`` (from ``--show-slots``)."""
    out = _run_util(conf, "--show-slots")
    serial = None
    for line in out.splitlines():
        m = re.match(r"\s*Serial number:\s*(\S*)", line)
        if m:
            serial = m.group(1)
            continue
        m = re.match(r"\s*Label:\s*(.*?)\s*$", line)
        if m and m.group(1) == label and serial:
            return serial
    raise RuntimeError(f"softhsm2-util shows no token labelled {label!r}")


def _init_token(conf: Path, token_dir: Path, module: str, label: str) -> SoftHsmToken:
    pin = "".join(secrets.choice("0123456789") for _ in range(8))
    so_pin = "".join(secrets.choice("0123456789") for _ in range(8))
    _run_util(conf, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin)
    return SoftHsmToken(
        module=module,
        label=label,
        pin=pin,
        so_pin=so_pin,
        conf=conf,
        token_dir=token_dir,
        serial=_serial_of(conf, label),
    )


_process_token_dir: Path | None = None  # one token directory per process (see init_softhsm)


def _conf_text(token_dir: Path) -> str:
    return (
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )


def _delete_token(conf: Path, label: str) -> None:
    util = softhsm_util()
    if util is None:
        return
    subprocess.run(
        [util, "--delete-token", "--token", label],
        env=dict(os.environ, SOFTHSM2_CONF=str(conf)),
        capture_output=True,
        timeout=_UTIL_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def init_softhsm(workdir: Path, label: str = "anyhsm") -> SoftHsmToken:
    """A SoftHSM2 configuration at ``workdir/softhsm2.conf`` with a fresh token ``label``.

    Sets ``os.environ["SOFTHSM2_CONF"]``; SoftHSM2 reads it at C_Initialize, so it
    must be set before the module is first initialised in this process.

    All calls in one process share one token directory (the first call's
    ``workdir/softhsm-tokens``), and every conf written points at it: the module is
    process-wide, so fixtures of different test directories can then use their
    tokens in any order without the module losing sight of one of them. A token with
    the same label made earlier in the process is deleted first (a fresh token).
    """
    global _process_token_dir
    module = find_softhsm_module()
    if module is None:
        raise RuntimeError("libsofthsm2.so not found (run scripts/install-softhsm.sh)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if _process_token_dir is None or not _process_token_dir.is_dir():
        _process_token_dir = workdir / "softhsm-tokens"
        _process_token_dir.mkdir(parents=True, exist_ok=True)
    token_dir = _process_token_dir
    conf = workdir / "softhsm2.conf"
    conf.write_text(_conf_text(token_dir), encoding="utf-8")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    _delete_token(conf, label)
    return _init_token(conf, token_dir, module, label)


def add_token(token: SoftHsmToken, label: str) -> SoftHsmToken:
    """Another token in the same configuration as ``token`` (an older one with the same
    label is deleted first)."""
    _delete_token(token.conf, label)
    return _init_token(token.conf, token.token_dir, token.module, label)


def token_subdir(token: SoftHsmToken) -> Path:
    """The directory SoftHSM2 keeps this token's objects in (its name ends with the
    serial), e.g. to move it away and back to simulate removing the token."""
    for path in token.token_dir.iterdir():
        if path.is_dir() and path.name.replace("-", "").endswith(token.serial):
            return path
    raise RuntimeError(f"no SoftHSM2 token directory for serial {token.serial}")
