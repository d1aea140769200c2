"""Token crypto of wrap mode: an AES key inside a PKCS#11 token encrypts the keystore's
master key (:func:`wrap_master_key`, :func:`unwrap_master_key`), and
:class:`TokenWrapSealer`, the token's :class:`~anyhsm.unlock_blobs.MasterKeySealer`.

The token keeps a 256-bit AES key (label ``wrap_key_label`` in ``[providers.pkcs11]``),
generated inside it as a sensitive, never-extractable token object. Mechanism, chosen
per token and recorded in the blob (:mod:`anyhsm.providers.pkcs11.wrap_blob`):

- ``CKM_AES_GCM`` when the token offers it (SoftHSM2 does): an AEAD, one call each
  way, no key object is created, and the blob's header is bound as additional
  authenticated data.
- otherwise ``CKM_AES_KEY_WRAP_PAD`` (RFC 5649) through C_WrapKey/C_UnwrapKey: an
  authenticated key wrap built into most HSMs, so no separate HMAC key is needed.
  The master key passes through a short-lived session object destroyed right after.

Every wrap is unwrapped again and compared before the blob is returned (a module
that, for example, writes its own GCM IV somewhere else cannot produce a blob that
later fails). Limits: python-pkcs11 takes and returns ``bytes``, so short-lived
immutable copies of the master key exist in this process while wrapping and
unwrapping; whoever can log in to the token with the user PIN can unwrap it.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import time
from typing import TYPE_CHECKING, Any, cast

from anyhsm.errors import (
    ConfigError,
    HsmError,
    KeyNotFound,
    KeystoreError,
    KeystoreTampered,
    ProviderError,
    ProviderUnavailable,
    UnsupportedOperation,
)
from anyhsm.provider import ProviderContext
from anyhsm.providers.pkcs11.settings import Pkcs11Settings
from anyhsm.providers.pkcs11.wrap_blob import SIDE_FILE, WrapMechanism, WrappedBlob
from anyhsm.secret import SecretBytes
from anyhsm.types import SecurityLevel

if TYPE_CHECKING:
    from types import ModuleType

    from pkcs11 import Attribute, DecryptMixin, EncryptMixin, SecretKey, UnwrapMixin, WrapMixin

    from anyhsm.keystore import Keystore
    from anyhsm.providers.pkcs11.conn import Connection
    from anyhsm.providers.pkcs11.pool import PooledSession

__all__ = [
    "PROVIDER_NAME",
    "TokenWrapSealer",
    "not_enrolled",
    "unwrap_master_key",
    "wrap_master_key",
    "wrap_settings",
]

PROVIDER_NAME = "pkcs11-wrapped"
MASTER_KEY_BYTES = 32
AES_KEY_BYTES = 32
GCM_IV_BYTES = 12
GCM_TAG_BITS = 128
KEY_ID_BYTES = 16
NOT_ENROLLED_HINT = (
    "run the pkcs11 enrolment (it needs the passphrase once), or open the keystore with "
    "the recovery passphrase"
)


def wrap_settings(context: ProviderContext) -> Pkcs11Settings:
    """The token settings, which must name the wrap key (``wrap_key_label``)."""
    settings = Pkcs11Settings.from_context(context)
    if settings.wrap_key_label is None:
        raise ConfigError(
            "[providers.pkcs11] wrap_key_label is required for wrap mode",
            hint='e.g. wrap_key_label = "anyhsm-master-wrap"',
        )
    return dataclasses.replace(settings, pool_size=1)


def _connect(context: ProviderContext) -> Connection:
    settings = wrap_settings(context)
    settings.require_module()  # before importing the token layer: a fallback stays cheap
    from anyhsm.providers.pkcs11.conn import Connection

    conn = Connection(settings, context.environment, context.timeout_s, PROVIDER_NAME)
    conn.open()
    return conn


def _p11() -> ModuleType:
    import pkcs11

    return pkcs11


def _find_wrap_key(ps: PooledSession, label: str, key_id: bytes | None) -> SecretKey | None:
    p11 = _p11()
    attr = p11.Attribute
    template: dict[Attribute, Any] = {
        attr.CLASS: p11.ObjectClass.SECRET_KEY,
        attr.KEY_TYPE: p11.KeyType.AES,
        attr.LABEL: label,
    }
    if key_id:
        template[attr.ID] = key_id
    found = list(ps.session.get_objects(template))
    if len(found) > 1:
        raise ProviderError(
            f"{len(found)} AES keys on the token carry the wrap key label {label!r}",
            hint="give the wrap key a unique label",
        )
    if not found:
        return None
    key: SecretKey = found[0]  # type: ignore[assignment]
    if (
        int(key[attr.VALUE_LEN]) != AES_KEY_BYTES
        or not key[attr.SENSITIVE]
        or key[attr.EXTRACTABLE]
    ):
        raise ProviderError(
            f"the wrap key {label!r} is not a sensitive, non-extractable AES-256 key",
            hint="delete it and let anyhsm generate the wrap key in the token",
        )
    return key


def _create_wrap_key(ps: PooledSession, label: str) -> SecretKey:
    p11 = _p11()
    attr = p11.Attribute
    flags = p11.MechanismFlag
    key: SecretKey = ps.session.generate_key(
        p11.KeyType.AES,
        AES_KEY_BYTES * 8,
        id=os.urandom(KEY_ID_BYTES),
        label=label,
        store=True,
        capabilities=flags.ENCRYPT | flags.DECRYPT | flags.WRAP | flags.UNWRAP,
        template={
            attr.TOKEN: True,
            attr.PRIVATE: True,
            attr.SENSITIVE: True,
            attr.EXTRACTABLE: False,
            attr.SIGN: False,
            attr.VERIFY: False,
            attr.DERIVE: False,
        },
    )
    return key


def _choose(ps: PooledSession, forced: WrapMechanism | None) -> WrapMechanism:
    if forced is not None:
        return forced
    p11 = _p11()
    offered = ps.session.token.slot.get_mechanisms()
    if p11.Mechanism.AES_GCM in offered:
        return WrapMechanism.AES_GCM
    if p11.Mechanism.AES_KEY_WRAP_PAD in offered:
        return WrapMechanism.AES_KEY_WRAP_PAD
    raise UnsupportedOperation(
        PROVIDER_NAME,
        "master-key wrapping: the token offers neither CKM_AES_GCM nor CKM_AES_KEY_WRAP_PAD",
        hint="use the TPM or the passphrase to open the keystore on this machine",
    )


def _encrypt(
    ps: PooledSession, key: SecretKey, mechanism: WrapMechanism, data: bytes, aad: bytes
) -> tuple[bytes, bytes]:
    p11 = _p11()
    if mechanism is WrapMechanism.AES_GCM:
        iv = os.urandom(GCM_IV_BYTES)
        params = p11.mechanisms.GCMParams(iv, aad, GCM_TAG_BITS)
        ct = cast("EncryptMixin", key).encrypt(
            data, mechanism=p11.Mechanism.AES_GCM, mechanism_param=params
        )
        return iv, bytes(cast(bytes, ct))
    attr = p11.Attribute
    tmp = ps.session.create_object(
        {
            attr.CLASS: p11.ObjectClass.SECRET_KEY,
            attr.KEY_TYPE: p11.KeyType.GENERIC_SECRET,
            attr.TOKEN: False,
            attr.PRIVATE: True,
            attr.SENSITIVE: False,
            attr.EXTRACTABLE: True,
            attr.VALUE: data,
        }
    )
    try:
        wrapped = cast("WrapMixin", key).wrap_key(
            cast("SecretKey", tmp), mechanism=p11.Mechanism.AES_KEY_WRAP_PAD
        )
    finally:
        tmp.destroy()
    return b"", bytes(wrapped)


def _decrypt(ps: PooledSession, key: SecretKey, blob: WrappedBlob) -> bytes:
    p11 = _p11()
    if blob.mechanism is WrapMechanism.AES_GCM:
        params = p11.mechanisms.GCMParams(blob.iv, blob.aad(), GCM_TAG_BITS)
        out = cast("DecryptMixin", key).decrypt(
            blob.ciphertext, mechanism=p11.Mechanism.AES_GCM, mechanism_param=params
        )
        return bytes(cast(bytes, out))
    attr = p11.Attribute
    tmp = cast("UnwrapMixin", key).unwrap_key(
        p11.ObjectClass.SECRET_KEY,
        p11.KeyType.GENERIC_SECRET,
        blob.ciphertext,
        mechanism=p11.Mechanism.AES_KEY_WRAP_PAD,
        store=False,
        template={attr.TOKEN: False, attr.SENSITIVE: False, attr.EXTRACTABLE: True},
    )
    try:
        return bytes(tmp[attr.VALUE])
    finally:
        tmp.destroy()


def _authenticated_decrypt(
    conn: Connection, ps: PooledSession, key: SecretKey, blob: WrappedBlob
) -> bytes:
    """Decrypt, telling a blob that does not authenticate apart from a token that left."""
    p11 = _p11()
    try:
        return _decrypt(ps, key, blob)
    except p11.PKCS11Error as exc:
        conn.verify_presence(ps)  # raises (and the connection reconnects) if it left
        raise KeystoreTampered(
            f"the PKCS#11-wrapped master key does not authenticate under the token's wrap key "
            f"({_ckr_name(exc)})",
            hint="the side file was altered or wrapped by another key; open the keystore with "
            "the recovery passphrase and enrol again",
        ) from None


def _ckr_name(exc: Exception) -> str:
    from anyhsm.providers.pkcs11.errors import ckr_name

    return ckr_name(exc)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def wrap_master_key(
    context: ProviderContext,
    master_key: SecretBytes,
    *,
    mechanism: WrapMechanism | None = None,
) -> bytes:
    """Encrypt ``master_key`` under the token's AES wrap key (generated on first use);
    returns the opaque blob to store beside the keystore.

    ``mechanism`` forces one (tests); by default GCM if the token offers it, else
    AES key wrap with padding. The blob is unwrapped and compared before it is returned.
    """
    if len(master_key) != MASTER_KEY_BYTES:
        raise KeystoreError(f"a keystore master key is {MASTER_KEY_BYTES} bytes")
    settings = wrap_settings(context)
    label = settings.wrap_key_label
    assert label is not None
    conn = _connect(context)
    try:
        facts = conn.facts
        assert facts is not None

        def attempt(ps: PooledSession, key: SecretKey, chosen: WrapMechanism) -> WrappedBlob:
            draft = WrappedBlob(
                token_serial=facts.serial,
                token_label=facts.label,
                key_label=label,
                key_id=bytes(key[_p11().Attribute.ID]),
                mechanism=chosen,
                iv=b"",
                ciphertext=b"",
                wrapped_at=_now(),
            )
            iv, ct = _encrypt(ps, key, chosen, master_key.reveal(), draft.aad())
            blob = dataclasses.replace(draft, iv=iv, ciphertext=ct)
            back = _authenticated_decrypt(conn, ps, key, blob)
            if not hmac.compare_digest(back, master_key.buffer):
                raise ProviderError(
                    f"the token did not give back the wrapped master key ({chosen.value}); "
                    "nothing was written",
                    hint="this module's AES mechanism misbehaves; see docs/pkcs11/",
                )
            return blob

        def op(ps: PooledSession) -> WrappedBlob:
            found = _find_wrap_key(ps, label, None)
            key = found if found is not None else _create_wrap_key(ps, label)
            chosen = _choose(ps, mechanism)
            try:
                return attempt(ps, key, chosen)
            except (ProviderError, KeystoreTampered):
                # Some modules pick their own GCM IV (AWS CloudHSM does) and the blob
                # would not open later; fall back to RFC 5649 key wrap if offered.
                if mechanism is not None or chosen is not WrapMechanism.AES_GCM:
                    raise
                if _p11().Mechanism.AES_KEY_WRAP_PAD not in ps.session.token.slot.get_mechanisms():
                    raise
                return attempt(ps, key, WrapMechanism.AES_KEY_WRAP_PAD)

        blob = conn.run(op, "master-key wrapping", retry=False)
    finally:
        conn.close()
    return blob.to_json()


def unwrap_master_key(context: ProviderContext, blob: bytes) -> SecretBytes:
    """The master key inside ``blob``, decrypted by the token that wrapped it.

    Token absent or PIN wrong: the typed provider error (ProviderUnavailable,
    PinRejected, ...); blob altered: KeystoreTampered; unreadable: KeystoreCorrupted.
    """
    parsed = WrappedBlob.from_json(blob)
    conn = _connect(context)
    try:
        facts = conn.facts
        assert facts is not None
        if facts.serial != parsed.token_serial:
            raise ProviderUnavailable(
                f"the master key was wrapped by token serial {parsed.token_serial}, but the "
                f"configured token is serial {facts.serial}",
                hint="insert the token that wrapped it, or open the keystore with the "
                "recovery passphrase",
            )

        def op(ps: PooledSession) -> bytes:
            key = _find_wrap_key(ps, parsed.key_label, parsed.key_id)
            if key is None:
                conn.verify_presence(ps)
                raise KeyNotFound(
                    f"the wrap key {parsed.key_label!r} (id {parsed.key_id.hex()}) is not on "
                    f"token {facts.serial}",
                    hint="open the keystore with the recovery passphrase and enrol again",
                )
            return _authenticated_decrypt(conn, ps, key, parsed)

        plain = conn.run(op, "master-key unwrapping")
    finally:
        conn.close()
    if len(plain) != MASTER_KEY_BYTES:
        raise KeystoreTampered(f"{SIDE_FILE} unwraps to {len(plain)} bytes, not a master key")
    return SecretBytes(plain)


def not_enrolled(keystore: Keystore) -> ProviderUnavailable:
    """The error for a keystore without a token-wrapped master key."""
    return ProviderUnavailable(
        f"the keystore is not enrolled with a PKCS#11 token (no {SIDE_FILE} in {keystore.path})",
        hint=NOT_ENROLLED_HINT,
    )


class TokenWrapSealer:
    """The keystore's master key wrapped by the token's AES key: the token's
    :class:`~anyhsm.unlock_blobs.MasterKeySealer`. Its settings are the
    ``[providers.pkcs11]`` ones (module, token, PIN, ``wrap_key_label``)."""

    name = "pkcs11"
    device = "the token"
    blob_file = SIDE_FILE
    level = SecurityLevel.HSM_WRAPPED

    def __init__(self, context: ProviderContext) -> None:
        self.context = context
        self.settings = wrap_settings(context)

    def seal(self, master: SecretBytes) -> bytes:
        return wrap_master_key(self.context, master)

    def unseal(self, blob: bytes) -> SecretBytes:
        return unwrap_master_key(self.context, blob)

    def not_enrolled(self, keystore: Keystore) -> HsmError:
        return not_enrolled(keystore)

    def blob_facts(self, blob: bytes) -> dict[str, object]:
        parsed = WrappedBlob.from_json(blob)
        return {
            "token_serial": parsed.token_serial,
            "token_label": parsed.token_label,
            "wrap_key_label": parsed.key_label,
            "wrap_key_id": parsed.key_id.hex(),
            "mechanism": parsed.mechanism.value,
        }

    def device_health(self) -> tuple[dict[str, object], str]:
        """The token is reached by unwrapping (:func:`anyhsm.unlock_blobs.health`)."""
        return {
            "module": str(self.settings.module),
            "token": self.settings.describe_token(),
            "wrap_key_label": str(self.settings.wrap_key_label),
        }, ""

    def failure_facts(self, error: HsmError) -> dict[str, object]:
        return {}
