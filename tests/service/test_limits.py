"""Limits: body size, per-client rate limits (429 + Retry-After), the bounded worker gate
(503 + Retry-After), the per-request timeout (504), and Idempotency-Key on batch and PSBT
signing (a retry gets the stored answer, never a second signature). Slow operations come
from the simulator provider's injected latency (a configured fault, not a mock)."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections.abc import Callable

import pytest
from tests.bitcoin.test_signer import Spend, build_psbt
from tests.service.conftest import Running, simulator

from anyhsm.errors import (
    HsmError,
    IdempotencyConflict,
    InvalidRequest,
    PsbtLimitExceeded,
    RateLimited,
    RequestTimedOut,
    RequestTooLarge,
    ServiceBusy,
)

DIGEST = hashlib.sha256(b"limits").digest()


def entries(r: Running, op: str) -> list[dict[str, object]]:
    lines = r.hsm.audit_path.read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["op"] == op]


def test_body_larger_than_the_limit_is_413(start: Callable[..., Running]) -> None:
    r = start(max_body_bytes=2000)
    c = r.client("signer")
    with pytest.raises(RequestTooLarge) as e:
        c.request("POST", "/v1/keys/hot-1/sign", {"digest": DIGEST.hex(), "pad": "x" * 3000})
    assert "2000" in e.value.message
    assert c.sign("hot-1", DIGEST)  # the connection still works


def test_batch_longer_than_max_batch_is_413(start: Callable[..., Running]) -> None:
    r = start(max_batch=4)
    with pytest.raises(RequestTooLarge):
        r.client("signer").sign_batch("hot-1", [DIGEST] * 5)
    assert len(r.client("signer").sign_batch("hot-1", [DIGEST] * 4)) == 4


def test_psbt_over_the_policy_limit_is_psbt_limit_exceeded(service: Running) -> None:
    limit = service.hsm.config.policy.max_psbt_bytes
    w = service.wallet
    assert w is not None
    psbt = build_psbt([Spend("p2wpkh", [w.key("m/84h/1h/0h/0/0")])])
    big = psbt.serialize() + b"\x00" * (limit + 1)
    with pytest.raises((PsbtLimitExceeded, RequestTooLarge)):
        service.client("psbt").sign_psbt("w", big)


def test_rate_limit_per_client_with_retry_after(start: Callable[..., Running]) -> None:
    r = start(rate_limit_per_s=0.5, rate_limit_burst=3)
    c = r.client("signer")
    for _ in range(3):
        c.sign("hot-1", DIGEST)
    with pytest.raises(RateLimited) as e:
        c.sign("hot-1", DIGEST)
    assert e.value.retry_after is not None and e.value.retry_after >= 1
    r.client("admin").sign("hot-1", DIGEST)  # another client has its own bucket
    assert len(entries(r, "sign")) == 4  # the refused one never reached the handle


def slow(latency_ms: int) -> Callable[..., object]:
    return functools.partial(simulator, latency_ms=latency_ms, timeout_ms=60_000)


def test_full_gate_is_503_with_retry_after(start: Callable[..., Running]) -> None:
    r = start(slow(50), max_concurrency=1, max_pending=0)
    results: list[object] = []
    barrier = threading.Barrier(4)

    def one() -> None:
        c = r.client("signer")
        barrier.wait()
        try:
            results.append(c.sign("hot-1", DIGEST))
        except HsmError as e:
            results.append(e)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    busy = [x for x in results if isinstance(x, ServiceBusy)]
    assert busy and all(b.retry_after == 1 for b in busy)
    assert any(isinstance(x, bytes) for x in results)
    assert all(isinstance(x, bytes | ServiceBusy) for x in results)


def test_timeout_is_504_and_the_operation_is_audited(start: Callable[..., Running]) -> None:
    r = start(slow(300), request_timeout_ms=100)
    before = len(entries(r, "sign"))
    with pytest.raises(RequestTimedOut) as e:
        r.client("signer").sign("hot-1", DIGEST)
    assert "may still finish" in e.value.message
    deadline = time.monotonic() + 10
    while len(entries(r, "sign")) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    last = entries(r, "sign")[-1]
    assert last["outcome"] == "ok" and last["principal"] == "signer"


def test_idempotent_batch_is_signed_once(service: Running) -> None:
    c = service.client("signer")
    digests = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    first = c.sign_batch("hot-1", digests, idempotency_key="batch-1")
    n = len(entries(service, "sign"))
    _status, body, headers = c.request(
        "POST",
        "/v1/keys/hot-1/sign-batch",
        {"digests": [d.hex() for d in digests], "scheme": "ecdsa"},
        headers={"Idempotency-Key": "batch-1"},
    )
    assert headers["idempotent-replayed"] == "true"
    assert [bytes.fromhex(x["signature"]) for x in json.loads(body)["results"]] == first
    assert len(entries(service, "sign")) == n  # not signed again
    with pytest.raises(IdempotencyConflict):
        c.sign_batch("hot-1", digests[:2], idempotency_key="batch-1")
    # keys are per client: another client's same key is its own
    other = service.client("admin").sign_batch("hot-1", digests[:1], idempotency_key="batch-1")
    assert len(other) == 1
    with pytest.raises(InvalidRequest):
        c.sign_batch("hot-1", digests, idempotency_key="bad key with spaces")


def test_idempotent_psbt_after_a_timeout_returns_the_result(start: Callable[..., Running]) -> None:
    r = start(slow(300), request_timeout_ms=100)
    w = r.wallet
    assert w is not None
    psbt = build_psbt([Spend("p2wpkh", [w.key("m/84h/1h/0h/0/0")])])
    c = r.client("psbt")
    with pytest.raises(RequestTimedOut):
        c.sign_psbt("w", psbt, idempotency_key="psbt-1")
    deadline = time.monotonic() + 20
    while True:
        try:
            got = c.sign_psbt("w", psbt, idempotency_key="psbt-1")
            break
        except RequestTimedOut:
            assert time.monotonic() < deadline
    assert got.replayed and got.signed_inputs == 1
    assert len([e for e in entries(r, "psbt_sign") if e["outcome"] == "ok"]) == 1
