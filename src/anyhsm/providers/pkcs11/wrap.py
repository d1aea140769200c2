"""Wrap mode: an AES key inside a PKCS#11 token protects the software keystore's master key.

The token keeps a 256-bit AES key (label ``wrap_key_label`` in ``[providers.pkcs11]``),
generated inside it as a sensitive, never-extractable token object. The keystore's
master key is encrypted under it and the result is stored beside the keystore
(``pkcs11-wrapped.json``), so the keystore opens without a passphrase only where the
token is present and logged in. The passphrase-wrapped copy in the keystore header
is untouched: the recovery passphrase still opens the same keys when the token is gone.

Mechanism, chosen per token and recorded in the blob:

- ``CKM_AES_GCM`` when the token offers it (SoftHSM2 does): an AEAD, one call each
  way, no key object is created, and the blob's header (format, version, token
  serial, key label and id) is bound as additional authenticated data, so a header
  edited to point at another key fails instead of being tried.
- otherwise ``CKM_AES_KEY_WRAP_PAD`` (RFC 5649) through C_WrapKey/C_UnwrapKey: an
  authenticated key wrap built into most HSMs, so no separate HMAC key is needed
  (plain CBC_PAD would need one, and a second key to manage). The master key passes
  through a short-lived session object that is destroyed right after.

Every wrap is unwrapped again and compared before the blob is returned (a module
that, for example, writes its own GCM IV somewhere else cannot produce a blob that
later fails). Limits: python-pkcs11 takes and returns ``bytes``, so short-lived
immutable copies of the master key exist in this process while wrapping and
unwrapping; whoever can log in to the token with the user PIN can unwrap it.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hmac
import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from anyhsm.errors import (
    ConfigError,
    HsmError,
    KeyNotFound,
    KeystoreCorrupted,
    KeystoreError,
    KeystoreTampered,
    ProviderError,
    ProviderUnavailable,
    UnsupportedFormatVersion,
    UnsupportedOperation,
)
from anyhsm.provider import ProviderContext
from anyhsm.providers.pkcs11.conn import Connection
from anyhsm.providers.pkcs11.errors import ckr_name
from anyhsm.providers.pkcs11.settings import Pkcs11Settings
from anyhsm.providers.software import SoftwareProvider, unlock_path_health
from anyhsm.secret import SecretBytes
from anyhsm.types import Health, SecurityLevel

if TYPE_CHECKING:
    from types import ModuleType

    from pkcs11 import Attribute, DecryptMixin, EncryptMixin, SecretKey, UnwrapMixin, WrapMixin

    from anyhsm.keystore import Keystore
    from anyhsm.providers.pkcs11.pool import PooledSession

__all__ = [
    "SIDE_FILE",
    "Pkcs11WrappedProvider",
    "WrapMechanism",
    "WrappedBlob",
    "enroll",
    "read_blob",
    "unenroll",
    "unwrap_master_key",
    "wrap_master_key",
]

PROVIDER_NAME = "pkcs11-wrapped"
SIDE_FILE = "pkcs11-wrapped.json"
BLOB_FORMAT = "anyhsm-pkcs11-wrapped-master-key"
BLOB_VERSION = 1
MASTER_KEY_BYTES = 32
AES_KEY_BYTES = 32
GCM_IV_BYTES = 12
GCM_TAG_BITS = 128
KEY_ID_BYTES = 16
NOT_ENROLLED_HINT = (
    "run the pkcs11 enrolment (it needs the passphrase once), or open the keystore with "
    "the recovery passphrase"
)


class WrapMechanism(enum.Enum):
    """How the master key is encrypted under the token's AES key."""

    AES_GCM = "CKM_AES_GCM"
    AES_KEY_WRAP_PAD = "CKM_AES_KEY_WRAP_PAD"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeystoreCorrupted(f"{SIDE_FILE}: {what} is missing or not a string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except ValueError:
        raise KeystoreCorrupted(f"{SIDE_FILE}: {what} is not base64") from None


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise KeystoreCorrupted(f"{SIDE_FILE}: {what} is missing or not a string")
    return value


@dataclass(frozen=True)
class WrappedBlob:
    """The side file's content: where the wrap key lives, how, and the ciphertext."""

    token_serial: str
    token_label: str
    key_label: str
    key_id: bytes
    mechanism: WrapMechanism
    iv: bytes
    ciphertext: bytes
    wrapped_at: str = ""

    def aad(self) -> bytes:
        """The header bound into the GCM tag (canonical JSON)."""
        header = {
            "format": BLOB_FORMAT,
            "version": BLOB_VERSION,
            "token_serial": self.token_serial,
            "key_label": self.key_label,
            "key_id": self.key_id.hex(),
            "mechanism": self.mechanism.value,
        }
        return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def to_json(self) -> bytes:
        body = {
            "format": BLOB_FORMAT,
            "version": BLOB_VERSION,
            "token_serial": self.token_serial,
            "token_label": self.token_label,
            "key_label": self.key_label,
            "key_id": self.key_id.hex(),
            "mechanism": self.mechanism.value,
            "iv": _b64(self.iv),
            "ciphertext": _b64(self.ciphertext),
            "wrapped_at": self.wrapped_at,
        }
        return json.dumps(body, sort_keys=True, indent=2).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> WrappedBlob:
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise KeystoreCorrupted(f"{SIDE_FILE} is not JSON") from None
        if not isinstance(body, dict) or body.get("format") != BLOB_FORMAT:
            raise KeystoreCorrupted(f"{SIDE_FILE} is not an anyhsm PKCS#11-wrapped master key")
        version = body.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise KeystoreCorrupted(f"{SIDE_FILE}: version is missing")
        if version != BLOB_VERSION:
            raise UnsupportedFormatVersion(
                f"{SIDE_FILE} has format version {version}; this anyhsm reads {BLOB_VERSION}",
                hint="upgrade anyhsm, or open the keystore with the recovery passphrase",
            )
        try:
            mechanism = WrapMechanism(body.get("mechanism"))
        except ValueError:
            raise KeystoreCorrupted(f"{SIDE_FILE}: unknown mechanism") from None
        try:
            key_id = bytes.fromhex(_text(body.get("key_id"), "key_id"))
        except ValueError:
            raise KeystoreCorrupted(f"{SIDE_FILE}: key_id is not hex") from None
        return cls(
            token_serial=_text(body.get("token_serial"), "token_serial"),
            token_label=_text(body.get("token_label"), "token_label"),
            key_label=_text(body.get("key_label"), "key_label"),
            key_id=key_id,
            mechanism=mechanism,
            iv=_unb64(body.get("iv"), "iv"),
            ciphertext=_unb64(body.get("ciphertext"), "ciphertext"),
            wrapped_at=str(body.get("wrapped_at", "")),
        )


# --- talking to the token -----------------------------------------------------------------


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
    conn = Connection(wrap_settings(context), context.environment, context.timeout_s, PROVIDER_NAME)
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
            f"({ckr_name(exc)})",
            hint="the side file was altered or wrapped by another key; open the keystore with "
            "the recovery passphrase and enrol again",
        ) from None


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


