"""Start-up cost of the ``anyhsm`` command, against ``python -c pass`` measured in the same run.

    .venv/bin/python benchmarks/bench_cli.py [--rounds 21]

Each row is the wall time of a fresh process (``subprocess.run`` until exit, output
captured), median of ``--rounds`` runs interleaved with the reference so that machine
load hits both alike. The command is the installed console script (``.venv/bin/anyhsm``)
when it exists, else ``python -m anyhsm.cli.main``. Also printed: which anyhsm modules
and heavy dependencies each command imports (from ``python -X importtime``), since the
start-up budget is kept by importing only what the command at hand needs.

Targets (issue 10): ``anyhsm --version`` and ``anyhsm --help`` within 4x of
``python -c pass``; falling back from an absent PKCS#11 module costs under 10 ms in a
fresh process: ``anyhsm health --json`` on a deployment whose chain is
``["pkcs11", "software"]`` with a module path that does not exist, against the same
deployment with the chain ``["software"]``, both measured in this run (the difference of
the medians, and their ratio). A benchmark, not a test: PASS/MISS, exit 0 either way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 4.0
FALLBACK_TARGET_MS = 10.0
_PASSPHRASE = "benchmark passphrase, long enough to be accepted"
HEAVY = ("cryptography", "coincurve", "argon2", "pkcs11", "tpm2_pytss", "importlib.metadata")


def _anyhsm() -> list[str]:
    script = Path(sys.executable).parent / "anyhsm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "anyhsm.cli.main"]


def _wall(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, timeout=60, env=env)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{cmd} failed ({r.returncode}): {r.stderr.decode()[-500:]}")
    return elapsed


def _imports(args: list[str], env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    code = "import sys; from anyhsm.cli.main import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    names = [
        line.rsplit("|", 1)[1].strip()
        for line in r.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    ]
    ours = [n for n in names if n == "anyhsm" or n.startswith("anyhsm.")]
    heavy = sorted(
        {n.split(".")[0] if n != "importlib.metadata" else n for n in names if n.startswith(HEAVY)}
    )
    return len(ours), heavy


def _deployment(directory: Path) -> tuple[Path, Path, dict[str, str]]:
    """A fresh deployment (cheap KDF) and two configs on it: chain software, and chain
    pkcs11,software with a PKCS#11 module that does not exist."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYHSM_")}
    env["ANYHSM_PASSPHRASE"] = _PASSPHRASE
    init = [*_anyhsm(), "init", "--dir", str(directory / "dep"), "--insecure-fast-kdf"]
    r = subprocess.run(init, capture_output=True, text=True, timeout=120, env=env)
    if r.returncode != 0:
        raise SystemExit(f"anyhsm init failed ({r.returncode}): {r.stderr[-500:]}")
    software = directory / "dep" / "anyhsm.toml"
    text = software.read_text()
    assert 'chain = ["software"]' in text, text
    absent = directory / "dep" / "absent-pkcs11.toml"
    absent.write_text(
        text.replace('chain = ["software"]', 'chain = ["pkcs11", "software"]')
        + f'\n[providers.pkcs11]\nmodule = "{directory / "no-such-vendor-pkcs11.so"}"\n'
        'token_label = "anyhsm"\n'
    )
    return software, absent, env


def fallback_row(rounds: int) -> None:
    """The cost of trying an absent PKCS#11 module first, in a fresh ``anyhsm health``."""
    with tempfile.TemporaryDirectory(prefix="anyhsm-bench-") as tmp:
        software, absent, env = _deployment(Path(tmp))
        rows = {
            "health, chain software": [*_anyhsm(), "--config", str(software), "health", "--json"],
            "health, pkcs11 absent first": [
                *_anyhsm(),
                "--config",
                str(absent),
                "health",
                "--json",
            ],
        }
        times: dict[str, list[float]] = {k: [] for k in rows}
        for cmd in rows.values():
            _wall(cmd, env)
        for _ in range(rounds):
            for name, cmd in rows.items():
                times[name].append(_wall(cmd, env))
        base, fell = (statistics.median(times[k]) for k in rows)
        print(f"{'row':<30} {'median ms':>10} {'ratio':>7}  target   {'modules':>8}  heavy imports")
        for name, cmd in rows.items():
            med = statistics.median(times[name])
            n_ours, heavy = _imports(cmd[len(_anyhsm()) :], env)
            ratio = f"{med / base:>7.3f}"
            print(f"{name:<30} {med * 1000:>10.1f} {ratio}  {'':<9}{n_ours:>8}  {', '.join(heavy)}")
        extra_ms = (fell - base) * 1000
        verdict = "PASS" if extra_ms < FALLBACK_TARGET_MS else "MISS"
        print(
            f"{'fallback cost (difference)':<30} {extra_ms:>10.1f} {fell / base:>7.3f}  "
            f"< {FALLBACK_TARGET_MS:g} ms {verdict}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--only-fallback", action="store_true", help="just the PKCS#11 fallback row")
    opts = ap.parse_args()
    if opts.only_fallback:
        fallback_row(opts.rounds)
        return
    base = [sys.executable, "-c", "pass"]
    rows = {
        "anyhsm --version": [*_anyhsm(), "--version"],
        "anyhsm --version --json": [*_anyhsm(), "--version", "--json"],
        "anyhsm --help": [*_anyhsm(), "--help"],
        "anyhsm key --help": [*_anyhsm(), "key", "--help"],
    }
    times: dict[str, list[float]] = {"python -c pass": [], **{k: [] for k in rows}}
    for cmd in [base, *rows.values()]:  # warm the page cache
        _wall(cmd)
    for _ in range(opts.rounds):
        times["python -c pass"].append(_wall(base))
        for name, cmd in rows.items():
            times[name].append(_wall(cmd))
    ref = statistics.median(times["python -c pass"])
    print(
        f"command: {' '.join(_anyhsm())}   rounds: {opts.rounds}   python {sys.version.split()[0]}"
    )
    print(f"{'row':<26} {'median ms':>10} {'ratio':>7}  target   {'modules':>8}  heavy imports")
    print(f"{'python -c pass':<26} {ref * 1000:>10.1f} {1.0:>7.2f}  reference")
    for name, cmd in rows.items():
        med = statistics.median(times[name])
        ratio = med / ref
        gated = name in ("anyhsm --version", "anyhsm --help")
        verdict = ("PASS" if ratio <= TARGET_RATIO else "MISS") if gated else "—"
        target = f"<= {TARGET_RATIO:g}x {verdict}" if gated else "—"
        n_ours, heavy = _imports(cmd[len(_anyhsm()) :])
        print(
            f"{name:<26} {med * 1000:>10.1f} {ratio:>7.2f}  {target:<9}{n_ours:>8}  "
            f"{', '.join(heavy) or 'none'}"
        )
    print()
    fallback_row(opts.rounds)


if __name__ == "__main__":
    main()
