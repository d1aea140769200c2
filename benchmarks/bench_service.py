"""Benchmark: the signing service (``anyhsm serve``) against the handle it serves.

A software-keystore deployment (HD wallet ``w`` and single key ``hot-1``) is measured
first in process, through the handle (the reference, same run, same machine):
single-digest ``Hsm.sign``, batches of 100 digests (``Hsm.sign_many``) and a 10-input
P2WPKH PSBT (``ops.psbt.sign_psbt``). Then the service's run loop is started in a child
process (the same code as ``anyhsm serve``: TLS off, loopback, one client, audit log on)
and a load generator in a second child process (asyncio, raw HTTP/1.1 keep-alive
connections, pre-built requests, so the generator costs little) drives it with 1, 8 and
32 concurrent clients for each workload, reporting requests/s, p50/p99 latency and the
service process's CPU time per request (``cpu ms``: its own cost, which other load on
the machine does not change much).

Targets (issue 12, on this 2-core machine): single-digest signing >= 3,000 requests/s
with 8 clients and p99 < 20 ms; batches of 100 digests >= 0.6x the in-process signing
rate (digests/s); a 10-input PSBT >= 300 signed PSBTs/s. The server and the generator
share the machine's two cores (and with whatever else runs on it): the table says so
beside the numbers (the load average before and after).

Run: ``.venv/bin/python benchmarks/bench_service.py [--seconds 4] [--clients 1,8,32]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PASSPHRASE = "a passphrase long enough for the service benchmark"
ROOT = Path(__file__).resolve().parents[1]


# --- the deployment and the in-process reference -------------------------------------------


def make_deployment(directory: Path) -> tuple[Path, str]:
    """The deployment (config path) and a 10-input PSBT of its wallet (base64)."""
    from anyhsm import open_hsm
    from anyhsm.bitcoin.bip32 import ExtendedKey, KeyOrigin, parse_path
    from anyhsm.bitcoin.psbt import Psbt
    from anyhsm.bitcoin.script import p2wpkh
    from anyhsm.bitcoin.tx import OutPoint, Transaction, TxIn, TxOut
    from anyhsm.crypto.secp256k1 import hash160
    from anyhsm.deploy import FAST_DEV_KDF, init_deployment
    from anyhsm.secret import SecretBytes
    from anyhsm.types import KeyType, Network

    cfg = init_deployment(directory, SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    seed = bytes(range(32))
    with open_hsm(cfg, passphrase=PASSPHRASE) as hsm:
        hsm.generate_key("hot-1")
        hsm.import_key("w", seed, KeyType.BIP32)
    root = ExtendedKey.from_seed(seed, Network.TESTNET)
    rng = random.Random(7)
    prevs, origins = [], []
    for i in range(10):
        path = parse_path(f"m/84h/1h/0h/0/{i}")
        pub = root.derive(path).public_key
        src = TxIn(OutPoint(rng.randbytes(32), 0), b"\x51", 0xFFFFFFFF)
        prevs.append(Transaction(2, [src], [TxOut(100_000, p2wpkh(hash160(pub)))], 0))
        origins.append((pub, KeyOrigin(root.fingerprint, path)))
    txins = [TxIn(OutPoint(p.txid(), 0), b"", 0xFFFFFFFD) for p in prevs]
    out = TxOut(10 * 100_000 - 2_000, p2wpkh(rng.randbytes(20)))
    psbt = Psbt.from_unsigned_tx(Transaction(2, txins, [out], 0))
    for inp, prev, (pub, origin) in zip(psbt.inputs, prevs, origins, strict=True):
        inp.non_witness_utxo = prev
        inp.witness_utxo = prev.outputs[0]
        inp.bip32_derivations[pub] = origin
    return cfg, psbt.to_base64()


def in_process(cfg: Path, psbt_b64: str, seconds: float) -> dict[str, float]:
    """Rates through the handle in this process: signatures/s (one digest per call),
    digests/s in batches of 100, PSBTs/s."""
    from anyhsm import open_hsm
    from anyhsm.ops.psbt import sign_psbt
    from anyhsm.types import SigScheme

    with open_hsm(cfg, passphrase=PASSPHRASE) as hsm:
        digests = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(100)]

        def rate(fn: object, per_call: int) -> float:
            assert callable(fn)
            fn()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                fn()
                n += 1
            return n * per_call / (time.perf_counter() - t0)

        reqs = [(d, SigScheme.ECDSA, None) for d in digests]
        return {
            "sign": rate(lambda: hsm.sign("hot-1", digests[0]), 1),
            "batch": rate(lambda: hsm.sign_many("hot-1", reqs), 100),
            "psbt": rate(lambda: sign_psbt(hsm, psbt_b64, "w"), 1),
        }


# --- the server child ----------------------------------------------------------------------


def serve_child(cfg: str, token_hash: str) -> int:
    """Child: the service's run loop (``anyhsm serve``'s) on a free loopback port."""
    import logging

    from anyhsm.config import Config
    from anyhsm.service.app import configure_logging
    from anyhsm.service.server import run
    from anyhsm.service.settings import ClientSpec, Listen, Op, ServiceSettings

    configure_logging(logging.INFO)
    settings = ServiceSettings(
        listen=Listen("127.0.0.1", 0),
        rate_limit_per_s=0,
        max_pending=1024,
        access_log=False,  # no line per request: not what is measured
        clients=(ClientSpec("bench", token_hash, ("*",), frozenset(Op)),),
    )
    return run(Config.load(cfg), settings)


# --- the load generator child ---------------------------------------------------------------


def load_child(port: int, request_b64: str, conns: int, seconds: float) -> int:
    """Child: ``conns`` keep-alive connections sending the same request as fast as each
    gets its answer; prints rps, p50, p99 (ms) and the statuses seen."""
    request = base64.b64decode(request_b64)
    lat: list[float] = []
    statuses: dict[str, int] = {}

    async def one(stop: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            code = head[9:12].decode()
            statuses[code] = statuses.get(code, 0) + 1
        writer.close()

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(t0 + seconds) for _ in range(conns)))
        return time.perf_counter() - t0

    elapsed = asyncio.run(main())
    lat.sort()
    ok = statuses.get("200", 0)
    print(
        json.dumps(
            {
                "rps": ok / elapsed,
                "p50_ms": lat[len(lat) // 2] * 1000 if lat else 0.0,
                "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else 0.0,
                "statuses": statuses,
            }
        )
    )
    return 0


def listening_port(server: subprocess.Popen[bytes]) -> int:
    """The port from the service's "listening" log line (JSON lines on its stderr)."""
    assert server.stderr is not None
    for raw in server.stderr:
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if event.get("event") == "listening":
            threading.Thread(target=server.stderr.read, daemon=True).start()  # drain
            return int(str(event["address"]).rsplit(":", 1)[1])
    raise SystemExit("the service did not start")


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) the process ``pid`` has used so far; None off Linux.
    Per request, it is the service's own cost, whatever else shares the machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_request(path: str, token: str, body: dict[str, object]) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


