"""PKCS#11 keys carry their creation time (issue 10 item 9), kept on the token in a data
object beside the key pair (keys.py explains why not CKA_START_DATE); real SoftHSM2."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, PKCS11Error
from tests.providers.pkcs11.conftest import ProviderMaker, unique_label

from anyhsm.providers.pkcs11.keys import (
    SECP256K1_OID_DER,
    created_label,
    decode_created,
    encode_created,
    key_id_of_created_label,
)
from anyhsm.providers.pkcs11.pool import PooledSession
from anyhsm.providers.pkcs11.provider import Pkcs11Provider
from anyhsm.types import KeySpec

T = TypeVar("T")


def _records(provider: Pkcs11Provider, key_id: bytes) -> list[dict[Attribute, object]]:
    attrs = (
        Attribute.TOKEN,
        Attribute.PRIVATE,
        Attribute.MODIFIABLE,
        Attribute.APPLICATION,
        Attribute.LABEL,
        Attribute.VALUE,
    )

    def op(ps: PooledSession) -> list[dict[Attribute, object]]:
        found = ps.session.get_objects(
            {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: created_label(key_id)}
        )
        return [{a: obj[a] for a in attrs} for obj in found]

    return provider._conn.run(op, "test read")


def _add_record(provider: Pkcs11Provider, key_id: bytes, value: bytes) -> None:
    def op(ps: PooledSession) -> None:
        ps.session.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.APPLICATION: "anyhsm",
                Attribute.LABEL: created_label(key_id),
                Attribute.VALUE: value,
            }
        )

    provider._conn.run(op, "test write")


def test_a_new_key_reports_when_it_was_made(make_provider: ProviderMaker) -> None:
    provider = make_provider()
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    info = provider.generate_key(KeySpec(unique_label()))
    after = dt.datetime.now(dt.UTC)
    made = dt.datetime.fromisoformat(info.created_at)
    assert before <= made <= after and made.utcoffset() == dt.timedelta(0)
    assert info.created_at == made.isoformat(timespec="seconds")  # the keystore's format
    assert provider.get_key(info.label).created_at == info.created_at
    provider.close()
    again = make_provider()  # a fresh process's view: read back from the token
    assert again.get_key(info.id).created_at == info.created_at
    assert {k.id: k.created_at for k in again.list_keys()}[info.id] == info.created_at


def test_the_record_on_the_token(provider: Pkcs11Provider) -> None:
    info = provider.generate_key(KeySpec(unique_label()))
    (record,) = _records(provider, bytes.fromhex(info.id))
    assert record[Attribute.TOKEN] is True
    assert record[Attribute.PRIVATE] is True  # readable after login only
    assert record[Attribute.MODIFIABLE] is False
    assert record[Attribute.APPLICATION] == "anyhsm"
    assert record[Attribute.VALUE] == info.created_at.encode("ascii")


def test_deleting_the_key_deletes_its_record(provider: Pkcs11Provider) -> None:
    info = provider.generate_key(KeySpec(unique_label()))
    provider.delete_key(info.id)
    assert _records(provider, bytes.fromhex(info.id)) == []


def test_a_key_without_a_record_has_no_creation_time(provider: Pkcs11Provider) -> None:
    """A key pair made by another tool (no record) is listed and used as before."""
    key_id = os.urandom(16)
    label = unique_label("foreign")

    def op(ps: PooledSession) -> None:
        ps.session.generate_keypair(
            KeyType.EC,
            id=key_id,
            label=label,
            store=True,
            mechanism=Mechanism.EC_KEY_PAIR_GEN,
            public_template={Attribute.EC_PARAMS: SECP256K1_OID_DER, Attribute.TOKEN: True},
            private_template={Attribute.TOKEN: True, Attribute.SIGN: True},
        )

    provider._conn.run(op, "test keygen")
    assert provider.get_key(label).created_at == ""
    assert {k.id: k.created_at for k in provider.list_keys()}[key_id.hex()] == ""
    provider.delete_key(label)


@pytest.mark.parametrize(
    "values",
    [
        [b"yesterday"],
        [b"2026-01-01T00:00:00"],  # no time zone
        [b"2026-01-01T00:00:00.5+00:00"],  # not as anyhsm writes it
        [b"2026-01-01T00:00:00+00:00", b"2026-01-02T00:00:00+00:00"],  # two: believe neither
    ],
)
def test_an_odd_record_is_not_believed(make_provider: ProviderMaker, values: list[bytes]) -> None:
    provider = make_provider()
    info = provider.generate_key(KeySpec(unique_label()))
    key_id = bytes.fromhex(info.id)

    def drop(ps: PooledSession) -> None:
        for obj in ps.session.get_objects({Attribute.LABEL: created_label(key_id)}):
            obj.destroy()

    provider._conn.run(drop, "test drop")
    for value in values:
        _add_record(provider, key_id, value)
    provider.close()
    fresh = make_provider()
    assert fresh.get_key(info.id).created_at == ""
    assert {k.id: k.created_at for k in fresh.list_keys()}[info.id] == ""
    fresh.delete_key(info.id)
    assert _records(fresh, key_id) == []  # every record of the key goes with it


def test_a_token_that_refuses_the_record_still_makes_the_key(
    provider: Pkcs11Provider, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault injection: C_CreateObject fails (a full token, a policy against data objects)."""
    run = provider._conn.run

    class Refusing:
        def __init__(self, session: object) -> None:
            self._session = session

        def create_object(self, attrs: object) -> object:
            raise PKCS11Error("no room")

        def __getattr__(self, name: str) -> object:
            return getattr(self._session, name)

    def refusing_run(op: Callable[[PooledSession], T], action: str, **kw: bool) -> T:
        def wrapped(ps: PooledSession) -> T:
            proxy = dataclasses.replace(ps, session=Refusing(ps.session))  # type: ignore[arg-type]
            proxy.objects = ps.objects
            return op(proxy)

        return run(wrapped, action, **kw)

    monkeypatch.setattr(provider._conn, "run", refusing_run)
    with caplog.at_level(logging.WARNING, logger="anyhsm.pkcs11"):
        info = provider.generate_key(KeySpec(unique_label()))
    assert info.created_at == ""
    assert "did not store the creation time" in caplog.text
    monkeypatch.undo()
    assert provider.get_key(info.id).public_key == info.public_key


def test_encoding() -> None:
    when = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    raw = encode_created(when)
    assert raw == b"2026-03-04T03:06:07+00:00"
    assert decode_created(raw) == "2026-03-04T03:06:07+00:00"
    for bad in (b"", b"x" * 40, b"2026-03-04T03:06:07+02:00", "text", None, b"\xff"):
        assert decode_created(bad) == ""
    with pytest.raises(ValueError):
        encode_created(dt.datetime(2026, 1, 1))
    key_id = bytes(range(16))
    assert key_id_of_created_label(created_label(key_id)) == key_id
    for label in ("anyhsm-created:", "anyhsm-created:0G", "anyhsm-created:ABCD", "other:00"):
        assert key_id_of_created_label(label) is None
