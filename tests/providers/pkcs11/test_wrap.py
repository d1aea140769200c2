"""Wrap mode on a real SoftHSM2 token: the keystore master key wrapped by an AES key
generated inside the token; the software keystore opened without a passphrase."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import coincurve
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass
from tests.providers.pkcs11.conftest import PIN_ENV, ProviderMaker, unique_label
from tests.support.softhsm import SoftHsmToken, token_subdir

from anyhsm.deploy import FAST_DEV_KDF
from anyhsm.errors import (
    ConfigError,
    KeyNotFound,
    KeystoreCorrupted,
    KeystoreTampered,
    PinRejected,
    ProviderUnavailable,
    UnsupportedFormatVersion,
)
from anyhsm.keystore import Keystore
from anyhsm.provider import ProviderContext
from anyhsm.providers.pkcs11.pool import PooledSession
from anyhsm.providers.pkcs11.provider import Pkcs11Provider
from anyhsm.providers.pkcs11.wrap import (
    SIDE_FILE,
    Pkcs11WrappedProvider,
    WrapMechanism,
    enroll,
    unenroll,
    unwrap_master_key,
    wrap_master_key,
)
from anyhsm.providers.software import SoftwareProvider
from anyhsm.secret import SecretBytes
from anyhsm.types import Environment, KeySpec, Network, SecurityLevel, SigScheme

PASSPHRASE = b"a recovery passphrase that is long enough to be fine"
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def wrap_label() -> str:
    return unique_label("wrap")


@pytest.fixture
def ctx(
    softhsm: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wrap_label: str
) -> ProviderContext:
    monkeypatch.setenv(PIN_ENV, softhsm.pin)
    return ProviderContext(
        environment=Environment.DEVELOPMENT,
        network=Network.REGTEST,
        config_dir=tmp_path,
        settings={
            "module": softhsm.module,
            "token_label": softhsm.label,
            "wrap_key_label": wrap_label,
        },
        software_settings={"path": str(tmp_path / "keystore")},
        timeout_s=20.0,
    )


@contextmanager
def _token_removed(token: SoftHsmToken, tmp_path: Path) -> Iterator[None]:
    src = token_subdir(token)
    parked = tmp_path / "parked-token"
    shutil.move(str(src), str(parked))
    try:
        yield
    finally:
        shutil.move(str(parked), str(src))


def _master() -> SecretBytes:
    return SecretBytes(os.urandom(32))


def _edit(blob: bytes, **changes: object) -> bytes:
    body = json.loads(blob)
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize("mechanism", [None, WrapMechanism.AES_KEY_WRAP_PAD])
def test_round_trip(ctx: ProviderContext, mechanism: WrapMechanism | None) -> None:
    master = _master()
    blob = wrap_master_key(ctx, master, mechanism=mechanism)
    body = json.loads(blob)
    expected = mechanism or WrapMechanism.AES_GCM  # SoftHSM2 offers GCM
    assert body["mechanism"] == expected.value
    assert master.reveal().hex() not in blob.decode()
    with unwrap_master_key(ctx, blob) as back:
        assert back.equals(master)


def test_gcm_that_does_not_round_trip_falls_back_to_key_wrap(
    ctx: ProviderContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: a module that uses its own GCM IV (as AWS CloudHSM documents)
    and reports another one; the round-trip check catches it before anything is stored."""
    from anyhsm.providers.pkcs11 import wrap_token

    real = wrap_token._encrypt

    def own_iv(ps: object, key: object, mech: WrapMechanism, data: bytes, aad: bytes) -> object:
        iv, ct = real(ps, key, mech, data, aad)  # type: ignore[arg-type]
        return (os.urandom(len(iv)), ct) if mech is WrapMechanism.AES_GCM else (iv, ct)

    monkeypatch.setattr(wrap_token, "_encrypt", own_iv)
    master = _master()
    blob = wrap_master_key(ctx, master)
    assert json.loads(blob)["mechanism"] == WrapMechanism.AES_KEY_WRAP_PAD.value
    with unwrap_master_key(ctx, blob) as back:
        assert back.equals(master)
    with pytest.raises(KeystoreTampered):  # forced GCM: no silent fallback
        wrap_master_key(ctx, master, mechanism=WrapMechanism.AES_GCM)


