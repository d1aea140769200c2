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

import errno
import json
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE
from tests.reliability.helpers_worker import AckedKey, AckedSig, Worker

import anyhsm.audit as audit_module
from anyhsm import open_hsm
from anyhsm.audit import AuditKeyRing, AuditState, VerifyResult, verify_log
from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import AuditError, AuditWriteFailed
from anyhsm.keystore import Keystore
from anyhsm.secret import SecretBytes
from anyhsm.types import SigScheme

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
        assert worker.proc.returncode == -signal.SIGKILL, (
            f"round {rnd}: the worker ended by itself ({worker.proc.returncode}):\n" + worker.stderr
        )
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


# --- disk faults around the real audit log ----------------------------------------------------


class FaultyOs:
    """``os`` as anyhsm.audit sees it, with write/fsync failing on demand."""

    def __init__(self) -> None:
        self.write_errno: int | None = None
        self.short_write = False
        self.fsync_errno: int | None = None
        self.writes_failed = 0

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        if self.short_write:
            self.writes_failed += 1
            return os.write(fd, data[: len(data) // 2])
        if self.write_errno is not None:
            self.writes_failed += 1
            raise OSError(self.write_errno, os.strerror(self.write_errno))
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        if self.fsync_errno is not None:
            raise OSError(self.fsync_errno, os.strerror(self.fsync_errno))
        os.fsync(fd)


@pytest.fixture
def faulty_os(monkeypatch: pytest.MonkeyPatch) -> FaultyOs:
    fake = FaultyOs()
    monkeypatch.setattr(audit_module, "os", fake)
    return fake


def labels_on_disk(deployment: Path) -> set[str]:
    ks = Keystore.load(deployment.parent / "keystore")
    try:
        ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
        return {r.label for r in ks.records()}
    finally:
        ks.close()


def test_enospc_on_the_audit_log_fails_the_signature_and_later_operations(
    deployment: Path, faulty_os: FaultyOs
) -> None:
    digest = bytes(32)
    hsm = open_hsm(deployment)
    key = hsm.generate_key("k")
    hsm.sign("k", digest)
    size_before = (deployment.parent / "audit.log").stat().st_size

    faulty_os.write_errno = errno.ENOSPC
    with pytest.raises(AuditWriteFailed) as err:
        hsm.sign("k", digest)
    assert "No space left" in err.value.message
    assert faulty_os.writes_failed == 1

    faulty_os.write_errno = None  # the disk recovers, but this handle stays failed
    for op in (
        lambda: hsm.sign("k", digest),
        lambda: hsm.sign("k", digest, SigScheme.SCHNORR),
        lambda: hsm.health(),
    ):
        with pytest.raises(AuditWriteFailed):
            op()
    assert (deployment.parent / "audit.log").stat().st_size == size_before
    hsm.close()

    with open_hsm(deployment) as again:  # reopened: works, and the chain is intact
        sig = again.sign("k", digest)
        assert curve.ecdsa_verify(key.public_key, digest, sig)
        result = again.verify_audit()
        assert result.ok, result.reason


def test_no_unaudited_key_changes_after_the_audit_log_failed(
    deployment: Path, faulty_os: FaultyOs
) -> None:
    """Regression test for a bug this suite found (fixed in 6d88009).

    Before the fix: after the audit log has failed, Hsm.generate_key and Hsm.delete_key still create
    or delete the key before the audit append raises AuditWriteFailed: a key is created or
    destroyed with no audit entry.
    """
    hsm = open_hsm(deployment)
    hsm.generate_key("keep")
    faulty_os.write_errno = errno.ENOSPC
    with pytest.raises(AuditWriteFailed):
        hsm.sign("keep", bytes(32))
    faulty_os.write_errno = None
    with pytest.raises(AuditWriteFailed):
        hsm.generate_key("unaudited")
    with pytest.raises(AuditWriteFailed):
        hsm.delete_key("keep")
    hsm.close()
    labels = labels_on_disk(deployment)
    assert "unaudited" not in labels, "a key was created without an audit entry"
    assert "keep" in labels, "a key was deleted without an audit entry"


def test_fsync_failure_in_fsync_mode_fails_the_operation(
    deployment: Path, faulty_os: FaultyOs
) -> None:
    hsm = open_hsm(fsync_config(deployment))
    hsm.generate_key("k")
    faulty_os.fsync_errno = errno.EIO
    with pytest.raises(AuditWriteFailed):
        hsm.sign("k", bytes(32))
    faulty_os.fsync_errno = None
    with pytest.raises(AuditWriteFailed):
        hsm.sign("k", bytes(32))
    hsm.close()


def test_fsync_failure_in_batched_mode_stops_later_operations(
    deployment: Path, faulty_os: FaultyOs
) -> None:
    """The background flush fails: the log must not silently stop; operations fail."""
    hsm = open_hsm(deployment)
    hsm.generate_key("k")
    faulty_os.fsync_errno = errno.EIO
    failed = False
    for _ in range(500):  # the flusher runs every few ms
        try:
            hsm.sign("k", bytes(32))
        except AuditWriteFailed:
            failed = True
            break
        time.sleep(0.01)
    assert failed, "signing went on while the audit log could not be synced"
    faulty_os.fsync_errno = None
    with pytest.raises(AuditWriteFailed):
        hsm.sign("k", bytes(32))
    hsm.close()


def test_short_write_is_refused_and_leaves_no_torn_line(
    deployment: Path, faulty_os: FaultyOs
) -> None:
    """A short write (disk full mid-entry): the operation fails, the handle stays failed,
    and the partial entry is cut back so the log still verifies."""
    hsm = open_hsm(deployment)
    hsm.generate_key("k")
    faulty_os.short_write = True
    with pytest.raises(AuditWriteFailed):
        hsm.sign("k", bytes(32))
    assert faulty_os.writes_failed == 1
    faulty_os.short_write = False
    with pytest.raises(AuditWriteFailed):
        hsm.sign("k", bytes(32))
    hsm.close()
    audit_path = deployment.parent / "audit.log"
    assert audit_path.read_bytes().endswith(b"\n"), "a torn entry was left in the log"
    result = verify_on_disk(deployment)
    assert result.ok, result.reason


def test_verify_names_a_torn_last_line(deployment: Path) -> None:
    """A log whose last entry was cut mid-line (e.g. by a power loss): verify names
    exactly that line, and open_hsm refuses to chain onto it."""
    with open_hsm(deployment) as hsm:
        hsm.generate_key("k")
    audit_path = deployment.parent / "audit.log"
    raw = audit_path.read_bytes()
    audit_path.write_bytes(raw[:-20])
    lines = audit_path.read_bytes().split(b"\n")
    result = verify_on_disk(deployment)
    assert not result.ok
    assert result.first_bad_line == len(lines)
    assert "incomplete" in result.reason
    with pytest.raises(AuditError):
        open_hsm(deployment)


def test_short_write_does_not_brick_the_deployment(deployment: Path, faulty_os: FaultyOs) -> None:
    """Regression test for a bug this suite found (fixed in 6d88009).

    Before the fix: AuditLog.append leaves the partial line of a short write in the log; every later
    open_hsm fails with AuditTampered ('restore the log from backup') although the torn
    entry belonged to an operation that was refused: the writer should truncate back to its
    last complete entry.
    """
    hsm = open_hsm(deployment)
    hsm.generate_key("k")
    faulty_os.short_write = True
    with pytest.raises(AuditWriteFailed):
        hsm.sign("k", bytes(32))
    faulty_os.short_write = False
    hsm.close()
    with open_hsm(deployment) as again:  # the disk has space again
        again.sign("k", bytes(32))
        assert again.verify_audit().ok


def audit_ring_and_state(deployment: Path) -> tuple[AuditKeyRing, AuditState]:
    """The audit chain's keys and recorded state, read from the keystore manifest the way
    an auditor holding the passphrase would (the caller wipes the ring)."""
    ks = Keystore.load(deployment.parent / "keystore")
    try:
        ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
        return ks.audit_keys(), ks.load_audit_state()
    finally:
        ks.close()


def verify_on_disk(deployment: Path) -> VerifyResult:
    """verify_log over the real log against the state the manifest records."""
    ring, state = audit_ring_and_state(deployment)
    with ring:
        return verify_log(deployment.parent / "audit.log", ring, state)
