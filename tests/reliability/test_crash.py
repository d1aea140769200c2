"""Crash safety: SIGKILL a process that is writing keys and audit entries, many times.

A worker (tests/reliability/helpers_worker.py) opens the real deployment and
generates keys in a loop, signing with each; it prints a key or signature only
after the library call returned. The test kills it at a random moment and
then checks, on the same keystore and audit log reused across all rounds:

- the keystore opens with the passphrase and has no damaged record;
- every acknowledged key is there, with its label and public key;
- labels are unique;
- the audit log verifies (each entry is one O_APPEND write, so a killed
  process cannot tear a line) and holds an entry for every acknowledged
  key and signature (the default durability hands each entry to the OS
  before the result is returned);
- the handle's health check passes.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE
from tests.reliability.helpers_worker import AckedKey, AckedSig, Worker

from anyhsm import open_hsm
from anyhsm.crypto import secp256k1 as curve
from anyhsm.keystore import Keystore
from anyhsm.secret import SecretBytes

ROUNDS = 40
SEED = 20240611


def fsync_config(deployment: Path) -> Path:
    """A second config on the same keystore and audit log, with fsync durability."""
    text = deployment.read_text().replace('durability = "batched"', 'durability = "fsync"')
    assert 'durability = "fsync"' in text
    path = deployment.with_name("fsync.toml")
    path.write_text(text)
    return path


def audit_entries(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def check_store(keystore_dir: Path, acked: dict[str, AckedKey]) -> dict[str, tuple[str, bytes]]:
    """Open the keystore directly; no damaged record; every acknowledged key present."""
    ks = Keystore.load(keystore_dir)
    try:
        ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
        records = ks.records()
        assert ks.problems == {}, f"damaged records after a crash: {ks.problems}"
        by_id = {r.id: (r.label, r.public_key) for r in records}
        labels = [r.label for r in records]
        assert len(labels) == len(set(labels)), "duplicate labels in the store"
        for key in acked.values():
            assert key.id in by_id, f"acknowledged key {key.label} ({key.id}) was lost"
            assert by_id[key.id] == (key.label, key.public_key)
        return by_id
    finally:
        ks.close()


def check_audit(
    audit_path: Path,
    acked_keys: dict[str, list[AckedKey]],
    acked_sigs: dict[str, list[AckedSig]],
) -> None:
    """Every acknowledged operation of every killed worker has its audit entry."""
    entries = audit_entries(audit_path)
    seen = Counter(
        (e.get("pid"), e.get("op"), e.get("key")) for e in entries if e.get("outcome") == "ok"
    )
    for pid, keys in acked_keys.items():
        for key in keys:
            assert seen[(int(pid), "generate_key", key.id)] == 1, (
                f"no audit entry for acknowledged key {key.label} of pid {pid}"
            )
    for pid, sigs in acked_sigs.items():
        per_key = Counter(s.key_id for s in sigs)
        for key_id, n in per_key.items():
            assert seen[(int(pid), "sign", key_id)] >= n, (
                f"pid {pid}: {n} acknowledged signatures with {key_id} but only "
                f"{seen[(int(pid), 'sign', key_id)]} audit entries"
            )


@pytest.mark.slow
def test_kill_while_writing_keys_never_loses_an_acknowledged_key(deployment: Path) -> None:
    rng = random.Random(SEED)
    keystore_dir = deployment.parent / "keystore"
    audit_path = deployment.parent / "audit.log"
    fsync_cfg = fsync_config(deployment)
    acked: dict[str, AckedKey] = {}
    acked_keys: dict[str, list[AckedKey]] = {}
    acked_sigs: dict[str, list[AckedSig]] = {}
    killed_mid_run = 0
    started = time.monotonic()
    for rnd in range(ROUNDS):
        # Alternate durability modes, and how much of the time goes to the audit log.
        config = fsync_cfg if rnd % 3 == 2 else deployment
        signs = (0, 1, 4)[rnd % 3]
        worker = Worker("generate", str(config), f"r{rnd}", "--signs-per-key", str(signs))
        worker.wait_for("KEY")
        time.sleep(rng.uniform(0.005, 0.150))
        out = worker.kill()
        assert out.pid, worker.stderr
        assert not out.done
        if worker.proc.returncode == -9:
            killed_mid_run += 1
        acked_keys[str(out.pid)] = out.keys
        acked_sigs[str(out.pid)] = out.sigs
        for key in out.keys:
            acked[key.id] = key
        for sig in out.sigs:
            pub = acked[sig.key_id].public_key
            assert curve.ecdsa_verify(pub, sig.digest, sig.signature)

        check_store(keystore_dir, acked)
        check_audit(audit_path, acked_keys, acked_sigs)
        with open_hsm(deployment) as hsm:
            result = hsm.verify_audit()
            assert result.ok, f"round {rnd}: audit log broken after a kill: {result.reason}"
            assert hsm.health().ok
            listed = {k.id: k for k in hsm.list_keys()}
            for key in out.keys:
                assert listed[key.id].public_key == key.public_key
            if out.keys:  # the last acknowledged key still signs
                last = out.keys[-1]
                digest = bytes(range(32))
                assert curve.ecdsa_verify(last.public_key, digest, hsm.sign(last.id, digest))
    assert killed_mid_run == ROUNDS
    assert len(acked) >= ROUNDS
    elapsed = time.monotonic() - started
    leftovers = sorted(p.name for p in keystore_dir.rglob("*.tmp-anyhsm"))
    print(
        f"{ROUNDS} kills, {len(acked)} acknowledged keys survived, {elapsed:.1f} s; "
        f"temp files left by kills: {leftovers}"
    )


def test_kill_during_signing_keeps_the_audit_chain(deployment: Path) -> None:
    """Kill a process that only signs (the audit log is written on every call)."""
    rng = random.Random(SEED + 1)
    with open_hsm(deployment) as hsm:
        key = hsm.generate_key("signer")
    for rnd in range(6):
        worker = Worker("generate", str(deployment), f"s{rnd}", "--signs-per-key", "200")
        worker.wait_for("SIG")
        time.sleep(rng.uniform(0.005, 0.08))
        out = worker.kill()
        check_audit(deployment.parent / "audit.log", {str(out.pid): out.keys},
                    {str(out.pid): out.sigs})  # fmt: skip
        with open_hsm(deployment) as hsm:
            result = hsm.verify_audit()
            assert result.ok, result.reason
            assert hsm.get_key("signer").public_key == key.public_key
