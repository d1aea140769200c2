"""seal/unseal, tpm_info and tpm_random against a real swtpm."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from tests.providers.tpm.tpmtools import extend_pcr, loaded_handles
from tests.support.swtpm import Swtpm

from anyhsm.errors import (
    ProviderError,
    ProviderNotInstalled,
    ProviderTimeout,
    ProviderUnavailable,
)
from anyhsm.secret import SecretBytes
from anyhsm.tpm import (
    SealedBlob,
    TpmBlobInvalid,
    TpmForeignBlob,
    TpmPolicyMismatch,
    TpmSettings,
    connection,
    pcr_values,
    seal,
    tpm_info,
    tpm_random,
    unseal,
)
from anyhsm.tpm.policy import policy_pcr_digest

pytestmark = pytest.mark.tpm

SECRET = bytes(range(1, 33))


def _secret() -> SecretBytes:
    return SecretBytes(SECRET)


def test_round_trip(settings: TpmSettings) -> None:
    blob = seal(settings, _secret())
    with unseal(settings, blob) as back:
        assert back.equals(SECRET)
    parsed = SealedBlob.from_json(blob)
    assert parsed.pcrs == ()
    assert parsed.policy_digest == b""
    assert SECRET.hex() not in blob.decode()


@pytest.mark.parametrize("size", [1, 32, 64, 128])
def test_sizes(settings: TpmSettings, size: int) -> None:
    data = bytes((i * 7 + 3) % 256 for i in range(size))
    with unseal(settings, seal(settings, SecretBytes(data))) as back:
        assert back.equals(data)


def test_oversized_secret_refused(settings: TpmSettings) -> None:
    with pytest.raises(ProviderError):
        seal(settings, SecretBytes(129))


def test_two_seals_differ_but_both_open(settings: TpmSettings) -> None:
    a, b = seal(settings, _secret()), seal(settings, _secret())
    assert SealedBlob.from_json(a).private != SealedBlob.from_json(b).private
    for blob in (a, b):
        with unseal(settings, blob) as back:
            assert back.equals(SECRET)


def test_pcr_policy_round_trip_then_mismatch(swtpm: Swtpm) -> None:
    pcr = 16  # the debug PCR: extending it disturbs no other test's policy
    s = TpmSettings(tcti=swtpm.tcti, pcrs=(0, pcr))
    blob = seal(s, _secret())
    parsed = SealedBlob.from_json(blob)
    now = pcr_values(s)
    assert parsed.pcr_values == (now[0], now[pcr])
    assert parsed.policy_digest == policy_pcr_digest("sha256", (0, pcr), parsed.pcr_values)
    with unseal(s, blob) as back:
        assert back.equals(SECRET)

    extend_pcr(swtpm.tcti, pcr)
    with pytest.raises(TpmPolicyMismatch) as info:
        unseal(s, blob)
    assert info.value.changed_pcrs == (pcr,)
    assert "PCR 16" in info.value.message
    assert "recovery passphrase" in (info.value.hint or "")
    assert isinstance(info.value, ProviderUnavailable)  # the factory falls back on it


def test_pcr_policy_is_enforced_by_the_tpm_itself(swtpm: Swtpm) -> None:
    """Rewrite the blob's recorded PCR values to the new ones (and its policy digest to
    match): anyhsm's own check passes, so only the TPM can refuse, and it must."""
    s = TpmSettings(tcti=swtpm.tcti, pcrs=(16,))
    blob = seal(s, _secret())
    extend_pcr(swtpm.tcti, 16, b"another measurement")
    d = json.loads(blob)
    new_value = pcr_values(s)[16]
    d["pcr_values"] = {"16": new_value.hex()}
    d["policy_digest"] = policy_pcr_digest("sha256", (16,), (new_value,)).hex()
    forged = json.dumps(d).encode()
    # The public area still carries the old authPolicy: refused before the TPM is asked...
    with pytest.raises(TpmBlobInvalid):
        unseal(s, forged)
    # ...and with the public area's authPolicy left alone the TPM itself refuses.
    d["policy_digest"] = SealedBlob.from_json(blob).policy_digest.hex()
    d["pcr_values"] = json.loads(blob)["pcr_values"]
    with pytest.raises(TpmPolicyMismatch):
        unseal(s, json.dumps(d).encode())