# --- enrolment and the provider ---------------------------------------------------------------


def enroll(keystore: Keystore, context: ProviderContext) -> dict[str, object]:
    """Wrap the (unlocked) keystore's master key with the token and store the blob.

    The passphrase-wrapped copy in the keystore header is never touched. Returns a
    summary without secrets.
    """
    with keystore.master_key() as master:
        blob = wrap_master_key(context, master)
    replaced = keystore.read_side_file(SIDE_FILE) is not None
    keystore.write_side_file(SIDE_FILE, blob)
    if keystore.read_side_file(SIDE_FILE) != blob:
        raise KeystoreError(f"{SIDE_FILE} did not read back as written", hint="check the disk")
    parsed = WrappedBlob.from_json(blob)
    return {
        "enrolled": True,
        "file": str(keystore.side_file_path(SIDE_FILE)),
        "token_serial": parsed.token_serial,
        "token_label": parsed.token_label,
        "wrap_key_label": parsed.key_label,
        "wrap_key_id": parsed.key_id.hex(),
        "mechanism": parsed.mechanism.value,
        "replaced": replaced,
    }


def unenroll(keystore: Keystore) -> bool:
    """Remove the wrapped blob; True if there was one. The passphrase path is unaffected."""
    return bool(keystore.remove_side_file(SIDE_FILE))


def read_blob(keystore: Keystore) -> bytes:
    raw = keystore.read_side_file(SIDE_FILE)
    if raw is None:
        raise ProviderUnavailable(
            f"the keystore is not enrolled with a PKCS#11 token (no {SIDE_FILE} in "
            f"{keystore.path})",
            hint=NOT_ENROLLED_HINT,
        )
    return raw


class Pkcs11WrappedProvider(SoftwareProvider):
    """The software keystore, opened by a master key that a PKCS#11 token unwraps.

    Its settings are the ``[providers.pkcs11]`` ones (module, token, PIN, and
    ``wrap_key_label``): the factory passes them in ``context.settings``.
    """

    name = PROVIDER_NAME

    def __init__(self, context: ProviderContext) -> None:
        super().__init__(context)
        self._wrap_context = context
        self.wrap_settings = wrap_settings(context)

    def _unlock(self, keystore: Keystore) -> None:
        """Unwrap the master key in the token; never uses a passphrase."""
        with unwrap_master_key(self._wrap_context, read_blob(keystore)) as master:
            keystore.unlock_with_master_key(master, via="pkcs11")

    def security_level(self) -> SecurityLevel:
        return SecurityLevel.HSM_WRAPPED

    def production_ready(self) -> bool:
        return True

    def health(self) -> Health:
        """The keystore's health plus: the token still unwraps this keystore's master key."""
        t0 = time.perf_counter()
        base = super().health()
        details = dict(base.details)
        details["module"] = str(self.wrap_settings.module)
        details["token"] = self.wrap_settings.describe_token()
        details["wrap_key_label"] = str(self.wrap_settings.wrap_key_label)
        problem = ""
        raw = self.keystore.read_side_file(SIDE_FILE)
        details["wrapped_blob"] = "present" if raw is not None else "absent"
        if raw is None:
            problem = "the wrapped master key is gone (unenrolled)"
        else:
            try:
                parsed = WrappedBlob.from_json(raw)
                details["token_serial"] = parsed.token_serial
                details["mechanism"] = parsed.mechanism.value
                with (
                    unwrap_master_key(self._wrap_context, raw) as master,
                    self.keystore.master_key() as mk,
                ):
                    matches = master.equals(mk)
                details["unwrappable"] = "yes" if matches else "no (another master key)"
                if not matches:
                    problem = "the wrapped master key no longer matches this keystore"
            except HsmError as exc:
                details["unwrappable"] = "no"
                problem = f"the token does not unwrap the master key: {exc.message}"
        return unlock_path_health(self.name, self.security_level(), base, t0, details, problem)
