"""A worker process for the spending policy's multi-process tests.

Run as ``python tests/policy/policy_worker.py MODE CONFIG ...``; it opens the real
deployment (passphrase from ``ANYHSM_PASSPHRASE``) and signs through the library's one
signing path (``anyhsm.ops.psbt.sign_psbt``), printing one flushed line per result, only
after the library call returned:

    READY <pid>
    SIGNED <txid>
    REFUSED <txid> <rules>
    FAILED <txid> <error code>      (fault injected: signing failed after the debit)
    DONE

Modes:
    race CONFIG BARRIER_DIR NPROCS PSBT_FILE...
        meet the other workers at a file barrier, then sign each PSBT in turn.
    loop CONFIG PSBT_DIR [--fail-every N]
        sign the PSBTs of PSBT_DIR in a loop, forever (until killed); with --fail-every,
        every N-th signing fails in the provider after the policy debited it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _open(config: str) -> object:
    from anyhsm.config import Config
    from anyhsm.hsm import open_hsm

    return open_hsm(Config.load(config, env={}), passphrase=os.environ["ANYHSM_PASSPHRASE"])


def _barrier(directory: Path, n: int) -> None:
    (directory / f"{os.getpid()}").touch()
    deadline = time.monotonic() + 60
    while len(list(directory.iterdir())) < n:
        if time.monotonic() > deadline:
            raise SystemExit("barrier timeout")
        time.sleep(0.001)


def _sign(hsm: object, data: str) -> None:
    from anyhsm.bitcoin.psbt import Psbt
    from anyhsm.errors import SigningFailed, SpendingPolicyRefused
    from anyhsm.ops.psbt import sign_psbt

    psbt = Psbt.parse(data)
    txid = psbt.unique_id()[::-1].hex()
    try:
        sign_psbt(hsm, psbt, "hot")  # type: ignore[arg-type]
    except SpendingPolicyRefused as e:
        _out(f"REFUSED {txid} {','.join(e.rules)}")
        return
    except SigningFailed as e:
        _out(f"FAILED {txid} {e.code}")
        return
    _out(f"SIGNED {txid}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("race")
    r.add_argument("config")
    r.add_argument("barrier", type=Path)
    r.add_argument("nprocs", type=int)
    r.add_argument("psbts", nargs="+", type=Path)
    lp = sub.add_parser("loop")
    lp.add_argument("config")
    lp.add_argument("psbt_dir", type=Path)
    lp.add_argument("--fail-every", type=int, default=0)
    args = ap.parse_args(argv)
    hsm = _open(args.config)
    _out(f"READY {os.getpid()}")
    if args.mode == "race":
        _barrier(args.barrier, args.nprocs)
        for f in args.psbts:
            _sign(hsm, f.read_text())
        _out("DONE")
        return 0
    files = sorted(args.psbt_dir.iterdir())
    if args.fail_every:
        from anyhsm.errors import SigningFailed

        real = hsm.sign_many  # type: ignore[attr-defined]
        count = [0]

        def flaky(*a: object, **kw: object) -> object:
            count[0] += 1
            if count[0] % args.fail_every == 0:
                raise SigningFailed("fault injected after the debit")
            return real(*a, **kw)

        hsm.sign_many = flaky  # type: ignore[attr-defined]
    n = 0
    while True:
        _sign(hsm, files[n % len(files)].read_text())
        n += 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
