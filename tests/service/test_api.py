"""The API over real HTTP through the typed client: every endpoint answers what the
operations layer (and so the CLI under --json) answers, and every failure is raised as
the library's own error class."""

from __future__ import annotations

import hashlib
import json

import pytest
from tests.bitcoin.test_signer import Spend, build_psbt
from tests.service.conftest import Running

from anyhsm.bitcoin.message import verify_message
from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import (
    Forbidden,
    HsmError,
    InvalidDigest,
    KeyNotFound,
    NothingSigned,
    PsbtError,
    UnsupportedOperation,
)
from anyhsm.ops import SCHEMA_VERSION
from anyhsm.ops import bitcoin as obtc
from anyhsm.ops import psbt as opsbt
from anyhsm.types import SigScheme

DIGEST = hashlib.sha256(b"service").digest()


def test_ready_and_health(service: Running) -> None:
    r = service.client(None).ready()
    assert r.ready and r.reasons == () and r.active_provider == "software"
    report = service.client("reader").health()
    assert report.ok and report.active_provider == "software"
    assert set(service.hsm.health().to_dict()) == set(report.to_dict())
    _, body, _ = service.client("reader").request("GET", "/v1/health")
    assert json.loads(body)["schema_version"] == SCHEMA_VERSION


def test_keys_are_those_the_client_may_use(service: Running) -> None:
    every = {k.label for k in service.client("reader").list_keys()}
    assert every == {"hot-1", "hot-2", "cold-1", "w"}
    mine = {k.label for k in service.client("signer").list_keys()}
    assert mine == {"hot-1", "hot-2", "w"}
    info = service.client("signer").get_key("w")
    assert info == service.hsm.get_key("w")  # chain code included: same fingerprint
    assert info.master_fingerprint == service.wallet.fingerprint  # type: ignore[union-attr]
    by_id = service.client("signer").get_key(info.id)
    assert by_id.label == "w"


@pytest.mark.parametrize("scheme", list(SigScheme))
def test_sign_digest_verifies_and_is_audited_with_the_client(
    service: Running, scheme: SigScheme
) -> None:
    c = service.client("signer")
    sig = c.sign("hot-1", DIGEST, scheme)
    pub = service.hsm.public_key("hot-1")
    if scheme is SigScheme.ECDSA:
        assert curve.ecdsa_verify(pub, DIGEST, sig)
        assert curve.normalize_der(sig) == sig  # strict DER, low S
    else:
        assert len(sig) == 64 and curve.schnorr_verify(curve.xonly(pub), DIGEST, sig)
    assert c.verify("hot-1", DIGEST, sig, scheme)
    assert not c.verify("hot-1", bytes(32), sig, scheme)
    entries = [json.loads(line) for line in service.hsm.audit_path.read_text().splitlines()]
    signs = [e for e in entries if e["op"] == "sign"]
    assert signs[-1]["principal"] == "signer" and signs[-1]["outcome"] == "ok"
    assert signs[-1]["detail"]["digest"] == DIGEST.hex()


def test_sign_batch_has_ordered_per_item_results(service: Running) -> None:
    c = service.client("signer")
    digests = [hashlib.sha256(bytes([i])).digest() for i in range(5)]
    res = c.sign_batch("hot-2", digests)
    pub = service.hsm.public_key("hot-2")
    assert all(isinstance(r, bytes) and curve.ecdsa_verify(pub, d, r) for r, d in zip(res, digests))
    # an invalid item is that item's error; the others are signed
    status, body, _ = c.request(
        "POST",
        "/v1/keys/hot-2/sign-batch",
        {"digests": [digests[0].hex(), "zz", "00" * 31, digests[1].hex()]},
    )
    results = json.loads(body)["results"]
    assert status == 200 and len(results) == 4
    assert "signature" in results[0] and "signature" in results[3]
    assert results[1]["error"]["code"] == results[2]["error"]["code"] == "invalid_digest"
    with pytest.raises(InvalidDigest):
        c.sign_many("hot-2", [digests[0], b"\x00" * 31])