def test_wrap_key_is_made_once_inside_the_token(
    ctx: ProviderContext, make_provider: ProviderMaker, wrap_label: str
) -> None:
    one = json.loads(wrap_master_key(ctx, _master()))
    two = json.loads(wrap_master_key(ctx, _master()))
    assert one["key_id"] == two["key_id"] and one["key_label"] == wrap_label
    assert one["iv"] != two["iv"]
    provider = make_provider()

    def op(ps: PooledSession) -> list[dict[Attribute, object]]:
        keys = ps.session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: wrap_label}
        )
        attrs = (
            Attribute.KEY_TYPE,
            Attribute.VALUE_LEN,
            Attribute.TOKEN,
            Attribute.SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.NEVER_EXTRACTABLE,
        )
        return [{a: k[a] for a in attrs} for k in keys]

    (key,) = provider._conn.run(op, "test read")
    assert key[Attribute.KEY_TYPE] == KeyType.AES
    assert key[Attribute.VALUE_LEN] == 32
    assert key[Attribute.TOKEN] is True
    assert key[Attribute.SENSITIVE] is True
    assert key[Attribute.EXTRACTABLE] is False
    assert key[Attribute.NEVER_EXTRACTABLE] is True


def test_altered_blobs_are_refused(ctx: ProviderContext, softhsm: SoftHsmToken) -> None:
    blob = wrap_master_key(ctx, _master())
    body = json.loads(blob)
    ct = bytearray(base64.b64decode(body["ciphertext"]))
    ct[0] ^= 1
    with pytest.raises(KeystoreTampered, match="does not authenticate"):
        unwrap_master_key(ctx, _edit(blob, ciphertext=base64.b64encode(bytes(ct)).decode()))
    with pytest.raises(KeystoreTampered):
        unwrap_master_key(ctx, _edit(blob, iv=base64.b64encode(os.urandom(12)).decode()))
    with pytest.raises(KeystoreTampered):  # a mechanism swap does not open it either
        unwrap_master_key(ctx, _edit(blob, mechanism=WrapMechanism.AES_KEY_WRAP_PAD.value))
    with pytest.raises(KeyNotFound):
        unwrap_master_key(ctx, _edit(blob, key_label="another-label"))
    with pytest.raises(ProviderUnavailable, match="serial"):
        unwrap_master_key(ctx, _edit(blob, token_serial="0000000000000000"))
    with pytest.raises(KeystoreCorrupted):
        unwrap_master_key(ctx, b"not json")
    with pytest.raises(KeystoreCorrupted):
        unwrap_master_key(ctx, _edit(blob, mechanism="CKM_DES"))
    with pytest.raises(KeystoreCorrupted):
        unwrap_master_key(ctx, _edit(blob, ciphertext="***"))
    with pytest.raises(UnsupportedFormatVersion):
        unwrap_master_key(ctx, _edit(blob, version=2))


def test_unwrap_without_the_token(
    ctx: ProviderContext, softhsm: SoftHsmToken, tmp_path: Path
) -> None:
    master = _master()
    blob = wrap_master_key(ctx, master)
    with _token_removed(softhsm, tmp_path), pytest.raises(ProviderUnavailable):
        unwrap_master_key(ctx, blob)
    with unwrap_master_key(ctx, blob) as back:  # the token is back
        assert back.equals(master)


def test_unwrap_with_a_wrong_pin(ctx: ProviderContext, monkeypatch: pytest.MonkeyPatch) -> None:
    blob = wrap_master_key(ctx, _master())
    monkeypatch.setenv(PIN_ENV, "31313131")
    with pytest.raises(PinRejected, match="PIN"):
        unwrap_master_key(ctx, blob)