# --- the parent ----------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--serve", nargs=2, metavar=("CONFIG", "TOKEN_HASH"), help=argparse.SUPPRESS)
    ap.add_argument("--load", nargs=4, metavar=("PORT", "REQ", "N", "S"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve_child(*args.serve)
    if args.load:
        port, req, n, s = args.load
        return load_child(int(port), req, int(n), float(s))

    from anyhsm.service.tokens import hash_token, new_token

    clients = [int(c) for c in args.clients.split(",")]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cfg, psbt_b64 = make_deployment(Path(tmp) / "dep")
        ref = in_process(cfg, psbt_b64, args.seconds / 2)
        token = new_token()
        env = {**os.environ, "ANYHSM_PASSPHRASE": PASSPHRASE}
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(cfg), hash_token(token)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            port = listening_port(server)
            digests = [hashlib.sha256(i.to_bytes(4, "big")).digest().hex() for i in range(100)]
            work = {
                "sign": (http_request("/v1/keys/hot-1/sign", token, {"digest": digests[0]}), 1),
                "batch": (
                    http_request("/v1/keys/hot-1/sign-batch", token, {"digests": digests}),
                    100,
                ),
                "psbt": (http_request("/v1/psbt/sign", token, {"key": "w", "psbt": psbt_b64}), 1),
            }
            results: dict[tuple[str, int], dict[str, object]] = {}
            for name, (req, _) in work.items():
                for n in clients:
                    cpu0 = cpu_seconds(server.pid)
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--load",
                            str(port),
                            base64.b64encode(req).decode(),
                            str(n),
                            str(args.seconds),
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                    results[(name, n)] = json.loads(out)
                    cpu1 = cpu_seconds(server.pid)
                    answered = sum(results[(name, n)]["statuses"].values())  # type: ignore[attr-defined]
                    if cpu0 is not None and cpu1 is not None and answered:
                        results[(name, n)]["cpu_ms"] = (cpu1 - cpu0) * 1000 / answered
        finally:
            server.terminate()
            server.wait(60)
    load_after = os.getloadavg()[0]
    report(ref, results, work_units={k: v[1] for k, v in work.items()}, clients=clients)
    print(
        f"\nload average (1 min) before {load_before:.2f}, after {load_after:.2f}, "
        f"on {os.cpu_count()} CPUs"
    )
    return 0


def report(
    ref: dict[str, float],
    results: dict[tuple[str, int], dict[str, object]],
    *,
    work_units: dict[str, int],
    clients: list[int],
) -> None:
    labels = {"sign": "sign 1 digest", "batch": "sign-batch 100", "psbt": "psbt sign 10 in"}
    print(
        f"{'workload':<16} {'clients':>7} {'req/s':>9} {'units/s':>10} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'in-proc/s':>10} {'ratio':>6} {'cpu ms':>7}  statuses"
    )
    for name in ("sign", "batch", "psbt"):
        for n in clients:
            r = results[(name, n)]
            rps = float(r["rps"])  # type: ignore[arg-type]
            units = rps * work_units[name]
            print(
                f"{labels[name]:<16} {n:>7} {rps:>9.0f} {units:>10.0f} {float(r['p50_ms']):>8.2f} "  # type: ignore[arg-type]
                f"{float(r['p99_ms']):>8.2f} {ref[name]:>10.0f} {units / ref[name]:>6.2f} "  # type: ignore[arg-type]
                f"{float(r.get('cpu_ms', 0.0)):>7.3f}  "  # type: ignore[arg-type]
                f"{r['statuses']}"
            )
    s8, b8, p8 = results[("sign", 8)], results[("batch", 8)], results[("psbt", 8)]
    sign_rps, sign_p99 = float(s8["rps"]), float(s8["p99_ms"])  # type: ignore[arg-type]
    batch_ratio = float(b8["rps"]) * 100 / ref["batch"]  # type: ignore[arg-type]
    best_psbt = max(float(results[("psbt", n)]["rps"]) for n in clients)  # type: ignore[arg-type]
    print("\ntargets (8 clients unless said):")
    print(
        f"  sign 1 digest >= 3000 req/s, p99 < 20 ms: {sign_rps:.0f} req/s, p99 {sign_p99:.1f} ms"
        f" -> {'met' if sign_rps >= 3000 and sign_p99 < 20 else 'NOT met'}"
    )
    print(
        f"  sign-batch 100 >= 0.6x in-process batch rate: {batch_ratio:.2f}x"
        f" -> {'met' if batch_ratio >= 0.6 else 'NOT met'}"
    )
    print(
        f"  psbt sign 10 inputs >= 300/s (best of the client counts): {best_psbt:.0f}/s"
        f" ({float(p8['rps']):.0f}/s with 8) -> {'met' if best_psbt >= 300 else 'NOT met'}"
    )  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
