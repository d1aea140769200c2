"""Signing in the token: every signature verified with coincurve, low-S strict DER,
honest refusals, and many threads at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import coincurve
import pytest
from tests.providers.pkcs11.conftest import ProviderMaker, unique_label
from tests.support.softhsm import SoftHsmToken

from anyhsm.crypto.secp256k1 import HALF_ORDER, der_decode, der_encode
from anyhsm.errors import InvalidDigest, SigningFailed, UnsupportedOperation
from anyhsm.providers.pkcs11.pool import PooledSession
from anyhsm.providers.pkcs11.provider import Pkcs11Provider
from anyhsm.types import KeySpec, SignParams, SigScheme

REPO = Path(__file__).resolve().parents[3]


def _check(pub: bytes, digest: bytes, der: bytes) -> None:
    r, s = der_decode(der)  # raises unless strict DER
    assert s <= HALF_ORDER, "high-S signature"
    assert der_encode(r, s) == der
    assert coincurve.PublicKey(pub).verify(der, digest, hasher=None)


def test_hundred_random_digests_verify_and_are_low_s(provider: Pkcs11Provider) -> None:
    info = provider.generate_key(KeySpec(unique_label()))
    for _ in range(100):
        digest = os.urandom(32)
        _check(info.public_key, digest, provider.sign_digest(info.id, digest, SigScheme.ECDSA))


def test_signing_by_label_and_with_bytearray_digest(provider: Pkcs11Provider) -> None:
    info = provider.generate_key(KeySpec(unique_label()))
    digest = bytearray(os.urandom(32))
    der = provider.sign_digest(info.label, digest, SigScheme.ECDSA, SignParams(grind_low_r=True))
    _check(info.public_key, bytes(digest), der)


def test_raw_token_signatures_are_often_high_s(provider: Pkcs11Provider) -> None:
    """Why the normalisation matters: CKM_ECDSA itself returns high S about half the time."""
    info = provider.generate_key(KeySpec(unique_label()))
    import pkcs11

    def op(ps: PooledSession) -> list[bytes]:
        key = provider._private(ps, provider._entry(info.id))
        return [
            bytes(key.sign(os.urandom(32), mechanism=pkcs11.Mechanism.ECDSA)) for _ in range(40)
        ]

    raws = provider._conn.run(op, "test raw signing")
    assert any(int.from_bytes(raw[32:], "big") > HALF_ORDER for raw in raws)


@pytest.mark.parametrize(
    ("scheme", "params", "what"),
    [
        (SigScheme.SCHNORR, None, "schnorr"),
        (SigScheme.ECDSA, SignParams(path=(0, 1)), "BIP32"),
        (SigScheme.SCHNORR, SignParams(tweak=bytes(32)), "schnorr"),
        (SigScheme.ECDSA, SignParams(tweak=bytes(32)), "tweak"),
    ],
)
def test_schnorr_paths_and_tweaks_are_unsupported(
    provider: Pkcs11Provider, scheme: SigScheme, params: SignParams | None, what: str
) -> None:
    info = provider.generate_key(KeySpec(unique_label()))
    with pytest.raises(UnsupportedOperation, match="pkcs11") as err:
        provider.sign_digest(info.id, os.urandom(32), scheme, params)
    assert what.lower() in str(err.value).lower()
    assert err.value.provider == "pkcs11"


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_digest_must_be_32_bytes(provider: Pkcs11Provider, size: int) -> None:
    info = provider.generate_key(KeySpec(unique_label()))
    with pytest.raises(InvalidDigest):
        provider.sign_digest(info.id, os.urandom(size), SigScheme.ECDSA)


class _Tampering:
    """Wraps the real token key; alters what its CKM_ECDSA signatures look like."""

    def __init__(self, key: object, alter: Callable[[bytes], bytes]) -> None:
        self._key = key
        self._alter = alter

    def sign(self, data: bytes, mechanism: object) -> bytes:
        return self._alter(bytes(self._key.sign(data, mechanism=mechanism)))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("alter", "message"),
    [
        (
            lambda raw: raw[:32] + (int.from_bytes(raw[32:], "big") ^ 1).to_bytes(32, "big"),
            "does not verify",
        ),
        (lambda raw: raw[:40], "40 bytes"),
        (lambda raw: bytes(64), "unusable"),
        (lambda raw: raw[32:] + raw[:32], "does not verify"),
    ],
)
def test_garbage_from_the_token_is_refused(
    provider: Pkcs11Provider,
    monkeypatch: pytest.MonkeyPatch,
    alter: Callable[[bytes], bytes],
    message: str,
) -> None:
    """Fault injection around the real token: its signatures come back damaged."""
    info = provider.generate_key(KeySpec(unique_label()))
    real_private = provider._private
    monkeypatch.setattr(
        provider, "_private", lambda ps, entry: _Tampering(real_private(ps, entry), alter)
    )
    with pytest.raises(SigningFailed, match=message):
        provider.sign_digest(info.id, os.urandom(32), SigScheme.ECDSA)


def test_a_module_returning_der_is_accepted(
    provider: Pkcs11Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: a non-conforming module returns DER (high-S allowed) instead of r||s."""

    def to_der(raw: bytes) -> bytes:
        return der_encode(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))

    info = provider.generate_key(KeySpec(unique_label()))
    real_private = provider._private
    monkeypatch.setattr(
        provider, "_private", lambda ps, entry: _Tampering(real_private(ps, entry), to_der)
    )
    for _ in range(10):
        digest = os.urandom(32)
        _check(info.public_key, digest, provider.sign_digest(info.id, digest, SigScheme.ECDSA))


