"""The PKCS#11 provider: secp256k1 keys generated and used inside an HSM token.

Keys are made in the token as sensitive, never-extractable token objects; the
token signs 32-byte digests with CKM_ECDSA and anyhsm turns the raw ``r||s`` it
returns into low-S strict DER, checking the signature against the public key
before handing it out. The token cannot do BIP340 Schnorr or BIP32 derivation,
and says so through :meth:`Pkcs11Provider.capabilities`.

Module loading, login, the session pool, reconnecting and the translation of
PKCS#11 errors live in the modules next to this one (conn, module, pool, errors);
they, the key object rules (keys) and python-pkcs11 are imported only when the
provider is opened, after the cheap check that the configured module file exists: a
chain that falls back from an absent module pays for almost nothing (benchmarks/
bench_cli.py measures it).
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from anyhsm.crypto import secp256k1
from anyhsm.errors import (
    HsmError,
    HsmKeyError,
    KeyBindingMismatch,
    KeyExists,
    KeyNotFound,
    ProviderError,
    ProviderUnavailable,
    SigningFailed,
    UnsupportedOperation,
)
from anyhsm.provider import ProviderContext, check_sign_request
from anyhsm.providers.pkcs11.settings import Pkcs11Settings
from anyhsm.types import (
    Capabilities,
    Health,
    KeyInfo,
    KeyRef,
    KeySpec,
    KeyType,
    SecurityLevel,
    SignParams,
    SigScheme,
)

if TYPE_CHECKING:
    from types import ModuleType

    from pkcs11 import Attribute, Object, Session, SignMixin

    from anyhsm.providers.pkcs11.conn import Connection
    from anyhsm.providers.pkcs11.keys import Verifier
    from anyhsm.providers.pkcs11.pool import PooledSession

CAPABILITIES = Capabilities(
    key_types=frozenset({KeyType.SECP256K1}),
    schemes=frozenset({SigScheme.ECDSA}),
    can_import=False,
    can_export=False,
    can_derive=False,
    can_tweak=False,
    controls_nonce=False,
    persistent=True,
)

MAX_LABEL_BYTES = 255

log = logging.getLogger("anyhsm.pkcs11")


@dataclass(frozen=True)
class _KeyEntry:
    """What anyhsm remembers about a key pair on the token (public facts only)."""

    id: bytes
    label: str
    public_key: bytes
    created_at: str = field(default="", compare=False)  # from its creation record, or ""
    verifier: Verifier = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        from anyhsm.providers.pkcs11.keys import Verifier

        # Parsed once: every signature is checked against it before it is returned.
        object.__setattr__(self, "verifier", Verifier(self.public_key))


def _is_hex(text: str) -> bool:
    if not text or len(text) % 2:
        return False
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


class Pkcs11Provider:
    """Keys in a PKCS#11 token (HSM): generate, list, sign (ECDSA), delete."""

    name = "pkcs11"

    def __init__(self, context: ProviderContext) -> None:
        self._context = context
        self.settings = Pkcs11Settings.from_context(context)
        self._connection: Connection | None = None  # made by open (see _conn)
        self._keys: dict[str, _KeyEntry] = {}
        # CKA_ID -> public key of every key this provider has resolved for use. Kept
        # across reconnects: a key object replaced under the same id (another
        # application, anyone with the user PIN) is refused, never signed with.
        self._pinned: dict[bytes, bytes] = {}
        self._keys_lock = threading.Lock()
        self._generate_lock = threading.Lock()
        self._p11: ModuleType | None = None

    # --- lifecycle -----------------------------------------------------------------

    @property
    def _conn(self) -> Connection:
        """The connection to the token (the connection modules imported on first use)."""
        if self._connection is None:
            from anyhsm.providers.pkcs11.conn import Connection

            ctx = self._context
            conn = Connection(self.settings, ctx.environment, ctx.timeout_s, self.name)
            conn.on_reset(self._forget_keys)
            self._connection = conn
        return self._connection

    def open(self) -> None:
        self.settings.require_module()  # before importing anything: fallback must be fast
        from anyhsm.providers.pkcs11.conn import import_pkcs11

        self._conn.open()
        self._p11 = import_pkcs11(self.name)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()

    def health(self) -> Health:
        started = time.perf_counter()
        if not self._conn.is_open:
            return Health(
                provider=self.name,
                ok=False,
                status="closed",
                reason="the pkcs11 provider is not open",
                security_level=self.security_level(),
                elapsed_ms=(time.perf_counter() - started) * 1000,
                details=self._conn.details(),
            )
        try:
            self._conn.probe()
        except HsmError as exc:
            return Health(
                provider=self.name,
                ok=False,
                status=exc.code,
                reason=str(exc),
                security_level=self.security_level(),
                elapsed_ms=(time.perf_counter() - started) * 1000,
                details=self._conn.details(),
            )
        return Health(
            provider=self.name,
            ok=True,
            status="ok",
            security_level=self.security_level(),
            elapsed_ms=(time.perf_counter() - started) * 1000,
            details=self._conn.details(),
        )

    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    def security_level(self) -> SecurityLevel:
        return SecurityLevel.HSM

    def production_ready(self) -> bool:
        return True

    def store_id(self) -> str:
        facts = self._conn.facts
        if facts is not None:
            return f"pkcs11:{facts.serial}"
        if self.settings.token_serial is not None:
            return f"pkcs11:{self.settings.token_serial}"
        raise ProviderUnavailable(
            "the pkcs11 store id is the token serial, known once the provider is open",
            hint="open the provider first, or configure token_serial",
        )

    # --- helpers ------------------------------------------------------------------------

    def _pkcs11(self) -> ModuleType:
        if self._p11 is None:
            raise ProviderUnavailable("the pkcs11 provider is not open", hint="open it first")
        return self._p11

    def _forget_keys(self) -> None:
        with self._keys_lock:
            self._keys.clear()

    def _remember(self, entry: _KeyEntry, *refs: str) -> None:
        with self._keys_lock:
            pinned = self._pinned.setdefault(entry.id, entry.public_key)
            if not hmac.compare_digest(pinned, entry.public_key):
                raise KeyBindingMismatch(
                    f"the key object with id {entry.id.hex()} (label {entry.label!r}) on "
                    f"PKCS#11 token {self.store_id()} now has public key "
                    f"{entry.public_key.hex()}, not {pinned.hex()} as when it was first used: "
                    "it was replaced; nothing was signed",
                    hint="investigate who can log in to the token; the original key is gone",
                )
            self._keys[entry.id.hex()] = entry
            self._keys[entry.label] = entry
            for ref in refs:
                self._keys[ref] = entry

    def _forget(self, entry: _KeyEntry) -> None:
        with self._keys_lock:
            for ref in [r for r, e in self._keys.items() if e.id == entry.id]:
                del self._keys[ref]

    def _info(self, entry: _KeyEntry) -> KeyInfo:
        return KeyInfo(
            id=entry.id.hex(),
            label=entry.label,
            provider=self.name,
            public_key=entry.public_key,
            key_type=KeyType.SECP256K1,
            store=self.store_id(),
            exportable=False,
            created_at=entry.created_at,
        )

    def _search(self, session: Session, cls: object, **attrs: object) -> list[Object]:
        p11 = self._pkcs11()
        template: dict[Attribute, Any] = {
            p11.Attribute.CLASS: cls,
            p11.Attribute.KEY_TYPE: p11.KeyType.EC,
        }
        for name, value in attrs.items():
            template[getattr(p11.Attribute, name.upper())] = value
        return list(session.get_objects(template))

    def _created_records(self, session: Session, key_id: bytes | None = None) -> list[Object]:
        """anyhsm's creation records (keys.py): all of them, or the one of ``key_id``."""
        from anyhsm.providers.pkcs11 import keys as k

        p11 = self._pkcs11()
        attr = p11.Attribute
        template: dict[Attribute, Any] = {
            attr.CLASS: p11.ObjectClass.DATA,
            attr.APPLICATION: k.CREATED_APPLICATION,
        }
        if key_id is not None:
            template[attr.LABEL] = k.created_label(key_id)
        return list(session.get_objects(template))

    def _created_times(self, session: Session, key_id: bytes | None = None) -> dict[bytes, str]:
        """CKA_ID -> creation time, from the records (one lookup for all keys when listing)."""
        from anyhsm.providers.pkcs11 import keys as k

        attr = self._pkcs11().Attribute
        out: dict[bytes, str] = {}
        for obj in self._created_records(session, key_id):
            named = k.key_id_of_created_label(str(obj[attr.LABEL]))
            when = k.decode_created(obj[attr.VALUE])
            if named is not None and when and (key_id is None or named == key_id):
                if named in out:  # two records for one key: believe neither
                    out[named] = ""
                else:
                    out[named] = when
        return out

    def _record_creation(self, session: Session, key_id: bytes) -> str:
        """Write the key's creation record; the time, or "" when the token refuses (the
        key stands without it)."""
        from anyhsm.providers.pkcs11 import keys as k

        p11 = self._pkcs11()
        when = dt.datetime.now(dt.UTC).replace(microsecond=0)
        template = k.created_template(p11.Attribute, p11.ObjectClass.DATA, key_id, when)
        try:
            session.create_object(template)
        except p11.PKCS11Error as e:
            log.warning(
                "the token did not store the creation time of key %s (%s); "
                "the key is made, its created_at stays empty",
                key_id.hex(),
                type(e).__name__,
            )
            return ""
        return when.isoformat(timespec="seconds")

    def _entry_from_private(
        self, session: Session, priv: Object, created: Mapping[bytes, str] | None = None
    ) -> _KeyEntry | None:
        """The key pair of a private key object; None for other curves or pairs without
        an id or a public half (anyhsm does not list what it cannot use). ``created``:
        the creation times read already (else this key's is looked up)."""
        from anyhsm.providers.pkcs11 import keys as k

        p11 = self._pkcs11()
        attr = p11.Attribute
        if bytes(priv[attr.EC_PARAMS]) != k.SECP256K1_OID_DER:
            return None
        key_id = bytes(priv[attr.ID])
        if not key_id:
            return None
        pubs = self._search(session, p11.ObjectClass.PUBLIC_KEY, id=key_id)
        if len(pubs) != 1:
            return None
        point = k.decode_ec_point(bytes(pubs[0][attr.EC_POINT]))
        if created is None:
            created = self._created_times(session, key_id)
        return _KeyEntry(
            id=key_id,
            label=str(priv[attr.LABEL]),
            public_key=point,
            created_at=created.get(key_id, ""),
        )

    def _lookup(self, ps: PooledSession, ref: KeyRef) -> _KeyEntry:
        p11 = self._pkcs11()
        session = ps.session
        privs: list[Object] = []
        by_id = bytes.fromhex(ref) if _is_hex(ref) else None
        if by_id is not None:
            privs = self._search(session, p11.ObjectClass.PRIVATE_KEY, id=by_id)
        # An id this provider has used is never re-resolved by label: an object
        # labelled with that id's hex must not stand in for the key once it is gone.
        if not privs and (by_id is None or by_id not in self._pinned):
            privs = self._search(session, p11.ObjectClass.PRIVATE_KEY, label=ref)
        if not privs:
            self._conn.verify_presence(ps)
            raise KeyNotFound(
                f"no key {ref!r} on PKCS#11 token {self.store_id()}",
                hint="refer to a key by its id or label (see: anyhsm keys list)",
            )
        entries = [e for e in (self._entry_from_private(session, p) for p in privs) if e]
        if not entries:
            raise UnsupportedOperation(
                self.name,
                f"the key {ref!r}: it is not a secp256k1 key pair with an id and a public half",
            )
        if len({e.id for e in entries}) > 1:
            raise HsmKeyError(
                f"{len(entries)} keys on the token carry the label {ref!r}",
                hint="refer to the key by its id",
            )
        entry = entries[0]
        if len(privs) == 1:
            ps.objects[entry.id] = privs[0]
        return entry

    def _entry(self, ref: KeyRef) -> _KeyEntry:
        if not isinstance(ref, str) or not ref:
            raise KeyNotFound("a key reference must be a non-empty id or label")
        entry = self._keys.get(ref)
        if entry is not None:
            return entry
        entry = self._conn.run(lambda ps: self._lookup(ps, ref), "key lookup")
        self._remember(entry, ref)
        return entry

    def _private(self, ps: PooledSession, entry: _KeyEntry) -> SignMixin:
        obj = ps.objects.get(entry.id)
        if obj is None:
            p11 = self._pkcs11()
            try:
                obj = ps.session.get_key(
                    object_class=p11.ObjectClass.PRIVATE_KEY, key_type=p11.KeyType.EC, id=entry.id
                )
            except p11.NoSuchKey:
                self._conn.verify_presence(ps)
                raise
            ps.objects[entry.id] = obj
        return obj  # type: ignore[return-value]

    # --- keys ----------------------------------------------------------------------------

    def generate_key(self, spec: KeySpec) -> KeyInfo:
        from anyhsm.providers.pkcs11 import keys as k

        if spec.key_type is not KeyType.SECP256K1:
            raise UnsupportedOperation(
                self.name,
                f"{spec.key_type.value} keys",
                hint="this provider generates secp256k1 keys only",
            )
        if spec.exportable:
            raise UnsupportedOperation(
                self.name, "exportable keys", hint="keys in a PKCS#11 token never leave it"
            )
        label = spec.label
        if not label or len(label.encode("utf-8")) > MAX_LABEL_BYTES:
            raise HsmKeyError(f"a key label must be 1 to {MAX_LABEL_BYTES} bytes of UTF-8")
        p11 = self._pkcs11()
        attr = p11.Attribute

        def op(ps: PooledSession) -> _KeyEntry:
            session = ps.session
            for cls in (p11.ObjectClass.PRIVATE_KEY, p11.ObjectClass.PUBLIC_KEY):
                if list(session.get_objects({attr.CLASS: cls, attr.LABEL: label})):
                    raise KeyExists(
                        f"a key labelled {label!r} already exists on token {self.store_id()}",
                        hint="choose another label, or delete the old key first",
                    )
            key_id = os.urandom(k.KEY_ID_BYTES)
            pub, priv = session.generate_keypair(
                p11.KeyType.EC,
                id=key_id,
                label=label,
                store=True,
                capabilities=p11.MechanismFlag.SIGN | p11.MechanismFlag.VERIFY,
                mechanism=p11.Mechanism.EC_KEY_PAIR_GEN,
                public_template=k.public_template(attr),
                private_template=k.private_template(attr),
            )
            try:
                if not priv[attr.SENSITIVE] or priv[attr.EXTRACTABLE]:
                    raise ProviderError(
                        "the token made the private key extractable or not sensitive; "
                        "it was deleted",
                        hint="this token does not honour CKA_SENSITIVE / CKA_EXTRACTABLE",
                    )
                point = k.decode_ec_point(bytes(pub[attr.EC_POINT]))
            except BaseException:
                for obj in (priv, pub):
                    obj.destroy()
                raise
            ps.objects[key_id] = priv
            created_at = self._record_creation(session, key_id)
            return _KeyEntry(id=key_id, label=label, public_key=point, created_at=created_at)

        with self._generate_lock:
            entry = self._conn.run(op, "key generation", retry=False)
        self._remember(entry)
        return self._info(entry)

    def list_keys(self) -> list[KeyInfo]:
        p11 = self._pkcs11()

        def op(ps: PooledSession) -> list[_KeyEntry]:
            privs = self._search(ps.session, p11.ObjectClass.PRIVATE_KEY)
            created = self._created_times(ps.session)
            out = [self._entry_from_private(ps.session, p, created) for p in privs]
            self._conn.verify_presence(ps)  # an absent token also "has no keys"
            return [e for e in out if e is not None]

        entries = self._conn.run(op, "key listing")
        for entry in entries:
            try:
                self._remember(entry)
            except KeyBindingMismatch:
                continue  # listed as the token has it; never used (see _remember)
        return [self._info(e) for e in sorted(entries, key=lambda e: (e.label, e.id))]

    def get_key(self, key: KeyRef) -> KeyInfo:
        return self._info(self._entry(key))

    def public_key(self, key: KeyRef) -> bytes:
        return self._entry(key).public_key

    def delete_key(self, key: KeyRef) -> None:
        p11 = self._pkcs11()
        entry = self._entry(key)

        def op(ps: PooledSession) -> int:
            found = 0
            for cls in (p11.ObjectClass.PRIVATE_KEY, p11.ObjectClass.PUBLIC_KEY):
                for obj in self._search(ps.session, cls, id=entry.id):
                    obj.destroy()
                    found += 1
            if not found:
                self._conn.verify_presence(ps)
            for record in self._created_records(ps.session, entry.id):
                record.destroy()  # after the key: a left-over record names no key
            return found

        try:
            found = self._conn.run(op, "key deletion")
        finally:
            self._forget(entry)
            self._forget_keys()  # other sessions' cached handles to it are stale too
        if found:
            with self._keys_lock:
                self._pinned.pop(entry.id, None)
        if not found:
            raise KeyNotFound(f"no key {key!r} on PKCS#11 token {self.store_id()}")

    # --- signing --------------------------------------------------------------------------

    def sign_digest(
        self, key: KeyRef, digest: bytes, scheme: SigScheme, params: SignParams | None = None
    ) -> bytes:
        check_sign_request(self, digest, scheme, params)
        p11 = self._pkcs11()
        mechanism = p11.Mechanism.ECDSA
        data = bytes(digest)
        entry = self._entry(key)

        def op(ps: PooledSession) -> bytes:
            raw = bytes(self._private(ps, entry).sign(data, mechanism=mechanism))
            return self._checked(entry, data, raw)

        try:
            return self._conn.run(op, "signing")
        except KeyNotFound:
            # The cached key may have been deleted and re-made (same label) elsewhere.
            self._forget(entry)
            entry = self._entry(key)
            return self._conn.run(op, "signing")
        except SigningFailed:
            self._check_not_replaced(entry)
            raise

    def _check_not_replaced(self, entry: _KeyEntry) -> None:
        """After a signature that does not verify: if the token's key pair under this
        id now has another public key, say so (KeyBindingMismatch) rather than blame
        the token; the old entry is dropped either way."""
        self._forget(entry)
        try:
            fresh = self._conn.run(lambda ps: self._lookup(ps, entry.id.hex()), "key lookup")
        except HsmError:
            return
        if fresh.id == entry.id:
            self._remember(fresh)  # raises KeyBindingMismatch when the public key changed

    @staticmethod
    def _checked(entry: _KeyEntry, digest: bytes, raw: bytes) -> bytes:
        """Low-S strict DER of the token's r||s, verified against the key's public key.

        PKCS#11 says CKM_ECDSA returns r||s; a module that returns DER instead (some
        vendor modules pass the device's encoding through) is accepted if it is strict DER.
        """
        try:
            if len(raw) != 64 and raw[:1] == b"\x30":
                der = secp256k1.normalize_der(raw)
            else:
                der = secp256k1.der_from_raw(raw)
        except secp256k1.CurveError:
            raise SigningFailed(
                f"the token returned an unusable ECDSA signature ({len(raw)} bytes)",
                hint="CKM_ECDSA must return r||s (64 bytes for secp256k1)",
            ) from None
        if not entry.verifier.verify(der, digest):
            raise SigningFailed(
                "the token's signature does not verify against the key's public key",
                hint="the token may be faulty; do not use this signature",
            )
        return der
