"""Key lifecycle on a real SoftHSM2 token: generate, list, get, delete, and what the
token really holds (attributes read back through python-pkcs11)."""

from __future__ import annotations

import pytest
from pkcs11 import Attribute, ObjectClass
from tests.providers.pkcs11.conftest import ProviderMaker, unique_label
from tests.support.softhsm import SoftHsmToken

from anyhsm.errors import (
    KeyExists,
    KeyNotFound,
    ProviderError,
    ProviderUnavailable,
    UnsupportedOperation,
)
from anyhsm.providers.pkcs11.keys import SECP256K1_OID_DER
from anyhsm.providers.pkcs11.pool import PooledSession
from anyhsm.providers.pkcs11.provider import Pkcs11Provider
from anyhsm.types import HEALTH_PROBE_LABEL, KeySpec, KeyType, SecurityLevel, SigScheme


def _objects(provider: Pkcs11Provider, key_id: bytes) -> dict[str, dict[Attribute, object]]:
    """The token's own view of both halves of a key (read with raw python-pkcs11)."""
    wanted = {
        "private": (
            ObjectClass.PRIVATE_KEY,
            (
                Attribute.TOKEN,
                Attribute.PRIVATE,
                Attribute.SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.ALWAYS_SENSITIVE,
                Attribute.NEVER_EXTRACTABLE,
                Attribute.SIGN,
                Attribute.DERIVE,
                Attribute.DECRYPT,
                Attribute.EC_PARAMS,
                Attribute.LABEL,
            ),
        ),
        "public": (
            ObjectClass.PUBLIC_KEY,
            (Attribute.TOKEN, Attribute.VERIFY, Attribute.EC_PARAMS, Attribute.EC_POINT),
        ),
    }

    def op(ps: PooledSession) -> dict[str, dict[Attribute, object]]:
        out: dict[str, dict[Attribute, object]] = {}
        for name, (cls, attrs) in wanted.items():
            objs = list(ps.session.get_objects({Attribute.CLASS: cls, Attribute.ID: key_id}))
            assert len(objs) == 1, name
            out[name] = {a: objs[0][a] for a in attrs}
        return out

    return provider._conn.run(op, "test read")


def test_generate_reports_a_secp256k1_key(provider: Pkcs11Provider, softhsm: SoftHsmToken) -> None:
    label = unique_label()
    info = provider.generate_key(KeySpec(label))
    assert info.label == label
    assert info.provider == "pkcs11"
    assert info.store == f"pkcs11:{softhsm.serial}" == provider.store_id()
    assert info.key_type is KeyType.SECP256K1
    assert len(bytes.fromhex(info.id)) == 16
    assert len(info.public_key) == 33 and info.public_key[0] in (2, 3)
    assert info.exportable is False


def test_generated_key_is_sensitive_non_extractable_token_object(
    provider: Pkcs11Provider,
) -> None:
    info = provider.generate_key(KeySpec(unique_label()))
    objs = _objects(provider, bytes.fromhex(info.id))
    priv, pub = objs["private"], objs["public"]
    assert priv[Attribute.TOKEN] is True
    assert priv[Attribute.PRIVATE] is True
    assert priv[Attribute.SENSITIVE] is True
    assert priv[Attribute.EXTRACTABLE] is False
    assert priv[Attribute.ALWAYS_SENSITIVE] is True
    assert priv[Attribute.NEVER_EXTRACTABLE] is True
    assert priv[Attribute.SIGN] is True
    assert priv[Attribute.DERIVE] is False
    assert priv[Attribute.DECRYPT] is False
    assert bytes(priv[Attribute.EC_PARAMS]) == SECP256K1_OID_DER  # type: ignore[arg-type]
    assert priv[Attribute.LABEL] == info.label
    assert pub[Attribute.TOKEN] is True
    assert pub[Attribute.VERIFY] is True
    point = bytes(pub[Attribute.EC_POINT])  # type: ignore[arg-type]
    # CKA_EC_POINT is a DER OCTET STRING around the uncompressed point.
    assert point[:3] == b"\x04\x41\x04" and len(point) == 67


def test_private_value_cannot_be_read(provider: Pkcs11Provider) -> None:
    info = provider.generate_key(KeySpec(unique_label()))

    def op(ps: PooledSession) -> object:
        priv = ps.session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=bytes.fromhex(info.id))
        return priv[Attribute.VALUE]

    with pytest.raises(ProviderError, match="CKR_ATTRIBUTE_SENSITIVE"):
        provider._conn.run(op, "reading the private value")


