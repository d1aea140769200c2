"""Several processes on one keystore and one audit log, at the same time.

Real processes (tests/reliability/helpers_worker.py), real files, real flock:
- three processes create keys and sign concurrently: every key of every
  process is present, labels are unique, every signature verifies, and the
  audit chain holds even though appends from the processes interleave;
- processes racing to create the same label: exactly one wins, the others get
  KeyExists, and the store holds that label once;
- a key deleted by another process while this handle has it cached: signing
  fails with KeyNotFound, never a signature from the deleted key;
- a master-key rotation by another process while a handle signs: the handle's
  next signing fails with a typed error (or succeeds), never with the retired
  key, and the audit chain stays continuous across the rotation.
"""

from __future__ import annotations

import itertools
import json
import signal
import threading
from collections import Counter
from pathlib import Path

import coincurve
import pytest
from tests.conftest import PASSPHRASE
from tests.reliability.helpers_worker import Output, Worker, check_audit_key_ids

from anyhsm import open_hsm
from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import AuditKeyRotated, HsmError, KeyNotFound, KeystoreRotated
from anyhsm.keystore import Keystore
from anyhsm.secret import SecretBytes
from anyhsm.types import SigScheme

NPROCS = 3
KEYS_PER_PROC = 25
SIGNS_PER_KEY = 8


def store_records(deployment: Path) -> dict[str, tuple[str, bytes]]:
    ks = Keystore.load(deployment.parent / "keystore")
    try:
        ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
        recs = ks.records()
        assert ks.problems == {}
        labels = [r.label for r in recs]
        assert len(labels) == len(set(labels)), f"duplicate labels: {labels}"
        return {r.id: (r.label, r.public_key) for r in recs}
    finally:
        ks.close()


def audit_entries(deployment: Path) -> list[dict[str, object]]:
    raw = (deployment.parent / "audit.log").read_bytes()
    return [json.loads(line) for line in raw.splitlines()]


def start_together(workers: list[Worker], go: Path) -> None:
    for w in workers:
        w.wait_for("READY")
    go.touch()


