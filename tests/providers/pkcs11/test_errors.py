"""The translation table (every python-pkcs11 exception has a typed anyhsm error) and
the CKA_EC_POINT decoder (fuzzed)."""

from __future__ import annotations

import inspect
import os

import coincurve
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyhsm.errors import (
    AuthenticationFailed,
    HsmError,
    KeyNotFound,
    PinLocked,
    PinRejected,
    ProviderError,
    ProviderUnavailable,
    UnsupportedOperation,
)
from anyhsm.providers.pkcs11 import errors as pe
from anyhsm.providers.pkcs11.keys import decode_ec_point

pkcs11 = pytest.importorskip("pkcs11")


def _exception_classes() -> list[type[BaseException]]:
    import pkcs11.exceptions as exc_mod

    return [
        cls
        for _, cls in inspect.getmembers(exc_mod, inspect.isclass)
        if issubclass(cls, exc_mod.PKCS11Error) and cls is not exc_mod.PKCS11Error
    ]


def test_every_python_pkcs11_exception_has_a_ckr_name() -> None:
    for cls in _exception_classes():
        assert pe.ckr_name(cls()) != "CKR_UNKNOWN", cls.__name__


@pytest.mark.parametrize("cls", _exception_classes(), ids=lambda c: c.__name__)
def test_every_exception_translates_to_a_typed_error(cls: type[BaseException]) -> None:
    err = pe.translate(cls(), "signing")
    assert isinstance(err, HsmError)
    assert pe.ckr_name(cls()) in str(err)
    assert err.hint


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("PinIncorrect", PinRejected),
        ("PinInvalid", PinRejected),
        ("PinLenRange", PinRejected),
        ("PinLocked", PinLocked),
        ("PinExpired", AuthenticationFailed),
        ("TokenNotPresent", ProviderUnavailable),
        ("DeviceRemoved", ProviderUnavailable),
        ("SessionHandleInvalid", ProviderUnavailable),
        ("NoSuchToken", ProviderUnavailable),
        ("MechanismInvalid", UnsupportedOperation),
        ("DomainParamsInvalid", UnsupportedOperation),
        ("FunctionNotSupported", UnsupportedOperation),
        ("NoSuchKey", KeyNotFound),
        ("ObjectHandleInvalid", KeyNotFound),
        ("TemplateInconsistent", ProviderError),
    ],
)
def test_translation_kinds(name: str, kind: type[HsmError]) -> None:
    err = pe.translate(getattr(pkcs11.exceptions, name)(), "login")
    assert type(err) is kind


def test_wrong_pin_message_says_rejected() -> None:
    err = pe.translate(pkcs11.exceptions.PinIncorrect(), "login")
    assert "PIN" in err.message and "rejected" in err.message
    assert "ANYHSM_PKCS11_PIN" in (err.hint or "")


def test_unsupported_names_the_provider() -> None:
    err = pe.translate(pkcs11.exceptions.MechanismInvalid(), "signing", provider="pkcs11")
    assert isinstance(err, UnsupportedOperation)
    assert err.provider == "pkcs11"
    assert "CKR_MECHANISM_INVALID" in str(err)


def test_codes_python_pkcs11_does_not_map() -> None:
    curve = pkcs11.PKCS11Error("Unmapped error code 0x140")
    assert pe.ckr_name(curve) == "CKR_CURVE_NOT_SUPPORTED"
    assert isinstance(pe.translate(curve, "key generation"), UnsupportedOperation)
    vendor = pkcs11.PKCS11Error("Unmapped error code 0x80000123")
    assert pe.ckr_name(vendor) == "CKR_VENDOR_DEFINED+0x123"
    assert type(pe.translate(vendor, "signing")) is ProviderError
    not_init = pkcs11.PKCS11Error("Initialisation error (not initialized). Should never see this.")
    assert pe.connection_lost(not_init)


def test_raw_return_values() -> None:
    assert pe.rv_name(0xA0) == "CKR_PIN_INCORRECT"
    assert isinstance(pe.translate_rv(0xA4, "login"), PinLocked)
    assert pe.rv_name(0x7777) == "CKR_0x7777"


def test_error_table_rows_for_docs() -> None:
    rows = pe.error_table()
    names = {r[0] for r in rows}
    assert {"CKR_PIN_INCORRECT", "CKR_PIN_LOCKED", "CKR_TOKEN_NOT_PRESENT"} <= names
    assert all(row[1] and row[2] and row[3] for row in rows)


# --- CKA_EC_POINT -------------------------------------------------------------------------


def _pub(compressed: bool) -> bytes:
    return coincurve.PrivateKey(os.urandom(32)).public_key.format(compressed=compressed)


def test_ec_point_encodings() -> None:
    full = _pub(False)
    short = coincurve.PublicKey(full).format(compressed=True)
    assert decode_ec_point(b"\x04\x41" + full) == short  # the standard DER OCTET STRING
    assert decode_ec_point(b"\x04\x81\x41" + full) == short  # long-form length
    assert decode_ec_point(full) == short  # bare point (older modules)
    assert decode_ec_point(b"\x04\x21" + short) == short
    assert decode_ec_point(short) == short


@pytest.mark.parametrize(
    "data",
    [b"", b"\x04", b"\x04\x41", b"\x04\x41" + bytes(65), b"\x05" * 67, b"\x04\x42" + bytes(66)],
)
def test_bad_ec_points(data: bytes) -> None:
    with pytest.raises(ProviderError):
        decode_ec_point(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_ec_point_decoder_fuzz(data: bytes) -> None:
    try:
        out = decode_ec_point(data)
    except ProviderError:
        return
    assert len(out) == 33 and out[0] in (2, 3)
    coincurve.PublicKey(out)
