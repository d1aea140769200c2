"""Time to open the keystore via TPM unseal versus via the passphrase KDF, same run.

Starts its own swtpm (tests/support/swtpm.py), creates a keystore with the
production KDF defaults (Argon2id 64 MiB, 3 passes) and enrolls it, then opens
it both ways, alternating, and prints a table with the ratio to the TPM path.
Also times seal and unseal alone, and scrypt (n=2^17) as a second KDF reference.

    .venv/bin/python benchmarks/bench_tpm.py [--rounds 15]

swtpm is a software TPM on a loopback socket: a hardware TPM is slower
(create_primary and unseal take tens of milliseconds on typical discrete
TPMs), so the ratio here is the upper bound of the TPM path's advantage.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.swtpm import start_swtpm, swtpm_available  # noqa: E402

from anyhsm.keystore import KdfParams, Keystore  # noqa: E402
from anyhsm.secret import SecretBytes  # noqa: E402
from anyhsm.tpm import TpmSettings, enroll, read_blob, seal, unseal  # noqa: E402

PASSPHRASE = b"a recovery passphrase of some forty characters"


def timed(fn: Callable[[], object], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if not swtpm_available():
        print("swtpm or tpm2-pytss missing: run scripts/install-tpm.sh", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tpm = start_swtpm(root / "swtpm")
        settings = TpmSettings(tcti=tpm.tcti, timeout_s=10.0)
        pcr_settings = TpmSettings(tcti=tpm.tcti, pcrs=(0, 7), timeout_s=10.0)
        stores = {
            "argon2id": (root / "ks-argon2id", KdfParams()),
            "scrypt": (root / "ks-scrypt", KdfParams(name="scrypt", n=2**17, r=8, p=1)),
        }
        for path, kdf in stores.values():
            ks = Keystore.create(path, SecretBytes(PASSPHRASE), kdf=kdf)
            enroll(ks, settings)
            ks.close()
        main_store = stores["argon2id"][0]

        def open_tpm() -> None:
            ks = Keystore.load(main_store)
            with unseal(settings, read_blob(ks)) as mk:
                ks.unlock_with_master_key(mk, via="tpm")
            ks.close()

        def open_passphrase(path: Path) -> Callable[[], None]:
            def run() -> None:
                ks = Keystore.load(path)
                ks.unlock_with_passphrase(SecretBytes(PASSPHRASE))
                ks.close()

            return run

        secret = SecretBytes(bytes(32))
        blob = seal(settings, secret)
        pcr_blob = seal(pcr_settings, secret)

        def do_unseal(s: TpmSettings, b: bytes) -> Callable[[], None]:
            return lambda: unseal(s, b).wipe()

        cases: list[tuple[str, Callable[[], object]]] = [
            ("open via TPM unseal (no PCR policy)", open_tpm),
            ("open via passphrase, Argon2id 64 MiB x3", open_passphrase(main_store)),
            ("open via passphrase, scrypt n=2^17 r=8", open_passphrase(stores["scrypt"][0])),
            ("unseal alone (no PCRs)", do_unseal(settings, blob)),
            ("unseal alone (PCR 0,7 policy)", do_unseal(pcr_settings, pcr_blob)),
            ("seal alone (enrolment)", lambda: seal(settings, secret)),
        ]
        for _, fn in cases:  # warm-up: imports, first connection, page cache
            fn()
        samples: dict[str, list[float]] = {name: [] for name, _ in cases}
        for _ in range(args.rounds):  # interleaved, so drift hits every case alike
            for name, fn in cases:
                samples[name].extend(timed(fn, 1))
        tpm.stop()

    ref = statistics.median(samples[cases[0][0]])
    print(f"keystore open, {args.rounds} rounds each, swtpm 0.7.1 on loopback")
    print(f"{'case':<42} {'median ms':>10} {'p90 ms':>9} {'x TPM open':>11}")
    for name, _ in cases:
        xs = sorted(samples[name])
        med = statistics.median(xs)
        p90 = xs[min(len(xs) - 1, int(0.9 * len(xs)))]
        print(f"{name:<42} {med:>10.2f} {p90:>9.2f} {med / ref:>10.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
