"""The provider contract at the raw level: each backend opened by itself, with no handle in
between to normalise its answers (issue 10, "conformance at two levels").

The handle-level suite (test_contract.py) cannot see a provider that returns a high-S or
non-strict signature, or an unchecked digest, because the handle fixes or checks them
first. Here every provider (software, simulator, pkcs11 on a real SoftHSM2 token,
pkcs11-wrapped through that token, tpm on a real swtpm) is constructed through the
registry and called directly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import coincurve
import pytest
from tests.conftest import PASSPHRASE

from anyhsm.config import Config
from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import HsmError, InvalidDigest, KeyExists, KeyNotFound, UnsupportedOperation
from anyhsm.factory import load_provider_class, provider_context
from anyhsm.keystore import Keystore
from anyhsm.provider import Provider
from anyhsm.secret import SecretBytes
from anyhsm.types import KeySpec, SecurityLevel, SignParams, SigScheme

RAW_BACKENDS = ["software", "simulator", "pkcs11", "pkcs11-wrapped", "tpm"]
_ORDER = 2**256 - 0x14551231950B75FC4402DA1732FC9BEBF  # secp256k1 group order n


def _mapping(directory: Path, name: str, extra: dict[str, object]) -> Config:
    raw: dict[str, object] = {
        "environment": "development",
        "network": "regtest",
        "fallback": {"chain": [name]},
        "providers": {"software": {"path": str(directory / "keystore")}, **extra},
        "audit": {"path": str(directory / "audit.log")},
    }
    return Config.from_mapping(raw, config_dir=directory, env={})


@pytest.fixture(params=RAW_BACKENDS)
def provider(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Provider]:
    from anyhsm.deploy import FAST_DEV_KDF

    name: str = request.param
    passphrase = SecretBytes(PASSPHRASE.encode())
    ks = Keystore.create(tmp_path / "keystore", passphrase, kdf=FAST_DEV_KDF)
    extra: dict[str, object] = {}
    if name in ("pkcs11", "pkcs11-wrapped"):
        token = request.getfixturevalue("softhsm_token")
        monkeypatch.setenv("ANYHSM_PKCS11_PIN", token.pin)  # type: ignore[attr-defined]
        extra["pkcs11"] = {
            "module": token.module,  # type: ignore[attr-defined]
            "token_label": token.label,  # type: ignore[attr-defined]
            "wrap_key_label": "raw-contract-wrap",
        }
    if name == "tpm":
        tpm = request.getfixturevalue("swtpm")
        extra["tpm"] = {"tcti": tpm.tcti}  # type: ignore[attr-defined]
    cfg = _mapping(tmp_path, name, extra)
    if name == "tpm":
        from anyhsm.tpm.enrollment import enroll
        from anyhsm.tpm.settings import TpmSettings

        enroll(ks, TpmSettings.from_mapping(cfg.provider_settings("tpm")))
    if name == "pkcs11-wrapped":
        from anyhsm.providers.pkcs11.wrap import enroll as wrap_enroll

        wrap_enroll(ks, provider_context(cfg, "pkcs11-wrapped", None))
    ks.close()
    needs_passphrase = name == "software"
    p = load_provider_class(name)(
        provider_context(cfg, name, passphrase if needs_passphrase else None)
    )
    p.open()
    made: list[str] = []
    request.node.made_keys = made
    yield p
    for key_id in made:  # tokens outlive the test: remove what it made
        with contextlib.suppress(HsmError):
            p.delete_key(key_id)
    p.close()
    os.environ.pop("ANYHSM_PKCS11_PIN", None)


def _new_key(p: Provider, request: pytest.FixtureRequest, label: str) -> str:
    info = p.generate_key(KeySpec(f"{label}-{os.urandom(4).hex()}"))
    request.node.made_keys.append(info.id)
    return info.id


def _bip66_strict(sig: bytes) -> bool:
    """Bitcoin Core's IsValidSignatureEncoding (BIP66), for a signature without its
    sighash byte: written out here from the BIP, independent of the code under test."""
    if len(sig) < 8 or len(sig) > 72 or sig[0] != 0x30 or sig[1] != len(sig) - 2:
        return False
    r_len = sig[3]
    if 5 + r_len >= len(sig):
        return False
    s_len = sig[5 + r_len]
    if r_len + s_len + 6 != len(sig) or sig[2] != 0x02 or r_len == 0 or sig[4] & 0x80:
        return False
    if r_len > 1 and sig[4] == 0 and not sig[5] & 0x80:
        return False
    if sig[r_len + 4] != 0x02 or s_len == 0 or sig[r_len + 6] & 0x80:
        return False
    return not (s_len > 1 and sig[r_len + 6] == 0 and not sig[r_len + 7] & 0x80)


def _strict_low_s(sig: bytes) -> tuple[int, int]:
    """(r, s) of a strict DER signature; fails unless strict (BIP66) and low-S."""
    assert _bip66_strict(sig), f"not strict DER: {sig.hex()}"
    r_len = sig[3]
    r = int.from_bytes(sig[4 : 4 + r_len], "big")
    s_len = sig[5 + r_len]
    s = int.from_bytes(sig[6 + r_len : 6 + r_len + s_len], "big")
    assert 1 <= r < _ORDER and 1 <= s <= _ORDER // 2, "high-S or out-of-range signature"
    return r, s


def test_identity_and_level(provider: Provider) -> None:
    assert isinstance(provider, Provider)
    assert isinstance(provider.security_level(), SecurityLevel)
    assert provider.store_id()
    assert provider.health().ok


def test_raw_ecdsa_is_strict_der_low_s_and_verifies(
    provider: Provider, request: pytest.FixtureRequest
) -> None:
    """The provider itself returns strict DER with low S: the one place low-S is made."""
    key = _new_key(provider, request, "ecdsa")
    pub = provider.public_key(key)
    for _ in range(40):
        digest = os.urandom(32)
        sig = provider.sign_digest(key, digest, SigScheme.ECDSA)
        _strict_low_s(sig)
        assert coincurve.PublicKey(pub).verify(sig, digest, hasher=None)


def test_raw_schnorr_or_unsupported_before_work(
    provider: Provider, request: pytest.FixtureRequest
) -> None:
    key = _new_key(provider, request, "schnorr")
    digest = os.urandom(32)
    if SigScheme.SCHNORR not in provider.capabilities().schemes:
        with pytest.raises(UnsupportedOperation):
            provider.sign_digest(key, digest, SigScheme.SCHNORR)
        return
    sig = provider.sign_digest(key, digest, SigScheme.SCHNORR)
    assert len(sig) == 64
    assert curve.schnorr_verify(curve.xonly(provider.public_key(key)), digest, sig)


def test_raw_capabilities_are_honest(provider: Provider, request: pytest.FixtureRequest) -> None:
    """What capabilities() denies is refused with UnsupportedOperation, not attempted."""
    key = _new_key(provider, request, "caps")
    caps = provider.capabilities()
    digest = os.urandom(32)
    if not caps.can_derive:
        with pytest.raises(UnsupportedOperation):
            provider.sign_digest(key, digest, SigScheme.ECDSA, SignParams(path=(0,)))
    if not caps.can_tweak and SigScheme.SCHNORR in caps.schemes:
        with pytest.raises(UnsupportedOperation):
            provider.sign_digest(key, digest, SigScheme.SCHNORR, SignParams(tweak=bytes(32)))


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33)], ids=["empty", "31", "33"])
def test_raw_digest_length_checked(
    provider: Provider, request: pytest.FixtureRequest, bad: bytes
) -> None:
    key = _new_key(provider, request, "digest")
    with pytest.raises(InvalidDigest):
        provider.sign_digest(key, bad, SigScheme.ECDSA)


def test_raw_key_lifecycle(provider: Provider, request: pytest.FixtureRequest) -> None:
    label = f"life-{os.urandom(4).hex()}"
    info = provider.generate_key(KeySpec(label))
    request.node.made_keys.append(info.id)
    assert len(info.public_key) == 33
    made = dt.datetime.fromisoformat(info.created_at)  # every provider says when (ISO 8601)
    assert made.utcoffset() == dt.timedelta(0)
    assert abs(dt.datetime.now(dt.UTC) - made) < dt.timedelta(minutes=5)
    assert provider.get_key(info.id).public_key == info.public_key
    assert provider.get_key(info.id).created_at == info.created_at
    assert provider.get_key(label).id == info.id
    assert {k.id: k.created_at for k in provider.list_keys()}[info.id] == info.created_at
    if provider.capabilities().persistent:
        with pytest.raises(KeyExists):
            provider.generate_key(KeySpec(label))
    provider.delete_key(info.id)
    request.node.made_keys.remove(info.id)
    with pytest.raises(KeyNotFound):
        provider.get_key(info.id)
    with pytest.raises(KeyNotFound):
        provider.sign_digest(info.id, os.urandom(32), SigScheme.ECDSA)