def test_processes_generating_and_signing_at_once(deployment: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    workers = [
        Worker(
            "generate",
            str(deployment),
            f"p{n}",
            "--count",
            str(KEYS_PER_PROC),
            "--signs-per-key",
            str(SIGNS_PER_KEY),
            "--go",
            str(go),
        )
        for n in range(NPROCS)
    ]
    start_together(workers, go)
    outputs: list[Output] = [w.check_ok() for w in workers]

    records = store_records(deployment)
    for n, out in enumerate(outputs):
        assert len(out.keys) == KEYS_PER_PROC
        assert len(out.sigs) == KEYS_PER_PROC * SIGNS_PER_KEY
        for key in out.keys:
            assert records[key.id] == (key.label, key.public_key)
            assert key.label.startswith(f"p{n}-")
        pubs = {k.id: k.public_key for k in out.keys}
        for sig in out.sigs:
            assert curve.ecdsa_verify(pubs[sig.key_id], sig.digest, sig.signature)

    entries = audit_entries(deployment)
    seqs = [e["seq"] for e in entries]
    assert seqs == list(range(1, len(entries) + 1))
    ok = Counter((e["pid"], e["op"]) for e in entries if e["outcome"] == "ok")
    worker_pids = {out.pid for out in outputs}
    pids = [e["pid"] for e in entries if e["pid"] in worker_pids]
    switches = sum(1 for a, b in itertools.pairwise(pids) if a != b)
    # Precondition: the processes really overlapped (their appends interleave).
    assert switches > NPROCS, f"workers ran one after another ({switches} switches)"
    for out in outputs:
        assert ok[(out.pid, "generate_key")] == KEYS_PER_PROC
        assert ok[(out.pid, "sign")] == KEYS_PER_PROC * SIGNS_PER_KEY
    with open_hsm(deployment) as hsm:
        result = hsm.verify_audit()
        assert result.ok, result.reason
        assert result.entries == len(audit_entries(deployment)) == len(entries) + 1  # + "open"
        labels = [k.label for k in hsm.list_keys()]
        assert len(labels) == len(set(labels)) == NPROCS * KEYS_PER_PROC
        assert hsm.health().ok


def test_racing_for_the_same_label_exactly_one_wins(deployment: Path, tmp_path: Path) -> None:
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    labels = [f"race-{i}" for i in range(20)]
    workers = [Worker("race", str(deployment), str(barrier), "2", *labels) for _ in range(2)]
    outputs = [w.check_ok() for w in workers]

    records = store_records(deployment)
    by_label = {label: key_id for key_id, (label, _) in records.items()}
    for label in labels:
        winners = [k for out in outputs for k in out.keys if k.label == label]
        losers = [out for out in outputs if label in out.exists]
        assert len(winners) == 1, f"{label}: {len(winners)} processes created it"
        assert len(losers) == 1, f"{label}: the other process did not get KeyExists"
        assert by_label[label] == winners[0].id
        assert records[winners[0].id][1] == winners[0].public_key
    with open_hsm(deployment) as hsm:
        assert hsm.verify_audit().ok
        entries = audit_entries(deployment)
        failed = [e for e in entries if e["op"] == "generate_key" and e["outcome"] == "error"]
        assert len(failed) == len(labels)
        assert all(e.get("error") == "key_exists" for e in failed)


def test_sign_after_another_process_deleted_the_key(deployment: Path) -> None:
    digest = bytes(range(32))
    with open_hsm(deployment) as hsm:
        victim = hsm.generate_key("victim")
        assert curve.ecdsa_verify(victim.public_key, digest, hsm.sign("victim", digest))
        assert hsm.sign(victim.id, digest, SigScheme.SCHNORR)  # both names now cached

        out = Worker("delete", str(deployment), "victim").check_ok()
        assert out.deleted == [victim.id]

        with pytest.raises(KeyNotFound):
            hsm.sign("victim", digest)
        with pytest.raises(KeyNotFound):
            hsm.sign(victim.id, digest)
        with pytest.raises(KeyNotFound):
            hsm.sign(victim.id, digest, SigScheme.SCHNORR)
        assert victim.id not in {k.id for k in hsm.list_keys()}


def test_sign_after_another_process_replaced_the_label(deployment: Path) -> None:
    """Deleted and re-created under the same label elsewhere: this handle never signs
    with the old key again, and signing by label reaches the new key."""
    digest = bytes(range(1, 33))
    with open_hsm(deployment) as hsm:
        old = hsm.generate_key("rotating")
        hsm.sign("rotating", digest)
        Worker("delete", str(deployment), "rotating").check_ok()
        new = Worker("create", str(deployment), "rotating").check_ok().keys[0]
        assert new.id != old.id

        for _ in range(2):  # the stale cache entry may cost one KeyNotFound
            try:
                sig = hsm.sign("rotating", digest)
            except KeyNotFound:
                continue
            assert not curve.ecdsa_verify(old.public_key, digest, sig)
            assert curve.ecdsa_verify(new.public_key, digest, sig)
            break
        else:
            pytest.fail("signing by label never reached the re-created key")
        with pytest.raises(KeyNotFound):
            hsm.sign(old.id, digest)


def test_public_key_after_another_process_replaced_the_label(deployment: Path) -> None:
    """Regression test for a bug this suite found (fixed in 6d88009).

    Before the fix: Hsm._route answers public_key/get_key from its cache without checking that the
    key still exists, so a handle reports the public key of a key another process deleted
    (or replaced under the same label).
    """
    with open_hsm(deployment) as hsm:
        old = hsm.generate_key("addr-key")
        assert hsm.public_key("addr-key") == old.public_key  # cached now
        Worker("delete", str(deployment), "addr-key").check_ok()
        new = Worker("create", str(deployment), "addr-key").check_ok().keys[0]
        # An application deriving a receive address must not get the deleted key's.
        assert hsm.public_key("addr-key") == new.public_key


# --- a master-key rotation by another process -------------------------------------------------

ROTATION_ERRORS = {"keystore_rotated", "audit_key_rotated"}


@pytest.mark.parametrize("rotations", [1, 2])
def test_rotation_by_another_process_while_one_signs(
    deployment: Path, tmp_path: Path, rotations: int
) -> None:
    """Process A holds a handle and signs in a loop; process B runs ``anyhsm keystore
    rotate`` (once, or twice in a row). A's signing after B committed either fails with
    a typed error naming the rotation (KeystoreRotated / AuditKeyRotated) or succeeds
    through the new keys, never with the retired key: no entry of A's old handle comes
    after B's "started" entry, every signature A acknowledged has its entry and
    verifies. After A reopens, the log verifies and the chain is continuous: the entry
    after each "rotate_master_key started" is B's "ok" under the next audit key (kid)."""
    with open_hsm(deployment) as hsm:
        keys = {k.id: k for k in (hsm.generate_key(f"busy-{i}") for i in range(3))}
    stop = tmp_path / "stop"
    a = Worker("signloop", str(deployment), str(stop), *keys)
    a.wait_for("READY")
    for _ in range(20):  # A is signing with its open handle
        a.wait_for("SIG")
    for _ in range(rotations):
        b = Worker("rotate", str(deployment), "--how", "cli", "--rounds", "1")
        assert len(b.check_ok().rotated) == 1, b.stderr
    # B committed: A's signings from now on (at least one more with each key after it sees
    # the stop file) meet the rotation.
    stop.touch()
    out = a.check_ok()

    assert set(out.errors) <= ROTATION_ERRORS, f"A failed with {out.errors}"
    assert set(out.reopen_errors) <= ROTATION_ERRORS, f"A's reopen: {out.reopen_errors}"
    assert out.reopened == len(out.errors)
    for sig in out.sigs:
        assert coincurve.PublicKey(keys[sig.key_id].public_key).verify(
            sig.signature, sig.digest, hasher=None
        ), "a signature from another key"

    with open_hsm(deployment) as hsm:
        result = hsm.verify_audit()
        assert result.ok, result.reason
        epoch = hsm.keystore.epoch
    assert epoch == 1 + rotations
    entries = check_audit_key_ids(deployment.parent / "audit.log", epoch)
    starts = [
        i
        for i, e in enumerate(entries)
        if e["op"] == "rotate_master_key" and e["outcome"] == "started"
    ]
    assert len(starts) == rotations
    for n, i in enumerate(starts, start=1):
        after = entries[i + 1]
        assert (after["op"], after["outcome"], after.get("kid")) == (
            "rotate_master_key",
            "ok",
            n + 1,
        ), f"the entry after rotation {n} started: {after}"
        assert after["pid"] == entries[i]["pid"] != out.pid
    # What A's first handle wrote all comes before B's first rotation; each signature A
    # acknowledged has exactly one "sign ok" entry.
    first = entries[starts[0]]["seq"]
    mine = [e for e in entries if e["pid"] == out.pid]
    old_handle = [e for e in mine if e.get("kid", 1) == 1]
    assert all(e["seq"] < first for e in old_handle), "A's retired handle wrote after B rotated"
    ok_signs = [e for e in mine if e["op"] == "sign" and e["outcome"] == "ok"]
    assert len(ok_signs) == len(out.sigs)
    before_reopen = out.lines.index("REOPENED") if out.reopened else len(out.lines)
    acked_old = sum(1 for line in out.lines[:before_reopen] if line.startswith("SIG "))
    assert acked_old == sum(1 for e in ok_signs if e["seq"] < first)


def test_rotation_whose_process_died_after_the_commit(deployment: Path) -> None:
    """Regression test for a bug this suite found (fixed in d413bf9).

    Process B runs ``anyhsm keystore rotate`` and is killed right after the new header is
    in place: the rotation committed, but B wrote no "ok" entry and the old epoch's
    directory is still there. Before the fix, handle A (opened before) saw nothing: it went
    on signing with the retired master key and appending under the retired audit key, right
    after B's "started" entry, where the manifest now expects the new key, so the log stopped
    verifying and every later open failed (AuditStateMismatch). Now A's next signing fails
    with a typed error and no signature, A closes (see the next test for a hang that closing
    met on the way), the log verifies and continues under the new key.
    """
    digest = bytes(range(32))
    a = open_hsm(deployment)
    key = a.generate_key("held")
    a.sign("held", digest)
    b = Worker("rotate", str(deployment), "--how", "cli", "--rounds", "1", "--die-after-commit")
    out = b.finish()
    assert b.proc.returncode == -signal.SIGKILL and "COMMITTED" in out.lines, b.stderr
    ks_dir = deployment.parent / "keystore"
    assert (ks_dir / "keys").is_dir() and (ks_dir / "keys.2").is_dir()  # the fault: both

    with pytest.raises((KeystoreRotated, AuditKeyRotated)):
        a.sign("held", digest)
    for _ in range(3):  # and never later either
        with pytest.raises(HsmError):
            a.sign("held", digest)
    closing = threading.Thread(target=a.close, daemon=True)
    closing.start()
    closing.join(20)
    assert not closing.is_alive(), "closing the handle hung"

    with open_hsm(deployment) as hsm:
        result = hsm.verify_audit()
        assert result.ok, result.reason
        assert hsm.keystore.epoch == 2
        sig = hsm.sign("held", digest)
        assert coincurve.PublicKey(key.public_key).verify(sig, digest, hasher=None)
    entries = check_audit_key_ids(deployment.parent / "audit.log", 2)
    started = next(i for i, e in enumerate(entries) if e["op"] == "rotate_master_key")
    assert entries[started]["pid"] == out.pid and entries[started]["outcome"] == "started"
    assert all(e.get("kid") == 2 for e in entries[started + 1 :])
    assert not any(
        e["pid"] != out.pid and e.get("kid", 1) == 1 and e["seq"] > entries[started]["seq"]
        for e in entries
    )


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_close_does_not_hang_when_the_last_checkpoint_fails(deployment: Path, damage: str) -> None:
    """Regression test for a bug this suite found (fixed in f95b91c).

    Before the fix: AuditLog.close holds the log's (non-reentrant) lock while it forces the
    last checkpoint; when recording the audit state failed with an anyhsm error (here the
    manifest was deleted or overwritten while the handle was open; equally a lock timeout
    or a rotation by another process), _maybe_checkpoint took that lock again to mark the
    log failed, and close() hung for ever. Now close returns, the log's entries are all on
    disk, and the damage is reported at the next open.
    """
    # fsync durability: no background flusher, so the forced checkpoint in close is the
    # one that meets the damage (in batched mode the flusher may get there first).
    fsync_cfg = deployment.with_name("fsync.toml")
    fsync_cfg.write_text(
        deployment.read_text().replace('durability = "batched"', 'durability = "fsync"')
    )
    assert 'durability = "fsync"' in fsync_cfg.read_text()
    hsm = open_hsm(fsync_cfg)
    hsm.generate_key("k")
    hsm.sign("k", bytes(32))  # entries newer than the last checkpoint
    manifest = Keystore.load(deployment.parent / "keystore").keys_dir / "MANIFEST"
    if damage == "deleted":
        manifest.unlink()
    else:
        manifest.write_bytes(b"{}")
    closing = threading.Thread(target=hsm.close, daemon=True)
    closing.start()
    closing.join(20)
    assert not closing.is_alive(), "closing the handle hung"
    entries = audit_entries(deployment)
    assert entries[-1]["op"] == "close"  # written before the checkpoint was attempted
    with pytest.raises(HsmError):
        open_hsm(deployment)
