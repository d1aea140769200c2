"""The encrypted file keystore behind the software provider.

Envelope encryption. A random 32-byte master key encrypts every record; it is
itself stored wrapped by a key derived from the operator's passphrase
(Argon2id or scrypt), and may additionally be sealed to a TPM or wrapped by an
HSM token (side files), so the passphrase stays a recovery path.

Layout of a keystore directory (0700)::

    keystore.json      header: format, version, store id, KDF params, wrapped master key,
                       MAC, checksum
    keys/<id>.json     one record per key: metadata + AES-256-GCM ciphertext whose associated
                       data binds the store id, key id and all metadata (so editing or swapping
                       records is detected); "reference" records name keys kept in other stores
    .lock              flock target serialising writers across processes
    <side files>       e.g. tpm-sealed.json, pkcs11-wrapped.json, audit-checkpoint.json

Each file is replaced atomically and durably (see fsutil), so a crash never
loses an acknowledged key, and several processes may share a store.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from anyhsm.errors import (
    AuthenticationFailed,
    HsmError,
    KeyExists,
    KeyNotFound,
    KeystoreCorrupted,
    KeystoreError,
    KeystoreExists,
    KeystoreNotFound,
    KeystoreTampered,
    UnsupportedFormatVersion,
    WrongPassphrase,
)
from anyhsm.fsutil import (
    atomic_write,
    clean_temp_files,
    file_lock,
    make_private_dir,
    remove_durably,
)
from anyhsm.keystore import aead
from anyhsm.keystore.kdf import KdfParams, derive_kek
from anyhsm.secret import SecretBytes
from anyhsm.types import KeyType

FORMAT = "anyhsm-keystore"
VERSION = 1
HEADER_FILE = "keystore.json"
KEYS_DIR = "keys"
LOCK_FILE = ".lock"
T = TypeVar("T")
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_SIDE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, what: str) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except ValueError:
        raise KeystoreCorrupted(f"{what} is not valid base64") from None


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class KeyRecord:
    """One key's stored record. ``kind`` is "sealed" (secret here) or
    "reference" (the key lives in another store, e.g. a PKCS#11 token)."""

    id: str
    label: str
    key_type: KeyType
    public_key: bytes
    created_at: str
    exportable: bool = False
    chain_code: bytes | None = None
    kind: str = "sealed"
    provider: str = ""  # for references: the provider that holds the key
    store: str = ""  # for references: that provider's store id
    nonce: bytes = b""
    sealed: bytes = b""
    mac: bytes = b""

    def metadata(self, store_id: str) -> dict[str, object]:
        return {
            "store_id": store_id,
            "version": VERSION,
            "kind": self.kind,
            "id": self.id,
            "label": self.label,
            "key_type": self.key_type.value,
            "public_key": self.public_key.hex(),
            "chain_code": self.chain_code.hex() if self.chain_code is not None else None,
            "exportable": self.exportable,
            "created_at": self.created_at,
            "provider": self.provider,
            "store": self.store,
        }

    def to_json(self) -> bytes:
        body: dict[str, object] = {k: v for k, v in self.metadata("").items() if k != "store_id"}
        if self.kind == "sealed":
            body["nonce"] = _b64(self.nonce)
            body["ciphertext"] = _b64(self.sealed)
        else:
            body["mac"] = self.mac.hex()
        return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> KeyRecord:
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise KeystoreCorrupted(f"{where} is not valid JSON (truncated or damaged)") from None
        if not isinstance(d, dict):
            raise KeystoreCorrupted(f"{where} is not a JSON object")
        version = d.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise UnsupportedFormatVersion(
                f"{where} has record format {version!r}; this anyhsm reads up to {VERSION}",
                hint="upgrade anyhsm; nothing was changed",
            )
        try:
            kind = str(d["kind"])
            cc = d.get("chain_code")
            return cls(
                id=str(d["id"]),
                label=str(d["label"]),
                key_type=KeyType(d["key_type"]),
                public_key=bytes.fromhex(str(d["public_key"])),
                created_at=str(d["created_at"]),
                exportable=bool(d["exportable"]),
                chain_code=bytes.fromhex(str(cc)) if cc is not None else None,
                kind=kind,
                provider=str(d.get("provider", "")),
                store=str(d.get("store", "")),
                nonce=_unb64(d["nonce"], where) if kind == "sealed" else b"",
                sealed=_unb64(d["ciphertext"], where) if kind == "sealed" else b"",
                mac=bytes.fromhex(str(d["mac"])) if kind == "reference" else b"",
            )
        except (KeyError, ValueError, TypeError, OverflowError) as e:
            raise KeystoreCorrupted(f"{where} is missing or has a bad field ({e})") from None


class Keystore:
    """A keystore directory. Load it locked, unlock it, then read and write keys."""

    def __init__(self, path: Path, header: dict[str, object]) -> None:
        self.path = path
        self._header = header
        self.store_id = str(header["store_id"])
        self.kdf = KdfParams.from_dict(header["kdf"])
        self._master: SecretBytes | None = None
        self._record_key: aead.AeadKey | None = None
        self._mac_key: SecretBytes | None = None
        self._records: dict[str, KeyRecord] = {}
        self._aads: dict[str, bytes] = {}
        self._scratch = threading.local()
        self._keys_str = str(path / KEYS_DIR)
        self._mtimes: dict[str, int] = {}
        self.problems: dict[str, HsmError] = {}
        self.unlocked_by = ""

    # --- creation and loading --------------------------------------------------------

    @staticmethod
    def exists(path: Path) -> bool:
        return (path / HEADER_FILE).is_file()

    @classmethod
    def create(
        cls, path: Path, passphrase: SecretBytes, *, kdf: KdfParams | None = None
    ) -> Keystore:
        """Create a new, unlocked keystore. Refuses to overwrite an existing one."""
        make_private_dir(path)
        make_private_dir(path / KEYS_DIR)
        with file_lock(path / LOCK_FILE):
            if cls.exists(path):
                raise KeystoreExists(
                    f"a keystore already exists at {path}",
                    hint="choose another directory or delete the old store deliberately",
                )
            params = (kdf or KdfParams()).with_salt()
            master = SecretBytes(os.urandom(32))
            header: dict[str, object] = {
                "format": FORMAT,
                "version": VERSION,
                "store_id": secrets.token_hex(16),
                "created_at": now_iso(),
                "kdf": params.to_dict(),
            }
            store = cls(path, header)
            store._install_master(master, "passphrase")
            store._header = store._wrap_header(header, master, passphrase, params)
            atomic_write(path / HEADER_FILE, store._header_bytes())
        return store

    @classmethod
    def load(cls, path: Path) -> Keystore:
        """Read and check the header; the store stays locked."""
        hp = path / HEADER_FILE
        try:
            raw = hp.read_bytes()
        except FileNotFoundError:
            raise KeystoreNotFound(
                f"no keystore at {path}", hint="create one with 'anyhsm init --dir DIR'"
            ) from None
        except OSError as e:
            raise KeystoreError(f"cannot read {hp}: {e.strerror}") from None
        try:
            header = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise KeystoreCorrupted(
                f"{hp} is not valid JSON (truncated or damaged)",
                hint="restore the keystore directory from backup",
            ) from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise KeystoreCorrupted(f"{hp} is not an anyhsm keystore header")
        version = header.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise UnsupportedFormatVersion(
                f"{hp} was written by keystore format {version!r}; "
                f"this anyhsm reads up to {VERSION}",
                hint="upgrade anyhsm; nothing was changed",
            )
        body = {k: v for k, v in header.items() if k != "checksum"}
        if not hmac.compare_digest(
            str(header.get("checksum", "")).encode("utf-8", "replace"),
            hashlib.sha256(canonical(body)).hexdigest().encode(),
        ):
            raise KeystoreCorrupted(
                f"{hp} fails its checksum (damaged or edited)",
                hint="restore the keystore directory from backup",
            )
        for field in ("store_id", "kdf", "wrapped_master", "mac"):
            if field not in header:
                raise KeystoreCorrupted(f"{hp} lacks the field {field!r}")
        return cls(path, header)

    # --- unlocking ---------------------------------------------------------------------

    @property
    def unlocked(self) -> bool:
        return self._master is not None

    def _wrap_aad(self) -> bytes:
        h = self._header
        return canonical(
            {
                "format": FORMAT,
                "version": h["version"],
                "store_id": h["store_id"],
                "kdf": h["kdf"],
            }
        )

    def _wrap_header(
        self,
        header: dict[str, object],
        master: SecretBytes,
        passphrase: SecretBytes,
        params: KdfParams,
    ) -> dict[str, object]:
        header = dict(header)
        header["kdf"] = params.to_dict()
        self._header = header
        with derive_kek(passphrase, params) as kek:
            nonce, ct = aead.seal_once(kek, master.buffer, self._wrap_aad())
        header["wrapped_master"] = {"nonce": _b64(nonce), "ciphertext": _b64(ct)}
        header.pop("mac", None)
        header.pop("checksum", None)
        with aead.subkey(master, "anyhsm/v1/header-mac") as mk:
            header["mac"] = hmac.digest(mk.buffer, canonical(header), "sha256").hex()
        header["checksum"] = hashlib.sha256(canonical(header)).hexdigest()
        return header

    def _header_bytes(self) -> bytes:
        return json.dumps(self._header, indent=1, sort_keys=True).encode() + b"\n"

    def _check_header_mac(self, master: SecretBytes) -> bool:
        body = {k: v for k, v in self._header.items() if k not in ("mac", "checksum")}
        with aead.subkey(master, "anyhsm/v1/header-mac") as mk:
            want = hmac.digest(mk.buffer, canonical(body), "sha256").hex()
        return hmac.compare_digest(
            want.encode(), str(self._header["mac"]).encode("utf-8", "replace")
        )

    def unlock_with_passphrase(self, passphrase: SecretBytes) -> None:
        """Derive the KEK and unwrap the master key. Wrong passphrase: WrongPassphrase."""
        wrapped = self._header["wrapped_master"]
        if not isinstance(wrapped, dict):
            raise KeystoreCorrupted("keystore header: wrapped_master is not an object")
        nonce = _unb64(wrapped.get("nonce"), "wrapped master key nonce")
        ct = _unb64(wrapped.get("ciphertext"), "wrapped master key")
        with derive_kek(passphrase, self.kdf) as kek:
            try:
                master = aead.open_once(kek, nonce, ct, self._wrap_aad())
            except aead.OpenFailed:
                raise WrongPassphrase(
                    f"the passphrase does not open the keystore at {self.path}",
                    hint="check ANYHSM_PASSPHRASE or the passphrase file; nothing was changed",
                ) from None
        if not self._check_header_mac(master):
            master.wipe()
            raise KeystoreTampered(
                f"{self.path / HEADER_FILE} fails authentication (edited)",
                hint="restore the keystore directory from backup",
            )
        self._install_master(master, "passphrase")

    def unlock_with_master_key(self, master_key: SecretBytes, *, via: str = "master-key") -> None:
        """Unlock with a master key unsealed elsewhere (TPM, HSM token)."""
        if len(master_key) != 32 or not self._check_header_mac(master_key):
            raise AuthenticationFailed(
                f"the unsealed master key does not open the keystore at {self.path}",
                hint="re-enroll, or open the keystore with the recovery passphrase",
            )
        self._install_master(SecretBytes(master_key.buffer), via)

    def _install_master(self, master: SecretBytes, via: str) -> None:
        self._master = master
        with aead.subkey(master, "anyhsm/v1/record") as rk:
            self._record_key = aead.AeadKey(rk)
        self._mac_key = aead.subkey(master, "anyhsm/v1/reference-mac")
        self.unlocked_by = via
        self._records.clear()
        self._aads.clear()
        self._mtimes.clear()
        self.problems.clear()

    def master_key(self) -> SecretBytes:
        """A copy of the master key (to seal it to a TPM or token); the caller wipes it."""
        return SecretBytes(self._require_master().buffer)

    def subkey(self, purpose: str) -> SecretBytes:
        """A purpose-bound key derived from the master key (e.g. the audit HMAC key)."""
        return aead.subkey(self._require_master(), purpose)

    def _require_master(self) -> SecretBytes:
        if self._master is None:
            raise KeystoreError("the keystore is locked", hint="unlock it first")
        return self._master

    def change_passphrase(self, new_passphrase: SecretBytes, kdf: KdfParams | None = None) -> None:
        """Re-wrap the master key under a new passphrase and/or stronger KDF params.

        Keys are untouched (they are sealed under the master key), so this is
        fast and cannot lose a key; the header is replaced atomically.
        """
        master = self._require_master()
        params = (kdf or self.kdf).with_salt()
        with file_lock(self.path / LOCK_FILE):
            header = {
                k: v
                for k, v in self._header.items()
                if k not in ("wrapped_master", "mac", "checksum")
            }
            self._header = self._wrap_header(header, master, new_passphrase, params)
            self.kdf = params
            atomic_write(self.path / HEADER_FILE, self._header_bytes())

    def close(self) -> None:
        for s in (self._master, self._mac_key):
            if s is not None:
                s.wipe()
        if self._record_key is not None:
            self._record_key.close()
        self._master = self._mac_key = None
        self._record_key = None
        self._records.clear()
        self._aads.clear()

    # --- records -----------------------------------------------------------------------

    @property
    def keys_dir(self) -> Path:
        return self.path / KEYS_DIR

    def _authenticate(self, rec: KeyRecord) -> None:
        aad = canonical(rec.metadata(self.store_id))
        if rec.kind == "sealed":
            assert self._record_key is not None
            try:
                self._record_key.open(rec.nonce, rec.sealed, aad).wipe()
            except aead.OpenFailed:
                raise KeystoreTampered(
                    f"key record {rec.id} fails authentication (edited, swapped or forged)",
                    hint="restore that record from backup; other keys are unaffected",
                ) from None
        elif rec.kind == "reference":
            assert self._mac_key is not None
            want = hmac.digest(self._mac_key.buffer, aad, "sha256")
            if not hmac.compare_digest(want, rec.mac):
                raise KeystoreTampered(f"key reference {rec.id} fails authentication")
        else:
            raise KeystoreCorrupted(f"key record {rec.id} has unknown kind {rec.kind!r}")

    def refresh(self) -> None:
        """Pick up records written or removed by other processes."""
        self._require_master()
        seen: set[str] = set()
        try:
            entries = list(os.scandir(self.keys_dir))
        except FileNotFoundError:
            raise KeystoreCorrupted(f"{self.keys_dir} is missing") from None
        for entry in entries:
            name = entry.name
            if not name.endswith(".json") or name.startswith("."):
                continue
            key_id = name[:-5]
            seen.add(key_id)
            mtime = entry.stat().st_mtime_ns
            if self._mtimes.get(key_id) == mtime:
                continue
            self._mtimes[key_id] = mtime
            self._records.pop(key_id, None)
            self.problems.pop(key_id, None)
            try:
                rec = KeyRecord.from_json(Path(entry.path).read_bytes(), f"key record {name}")
                if rec.id != key_id or not _ID_RE.match(key_id):
                    raise KeystoreTampered(
                        f"key record {name} names id {rec.id!r}: records were renamed or swapped"
                    )
                self._authenticate(rec)
            except (KeystoreError, FileNotFoundError) as e:
                err = e if isinstance(e, KeystoreError) else KeystoreCorrupted(str(e))
                self.problems[key_id] = err
                continue
            self._records[key_id] = rec
            self._aads[key_id] = canonical(rec.metadata(self.store_id))
        for gone in set(self._mtimes) - seen:
            self._mtimes.pop(gone, None)
            self._records.pop(gone, None)
            self._aads.pop(gone, None)
            self.problems.pop(gone, None)

    def records(self) -> list[KeyRecord]:
        self.refresh()
        return sorted(self._records.values(), key=lambda r: (r.created_at, r.id))

    def find(self, ref: str) -> KeyRecord:
        """A record by id or label; checks it still exists on disk (deleted
        elsewhere means deleted here too)."""
        self._require_master()
        rec = self._lookup(ref)
        if rec is not None and not os.path.exists(f"{self._keys_str}/{rec.id}.json"):
            rec = None
        if rec is None:
            self.refresh()
            rec = self._lookup(ref)
        if rec is None:
            problem = self.problems.get(ref)
            if problem is not None:
                raise problem
            raise KeyNotFound(
                f"no key {ref!r} in the keystore", hint="list keys with 'anyhsm key list'"
            )
        return rec

    def _lookup(self, ref: str) -> KeyRecord | None:
        rec = self._records.get(ref)
        if rec is not None:
            return rec
        for r in self._records.values():
            if r.label == ref:
                return r
        return None

    def add_sealed(
        self,
        label: str,
        key_type: KeyType,
        secret: SecretBytes,
        public_key: bytes,
        *,
        exportable: bool = False,
        chain_code: bytes | None = None,
    ) -> KeyRecord:
        """Seal and persist a new key; returns once it is durably on disk."""
        self._require_master()
        rec = KeyRecord(
            id=secrets.token_hex(16),
            label=label,
            key_type=key_type,
            public_key=public_key,
            created_at=now_iso(),
            exportable=exportable,
            chain_code=chain_code,
        )
        assert self._record_key is not None
        nonce, sealed = self._record_key.seal(secret.buffer, canonical(rec.metadata(self.store_id)))
        return self._persist(replace(rec, nonce=nonce, sealed=sealed))

    def add_reference(
        self, key_id: str, label: str, public_key: bytes, provider: str, store: str
    ) -> KeyRecord:
        """Record that a key lives in another store, so that routing can say
        which provider is needed when that store is unreachable."""
        rec = KeyRecord(
            id=key_id if _ID_RE.match(key_id) else hashlib.sha256(key_id.encode()).hexdigest()[:32],
            label=label,
            key_type=KeyType.SECP256K1,
            public_key=public_key,
            created_at=now_iso(),
            kind="reference",
            provider=provider,
            store=store,
        )
        assert self._mac_key is not None
        mac = hmac.digest(self._mac_key.buffer, canonical(rec.metadata(self.store_id)), "sha256")
        return self._persist(replace(rec, mac=mac), replace_same_label=True)

    def _persist(self, rec: KeyRecord, *, replace_same_label: bool = False) -> KeyRecord:
        with file_lock(self.path / LOCK_FILE):
            clean_temp_files(self.keys_dir)
            self.refresh()
            clash = self._lookup(rec.label)
            if clash is not None and clash.id != rec.id:
                if not (replace_same_label and clash.kind == "reference"):
                    raise KeyExists(
                        f"a key labelled {rec.label!r} already exists",
                        hint="choose another label",
                    )
                remove_durably(self.keys_dir / f"{clash.id}.json")
            path = self.keys_dir / f"{rec.id}.json"
            atomic_write(path, rec.to_json())
            self._records[rec.id] = rec
            self._aads[rec.id] = canonical(rec.metadata(self.store_id))
            self._mtimes[rec.id] = path.stat().st_mtime_ns
        return rec

    def delete(self, ref: str) -> KeyRecord:
        rec = self.find(ref)
        with file_lock(self.path / LOCK_FILE):
            remove_durably(self.keys_dir / f"{rec.id}.json")
            self._records.pop(rec.id, None)
            self._mtimes.pop(rec.id, None)
        return rec

    def _decrypt_to_scratch(self, rec: KeyRecord) -> memoryview:
        """Decrypt a sealed record into this thread's scratch buffer (mlock-ed once,
        reused), so the signing path allocates nothing secret. The caller wipes
        and releases the returned view."""
        if rec.kind != "sealed":
            raise KeyNotFound(f"key {rec.label!r} is held by provider {rec.provider!r}, not here")
        key = self._record_key
        if key is None:
            raise KeystoreError("the keystore is locked", hint="unlock it first")
        scratch: SecretBytes | None = getattr(self._scratch, "buf", None)
        if scratch is None or scratch.wiped:
            scratch = self._scratch.buf = SecretBytes(128)
        buf = scratch.buffer
        aad = self._aads.get(rec.id) or canonical(rec.metadata(self.store_id))
        try:
            n = key.open_into(rec.nonce, rec.sealed, aad, buf)
        except aead.OpenFailed:
            raise KeystoreTampered(f"key record {rec.id} fails authentication") from None
        return memoryview(buf)[:n]

    @staticmethod
    def _wipe_view(view: memoryview) -> None:
        view[:] = bytes(len(view))
        view.release()

    def use_secret(self, rec: KeyRecord, fn: Callable[[memoryview], T]) -> T:
        """Call ``fn`` with the decrypted secret, then wipe it (the hot signing path:
        same guarantees as :meth:`secret`, without a generator's overhead)."""
        view = self._decrypt_to_scratch(rec)
        try:
            return fn(view)
        finally:
            self._wipe_view(view)

    @contextlib.contextmanager
    def secret(self, rec: KeyRecord) -> Iterator[memoryview]:
        """Decrypt a key's secret for the ``with`` block, then wipe it.
        Do not keep the view past the block."""
        view = self._decrypt_to_scratch(rec)
        try:
            yield view
        finally:
            self._wipe_view(view)

    # --- side files (sealed master key blobs, audit checkpoint) --------------------------

    def _side_path(self, name: str) -> Path:
        if not _SIDE_RE.match(name) or name in (HEADER_FILE, LOCK_FILE):
            raise KeystoreError(f"invalid side file name {name!r}")
        return self.path / name

    def read_side_file(self, name: str) -> bytes | None:
        try:
            return self._side_path(name).read_bytes()
        except FileNotFoundError:
            return None

    def write_side_file(self, name: str, data: bytes) -> None:
        atomic_write(self._side_path(name), data)

    def remove_side_file(self, name: str) -> bool:
        return remove_durably(self._side_path(name))
