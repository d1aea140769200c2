"""Benchmark: sign a 100-input P2WPKH PSBT and a 100-input P2TR PSBT with the software provider.

Prints, per PSBT, the time per input of
- anyhsm ``sign_psbt`` (software keystore, HD key, audit log on, every signature verified),
- embit's ``PSBT.sign_with`` on the same PSBT, in the same run (the independent library),
- the raw cost: 100 libsecp256k1 signatures (low-R ECDSA / tweaked BIP340) with child keys
  derived beforehand, plus the sighash computation,
and the ratios anyhsm/embit and anyhsm/raw (targets: < 1 and < 2). A breakdown shows where
anyhsm's time goes: one ``Hsm.sign`` call (BIP32 derivation inside the provider from the
master key, keystore record decryption, audit entry), derivation alone, verification.

Run: ``.venv/bin/python benchmarks/bench_psbt.py [--inputs 100] [--rounds 7]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from embit.bip32 import HDKey
from embit.psbt import PSBT as EmbitPsbt

from anyhsm.bitcoin import Psbt, sign_psbt
from anyhsm.bitcoin.bip32 import KeyOrigin, parse_path
from anyhsm.bitcoin.encoding import hash160
from anyhsm.bitcoin.psbt import TapKeyOrigin
from anyhsm.bitcoin.script import p2pkh, p2tr, p2wpkh
from anyhsm.bitcoin.sighash import SighashCache
from anyhsm.bitcoin.taproot import taproot_output_key, taproot_tweak
from anyhsm.bitcoin.tx import OutPoint, Transaction, TxIn, TxOut
from anyhsm.crypto import secp256k1 as ec
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.hsm import Hsm, open_hsm
from anyhsm.secret import SecretBytes
from anyhsm.types import KeyType, SignParams, SigScheme

PASSPHRASE = "benchmark passphrase, long enough for the keystore"


def build(kind: str, seed: bytes, n: int) -> tuple[Psbt, list[tuple[int, ...]]]:
    """A PSBT with ``n`` inputs of one kind, all ours (paths m/84'|86'/1'/0'/0/i)."""
    rng = random.Random(kind)
    purpose = 84 if kind == "p2wpkh" else 86
    paths = [parse_path(f"m/{purpose}'/1'/0'/0/{i}") for i in range(n)]
    master = HDKey.from_seed(seed)
    fp = master.my_fingerprint
    prevs, pubs = [], []
    for path in paths:
        pub = master.derive(list(path)).get_public_key().sec()
        spk = (
            p2wpkh(hash160(pub)) if kind == "p2wpkh" else p2tr(taproot_output_key(pub[1:], None)[0])
        )
        src = TxIn(OutPoint(rng.randbytes(32), 0))
        prevs.append(Transaction(2, [src], [TxOut(100_000, spk)], 0))
        pubs.append(pub)
    tx = Transaction(
        2,
        [TxIn(OutPoint(p.txid(), 0), b"", 0xFFFFFFFD) for p in prevs],
        [TxOut(n * 100_000 - 20 * n - 200, p2wpkh(rng.randbytes(20)))],
        0,
    )
    psbt = Psbt.from_unsigned_tx(tx)
    for inp, prev, pub, path in zip(psbt.inputs, prevs, pubs, paths, strict=True):
        inp.witness_utxo = prev.outputs[0]
        if kind == "p2wpkh":
            inp.bip32_derivations[pub] = KeyOrigin(fp, path)
        else:
            inp.tap_internal_key = pub[1:]
            inp.tap_bip32_derivations[pub[1:]] = TapKeyOrigin((), KeyOrigin(fp, path))
    return psbt, paths


def best(fn: Callable[[], object], rounds: int) -> float:
    """Median wall time of ``fn`` over ``rounds`` runs (one warm-up run first)."""
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def raw_cost(
    kind: str, psbt: Psbt, seed: bytes, paths: list[tuple[int, ...]], rounds: int
) -> float:
    """100 libsecp256k1 signatures + sighashes, child keys derived beforehand."""
    master = HDKey.from_seed(seed)
    keys = [bytearray(master.derive(list(p)).key.secret) for p in paths]
    tweaks = [taproot_tweak(ec.public_key(k)[1:], None) for k in keys]
    spent = [i.witness_utxo for i in psbt.inputs]

    def run() -> None:
        cache = SighashCache(psbt.unsigned_tx(), spent)
        for i, key in enumerate(keys):
            if kind == "p2wpkh":
                out = spent[i]
                assert out is not None
                digest = cache.bip143(i, p2pkh(out.script_pubkey[2:]), out.value, 1)
                ec.ecdsa_sign(key, digest, grind_low_r=True)
            else:
                digest = cache.bip341(i, 0)
                ec.schnorr_sign(key, digest, None, tweaks[i])

    return best(run, rounds)


def breakdown(
    hsm: Hsm, kind: str, seed: bytes, paths: list[tuple[int, ...]], rounds: int
) -> dict[str, float]:
    """Per-input costs of the pieces of anyhsm's signing path."""
    digest = bytes(range(32))
    scheme = SigScheme.ECDSA if kind == "p2wpkh" else SigScheme.SCHNORR
    tweak = bytes(31) + b"\x01" if kind == "p2tr" else None
    n = len(paths)

    def hsm_sign() -> None:
        for p in paths:
            hsm.sign(
                "bench", digest, scheme, params=SignParams(path=p, tweak=tweak, grind_low_r=True)
            )

    master = HDKey.from_seed(seed)
    mkey = bytearray(master.key.secret)
    chain = master.chain_code

    def derive() -> None:
        for p in paths:
            k, _, _, _ = ec.bip32_derive_priv(mkey, chain, p)
            k[:] = bytes(32)

    child = bytearray(master.derive(list(paths[0])).key.secret)
    pub = ec.public_key(child)

    def sign_only() -> None:
        for _ in paths:
            if scheme is SigScheme.ECDSA:
                ec.ecdsa_sign(child, digest, grind_low_r=True)
            else:
                ec.schnorr_sign(child, digest, None, tweak)

    sig_e = ec.ecdsa_sign(child, digest, grind_low_r=True)
    sig_s = ec.schnorr_sign(child, digest, bytes(32))

    def verify() -> None:
        for _ in paths:
            if scheme is SigScheme.ECDSA:
                ec.ecdsa_verify(pub, digest, sig_e)
            else:
                ec.schnorr_verify(pub[1:], digest, sig_s)

    return {
        "Hsm.sign with path (provider derives)": best(hsm_sign, rounds) / n,
        "  of which BIP32 derivation from master": best(derive, rounds) / n,
        "  of which the signature itself": best(sign_only, rounds) / n,
        "verification of each signature": best(verify, rounds) / n,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    seed = bytes(range(32))
    n = args.inputs
    with tempfile.TemporaryDirectory() as tmp:
        cfg = init_deployment(Path(tmp) / "dep", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
        with open_hsm(cfg, passphrase=PASSPHRASE) as hsm:
            hsm.import_key("bench", seed, KeyType.BIP32)
            print(
                f"anyhsm PSBT signing benchmark: {n} inputs, median of {args.rounds} rounds, "
                f"provider {hsm.active_provider}, audit log on"
            )
            print()
            head = ("PSBT", "anyhsm", "embit", "raw", "anyhsm/embit", "anyhsm/raw")
            print(
                f"{head[0]:8} {head[1]:>12} {head[2]:>12} {head[3]:>12} {head[4]:>13} {head[5]:>11}"
            )
            details: dict[str, dict[str, float]] = {}
            for kind in ("p2wpkh", "p2tr"):
                psbt, paths = build(kind, seed, n)
                res = sign_psbt(hsm, psbt, "bench")
                assert res.signed_inputs == n, res.inputs[0].reason

                def anyhsm_sign(psbt: Psbt = psbt) -> None:
                    sign_psbt(hsm, psbt, "bench")

                t_any = best(anyhsm_sign, args.rounds)
                b64 = psbt.to_base64()
                root = HDKey.from_seed(seed)
                copies = [EmbitPsbt.from_string(b64) for _ in range(args.rounds + 1)]

                def embit_sign(copies: list[EmbitPsbt] = copies, root: HDKey = root) -> None:
                    assert copies.pop().sign_with(root) == n

                t_embit = best(embit_sign, args.rounds)
                t_raw = raw_cost(kind, psbt, seed, paths, args.rounds)
                us = 1e6 / n
                vs_embit, vs_raw = t_any / t_embit, t_any / t_raw
                print(
                    f"{kind:8} {t_any * us:9.1f} us {t_embit * us:9.1f} us {t_raw * us:9.1f} us "
                    f"{vs_embit:8.2f} {'PASS' if vs_embit < 1 else 'MISS'} "
                    f"{vs_raw:6.2f} {'PASS' if vs_raw < 2 else 'MISS'}"
                )
                details[kind] = breakdown(hsm, kind, seed, paths, args.rounds)
            print()
            print("targets: anyhsm/embit < 1, anyhsm/raw < 2")
            print()
            print("where the time goes (per input):")
            for kind, rows in details.items():
                for name, secs in rows.items():
                    print(f"  {kind:8} {name:42} {secs * 1e6:8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
