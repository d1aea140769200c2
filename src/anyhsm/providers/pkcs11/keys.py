"""secp256k1 key objects on a PKCS#11 token: curve parameters, public points, templates,
and the record of when anyhsm made a key.

Pure functions: no module calls happen here except through the session objects
passed in, so the decoding rules can be tested on their own.

**Creation time.** PKCS#11 keeps no creation time of its own. ``CKA_START_DATE`` is a
date only, and it means the start of the key's validity period: a module that enforces
it would refuse a key made just after midnight UTC until its own local date caught up.
So anyhsm records the time in a data object (``CKO_DATA``) beside the key pair:
application ``anyhsm``, label ``anyhsm-created:<CKA_ID in hex>``, value the UTC time as
ISO 8601 to the second (the software keystore's format), private (read after login)
and not modifiable. It is informational, like the keystore's: anyone holding the user
PIN could replace it, so nothing is decided by it. Keys made before, or by other tools,
have none and report an empty creation time.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from coincurve._libsecp256k1 import ffi, lib
from coincurve.context import GLOBAL_CONTEXT

from anyhsm.crypto import secp256k1
from anyhsm.errors import ProviderError

if TYPE_CHECKING:
    from pkcs11 import Attribute

SECP256K1_OID_DER = bytes.fromhex("06052b8104000a")  # OBJECT IDENTIFIER 1.3.132.0.10
"""CKA_EC_PARAMS of a secp256k1 key: the DER of the curve's named OID."""

KEY_ID_BYTES = 16

CREATED_APPLICATION = "anyhsm"
CREATED_LABEL_PREFIX = "anyhsm-created:"
_CREATED_MAX_BYTES = 32  # "2026-01-01T00:00:00+00:00" is 25


def decode_ec_point(data: bytes) -> bytes:
    """CKA_EC_POINT to a 33-byte compressed public key.

    The standard wraps the SEC1 point in a DER OCTET STRING (``04 41 04||X||Y``);
    some older modules return the bare point. Both are accepted; anything else,
    or a point not on secp256k1, is refused.
    """
    point = data
    if len(data) >= 2 and data[0] == 0x04:
        length = data[1]
        body_start = 2
        if length == 0x81 and len(data) >= 3:
            length = data[2]
            body_start = 3
        if length in (33, 65) and len(data) == body_start + length:
            point = data[body_start:]
    if not ((len(point) == 65 and point[0] == 0x04) or (len(point) == 33 and point[0] in (2, 3))):
        raise ProviderError(
            "the token returned a malformed CKA_EC_POINT",
            hint="the module may not follow PKCS#11 for EC keys; see docs/pkcs11/",
        )
    try:
        return secp256k1.compress(bytes(point))
    except secp256k1.CurveError:
        raise ProviderError(
            "the token returned a CKA_EC_POINT that is not on secp256k1",
            hint="the key was made on another curve",
        ) from None


class Verifier:
    """ECDSA verification against one public key, parsed once (libsecp256k1).

    Every signature the token returns is checked before it is handed out; this is
    on the signing hot path, so the key is not re-parsed each time. libsecp256k1's
    verify accepts only low-S signatures, so a True here also confirms low S.
    """

    __slots__ = ("_pub",)

    def __init__(self, public_key: bytes) -> None:
        self._pub = ffi.new("secp256k1_pubkey *")
        if not lib.secp256k1_ec_pubkey_parse(
            GLOBAL_CONTEXT.ctx, self._pub, public_key, len(public_key)
        ):
            raise ProviderError("not a valid secp256k1 public key")

    def verify(self, der: bytes, digest: bytes) -> bool:
        """Whether ``der`` (the exact bytes to be returned) signs ``digest`` (32 bytes)."""
        if len(digest) != 32:
            return False
        sig = ffi.new("secp256k1_ecdsa_signature *")
        ctx = GLOBAL_CONTEXT.ctx
        if not lib.secp256k1_ecdsa_signature_parse_der(ctx, sig, der, len(der)):
            return False
        return bool(lib.secp256k1_ecdsa_verify(ctx, sig, digest, self._pub))


def public_template(attr: type[Attribute]) -> dict[Attribute, object]:
    """Attributes of the public half: a token object anyone may read, verify-only."""
    return {
        attr.EC_PARAMS: SECP256K1_OID_DER,
        attr.TOKEN: True,
        attr.PRIVATE: False,
        attr.VERIFY: True,
        attr.ENCRYPT: False,
        attr.WRAP: False,
        attr.DERIVE: False,
    }


def private_template(attr: type[Attribute]) -> dict[Attribute, object]:
    """Attributes of the private half: a sensitive, never-extractable, sign-only token key."""
    return {
        attr.TOKEN: True,
        attr.PRIVATE: True,
        attr.SENSITIVE: True,
        attr.EXTRACTABLE: False,
        attr.SIGN: True,
        attr.DECRYPT: False,
        attr.UNWRAP: False,
        attr.DERIVE: False,
    }


def created_label(key_id: bytes) -> str:
    """CKA_LABEL of the data object recording when the key with this CKA_ID was made."""
    return CREATED_LABEL_PREFIX + key_id.hex()


def key_id_of_created_label(label: str) -> bytes | None:
    """The CKA_ID a creation record's label names, or None for any other label."""
    if not label.startswith(CREATED_LABEL_PREFIX):
        return None
    text = label[len(CREATED_LABEL_PREFIX) :]
    try:
        key_id = bytes.fromhex(text)
    except ValueError:
        return None
    return key_id if key_id and key_id.hex() == text else None


def encode_created(when: dt.datetime) -> bytes:
    """The record's CKA_VALUE: UTC, ISO 8601, to the second."""
    if when.tzinfo is None:
        raise ValueError("a creation time must carry its time zone")
    return when.astimezone(dt.UTC).isoformat(timespec="seconds").encode("ascii")


def decode_created(raw: object) -> str:
    """A record's value as the ISO 8601 text anyhsm wrote, or "" for anything else (a
    token may hold objects anyhsm did not make: nothing odd reaches the output)."""
    if not isinstance(raw, bytes | bytearray) or not 0 < len(raw) <= _CREATED_MAX_BYTES:
        return ""
    try:
        text = bytes(raw).decode("ascii")
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return ""
    if when.tzinfo is None or encode_created(when) != bytes(raw):
        return ""
    return text


def created_template(
    attr: type[Attribute], data_class: object, key_id: bytes, when: dt.datetime
) -> dict[Attribute, object]:
    """The creation record of the key with ``key_id``: a private, unmodifiable token
    data object."""
    return {
        attr.CLASS: data_class,
        attr.TOKEN: True,
        attr.PRIVATE: True,
        attr.MODIFIABLE: False,
        attr.APPLICATION: CREATED_APPLICATION,
        attr.LABEL: created_label(key_id),
        attr.VALUE: encode_created(when),
    }