def test_eight_threads_fifty_signatures_each(make_provider: ProviderMaker) -> None:
    provider = make_provider(pool_size=4)
    keys = [provider.generate_key(KeySpec(unique_label(f"t{i}"))) for i in range(2)]
    errors: list[BaseException] = []
    results: list[tuple[bytes, bytes, bytes]] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        try:
            start.wait()
            mine = []
            for i in range(50):
                key = keys[(n + i) % 2]
                digest = os.urandom(32)
                mine.append(
                    (key.public_key, digest, provider.sign_digest(key.id, digest, SigScheme.ECDSA))
                )
            with lock:
                results.extend(mine)
        except BaseException as exc:  # collected and asserted below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 400
    for pub, digest, der in results:
        _check(pub, digest, der)
    details = provider.health().details
    assert int(details["pool_open"]) <= 4


_THREADSAFE_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading
    sys.path.insert(0, sys.argv[1])
    os.environ["SOFTHSM2_CONF"] = sys.argv[2]
    os.environ["ANYHSM_PKCS11_PIN"] = sys.argv[5]
    from pathlib import Path
    import coincurve
    from anyhsm.provider import ProviderContext
    from anyhsm.providers.pkcs11.provider import Pkcs11Provider
    from anyhsm.types import Environment, KeySpec, Network, SigScheme
    ctx = ProviderContext(Environment.DEVELOPMENT, Network.REGTEST, Path("."), settings={
        "module": sys.argv[3], "token_label": sys.argv[4], "pool_size": 4,
        "threadsafe_module": True}, timeout_s=30.0)
    p = Pkcs11Provider(ctx)
    p.open()
    details = p.health().details
    key = p.generate_key(KeySpec("threadsafe-" + os.urandom(6).hex()))
    bad = []
    def work():
        for _ in range(50):
            d = os.urandom(32)
            der = p.sign_digest(key.id, d, SigScheme.ECDSA)
            if not coincurve.PublicKey(key.public_key).verify(der, d, hasher=None):
                bad.append(d)
    ts = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    p.delete_key(key.id)
    p.close()
    print("locking=" + details["locking"])
    print("bad=%d" % len(bad))
    """
)


def test_threadsafe_module_signs_in_parallel_without_crashing(softhsm: SoftHsmToken) -> None:
    """OS locking lets SoftHSM2 run sessions in parallel. In a child process: if the
    module were initialised without locks this would crash, and it must not take the
    test run with it."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _THREADSAFE_SCRIPT,
            str(REPO / "src"),
            str(softhsm.conf),
            softhsm.module,
            softhsm.label,
            softhsm.pin,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "locking=os-locking (parallel sessions)" in proc.stdout
    assert "bad=0" in proc.stdout