def test_sealed_to_pcrs_needs_the_policy(swtpm: Swtpm) -> None:
    """A PCR-bound object has userWithAuth clear: the blob's attributes say so and an
    edit that sets it is detected (the TPM would refuse to load it anyway)."""
    s = TpmSettings(tcti=swtpm.tcti, pcrs=(16,))
    blob = SealedBlob.from_json(seal(s, _secret()))
    public = bytearray(blob.public)
    # TPM2B_PUBLIC: size(2) type(2) nameAlg(2) objectAttributes(4): set USERWITHAUTH (0x40)
    public[9] |= 0x40
    d = json.loads(blob.to_json())
    d["public"] = bytes(public).hex()
    with pytest.raises(TpmBlobInvalid):
        unseal(s, json.dumps(d).encode())


@pytest.mark.parametrize("part", ["private", "public"])
def test_tampered_tpm_objects_refused(settings: TpmSettings, part: str) -> None:
    blob = seal(settings, _secret())
    d = json.loads(blob)
    raw = bytearray.fromhex(d[part])
    raw[-1] ^= 0x01  # inside the encrypted sensitive area / the unique field
    d[part] = raw.hex()
    with pytest.raises(TpmBlobInvalid):
        unseal(settings, json.dumps(d).encode())


def test_truncated_and_garbage_blobs_refused(settings: TpmSettings) -> None:
    blob = seal(settings, _secret())
    for bad in (
        blob[: len(blob) // 2],
        b"",
        b"not json",
        blob.replace(b'"version": 1', b'"version": 9'),
    ):
        with pytest.raises(TpmBlobInvalid):
            unseal(settings, bad)


def test_blob_from_another_tpm(settings: TpmSettings, private_swtpm: Swtpm) -> None:
    blob = seal(settings, _secret())
    with pytest.raises(TpmForeignBlob) as info:
        unseal(TpmSettings(tcti=private_swtpm.tcti), blob)
    assert "recovery passphrase" in (info.value.hint or "")


def test_wiped_tpm_state(private_swtpm: Swtpm) -> None:
    s = TpmSettings(tcti=private_swtpm.tcti)
    blob = seal(s, _secret())
    private_swtpm.stop()
    private_swtpm.start()  # same state: still opens (PCRs reset, seeds kept)
    with unseal(s, blob) as back:
        assert back.equals(SECRET)
    private_swtpm.wipe()  # new seeds: as if the TPM were cleared or replaced
    with pytest.raises(TpmForeignBlob):
        unseal(s, blob)


def test_stopped_tpm_is_unavailable(private_swtpm: Swtpm) -> None:
    s = TpmSettings(tcti=private_swtpm.tcti, timeout_s=2.0)
    blob = seal(s, _secret())
    private_swtpm.stop()
    for call in (lambda: unseal(s, blob), lambda: seal(s, _secret()), lambda: tpm_info(s)):
        with pytest.raises(ProviderUnavailable) as info:
            call()
        assert "not reachable" in info.value.message
    private_swtpm.start()
    with unseal(s, blob) as back:
        assert back.equals(SECRET)


def test_paused_tpm_times_out_then_recovers(private_swtpm: Swtpm) -> None:
    """A TPM that accepts but never answers: ProviderTimeout (never a hang). Once it
    answers again the abandoned worker finishes and flushes what it loaded."""
    s = TpmSettings(tcti=private_swtpm.tcti, timeout_s=0.3)
    blob = seal(s, _secret())
    private_swtpm.pause()
    try:
        with pytest.raises(ProviderTimeout):
            unseal(s, blob)
        with pytest.raises(ProviderTimeout):  # the first worker still holds the TPM
            tpm_random(s, 8)
    finally:
        private_swtpm.resume()
    with unseal(TpmSettings(tcti=private_swtpm.tcti, timeout_s=5.0), blob) as back:
        assert back.equals(SECRET)
    assert loaded_handles(private_swtpm.tcti) == []


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Loopback ports N (commands) and N+1 (control) that accept connections and never
    answer: a hung TPM daemon, as the swtpm TCTI sees it."""
    servers: list[socket.socket] = []
    for _ in range(100):
        first = socket.socket()
        first.bind(("127.0.0.1", 0))
        second = socket.socket()
        try:
            second.bind(("127.0.0.1", first.getsockname()[1] + 1))
        except OSError:
            first.close()
            second.close()
            continue
        servers = [first, second]
        break
    assert servers, "no free port pair"
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept(srv: socket.socket) -> None:
        srv.listen(8)
        srv.settimeout(0.05)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    threads = [threading.Thread(target=accept, args=(s,), daemon=True) for s in servers]
    for t in threads:
        t.start()
    yield int(servers[0].getsockname()[1])
    stop.set()
    for t in threads:
        t.join()
    for c in conns + servers:
        c.close()


def test_tcti_that_never_answers_times_out(silent_server: int) -> None:
    s = TpmSettings(tcti=f"swtpm:host=127.0.0.1,port={silent_server}", timeout_s=0.2)
    with pytest.raises(ProviderTimeout):
        tpm_info(s)


def test_missing_device(tmp_path: Path) -> None:
    s = TpmSettings(tcti=f"device:{tmp_path / 'no-tpm'}")
    with pytest.raises(ProviderUnavailable) as info:
        tpm_info(s)
    assert "no TPM device" in info.value.message


def test_timed_out_secret_is_wiped(private_swtpm: Swtpm) -> None:
    """A result that arrives after the caller gave up is disposed of, not leaked."""
    s = TpmSettings(tcti=private_swtpm.tcti, timeout_s=0.2)
    produced: list[SecretBytes] = []
    release = threading.Event()

    def slow(conn: connection.Connection) -> SecretBytes:
        out = SecretBytes(bytes(conn.esys.get_random(16)))
        produced.append(out)
        release.wait(10)
        return out

    with pytest.raises(ProviderTimeout):
        connection.run(s, "test", slow, discard=lambda x: x.wipe())
    release.set()
    for _ in range(1000):  # the worker finishes in microseconds once released
        if produced and produced[0].wiped:
            break
        time.sleep(0.005)
    assert produced[0].wiped


def test_tpm_info(settings: TpmSettings) -> None:
    info = tpm_info(settings)
    assert info["manufacturer"] == "IBM"  # swtpm reports IBM's manufacturer id
    assert info["vendor"].startswith("SW")
    assert info["family"] == "2.0"
    assert info["firmware_version"].count(".") == 3
    assert info["in_lockout"] == "no"
    assert info["owner_auth_set"] == "no"
    assert info["tcti"] == settings.tcti


def test_tpm_random(settings: TpmSettings) -> None:
    outs = {tpm_random(settings, 64) for _ in range(4)}
    assert len(outs) == 4
    assert all(len(o) == 64 for o in outs)
    assert len(tpm_random(settings, 100)) == 100  # several TPM calls
    with pytest.raises(Exception, match="random bytes"):
        tpm_random(settings, 0)


def test_missing_tpm2_pytss_is_provider_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: tpm2_pytss made unimportable."""
    monkeypatch.setattr(connection, "_pytss", None)
    monkeypatch.setitem(sys.modules, "tpm2_pytss", None)
    settings = TpmSettings(tcti="swtpm:host=127.0.0.1,port=2321")
    with pytest.raises(ProviderNotInstalled) as info:
        tpm_info(settings)
    assert "pip install 'anyhsm[tpm]'" in (info.value.hint or "")


@hypothesis_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_tpm_objects_never_yield_a_secret(settings: TpmSettings, data: st.DataObject) -> None:
    """Any mutation of the TPM objects in a real blob is refused with a typed error
    (the TPM's integrity check covers every byte); it never unseals to anything."""
    blob = _fuzz_blob(settings)
    d = json.loads(blob)
    part = data.draw(st.sampled_from(["public", "private"]))
    raw = bytearray.fromhex(d[part])
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    d[part] = raw.hex()
    with pytest.raises((TpmBlobInvalid, TpmForeignBlob)):
        unseal(settings, json.dumps(d).encode())


_FUZZ_BLOBS: dict[str, bytes] = {}


def _fuzz_blob(s: TpmSettings) -> bytes:
    if s.tcti not in _FUZZ_BLOBS:
        _FUZZ_BLOBS[s.tcti] = seal(s, _secret())
    return _FUZZ_BLOBS[s.tcti]


def test_concurrent_unseals_are_serialised(settings: TpmSettings) -> None:
    blob = seal(settings, _secret())
    results: list[bool] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(3):
                with unseal(settings, blob) as back:
                    results.append(back.equals(SECRET))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [True] * 18


@pytest.mark.parametrize(("part", "index", "flip"), [("public", 1, 2), ("private", 1, 2)])
def test_edited_tpm2b_size_field_is_refused(
    settings: TpmSettings, part: str, index: int, flip: int
) -> None:
    """Regression (found by the fuzz test above): a TPM2B size field edited so that the MU
    layer still parses the structure used to unseal; the blob must be byte-canonical."""
    d = json.loads(_fuzz_blob(settings))
    raw = bytearray.fromhex(d[part])
    raw[index] ^= flip
    d[part] = raw.hex()
    with pytest.raises((TpmBlobInvalid, TpmForeignBlob)):
        unseal(settings, json.dumps(d).encode())