def test_psbt_sign_is_what_psbt_sign_json_prints(service: Running) -> None:
    w = service.wallet
    assert w is not None
    psbt = build_psbt([Spend("p2wpkh", [w.key("m/84h/1h/0h/0/0")])])
    got = service.client("psbt").sign_psbt("w", psbt)
    expected = opsbt.sign_psbt(service.hsm, psbt, "w").to_dict()
    assert got.signed_inputs == expected["signed_inputs"] == 1
    report = dict(got.report)
    assert report.pop("schema_version") == SCHEMA_VERSION  # as the CLI prints it
    # the signature itself differs (fresh nonce grinding is deterministic: RFC 6979 + low R)
    assert report == expected
    fin = service.client("reader").finalize_psbt(got.psbt)
    assert fin.complete and fin.tx is not None
    finalized = dict(fin.report)
    del finalized["schema_version"]
    assert finalized == opsbt.finalize_psbt(got.psbt).to_dict()
    inspected = dict(service.client("reader").inspect_psbt(psbt))
    del inspected["schema_version"]
    assert inspected == opsbt.inspect_psbt(psbt, service.hsm.network).to_dict()


def test_psbt_nothing_to_sign_is_nothing_signed(service: Running) -> None:
    w = service.wallet
    assert w is not None
    psbt = build_psbt([Spend("p2wpkh", [w.key("m/84h/1h/0h/0/0")])])
    with pytest.raises(NothingSigned):
        service.client("signer").sign_psbt("hot-1", psbt)
    with pytest.raises(PsbtError):
        service.client("signer").sign_psbt("w", "bm90IGEgcHNidA==")


def test_xpub_address_descriptors_are_the_operations(service: Running) -> None:
    c = service.client("reader")
    hsm = service.hsm
    assert c.xpub("w", "m/84h/1h/0h") == obtc.xpub(hsm, "w", "m/84h/1h/0h")
    assert c.address("w", "m/84h/1h/0h/0/3") == obtc.address(hsm, "w", "m/84h/1h/0h/0/3")
    assert c.address("hot-1", kind="p2pkh") == obtc.address(hsm, "hot-1", kind="p2pkh")
    assert c.descriptor("w", "tr", account=2) == obtc.descriptor(hsm, "w", "tr", account=2)
    assert c.wallet_descriptors("w") == obtc.wallet_descriptors(hsm, "w")
    with pytest.raises(UnsupportedOperation):
        c.xpub("hot-1")


def test_messages(service: Running) -> None:
    c = service.client("signer")
    for bip322, kind in ((False, None), (True, "p2wpkh"), (True, "p2tr")):
        sig = c.sign_message("w", "hello", "m/84h/1h/0h/0/0", kind=kind, bip322=bip322)
        assert verify_message(sig.address, "hello", sig.signature, service.hsm.network)
        v = service.client("reader").verify_message(sig.address, "hello", sig.signature)
        assert v.valid
        assert v == obtc.verify_message(sig.address, "hello", sig.signature, service.hsm.network)
        assert not service.client("reader").verify_message(sig.address, "bye", sig.signature).valid


def test_admin_audit_tail_and_verify(service: Running) -> None:
    service.client("signer").sign("hot-1", DIGEST)
    admin = service.client("admin")
    res = admin.verify_audit()
    assert res.ok and res.entries > 0
    tail = admin.audit_tail(limit=3, op="sign")
    assert tail.verified and len(tail.entries) == 1
    assert tail.entries[0]["principal"] == "signer"
    with pytest.raises(Forbidden):
        service.client("signer").verify_audit()


def test_errors_are_the_library_classes(service: Running) -> None:
    c = service.client("admin")
    with pytest.raises(KeyNotFound) as e:
        c.sign("no-such-key", DIGEST)
    assert e.value.code == "key_not_found" and "no-such-key" in e.value.message
    with pytest.raises(InvalidDigest):
        c.request("POST", "/v1/keys/hot-1/sign", {"digest": "00" * 33})
    with pytest.raises(HsmError) as e2:
        c.request("POST", "/v1/keys/hot-1/sign", {"digest": DIGEST.hex(), "scheme": "rsa"})
    assert e2.value.code == "invalid_request"
