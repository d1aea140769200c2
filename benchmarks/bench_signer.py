"""Benchmark: ``anyhsm-signer`` end to end, called as Bitcoin Core calls it.

Core runs the signer as a new process for every call, and calls ``enumerate`` before
each wallet operation, so what counts is the whole process: start, config, keystore
unlock, the work, the one JSON line. On a deployment with the default keystore KDF
(Argon2id 64 MiB, 3 passes: what an operator gets) and one BIP32 key, best of
``--rounds`` wall-clock runs of each row:

- ``python -c pass`` and ``Config.load`` in a fresh interpreter: the references a
  passphrase-free ``enumerate`` cannot go below;
- ``enumerate`` from the public key index (no passphrase, no keystore): target within
  1.5x of loading the config alone;
- ``enumerate`` with no index, which opens the keystore (the KDF): what the index saves;
- ``signtx`` of a 1-input and of a ``--inputs``-input P2WPKH PSBT, standard input
  ``signtx <base64>`` as Core v28+ writes it (argv and stdin built as in
  ``src/external_signer.cpp``);
- ``anyhsm psbt sign`` of the same PSBT in a fresh process (the CLI, same operation, same
  deployment): the reference for ``signtx``, target signtx <= 1.1x (the protocol layer adds
  parsing one line and printing one; everything else is the shared operation);
- the same signing in-process on an open handle (``anyhsm.ops.psbt.sign_psbt``): what
  remains of the end-to-end time once the process, the imports and the KDF are paid.

Run: ``.venv/bin/python benchmarks/bench_signer.py [--inputs 100] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_psbt import build

from anyhsm.config import Config
from anyhsm.deploy import init_deployment
from anyhsm.hsm import open_hsm
from anyhsm.ops.psbt import sign_psbt
from anyhsm.secret import SecretBytes
from anyhsm.types import KeyType

PASSPHRASE = "benchmark passphrase, long enough for the keystore"
SEED = bytes(range(32))


def _signer() -> list[str]:
    script = Path(sys.executable).with_name("anyhsm-signer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "anyhsm.signer"]


def _anyhsm() -> list[str]:
    script = Path(sys.executable).with_name("anyhsm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "anyhsm.cli.main"]


def best(fn: Callable[[], object], rounds: int) -> float:
    return interleaved([fn], rounds)[0]


def interleaved(fns: list[Callable[[], object]], rounds: int) -> list[float]:
    """Best time of each of ``fns``, run in turn round after round, so that what is
    compared saw the same machine (other load moves both, not one)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return [min(t) for t in times]


def run(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> bytes:
    p = subprocess.run(argv, input=stdin, capture_output=True, env=env, check=False)
    first = p.stdout.split(b"\n", 1)[0]
    if p.returncode or b'"error"' in first:
        raise SystemExit(f"{argv[-1]} failed ({p.returncode}): {first[:300]!r} {p.stderr[:300]!r}")
    return first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = init_deployment(Path(tmp) / "dep", SecretBytes(PASSPHRASE.encode()))
        hsm = open_hsm(Config.load(cfg_path, env={}), passphrase=PASSPHRASE)
        hsm.import_key("core", SEED, KeyType.BIP32)
        fp = hsm.get_key("core").master_fingerprint
        assert fp is not None
        big, _ = build("p2wpkh", SEED, args.inputs)
        one, _ = build("p2wpkh", SEED, 1)
        psbt_file = Path(tmp) / "big.psbt"
        psbt_file.write_text(big.to_base64())
        inprocess = best(lambda: sign_psbt(hsm, big, "core"), args.rounds)
        hsm.close()

        base = {k: v for k, v in os.environ.items() if not k.startswith("ANYHSM_")}
        env = {**base, "ANYHSM_CONFIG": str(cfg_path), "ANYHSM_PASSPHRASE": PASSPHRASE}
        locked = {**base, "ANYHSM_CONFIG": str(cfg_path)}
        signer = _signer()
        index = cfg_path.parent / "signer-public.json"

        def tx(psbt_b64: str) -> Callable[[], object]:
            argv = [*signer, "--stdin", "--fingerprint", fp.hex(), "--chain", "regtest"]
            return lambda: run(argv, env, ("signtx " + psbt_b64).encode())

        def no_index() -> object:
            index.unlink(missing_ok=True)
            return run([*signer, "enumerate"], env)

        load = "from anyhsm.config import Config, find_config; Config.load(find_config())"
        no_index_t = best(no_index, args.rounds)
        run([*signer, "enumerate"], env)  # writes the index
        start, config_t, enum_t = interleaved(
            [
                lambda: run([sys.executable, "-c", "pass"], env),
                lambda: run([sys.executable, "-c", load], env),
                lambda: run([*signer, "enumerate"], locked),
            ],
            args.rounds,
        )
        cli = [*_anyhsm(), "psbt", "sign", "core", str(psbt_file), "--json"]
        one_t, big_t, cli_t = interleaved(
            [tx(one.to_base64()), tx(big.to_base64()), lambda: run(cli, env)], args.rounds
        )
        rows: list[tuple[str, float]] = [
            ("python -c pass", start),
            ("Config.load in a new process", config_t),
            ("enumerate, no index (opens the keystore)", no_index_t),
            ("enumerate from the index, no passphrase", enum_t),
            ("signtx, 1 input", one_t),
            (f"signtx, {args.inputs} inputs", big_t),
            (f"anyhsm psbt sign, {args.inputs} inputs", cli_t),
        ]
        rows.append((f"in-process sign_psbt, {args.inputs} inputs", inprocess))
    t = dict(rows)
    kdf = "default KDF"
    print(f"anyhsm-signer end to end (best of {args.rounds}, {kdf}, {args.inputs} P2WPKH inputs)")
    print(f"{'row':<48} {'ms':>9}")
    for name, secs in rows:
        print(f"{name:<48} {secs * 1000:9.1f}")
    enum_ratio = t["enumerate from the index, no passphrase"] / t["Config.load in a new process"]
    sign_ratio = t[f"signtx, {args.inputs} inputs"] / t[f"anyhsm psbt sign, {args.inputs} inputs"]
    saved = (
        t["enumerate, no index (opens the keystore)"] / t["enumerate from the index, no passphrase"]
    )
    print()
    for label, ratio, target in (
        ("enumerate (index) / Config.load process", enum_ratio, 1.5),
        ("signtx / anyhsm psbt sign", sign_ratio, 1.1),
    ):
        verdict = "PASS" if ratio <= target else "MISS"
        print(f"{label:<42} {ratio:5.2f}x  target <= {target}x  {verdict}")
    print(
        f"{'enumerate without index / with index':<42} {saved:5.2f}x  (the unlock the index avoids)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