def test_wrap_key_label_is_required(ctx: ProviderContext) -> None:
    settings = dict(ctx.settings)
    del settings["wrap_key_label"]
    bad = ProviderContext(ctx.environment, ctx.network, ctx.config_dir, settings=settings)
    with pytest.raises(ConfigError, match="wrap_key_label"):
        wrap_master_key(bad, _master())


# --- the pkcs11-wrapped provider over a real keystore -------------------------------------------


@pytest.fixture
def keystore_dir(ctx: ProviderContext) -> Path:
    path = Path(str(ctx.software_settings["path"]))
    Keystore.create(path, SecretBytes(PASSPHRASE), kdf=FAST_DEV_KDF).close()
    return path


def _enrolled(path: Path, ctx: ProviderContext) -> dict[str, object]:
    ks = Keystore.load(path)
    ks.unlock_with_passphrase(SecretBytes(PASSPHRASE))
    try:
        return enroll(ks, ctx)
    finally:
        ks.close()


def test_wrapped_provider_opens_the_keystore_without_a_passphrase(
    ctx: ProviderContext, keystore_dir: Path, softhsm: SoftHsmToken
) -> None:
    summary = _enrolled(keystore_dir, ctx)
    assert summary["mechanism"] == "CKM_AES_GCM"
    assert summary["token_serial"] == softhsm.serial
    assert (keystore_dir / SIDE_FILE).is_file()
    provider = Pkcs11WrappedProvider(ctx)
    assert ctx.passphrase is None
    provider.open()
    try:
        assert provider.security_level() is SecurityLevel.HSM_WRAPPED
        assert provider.name == "pkcs11-wrapped"
        info = provider.generate_key(KeySpec(unique_label()))
        digest = os.urandom(32)
        der = provider.sign_digest(info.id, digest, SigScheme.ECDSA)
        assert coincurve.PublicKey(info.public_key).verify(der, digest, hasher=None)
        health = provider.health()
        assert health.ok, health.reason
        assert health.details["unlock_blob"] == "present"
        assert health.details["unseals"] == "yes"
        assert health.details["blob"]["mechanism"] == "CKM_AES_GCM"  # type: ignore[index]
        store = provider.store_id()
    finally:
        provider.close()
    # The same keys open with the recovery passphrase through the software provider.
    with_passphrase = ProviderContext(
        ctx.environment,
        ctx.network,
        ctx.config_dir,
        software_settings=ctx.software_settings,
        passphrase=SecretBytes(PASSPHRASE),
    )
    software = SoftwareProvider(with_passphrase)
    software.open()
    try:
        assert software.store_id() == store
        assert software.get_key(info.id).public_key == info.public_key
    finally:
        software.close()


def test_wrapped_provider_without_the_token_or_enrolment(
    ctx: ProviderContext, keystore_dir: Path, softhsm: SoftHsmToken, tmp_path: Path
) -> None:
    provider = Pkcs11WrappedProvider(ctx)
    with pytest.raises(ProviderUnavailable, match="not enrolled"):
        provider.open()
    _enrolled(keystore_dir, ctx)
    with _token_removed(softhsm, tmp_path), pytest.raises(ProviderUnavailable):
        Pkcs11WrappedProvider(ctx).open()
    ks = Keystore.load(keystore_dir)
    ks.unlock_with_passphrase(SecretBytes(PASSPHRASE))
    try:
        assert unenroll(ks) is True
        assert unenroll(ks) is False
    finally:
        ks.close()


def test_pkcs11_provider_and_wrap_mode_share_the_token(
    ctx: ProviderContext, make_provider: ProviderMaker
) -> None:
    """Both log in to the same token in one process: the login is shared, not doubled."""
    provider: Pkcs11Provider = make_provider()
    info = provider.generate_key(KeySpec(unique_label()))
    master = _master()
    with unwrap_master_key(ctx, wrap_master_key(ctx, master)) as back:
        assert back.equals(master)
    digest = os.urandom(32)
    der = provider.sign_digest(info.id, digest, SigScheme.ECDSA)
    assert coincurve.PublicKey(info.public_key).verify(der, digest, hasher=None)
