"""Signatures per second through the PKCS#11 provider vs raw python-pkcs11, same token, same run.

Sets up its own temporary SoftHSM2 token (tests/support/softhsm.py), then for each
way of initialising the module:

- ``serialised``  (``threadsafe_module = false``, the default): C_Initialize without
  locking flags, as python-pkcs11 does; SoftHSM2 then has no mutexes, so the raw
  4-thread run must hold one lock around every call (without it, it crashes);
- ``os-locking``  (``threadsafe_module = true``): C_Initialize with CKF_OS_LOCKING_OK,
  so sessions really run in parallel (raw threads need no lock);

it measures, interleaved over several rounds (median reported):

- ``raw``: ``PrivateKey.sign(digest, mechanism=CKM_ECDSA)`` on a key object found once,
  one session per thread -- the floor for any python-pkcs11 user;
- ``raw+verify``: the same plus what a careful caller must add before using the
  signature: low-S strict DER and a libsecp256k1 verification;
- ``anyhsm``: ``Pkcs11Provider.sign_digest`` (session pool, module gate, DER, verify).

Targets: anyhsm >= 0.9 x raw single-threaded; 4 threads never crash and lose no
throughput against 1. Run: ``.venv/bin/python benchmarks/bench_pkcs11.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "src"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import coincurve  # noqa: E402
import pkcs11  # noqa: E402
from tests.support.softhsm import find_softhsm_module, init_softhsm, softhsm_util  # noqa: E402

from anyhsm.crypto import secp256k1  # noqa: E402
from anyhsm.provider import ProviderContext  # noqa: E402
from anyhsm.providers.pkcs11.module import loaded_module  # noqa: E402
from anyhsm.providers.pkcs11.provider import Pkcs11Provider  # noqa: E402
from anyhsm.types import Environment, KeySpec, Network, SigScheme  # noqa: E402

THREADS = (1, 4)
Signer = Callable[[int, bytes], object]  # (thread index, digest) -> signature


def _rate(sign: Signer, threads: int, per_thread: int) -> float:
    """Signatures per second with ``threads`` threads each signing ``per_thread`` digests."""
    digests = [os.urandom(32) for _ in range(per_thread)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)

    def work(n: int) -> None:
        try:
            barrier.wait()
            for d in digests:
                sign(n, d)
        except BaseException as exc:  # reported below: the run must not hide failures
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} thread(s) failed: {errors[0]!r}")
    return threads * per_thread / elapsed


def _phase(
    token_pin: str, module: str, label: str, threadsafe: bool, args: argparse.Namespace
) -> dict[tuple[str, int], float]:
    os.environ["ANYHSM_PKCS11_PIN"] = token_pin
    ctx = ProviderContext(
        environment=Environment.DEVELOPMENT,
        network=Network.REGTEST,
        config_dir=Path.cwd(),
        settings={
            "module": module,
            "token_label": label,
            "pool_size": max(THREADS),
            "threadsafe_module": threadsafe,
        },
        timeout_s=60.0,
    )
    provider = Pkcs11Provider(ctx)
    provider.open()
    key = provider.generate_key(KeySpec(f"bench-{os.urandom(4).hex()}"))
    key_id = bytes.fromhex(key.id)
    loaded = loaded_module(module)
    assert loaded is not None and loaded.lib is not None
    gate = loaded.gate
    parallel = loaded.os_locking
    # Raw sessions on the same token; the provider's login is the application's login.
    with gate.shared(60.0):
        token = loaded.lib.get_token(token_label=label)
        sessions = [token.open(rw=False) for _ in range(max(THREADS))]
        keys = [s.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, id=key_id) for s in sessions]
    mech = pkcs11.Mechanism.ECDSA
    pub = coincurve.PublicKey(key.public_key)
    raw_lock = nullcontext() if parallel else threading.Lock()

    def raw(n: int, d: bytes) -> object:
        with raw_lock:  # without OS locking SoftHSM2 must never see two calls at once
            return keys[n].sign(d, mechanism=mech)

    def raw_verify(n: int, d: bytes) -> object:
        der = secp256k1.der_from_raw(bytes(raw(n, d)))  # type: ignore[arg-type]
        if not pub.verify(der, d, hasher=None):
            raise RuntimeError("raw signature does not verify")
        return der

    def anyhsm(n: int, d: bytes) -> object:
        return provider.sign_digest(key.id, d, SigScheme.ECDSA)

    signers: dict[str, Signer] = {"raw": raw, "raw+verify": raw_verify, "anyhsm": anyhsm}
    samples: dict[tuple[str, int], list[float]] = {(n, t): [] for n in signers for t in THREADS}
    for name in signers:  # warm-up
        _rate(signers[name], 1, 50)
    for _ in range(args.rounds):
        for threads in THREADS:
            for name, sign in signers.items():
                per_thread = max(args.signatures // threads, 1)
                samples[(name, threads)].append(_rate(sign, threads, per_thread))
    with gate.shared(60.0):
        for s in sessions:
            s.close()
    provider.delete_key(key.id)
    provider.close()
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signatures", type=int, default=600, help="per configuration and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    args = parser.parse_args()
    module = find_softhsm_module()
    if module is None or softhsm_util() is None:
        print("SoftHSM2 is not installed: run scripts/install-softhsm.sh", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="anyhsm-bench-") as tmp:
        token = init_softhsm(Path(tmp), label="anyhsm-bench")
        results = {
            "serialised": _phase(token.pin, token.module, token.label, False, args),
            "os-locking": _phase(token.pin, token.module, token.label, True, args),
        }
    print(f"SoftHSM2 module {module}; {args.rounds} rounds x {args.signatures} signatures; medians")
    print(
        f"{'module init':<12} {'threads':>7} {'raw/s':>9} {'raw+verify/s':>13} {'anyhsm/s':>9} "
        f"{'anyhsm/raw':>10} {'anyhsm/(raw+verify)':>20}"
    )
    for mode, res in results.items():
        for threads in THREADS:
            raw, rawv, ours = (res[(n, threads)] for n in ("raw", "raw+verify", "anyhsm"))
            print(
                f"{mode:<12} {threads:>7} {raw:>9.0f} {rawv:>13.0f} {ours:>9.0f} "
                f"{ours / raw:>10.3f} {ours / rawv:>20.3f}"
            )
    print()
    ok = True
    for mode, res in results.items():
        single = res[("anyhsm", 1)] / res[("raw", 1)]
        scale = res[("anyhsm", 4)] / res[("anyhsm", 1)]
        target = "met" if single >= 0.9 else "NOT met"
        ok = ok and single >= 0.9 and scale >= 1.0
        print(
            f"{mode}: anyhsm/raw single-threaded = {single:.3f} (target >= 0.9: {target}); "
            f"anyhsm 4 threads / 1 thread = {scale:.3f} (target >= 1.0: "
            f"{'met' if scale >= 1.0 else 'NOT met'}); no crash"
        )
    print("raw+verify shows what the mandatory libsecp256k1 check of every signature costs.")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