def test_list_get_and_delete(provider: Pkcs11Provider) -> None:
    a = provider.generate_key(KeySpec(unique_label("a")))
    b = provider.generate_key(KeySpec(unique_label("b")))
    listed = {k.id: k for k in provider.list_keys()}
    assert listed[a.id] == a
    assert listed[b.id] == b
    assert provider.get_key(a.id) == a
    assert provider.get_key(a.label) == a
    assert provider.public_key(b.label) == b.public_key
    provider.delete_key(a.label)
    assert a.id not in {k.id for k in provider.list_keys()}
    with pytest.raises(KeyNotFound):
        provider.get_key(a.id)
    with pytest.raises(KeyNotFound):
        provider.get_key(a.label)
    with pytest.raises(KeyNotFound):
        provider.delete_key(a.id)
    assert provider.get_key(b.id) == b


def test_delete_removes_both_halves(provider: Pkcs11Provider) -> None:
    info = provider.generate_key(KeySpec(unique_label()))
    key_id = bytes.fromhex(info.id)
    provider.delete_key(info.id)

    def op(ps: PooledSession) -> int:
        return len(list(ps.session.get_objects({Attribute.ID: key_id})))

    assert provider._conn.run(op, "test count") == 0


def test_duplicate_label_is_refused(provider: Pkcs11Provider) -> None:
    label = unique_label()
    first = provider.generate_key(KeySpec(label))
    with pytest.raises(KeyExists, match=label):
        provider.generate_key(KeySpec(label))
    assert [k.id for k in provider.list_keys() if k.label == label] == [first.id]


@pytest.mark.parametrize("key_type", [KeyType.BIP32, KeyType.ED25519, KeyType.P256])
def test_other_key_types_are_refused_before_any_work(
    make_provider: ProviderMaker, key_type: KeyType
) -> None:
    closed = make_provider(open=False)
    with pytest.raises(UnsupportedOperation, match="pkcs11"):
        closed.generate_key(KeySpec(unique_label(), key_type=key_type))


def test_exportable_keys_are_refused(provider: Pkcs11Provider) -> None:
    with pytest.raises(UnsupportedOperation, match="exportable"):
        provider.generate_key(KeySpec(unique_label(), exportable=True))


def test_unknown_reference(provider: Pkcs11Provider) -> None:
    with pytest.raises(KeyNotFound):
        provider.get_key("no-such-key-" + unique_label())
    with pytest.raises(KeyNotFound):
        provider.public_key("00" * 16)


def test_internal_labels_are_stored_like_any_other(provider: Pkcs11Provider) -> None:
    existing = [k for k in provider.list_keys() if k.label == HEALTH_PROBE_LABEL]
    info = existing[0] if existing else provider.generate_key(KeySpec(HEALTH_PROBE_LABEL))
    assert info.internal
    assert provider.get_key(HEALTH_PROBE_LABEL).id == info.id


def test_keys_persist_across_close_and_open(
    make_provider: ProviderMaker, softhsm: SoftHsmToken
) -> None:
    first = make_provider()
    info = first.generate_key(KeySpec(unique_label()))
    first.close()
    with pytest.raises(ProviderUnavailable):
        first.get_key(info.id)
    again = make_provider()
    assert again.get_key(info.label) == info


def test_capabilities_and_levels(make_provider: ProviderMaker, softhsm: SoftHsmToken) -> None:
    provider = make_provider(open=False)
    caps = provider.capabilities()
    assert caps.key_types == frozenset({KeyType.SECP256K1})
    assert caps.schemes == frozenset({SigScheme.ECDSA})
    assert not (caps.can_import or caps.can_export or caps.can_derive or caps.can_tweak)
    assert caps.controls_nonce is False and caps.persistent is True
    assert provider.security_level() is SecurityLevel.HSM
    assert provider.production_ready() is True
    assert provider.name == "pkcs11"
    with pytest.raises(ProviderUnavailable):
        provider.store_id()  # the serial is only known once open
    by_serial = make_provider(open=False, token_label=None, token_serial=softhsm.serial)
    assert by_serial.store_id() == f"pkcs11:{softhsm.serial}"
