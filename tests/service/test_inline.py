"""Which operations the service runs on its event loop instead of a worker thread
(``Hsm.runs_in_process``, ``Service.run(inline=True)``): a software or plain simulator key
already routed, with an audit log that neither fsyncs nor forwards each entry. Anything
that may wait (a simulated device latency, fsync durability, a key not yet routed) still
goes to a worker, so the loop never waits on it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import PASSPHRASE
from tests.service.conftest import PASSPHRASE as SERVICE_PASSPHRASE
from tests.service.conftest import Running, simulator

from anyhsm import open_hsm
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.errors import HsmError, KeyNotFound
from anyhsm.secret import SecretBytes

DIGEST = hashlib.sha256(b"inline").digest()


def test_software_key_runs_in_process_once_routed(tmp_path: Path) -> None:
    cfg = init_deployment(tmp_path / "dep", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    with open_hsm(cfg, passphrase=PASSPHRASE) as hsm:
        key = hsm.generate_key("k")
        fresh = open_hsm(cfg, passphrase=PASSPHRASE)
        try:
            assert not fresh.runs_in_process("k")  # not routed yet: unsure, so a worker
            fresh.sign("k", DIGEST)
            assert fresh.runs_in_process("k") and fresh.runs_in_process(key.id)
            assert not fresh.runs_in_process("no-such-key")
        finally:
            fresh.close()
        assert hsm.capabilities(key.id).describe()["in_process"] is True


def test_fsync_durability_goes_to_a_worker(tmp_path: Path) -> None:
    cfg = init_deployment(tmp_path / "dep", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    cfg.write_text(cfg.read_text().replace('durability = "batched"', 'durability = "fsync"'))
    assert 'durability = "fsync"' in cfg.read_text()
    with open_hsm(cfg, passphrase=PASSPHRASE) as hsm:
        hsm.generate_key("k")
        hsm.sign("k", DIGEST)
        assert not hsm.runs_in_process("k")  # each entry waits on the disk


def test_simulated_latency_goes_to_a_worker(tmp_path: Path) -> None:
    slow = simulator(tmp_path / "slow", latency_ms=1)
    plain = simulator(tmp_path / "plain")
    try:
        for hsm in (slow, plain):
            hsm.generate_key("k")
            hsm.sign("k", DIGEST)
        assert not slow.runs_in_process("k")
        assert plain.runs_in_process("k")
    finally:
        slow.close()
        plain.close()


def test_inline_signature_is_audited_under_the_client(
    start: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real server: a signature by a routed software key (the fixture made
    the keys through this handle) runs on the loop's own thread, and is audited with the
    client's name like one in a worker."""
    r = start()
    threads: list[str] = []
    real_sign = r.hsm.sign

    def observed(*args: object, **kwargs: object) -> bytes:
        threads.append(threading.current_thread().name)
        return real_sign(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(r.hsm, "sign", observed)
    c = r.client("signer")
    assert r.hsm.runs_in_process("hot-1")
    c.sign("hot-1", DIGEST)
    c.sign("hot-1", DIGEST)
    assert threads == ["anyhsm-test-service"] * 2  # the loop's thread (conftest.serve)
    lines = r.hsm.audit_path.read_text().splitlines()
    entries = [e for e in map(json.loads, lines) if e["op"] == "sign"]
    assert [e["principal"] for e in entries[-2:]] == ["signer", "signer"]


def test_label_replaced_in_another_process_never_signs_with_the_old_key(
    start: Callable[..., Running],
) -> None:
    """The service authorises from its routing (Hsm.key_info) and signs by the key's id:
    after another handle deletes hot-1 and makes a new hot-1, a request for hot-1 is
    refused or signed by the new key, and the next one by the new key; never the old."""
    from anyhsm.crypto import secp256k1 as curve

    r = start()
    c = r.client("signer")
    old = r.hsm.get_key("hot-1")
    c.sign("hot-1", DIGEST)
    cfg = r.hsm.config.source
    assert cfg is not None
    with open_hsm(cfg, passphrase=SERVICE_PASSPHRASE) as other:
        other.delete_key(old.id)
        new = other.generate_key("hot-1")
    outcomes = []
    for _ in range(2):
        try:
            outcomes.append(c.sign("hot-1", DIGEST))
        except KeyNotFound:
            outcomes.append(None)
    assert outcomes[-1] is not None
    for sig in outcomes:
        if sig is not None:
            assert curve.ecdsa_verify(new.public_key, DIGEST, sig)
            assert not curve.ecdsa_verify(old.public_key, DIGEST, sig)


def test_where_psbts_and_batches_run(
    start: Callable[..., Running], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """For routed software keys: a small PSBT on the loop; a batch in the one local
    worker; a PSBT for "every key the client may use" (keys not known up front) in the
    pool; and under an active spending policy (its state lock may be held by another
    process) the PSBT in the local worker, never on the loop."""
    from tests.bitcoin.test_signer import Spend, build_psbt

    from anyhsm.ops import psbt as opsbt
    from anyhsm.ops import signing as osigning
    from anyhsm.ops.policy import set_policy

    r = start()
    assert r.wallet is not None
    threads: list[str] = []
    real_psbt, real_batch = opsbt.sign_psbt, osigning.sign_digests

    def psbt_observed(*args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread().name)
        return real_psbt(*args, **kwargs)  # type: ignore[arg-type]

    def batch_observed(*args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread().name)
        return real_batch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(opsbt, "sign_psbt", psbt_observed)
    monkeypatch.setattr(osigning, "sign_digests", batch_observed)
    c = r.client("signer")
    psbt = build_psbt([Spend("p2wpkh", [r.wallet.key("m/84h/1h/0h/0/0")])])
    c.sign_psbt("w", psbt)  # routes w first (pool), then:
    c.sign_psbt("w", psbt)
    c.sign_many("hot-1", [DIGEST, DIGEST])
    body = {"psbt": psbt.to_base64(), "all_keys": True}
    status, _body, _h = c.request("POST", "/v1/psbt/sign", body)
    assert status == 200
    assert threads[1:3] == ["anyhsm-test-service", "anyhsm-local_0"]
    assert threads[3].startswith("anyhsm-op")
    policy = tmp_path / "spending.toml"
    policy.write_text('[[rules]]\nname = "any"\nmax_per_tx_sat = 100000000\n')
    set_policy(r.hsm, policy)
    del threads[:]
    with contextlib.suppress(HsmError):  # allowed or refused: where it ran is checked
        c.sign_psbt("w", psbt)
    assert threads == ["anyhsm-local_0"]
