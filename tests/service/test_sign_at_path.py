"""``POST /v1/keys/{key}/sign`` and ``/verify`` with a BIP32 ``path`` and a BIP341
``tweak``, and ``POST /v1/psbt/sign`` with several keys, over real HTTP: the same
signatures the handle makes (checked with the curve, independently of the service),
strict validation with typed 4xx errors, authorisation unchanged, and the spending
policy's raw-digest rule (docs/policy.md section 7) still refusing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from tests.bitcoin.test_signer import Spend, add_wallet, build_psbt
from tests.service.conftest import Running

from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import (
    Bip32Error,
    Forbidden,
    InvalidDigest,
    InvalidRequest,
    RequestTooLarge,
    SpendingPolicyRefused,
    UnsupportedOperation,
)
from anyhsm.types import SigScheme

DIGEST = hashlib.sha256(b"sign at a path").digest()
PATH = "m/84'/1'/0'/0/5"


def test_ecdsa_at_a_path_is_the_childs_signature(service: Running) -> None:
    assert service.wallet is not None
    c = service.client("signer")
    sig = c.sign("w", DIGEST, path=PATH)
    child = service.wallet.pub(PATH)
    assert curve.ecdsa_verify(child, DIGEST, sig)
    assert not curve.ecdsa_verify(service.wallet.root.public_key, DIGEST, sig)
    assert sig == service.hsm.sign("w", DIGEST, params=_params(PATH))  # RFC 6979: equal
    assert c.verify("w", DIGEST, sig, path=PATH)
    assert not c.verify("w", DIGEST, sig)
    assert c.sign("w", DIGEST, path="m") == c.sign("w", DIGEST)  # "m": the key itself


def test_schnorr_with_a_tweak_at_a_path(service: Running) -> None:
    """A taproot key path signature: the child at the path, tweaked (x-only)."""
    assert service.wallet is not None
    tweak = hashlib.sha256(b"a tweak").digest()
    c = service.client("signer")
    path = "m/86'/1'/0'/0/1"
    sig = c.sign("w", DIGEST, SigScheme.SCHNORR, path=path, tweak=tweak)
    xo, _ = curve.xonly_tweak_add(curve.xonly(service.wallet.pub(path)), tweak)
    assert curve.schnorr_verify(xo, DIGEST, sig)
    assert c.verify("w", DIGEST, sig, SigScheme.SCHNORR, path=path, tweak=tweak)
    assert not c.verify("w", DIGEST, sig, SigScheme.SCHNORR, path=path)


def _params(path: str) -> object:
    from anyhsm.bitcoin.bip32 import parse_path
    from anyhsm.types import SignParams

    return SignParams(path=parse_path(path))


@pytest.mark.parametrize(
    ("member", "value", "error"),
    [
        ("path", "m/x", Bip32Error),
        ("path", "m/" + "/".join(["0"] * 256), Bip32Error),  # deeper than BIP32's 255
        ("path", "m/" + "0/" * 2100, RequestTooLarge),  # longer than the member allows
        ("path", 5, InvalidRequest),
        ("path", ["84'", 1], InvalidRequest),
        ("tweak", "00" * 31, InvalidRequest),
        ("tweak", "zz" * 32, InvalidDigest),  # hex_bytes: as every hex member
        ("tweak", "ff" * 32, InvalidRequest),  # not below the group order
        ("tweak", 7, InvalidRequest),
    ],
)
def test_malformed_members_are_typed_4xx(
    service: Running, member: str, value: object, error: type[Exception]
) -> None:
    c = service.client("signer")
    body = {"digest": DIGEST.hex(), "scheme": "schnorr", member: value}
    for route in ("sign", "verify"):
        req = {**body, "signature": "00" * 64} if route == "verify" else body
        with pytest.raises(error) as e:
            c.request("POST", f"/v1/keys/w/{route}", req)
        assert 400 <= _status(c, f"/v1/keys/w/{route}", req) < 500, e.value


def _status(c: object, path: str, body: dict[str, object]) -> int:
    from anyhsm.client import Client

    assert isinstance(c, Client)
    status, _, _ = c.request("POST", path, body, accept=tuple(range(400, 600)))
    return status


def test_a_single_key_refuses_a_path_and_ecdsa_a_tweak(service: Running) -> None:
    c = service.client("signer")
    with pytest.raises(UnsupportedOperation):
        c.sign("hot-1", DIGEST, path="m/0")
    with pytest.raises(UnsupportedOperation):
        c.sign("w", DIGEST, SigScheme.ECDSA, tweak=bytes(32))  # a tweak is for schnorr


def test_authorisation_is_unchanged(service: Running) -> None:
    with pytest.raises(Forbidden):  # read only
        service.client("reader").sign("w", DIGEST, path=PATH)
    with pytest.raises(Forbidden):  # not its key
        service.client("signer").sign("cold-1", DIGEST, path="m/0")


def test_the_raw_digest_rule_holds_at_a_path(service: Running, tmp_path: Path) -> None:
    """Under an active spending policy a key no rule allows raw digests for refuses
    them, at a path and tweaked as well as with the key itself."""
    from anyhsm.ops.policy import set_policy

    policy = tmp_path / "spending.toml"
    policy.write_text('[[rules]]\nname = "per-tx"\nkeys = ["w"]\nmax_per_tx_sat = 1000000\n')
    set_policy(service.hsm, policy)
    c = service.client("signer")
    for kwargs in ({}, {"path": PATH}, {"path": "m/86'/1'/0'/0/1", "tweak": bytes(31) + b"\1"}):
        scheme = SigScheme.SCHNORR if "tweak" in kwargs else SigScheme.ECDSA
        with pytest.raises(SpendingPolicyRefused) as e:
            c.sign("w", DIGEST, scheme, **kwargs)  # type: ignore[arg-type]
        assert e.value.rules == ["raw-digest"]


# --- PSBTs signed by several keys -----------------------------------------------------------


def test_psbt_with_several_keys_one_request(service: Running) -> None:
    assert service.wallet is not None
    w2 = add_wallet(service.hsm, "hot-w2")  # the signer client's "hot-*"
    psbt = build_psbt(
        [
            Spend("p2wpkh", [service.wallet.key("m/84'/1'/0'/0/0")]),
            Spend("p2wpkh", [w2.key("m/84'/1'/0'/0/3")]),
        ]
    )
    c = service.client("signer")
    both = c.sign_psbt(["w", "hot-w2"], psbt)
    assert both.signed_inputs == 2 and both.signatures == 2
    every = c.sign_psbt(None, psbt)  # all_keys: every key of the client's
    assert every.signed_inputs == 2
    assert every.psbt.serialize() == both.psbt.serialize()  # ECDSA: deterministic
    with pytest.raises(Forbidden):  # a key outside the client's list, among others
        c.sign_psbt(["w", "cold-1"], psbt)
    psbt_only = service.client("psbt")  # "w" only: all_keys is w alone
    assert (
        psbt_only.sign_psbt(
            None, build_psbt([Spend("p2wpkh", [service.wallet.key("m/84'/1'/0'/0/0")])])
        ).signed_inputs
        == 1
    )


@pytest.mark.parametrize(
    "selection",
    [
        {},
        {"key": "w", "keys": ["w"]},
        {"key": "w", "all_keys": True},
        {"keys": []},
        {"keys": "w"},
        {"keys": ["w", 3]},
        {"keys": ["x" * 129]},
        {"all_keys": False},
        {"all_keys": "yes"},
    ],
)
def test_psbt_key_selection_is_strict(service: Running, selection: dict[str, object]) -> None:
    psbt = build_psbt([Spend("p2wpkh", [service.wallet.key("m/84'/1'/0'/0/0")])])  # type: ignore[union-attr]
    body = {**selection, "psbt": psbt.to_base64()}
    with pytest.raises(InvalidRequest):
        service.client("signer").request("POST", "/v1/psbt/sign", body)


def test_too_many_psbt_keys(service: Running) -> None:
    psbt = build_psbt([Spend("p2wpkh", [service.wallet.key("m/84'/1'/0'/0/0")])])  # type: ignore[union-attr]
    body = {"keys": ["w"] * 65, "psbt": psbt.to_base64()}
    with pytest.raises(RequestTooLarge):
        service.client("signer").request("POST", "/v1/psbt/sign", body)


def test_batch_at_a_path_and_with_a_tweak(service: Running) -> None:
    """sign-batch takes path and tweak as sign does: every item is the child's (tweaked)
    signature, a malformed item still fails alone, and a bad path fails the batch."""
    assert service.wallet is not None
    c = service.client("signer")
    digests = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    results = c.sign_batch("w", [*digests, b"\x00" * 31], path=PATH)
    child = service.wallet.pub(PATH)
    for d, r in zip(digests, results[:3], strict=True):
        assert isinstance(r, bytes) and curve.ecdsa_verify(child, d, r)
        assert r == c.sign("w", d, path=PATH)
    assert isinstance(results[3], InvalidDigest)
    tweak = hashlib.sha256(b"batch tweak").digest()
    path = "m/86'/1'/0'/0/2"
    tweaked = c.sign_batch("w", digests, SigScheme.SCHNORR, path=path, tweak=tweak)
    xo, _ = curve.xonly_tweak_add(curve.xonly(service.wallet.pub(path)), tweak)
    assert all(
        isinstance(s, bytes) and curve.schnorr_verify(xo, d, s)
        for d, s in zip(digests, tweaked, strict=True)
    )
    with pytest.raises(Bip32Error):
        c.sign_batch("w", digests, path="m/not-a-path")
    with pytest.raises(UnsupportedOperation):
        c.sign_batch("hot-1", digests, path=PATH)  # a single key cannot derive
