"""The encrypted file keystore behind the software provider.

Envelope encryption. A random 32-byte master key encrypts every record; it is
itself stored wrapped by a key derived from the operator's passphrase
(Argon2id or scrypt), and may additionally be sealed to a TPM or wrapped by an
HSM token (side files), so the passphrase stays a recovery path.

Layout of a keystore directory (0700)::

    keystore.json      header: format, version, store id, KDF params, wrapped master key,
                       the master key's epoch, MAC, checksum
    keys/              the records of epoch 1 (``keys.N/`` for epoch N, after rotations):
      <id>.json        one record per key: metadata + AES-256-GCM ciphertext whose associated
                       data binds the store id, key id and all metadata (so editing or swapping
                       records is detected); "reference" records name keys kept in other stores
      MANIFEST         the authenticated list of live records, the audit chain's state and
                       the generation (see manifest.py)
    .lock              flock target serialising writers across processes
    .changes           the change counter every writer bumps (see changes.py), so signers
                       need no system call beyond one pread to know nothing changed
    <side files>       unlock blobs (tpm-sealed.json, pkcs11-wrapped.json): beside the header
                       in epoch 1, in the epoch's directory after a rotation

A master-key rotation writes a complete new epoch directory and then switches
to it by replacing the header (one atomic rename), so a crash leaves either the
old store or the new one.

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
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from anyhsm.audit import GENESIS, MAX_SEQ, AuditKeyRing, AuditState
from anyhsm.errors import (
    AnchorMismatch,
    AuthenticationFailed,
    HsmError,
    KeyExists,
    KeyNotFound,
    KeystoreCorrupted,
    KeystoreError,
    KeystoreExists,
    KeystoreNotFound,
    KeystoreRolledBack,
    KeystoreRotated,
    KeystoreTampered,
    ManifestMissing,
    RecordNotInManifest,
    UnsupportedFormatVersion,
    WrongPassphrase,
)
from anyhsm.fsutil import (
    atomic_write,
    clean_temp_files,
    file_lock,
    fsync_dir,
    make_private_dir,
    remove_durably,
)
from anyhsm.keystore import aead
from anyhsm.keystore.anchor import GenerationAnchor
from anyhsm.keystore.changes import RECHECK_S, ChangeCounter
from anyhsm.keystore.kdf import KdfParams, derive_kek
from anyhsm.keystore.manifest import (
    FILE_NAME as MANIFEST_FILE,
)
from anyhsm.keystore.manifest import (
    HEADER_VERSION as MANIFEST_VERSION,
)
from anyhsm.keystore.manifest import (
    MAC_PURPOSE as MANIFEST_MAC_PURPOSE,
)
from anyhsm.keystore.manifest import (
    AnchorRef,
    Entry,
    Manifest,
    PolicyBinding,
    SealedAuditKey,
    SealedSecret,
    audit_key_aad,
    file_digest,
    state_secret_aad,
)
from anyhsm.secret import SecretBytes
from anyhsm.types import KeyType

FORMAT = "anyhsm-keystore"
VERSION = 1
HEADER_FILE = "keystore.json"
KEYS_DIR = "keys"
LOCK_FILE = ".lock"
LEGACY_CHECKPOINT = "audit-checkpoint.json"
TOMBSTONE_SUFFIX = ".revoked"
PENDING_REMOVAL_SUFFIX = ".removing"
log = logging.getLogger("anyhsm")
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
    generation: int = 0  # the manifest generation that listed it first (0: older records)

    def metadata(self, store_id: str) -> dict[str, object]:
        meta: dict[str, object] = {
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
        if self.generation:
            meta["generation"] = self.generation
        return meta

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
            generation = d.get("generation", 0)
            if type(generation) is not int or generation < 0:
                raise ValueError("bad generation")
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
                generation=generation,
            )
        except (KeyError, ValueError, TypeError, OverflowError) as e:
            raise KeystoreCorrupted(f"{where} is missing or has a bad field ({e})") from None


@dataclass
class _FileState:
    """One record file as last read: its mtime, digest, and the parsed, authenticated
    record (or why it could not be used)."""

    mtime: int
    digest: str
    record: KeyRecord | None
    problem: KeystoreError | None


class Keystore:
    """A keystore directory. Load it locked, unlock it, then read and write keys.

    It is also the audit chain's authenticated state store (``AuditStateStore``): the
    chain's state and MAC keys live in the manifest, under the same generation as the
    records.
    """

    def __init__(self, path: Path, header: dict[str, object]) -> None:
        self.path = path
        self._header = header
        self.store_id = str(header["store_id"])
        self.kdf = KdfParams.from_dict(header["kdf"])
        self._master: SecretBytes | None = None
        self._record_key: aead.AeadKey | None = None
        self._mac_key: SecretBytes | None = None
        self._manifest_key: SecretBytes | None = None
        self._manifest: Manifest | None = None
        self._manifest_stat: tuple[int, int] | None = None
        self._seen_generation = 0
        self._records: dict[str, KeyRecord] = {}
        self._aads: dict[str, bytes] = {}
        self._files: dict[str, _FileState] = {}
        self._tombs: dict[str, int] = {}
        self._removing: set[str] = set()
        # Threads of one process (a service, the audit flusher) read and write the manifest;
        # serialising that in-process keeps the "generation only grows" check exact.
        self._manifest_lock = threading.RLock()
        self._keys_str = f"{self.keys_dir}/"  # the signing path's existence check
        self._changes = ChangeCounter(path)
        self._looked: dict[str, tuple[bytes, float]] = {}  # key id -> (counter, when)
        self._manifest_looked: tuple[bytes, float] | None = None
        self._scratch = threading.local()
        self.problems: dict[str, HsmError] = {}
        self.unacknowledged: set[str] = set()
        self.unlocked_by = ""
        self._anchor: GenerationAnchor | None = None
        self.anchor_problem = ""
        self.upgraded = False
        self._header_seen: tuple[int, int, int] | None = None  # stat of the header checked

    # --- layout ------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The master key's epoch: each rotation starts a new one in a new directory."""
        epoch = self._header.get("epoch", 1)
        return epoch if isinstance(epoch, int) and epoch >= 1 else 1

    @property
    def keys_dir(self) -> Path:
        return self.path / _records_dir_name(self.epoch)

    @property
    def generation(self) -> int:
        return self._require_manifest().generation

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
                "epoch": 1,
                "manifest": MANIFEST_VERSION,
            }
            store = cls(path, header)
            store._install_master(master, "passphrase")
            store._header = store._wrap_header(header, master, passphrase, params)
            make_private_dir(store.keys_dir)
            with aead.subkey(master, "anyhsm/v1/audit") as first_audit_key:
                manifest = Manifest(
                    store.store_id,
                    1,
                    generation=1,
                    audit_keys=(store._seal_audit_key(first_audit_key, 1, 1),),
                )
            store._write_manifest_file(manifest)
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
        return cls(path, _parse_header(raw, hp))

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
        return _seal_header(header, master)

    def _header_bytes(self) -> bytes:
        return json.dumps(self._header, indent=1, sort_keys=True).encode() + b"\n"

    def _check_header_mac(self, master: SecretBytes) -> bool:
        body = {k: v for k, v in self._header.items() if k not in ("mac", "checksum")}
        with aead.subkey(master, "anyhsm/v1/header-mac") as mk:
            want = hmac.digest(mk.buffer, canonical(body), "sha256").hex()
        return hmac.compare_digest(
            want.encode(), str(self._header["mac"]).encode("utf-8", "replace")
        )

    def _unwrap_with_passphrase(self, passphrase: SecretBytes) -> SecretBytes:
        """The master key the header wraps under ``passphrase``; WrongPassphrase otherwise."""
        wrapped = self._header["wrapped_master"]
        if not isinstance(wrapped, dict):
            raise KeystoreCorrupted("keystore header: wrapped_master is not an object")
        nonce = _unb64(wrapped.get("nonce"), "wrapped master key nonce")
        ct = _unb64(wrapped.get("ciphertext"), "wrapped master key")
        with derive_kek(passphrase, self.kdf) as kek:
            try:
                return aead.open_once(kek, nonce, ct, self._wrap_aad())
            except aead.OpenFailed:
                raise WrongPassphrase(
                    f"the passphrase does not open the keystore at {self.path}",
                    hint="check ANYHSM_PASSPHRASE or the passphrase file; nothing was changed",
                ) from None

    def unlock_with_passphrase(self, passphrase: SecretBytes) -> None:
        """Derive the KEK and unwrap the master key. Wrong passphrase: WrongPassphrase."""
        master = self._unwrap_with_passphrase(passphrase)
        if not self._check_header_mac(master):
            master.wipe()
            raise KeystoreTampered(
                f"{self.path / HEADER_FILE} fails authentication (edited)",
                hint="restore the keystore directory from backup",
            )
        self._install_master(master, "passphrase")
        self._open_manifest()

    def check_passphrase(self, passphrase: SecretBytes) -> None:
        """WrongPassphrase unless ``passphrase`` opens this (unlocked) store: an
        administrative step (passphrase change, rotation) asks for it even when the store
        was opened through a TPM or token."""
        with self._unwrap_with_passphrase(passphrase) as master:
            if not master.equals(self._require_master()):
                raise WrongPassphrase(f"the passphrase opens another master key at {self.path}")

    def unlock_with_master_key(self, master_key: SecretBytes, *, via: str = "master-key") -> None:
        """Unlock with a master key unsealed elsewhere (TPM, HSM token)."""
        if len(master_key) != 32 or not self._check_header_mac(master_key):
            raise AuthenticationFailed(
                f"the unsealed master key does not open the keystore at {self.path}",
                hint="re-enroll, or open the keystore with the recovery passphrase",
            )
        self._install_master(SecretBytes(master_key.buffer), via)
        self._open_manifest()

    def _install_master(self, master: SecretBytes, via: str) -> None:
        self._master = master
        with aead.subkey(master, "anyhsm/v1/record") as rk:
            self._record_key = aead.AeadKey(rk)
        self._mac_key = aead.subkey(master, "anyhsm/v1/reference-mac")
        self._manifest_key = aead.subkey(master, MANIFEST_MAC_PURPOSE)
        self.unlocked_by = via
        self._records.clear()
        self._aads.clear()
        self._files.clear()
        self._tombs.clear()
        self.problems.clear()
        self._manifest = None
        self._manifest_stat = None

    def master_key(self) -> SecretBytes:
        """A copy of the master key (to seal it to a TPM or token); the caller wipes it."""
        return SecretBytes(self._require_master().buffer)

    def subkey(self, purpose: str) -> SecretBytes:
        """A purpose-bound key derived from the master key."""
        return aead.subkey(self._require_master(), purpose)

    def _require_master(self) -> SecretBytes:
        if self._master is None:
            raise KeystoreError("the keystore is locked", hint="unlock it first")
        return self._master

    def close(self) -> None:
        for s in (self._master, self._mac_key, self._manifest_key):
            if s is not None:
                s.wipe()
        if self._record_key is not None:
            self._record_key.close()
        self._master = self._mac_key = self._manifest_key = None
        self._record_key = None
        self._records.clear()
        self._aads.clear()
        self._files.clear()
        self._looked.clear()
        self._manifest_looked = None
        self._changes.close()
        if self._anchor is not None:
            self._anchor.close()
            self._anchor = None

    # --- the manifest ------------------------------------------------------------------

    def _manifest_path(self) -> Path:
        return self.keys_dir / MANIFEST_FILE

    def _open_manifest(self) -> None:
        if "manifest" not in self._header:
            self._upgrade_legacy()
            return
        self._manifest = self._read_manifest()
        self.refresh()

    def _require_manifest(self) -> Manifest:
        if self._manifest is None:
            self._require_master()
            raise KeystoreError("the keystore manifest is not loaded")
        return self._manifest

    def _read_manifest(self) -> Manifest:
        with self._manifest_lock:
            return self._read_manifest_locked()

    def _read_manifest_locked(self) -> Manifest:
        mp = self._manifest_path()
        try:
            fd = os.open(mp, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if not (self.path / HEADER_FILE).exists() or self._header_epoch_on_disk() != self.epoch:
                raise KeystoreRotated(
                    f"the keystore at {self.path} was re-encrypted under a new master key "
                    "by another process",
                    hint="reopen the handle",
                ) from None
            raise ManifestMissing(
                f"the keystore manifest {mp} is missing: the list of live records cannot be "
                "authenticated",
                hint="restore the keystore directory from backup",
            ) from None
        try:
            st = os.fstat(fd)
            with os.fdopen(fd, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise KeystoreError(f"cannot read {mp}: {e.strerror}") from None
        assert self._manifest_key is not None
        m = Manifest.from_bytes(raw, self._manifest_key, str(mp))
        if m.store_id != self.store_id or m.epoch != self.epoch:
            raise KeystoreTampered(
                f"{mp} belongs to another keystore or epoch (store {m.store_id}, epoch "
                f"{m.epoch}; expected {self.store_id}, epoch {self.epoch})"
            )
        if m.generation < self._seen_generation:
            raise KeystoreRolledBack(
                f"the keystore manifest went back from generation {self._seen_generation} to "
                f"{m.generation} while open: {mp} was replaced by an older copy",
                hint="restore the current manifest; find out who wrote the old one",
            )
        self._seen_generation = m.generation
        self._manifest_stat = (st.st_mtime_ns, st.st_size)
        return m

    def _reload_manifest_if_changed(self) -> None:
        with self._manifest_lock:
            self._reload_manifest_if_changed_locked()

    def _reload_manifest_if_changed_locked(self) -> None:
        """Re-read the manifest if it changed on disk. Its ``stat`` is skipped while the
        change counter says no writer finished since the last look (under ``RECHECK_S``
        ago): every manifest write is a writer's, under the write lock."""
        stamp = self._changes.stamp()
        now = time.monotonic()
        looked = self._manifest_looked
        if (
            self._manifest is not None
            and looked is not None
            and looked[0] == stamp
            and now - looked[1] < RECHECK_S
        ):
            return
        try:
            st = os.stat(self._manifest_path())
            stat_now: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stat_now = None
        if self._manifest is None or stat_now != self._manifest_stat:
            self._manifest = self._read_manifest()
        self._manifest_looked = None if stamp is None else (stamp, now)

    def _write_manifest_file(self, manifest: Manifest, directory: Path | None = None) -> None:
        with self._manifest_lock:
            self._write_manifest_file_locked(manifest, directory)

    def _write_manifest_file_locked(self, manifest: Manifest, directory: Path | None) -> None:
        key = self._manifest_key
        assert key is not None
        path = (directory or self.keys_dir) / MANIFEST_FILE
        atomic_write(path, manifest.to_bytes(key))
        if directory is None:
            st = os.stat(path)
            self._manifest = manifest
            self._manifest_stat = (st.st_mtime_ns, st.st_size)
            self._seen_generation = manifest.generation

    def _commit(self, manifest: Manifest, *, significant: bool) -> None:
        """Write the next manifest (called under the write lock). A significant change
        (the key set, the master key, the audit chain, the anchor) also moves the
        external anchor, after the manifest: a crash in between leaves the manifest ahead
        of the anchor, which the next attach repairs, never behind it."""
        if significant and manifest.anchor is not None:
            anchor = replace(manifest.anchor, value=manifest.anchor.value + 1)
            manifest = replace(manifest, anchor=anchor)
        self._write_manifest_file(manifest)
        if significant and manifest.anchor is not None and self._anchor is not None:
            self._advance_anchor(manifest.anchor.value)

    def _advance_anchor(self, value: int) -> None:
        assert self._anchor is not None
        try:
            self._anchor.advance_to(value)
            self.anchor_problem = ""
        except HsmError as e:
            self.anchor_problem = e.message
            log.warning("anyhsm: could not advance the keystore anchor: %s", e.message)

    def _header_epoch_on_disk(self) -> int:
        try:
            header = _parse_header((self.path / HEADER_FILE).read_bytes(), self.path / HEADER_FILE)
        except (OSError, KeystoreError):
            return -1
        epoch = header.get("epoch", 1)
        return epoch if isinstance(epoch, int) else -1

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[Manifest]:
        """The inter-process write lock, with this handle checked to be current (same
        master-key epoch) and the manifest re-read from disk."""
        self._require_master()
        with file_lock(self.path / LOCK_FILE):
            if self._header_epoch_on_disk() != self.epoch:
                raise KeystoreRotated(
                    f"the keystore at {self.path} was re-encrypted under a new master key by "
                    "another process; this handle holds the retired key",
                    hint="reopen the handle",
                )
            try:
                self._manifest = self._read_manifest()
                self._clean_stale()
                yield self._manifest
            finally:
                self._changes.bump()  # after every effect; readers look at their records again

    def _clean_stale(self) -> None:
        """Remove what crashed writers left: temp files and directories of other epochs
        (an interrupted or finished rotation). Records never acknowledged are kept (never
        used, reported in ``unacknowledged``): deleting them could destroy a real key
        whose listing an attacker took back by replaying an old manifest."""
        clean_temp_files(self.keys_dir)
        clean_temp_files(self.path)
        self._finish_interrupted_removals(self._require_manifest())
        for entry in os.scandir(self.path):
            name = entry.name
            if entry.is_dir() and name != self.keys_dir.name and _is_records_dir(name):
                shutil.rmtree(entry.path, ignore_errors=True)
        self.refresh()

    # --- records -----------------------------------------------------------------------

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

    def _read_record_file(self, key_id: str, path: str, mtime: int) -> _FileState:
        name = f"{key_id}.json"
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            return _FileState(mtime, "", None, KeystoreCorrupted(f"{name} vanished"))
        digest = file_digest(raw)
        try:
            rec = KeyRecord.from_json(raw, f"key record {name}")
            if rec.id != key_id:
                raise KeystoreTampered(
                    f"key record {name} names id {rec.id!r}: records were renamed or swapped"
                )
            self._authenticate(rec)
        except KeystoreError as e:
            return _FileState(mtime, digest, None, e)
        return _FileState(mtime, digest, rec, None)

    def refresh(self) -> None:
        """Pick up records written or removed by other processes, and decide which are
        live: only those the manifest lists, byte for byte."""
        self._require_master()
        self._reload_manifest_if_changed()
        seen: set[str] = set()
        try:
            entries = list(os.scandir(self.keys_dir))
        except FileNotFoundError:
            if self._header_epoch_on_disk() != self.epoch:
                raise KeystoreRotated(
                    f"the keystore at {self.path} was re-encrypted by another process",
                    hint="reopen the handle",
                ) from None
            raise KeystoreCorrupted(f"{self.keys_dir} is missing") from None
        tombs: dict[str, int] = {}
        removing: set[str] = set()
        for entry in entries:
            name = entry.name
            if name.endswith(PENDING_REMOVAL_SUFFIX):
                removing.add(name.removesuffix(PENDING_REMOVAL_SUFFIX))
                continue
            if name.endswith(TOMBSTONE_SUFFIX):
                key_id = name.removesuffix(TOMBSTONE_SUFFIX)
                if _ID_RE.match(key_id):
                    known = self._tombs.get(key_id)
                    tombs[key_id] = (
                        known if known is not None else self._read_tombstone(key_id, entry.path)
                    )
                continue
            if not name.endswith(".json") or not _ID_RE.match(name[:-5]):
                continue
            key_id = name[:-5]
            seen.add(key_id)
            mtime = entry.stat().st_mtime_ns
            cached = self._files.get(key_id)
            if cached is None or cached.mtime != mtime:
                self._files[key_id] = self._read_record_file(key_id, entry.path, mtime)
        for gone in set(self._files) - seen:
            del self._files[gone]
        self._tombs = tombs
        self._removing = removing
        self._reconcile()

    def _reconcile(self) -> None:
        self._check_not_rolled_back()
        m = self._require_manifest()
        records: dict[str, KeyRecord] = {}
        problems: dict[str, HsmError] = {}
        orphans: set[str] = set()
        for key_id, fs in self._files.items():
            entry = m.keys.get(key_id)
            if entry is None:
                if key_id in m.revoked and key_id in self._removing:
                    continue  # a delete still finishing (or killed midway): not an attack
                if key_id in m.revoked:
                    problems[key_id] = RecordNotInManifest(
                        f"key record {key_id} belongs to a deleted key: a restored copy is "
                        "never used again",
                        hint="remove the file; find out who put it back",
                    )
                elif fs.problem is not None:
                    problems[key_id] = fs.problem
                else:
                    orphans.add(key_id)  # written, never acknowledged (or listing replayed)
                continue
            if fs.problem is not None:
                problems[key_id] = fs.problem
                continue
            rec = fs.record
            assert rec is not None
            if (fs.digest, rec.label, rec.kind) != (entry.sha256, entry.label, entry.kind):
                problems[key_id] = RecordNotInManifest(
                    f"key record {key_id} is not the one the keystore manifest lists for it "
                    "(replaced by another version)",
                    hint="restore that record from backup",
                )
                continue
            records[key_id] = rec
        for key_id, entry in m.keys.items():
            if key_id not in self._files:
                problems[key_id] = RecordNotInManifest(
                    f"key {entry.label!r} ({key_id}) is listed in the keystore manifest but its "
                    "record file is missing (deleted outside anyhsm, or the directory was "
                    "partly restored)",
                    hint="restore the record from backup; the label is not given to another key",
                )
        for key_id in set(self._records) - set(records):
            self._aads.pop(key_id, None)
        for key_id, rec in records.items():
            if key_id not in self._aads or self._records.get(key_id) is not rec:
                self._aads[key_id] = canonical(rec.metadata(self.store_id))
        self._records = records
        self.problems = problems
        self.unacknowledged = orphans

    def records(self) -> list[KeyRecord]:
        self.refresh()
        return sorted(self._records.values(), key=lambda r: (r.created_at, r.id))

    def find(self, ref: str) -> KeyRecord:
        """A record by id or label; checks it still exists on disk (deleted
        elsewhere means deleted here too). A label or id the manifest lists whose record
        is missing or altered raises that problem, never another key's record."""
        self._require_master()
        rec = self._lookup(ref)
        if rec is not None and not self._still_on_disk(rec.id):
            rec = None
        if rec is None:
            self.refresh()
            rec = self._lookup(ref)
        if rec is None:
            m = self._require_manifest()
            key_id = ref if ref in m.keys or ref in self.problems else m.label_owner(ref)
            problem = self.problems.get(key_id or "")
            if problem is not None:
                raise problem
            raise KeyNotFound(
                f"no key {ref!r} in the keystore", hint="list keys with 'anyhsm key list'"
            )
        return rec

    def _still_on_disk(self, key_id: str) -> bool:
        """Whether ``key_id``'s record file is still there. Without a system call beyond
        the change counter's one ``pread`` when no anyhsm writer finished a change since
        the last full look at this record and that look is under ``RECHECK_S`` old;
        otherwise the full look (the file's existence, the counter file's identity). The
        counter is read *before* the look, so a change made during it is seen next time."""
        stamp = self._changes.stamp()
        now = time.monotonic()
        looked = self._looked.get(key_id)
        if looked is not None and looked[0] == stamp and now - looked[1] < RECHECK_S:
            return True
        self._changes.reopen_if_replaced()
        if not os.path.exists(f"{self._keys_str}{key_id}.json"):
            self._looked.pop(key_id, None)
            return False
        if stamp is not None:
            if len(self._looked) > 4096:
                self._looked.clear()
            self._looked[key_id] = (stamp, now)
        return True

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
        """Seal and persist a new key; returns once it is durably on disk and listed."""
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
        record_key = self._record_key
        assert record_key is not None

        def seal(generation: int) -> KeyRecord:
            listed = replace(rec, generation=generation)
            aad = canonical(listed.metadata(self.store_id))
            nonce, sealed = record_key.seal(secret.buffer, aad)
            return replace(listed, nonce=nonce, sealed=sealed)

        return self._persist(rec.label, seal)

    def add_reference(
        self,
        key_id: str,
        label: str,
        public_key: bytes,
        provider: str,
        store: str,
        *,
        created_at: str | None = None,
    ) -> KeyRecord:
        """Record that a key lives in another store, so that routing can say
        which provider is needed when that store is unreachable. ``created_at``: the
        creation time that store reports (now when it reports none)."""
        rec = KeyRecord(
            id=key_id if _ID_RE.match(key_id) else hashlib.sha256(key_id.encode()).hexdigest()[:32],
            label=label,
            key_type=KeyType.SECP256K1,
            public_key=public_key,
            created_at=created_at or now_iso(),
            kind="reference",
            provider=provider,
            store=store,
        )
        return self._persist(
            rec.label,
            lambda g: self._mac_reference(replace(rec, generation=g)),
            replace_same_label=True,
        )

    def _mac_reference(self, rec: KeyRecord) -> KeyRecord:
        assert self._mac_key is not None
        mac = hmac.digest(self._mac_key.buffer, canonical(rec.metadata(self.store_id)), "sha256")
        return replace(rec, mac=mac)

    def _persist(
        self,
        label: str,
        build: Callable[[int], KeyRecord],
        *,
        replace_same_label: bool = False,
    ) -> KeyRecord:
        """Write the record ``build(generation)`` makes, then list it in the next manifest
        (a crash in between leaves a record never acknowledged, dropped later)."""
        with self._write_lock() as m:
            rec = build(m.generation + 1)
            owner = m.label_owner(label)
            replacing = None
            if owner is not None and owner != rec.id:
                entry = m.keys[owner]
                if not (replace_same_label and entry.kind == "reference"):
                    raise KeyExists(
                        f"a key labelled {rec.label!r} already exists",
                        hint="choose another label",
                    )
                replacing = owner
            raw = rec.to_json()
            path = self.keys_dir / f"{rec.id}.json"
            atomic_write(path, raw)
            keys = dict(m.keys)
            revoked = m.revoked
            if replacing is not None:
                keys.pop(replacing)
                revoked = revoked | {replacing}
            keys[rec.id] = Entry(rec.label, rec.kind, file_digest(raw))
            self._commit(m.next(keys=keys, revoked=revoked), significant=True)
            if replacing is not None:
                self._tombstone(replacing, m.generation + 1)
                self._tombs[replacing] = m.generation + 1
                remove_durably(self.keys_dir / f"{replacing}.json")
                self._files.pop(replacing, None)
            self._files[rec.id] = _FileState(path.stat().st_mtime_ns, file_digest(raw), rec, None)
            self._reconcile()
        return rec

    def delete(self, ref: str) -> KeyRecord:
        """Revoke a key: the manifest drops it (and remembers its id, so a restored copy is
        recognised), then its record file is removed."""
        rec = self.find(ref)
        with self._write_lock() as m:
            if rec.id not in m.keys:
                raise KeyNotFound(f"no key {ref!r} in the keystore")
            keys = dict(m.keys)
            keys.pop(rec.id)
            pending = self.keys_dir / f"{rec.id}{PENDING_REMOVAL_SUFFIX}"
            atomic_write(pending, b"")  # a crash from here on is finished by the next writer
            self._commit(m.next(keys=keys, revoked=m.revoked | {rec.id}), significant=True)
            self._finish_removal(rec.id, m.generation + 1)
            self._reconcile()
        return rec

    def _finish_removal(self, key_id: str, generation: int) -> None:
        """After the manifest revoked ``key_id``: tombstone, remove the record, then the
        pending-removal marker (each step idempotent, so a writer can finish a crashed one)."""
        if key_id not in self._tombs:
            self._tombstone(key_id, generation)
            self._tombs[key_id] = generation
        remove_durably(self.keys_dir / f"{key_id}.json")
        self._files.pop(key_id, None)
        remove_durably(self.keys_dir / f"{key_id}{PENDING_REMOVAL_SUFFIX}")

    def _finish_interrupted_removals(self, m: Manifest) -> None:
        """A delete killed between its manifest and the record's removal left a marker:
        finish it (the key is revoked), or drop the marker of one killed before its manifest
        (the key is live). An attacker planting a marker only gets a revoked record of a
        deleted key removed, which is what should happen to it anyway."""
        for entry in os.scandir(self.keys_dir):
            key_id = entry.name.removesuffix(PENDING_REMOVAL_SUFFIX)
            if key_id == entry.name or not _ID_RE.match(key_id):
                continue
            if key_id in m.keys:
                remove_durably(Path(entry.path))
            else:
                self._finish_removal(key_id, m.generation)

    def _tombstone(self, key_id: str, generation: int) -> None:
        """Leave a MAC-ed note that ``key_id`` was deleted at ``generation``: an older
        manifest put back beside it is then recognised as a rollback, not a lost record."""
        assert self._manifest_key is not None
        body = canonical({"id": key_id, "generation": generation, "store_id": self.store_id})
        mac = hmac.digest(self._manifest_key.buffer, body, "sha256").hex()
        data = canonical({"id": key_id, "generation": generation, "mac": mac}) + b"\n"
        atomic_write(self.keys_dir / f"{key_id}{TOMBSTONE_SUFFIX}", data)

    def _read_tombstone(self, key_id: str, path: str) -> int:
        """The generation of an authentic tombstone, or -1 (a forged one is ignored)."""
        assert self._manifest_key is not None
        try:
            d = json.loads(Path(path).read_bytes())
            gen = d["generation"]
            body = canonical({"id": key_id, "generation": gen, "store_id": self.store_id})
            want = hmac.digest(self._manifest_key.buffer, body, "sha256").hex()
            if type(gen) is int and hmac.compare_digest(want, str(d["mac"])):
                return gen
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return -1

    def _newer_than(self, m: Manifest) -> list[str]:
        """Ids whose deletion, or whose record, the manifest cannot know yet. A writer
        lists a record in the very next generation and writes a tombstone after the
        manifest, so honest ones are never more than one generation ahead of a record,
        nor ahead of a tombstone at all."""
        newer = [k for k, g in self._tombs.items() if g > m.generation]
        newer += [
            fs.record.id
            for fs in self._files.values()
            if fs.record is not None
            and fs.record.generation > m.generation + 1
            and fs.record.id not in m.keys
        ]
        return newer

    def _check_not_rolled_back(self) -> None:
        """Fail closed when the manifest was put back from an earlier copy (a record or a
        deletion beside it is newer). The manifest is read again first, so a writer that
        committed while we were scanning is not taken for an attack."""
        if not self._newer_than(self._require_manifest()):
            return
        self._manifest = self._read_manifest()
        m = self._manifest
        newer = self._newer_than(m)
        if newer:
            raise KeystoreRolledBack(
                f"the keystore manifest {self._manifest_path()} (generation {m.generation}) is "
                f"older than {len(newer)} record(s) or deletion(s) beside it "
                f"({', '.join(sorted(newer)[:3])}): it was put back from an earlier copy",
                hint="restore the current manifest from the newest backup; a replayed manifest "
                "would bring back deleted keys and hide audit entries",
            )

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

    # --- the audit chain's state (AuditStateStore) ----------------------------------------

    def _seal_audit_key(self, key: SecretBytes, chain: int, from_seq: int) -> SealedAuditKey:
        assert self._record_key is not None
        nonce, ct = self._record_key.seal(key.buffer, audit_key_aad(self.store_id, chain, from_seq))
        return SealedAuditKey(from_seq, nonce, ct)

    def load_audit_state(self) -> AuditState:
        self._require_master()
        self.check_not_rotated()
        self._reload_manifest_if_changed()
        return self._require_manifest().audit

    def check_not_rotated(self) -> None:
        """KeystoreRotated when the header on disk names another epoch. Without this, a
        handle whose store another process rotated (and was killed before it removed the
        old epoch's directory and wrote its first entry under the new audit key) still
        found its old manifest, and its log went on appending under the retired audit key
        where the new manifest expects the new one. One stat per call; the header is
        parsed only when it was replaced."""
        try:
            st = os.stat(self.path / HEADER_FILE)
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            seen = None
        if seen is not None and seen == self._header_seen:
            return
        if self._header_epoch_on_disk() != self.epoch:
            raise KeystoreRotated(
                f"the keystore at {self.path} was re-encrypted under a new master key by "
                "another process; this handle holds the retired key",
                hint="reopen the handle",
            )
        self._header_seen = seen

    def advance_audit_state(self, seq: int, mac: bytes, offset: int) -> None:
        with self._write_lock() as m:
            if seq <= m.audit.seq:
                return
            audit = replace(m.audit, seq=seq, mac=mac, offset=offset)
            self._commit(m.next(audit=audit), significant=False)

    def audit_keys(self) -> AuditKeyRing:
        self._require_master()
        self._reload_manifest_if_changed()
        m = self._require_manifest()
        assert self._record_key is not None
        keys: list[tuple[int, SecretBytes]] = []
        try:
            for k in m.audit_keys:
                aad = audit_key_aad(self.store_id, m.audit.chain, k.from_seq)
                keys.append((k.from_seq, self._record_key.open(k.nonce, k.ciphertext, aad)))
            return AuditKeyRing(keys)
        except (aead.OpenFailed, ValueError):
            for _, key in keys:
                key.wipe()
            raise KeystoreTampered(
                "the audit keys in the keystore manifest fail authentication"
            ) from None

    def start_audit_chain(self, genesis: bytes) -> AuditState:
        with self._write_lock() as m:
            chain = m.audit.chain + 1
            audit = AuditState(chain, 0, genesis, 0, genesis)
            with SecretBytes(os.urandom(32)) as key:
                sealed = (self._seal_audit_key(key, chain, 1),)
            self._commit(m.next(audit=audit, audit_keys=sealed), significant=True)
            return audit

    # --- the generation anchor (TPM NV counter) -----------------------------------------

    @property
    def anchor_attached(self) -> bool:
        """Whether the store was checked against its external anchor, which now moves with it."""
        return self._anchor is not None

    def generation_anchor_ref(self) -> tuple[str, str] | None:
        """(kind, ref) of the anchor the manifest names, or None."""
        anchor = self._require_manifest().anchor
        return None if anchor is None else (anchor.kind, anchor.ref)

    def set_generation_anchor(self, anchor: GenerationAnchor | None) -> None:
        """Anchor the generation in ``anchor`` from now on (None: stop anchoring)."""
        with self._write_lock() as m:
            if anchor is None:
                self._commit(m.next(anchor=None), significant=True)
                if self._anchor is not None:
                    self._anchor.close()
                self._anchor = None
                return
            value = anchor.read() + 1
            self._commit(
                m.next(anchor=AnchorRef(anchor.kind, anchor.ref, value)), significant=False
            )
            anchor.advance_to(value)
            self._anchor = anchor
            self.anchor_problem = ""

    def attach_generation_anchor(self, anchor: GenerationAnchor) -> None:
        """Check the store against its anchor (KeystoreRolledBack when the store is older)
        and keep the anchor moving with every significant change."""
        m = self._require_manifest()
        if m.anchor is None or (m.anchor.kind, m.anchor.ref) != (anchor.kind, anchor.ref):
            raise AnchorMismatch(
                f"the keystore manifest does not name the anchor {anchor.kind} {anchor.ref}"
            )
        current = anchor.read()
        if m.anchor.value < current:
            raise KeystoreRolledBack(
                f"the keystore at {self.path} is older than its anchor: the manifest "
                f"records {anchor.kind} {anchor.ref} = {m.anchor.value}, the counter holds "
                f"{current} (the directory was put back from an earlier copy)",
                hint="restore the newest keystore backup; a rolled-back store may hold revoked "
                "keys and miss new ones",
            )
        if m.anchor.value > current:
            anchor.advance_to(m.anchor.value)  # a crash after the manifest, before the counter
        self._anchor = anchor
        self.anchor_problem = ""

    def anchor_status(self) -> dict[str, object]:
        """Which anchor is in force, for ``health``."""
        m = self._require_manifest()
        out: dict[str, object] = {"generation": m.generation, "epoch": self.epoch}
        if m.anchor is None:
            out["kind"] = "manifest"
            out["checked"] = False
            out["note"] = (
                "no external anchor: a rollback of the whole keystore directory is not "
                "detected (enrol a TPM, or forward the audit log)"
            )
            return out
        out.update(kind=m.anchor.kind, ref=m.anchor.ref, value=m.anchor.value)
        out["checked"] = self._anchor is not None
        if self._anchor is None and not self.anchor_problem:
            out["note"] = "the anchor was not checked when the keystore was opened"
        if self.anchor_problem:
            out["problem"] = self.anchor_problem
        return out

    # --- the spending policy's binding and the state secret ---------------------------------

    def policy_binding(self) -> tuple[str, int] | None:
        """(SHA-256 hex of the active spending policy's file, its version), or None."""
        self._reload_manifest_if_changed()
        p = self._require_manifest().policy
        return None if p is None else (p.sha256, p.version)

    def set_policy_binding(self, sha256: str | None) -> int:
        """Bind the spending policy whose file has this SHA-256 (None: no policy); returns
        the new version (one more than the last, set or removed). A significant change:
        the generation anchor moves with it, so a rolled-back policy is caught where a TPM
        anchors the store."""
        if sha256 is not None and (
            not isinstance(sha256, str) or re.fullmatch(r"[0-9a-f]{64}", sha256) is None
        ):
            raise KeystoreError("a policy binding is the SHA-256 of the policy file, as hex")
        with self._write_lock() as m:
            version = m.policy_version + 1
            policy = None if sha256 is None else PolicyBinding(sha256, version)
            self._commit(m.next(policy=policy, policy_version=version), significant=True)
        return version

    def state_key(self, purpose: str) -> SecretBytes:
        """A 32-byte key for MAC-ing state kept beside the keystore (``purpose`` names
        it), derived from the manifest's state secret: random, sealed under the master key,
        made on first use and sealed again by every rotation, so the key outlives master
        keys. The caller wipes it."""
        self._reload_manifest_if_changed()
        if self._require_manifest().state is None:
            with self._write_lock() as m:
                if m.state is None:
                    with SecretBytes(os.urandom(32)) as fresh:
                        self._commit(m.next(state=self._seal_state(fresh)), significant=False)
        with self._open_state(self._require_manifest()) as secret:
            return aead.subkey(secret, f"anyhsm/v1/state/{purpose}")

    def _seal_state(self, secret: SecretBytes) -> SealedSecret:
        assert self._record_key is not None
        nonce, ct = self._record_key.seal(secret.buffer, state_secret_aad(self.store_id))
        return SealedSecret(nonce, ct)

    def _open_state(self, m: Manifest) -> SecretBytes:
        assert m.state is not None and self._record_key is not None
        try:
            return self._record_key.open(
                m.state.nonce, m.state.ciphertext, state_secret_aad(self.store_id)
            )
        except (aead.OpenFailed, ValueError):
            raise KeystoreTampered(
                "the state secret in the keystore manifest fails authentication"
            ) from None

    # --- master-key rotation --------------------------------------------------------------

    def rotate(
        self,
        passphrase: SecretBytes,
        *,
        kdf: KdfParams | None = None,
        reseal: Callable[[SecretBytes], Mapping[str, bytes]] | None = None,
        audit_position: tuple[int, bytes, int] | None = None,
    ) -> None:
        """Re-encrypt every live record under a fresh master key, wrapped under
        ``passphrase`` (and ``kdf``), in a new epoch directory.

        Crash-safe: the new epoch is written completely (records, ``reseal(master)`` side
        files such as a TPM blob, manifest) before the header that names it replaces the
        old one in one atomic rename; killed at any point, the store opens as either the old
        or the new one. The old epoch is then removed, so the old passphrase, an old header
        or a saved unlock blob no longer open the live store. With ``audit_position``
        (seq, mac, offset of the entry announcing the rotation), the audit chain gets a new
        MAC key from the next entry on.
        """
        params = (kdf or self.kdf).with_salt()
        with self._write_lock() as m:
            broken = [k for k in m.keys if k not in self._records]
            if broken:
                raise KeystoreError(
                    f"cannot rotate: {len(broken)} listed record(s) are missing or damaged "
                    f"({', '.join(sorted(broken)[:5])})",
                    hint="restore them from backup (or delete those keys) first",
                )
            new_epoch = self.epoch + 1
            new_dir = self.path / _records_dir_name(new_epoch)
            shutil.rmtree(new_dir, ignore_errors=True)
            make_private_dir(new_dir)
            new_master = SecretBytes(os.urandom(32))
            old_ring = self.audit_keys()
            try:
                successor = Keystore(self.path, dict(self._header, epoch=new_epoch))
                successor._install_master(new_master, self.unlocked_by or "passphrase")
                keys: dict[str, Entry] = {}
                for rec in self._records.values():
                    new_rec = successor._reencrypt(rec, self)
                    raw = new_rec.to_json()
                    atomic_write(new_dir / f"{rec.id}.json", raw)
                    keys[rec.id] = Entry(rec.label, rec.kind, file_digest(raw))
                for name, blob in (reseal(new_master) if reseal else {}).items():
                    atomic_write(successor._side_path(name), blob)
                audit = m.audit
                sealed = [successor._seal_audit_key(k, audit.chain, f) for f, k in old_ring.items()]
                if audit_position is not None:
                    seq, mac, offset = audit_position
                    audit = replace(audit, seq=seq, mac=mac, offset=offset)
                    with SecretBytes(os.urandom(32)) as fresh:
                        sealed.append(successor._seal_audit_key(fresh, audit.chain, seq + 1))
                anchor = m.anchor
                if anchor is not None:
                    anchor = replace(anchor, value=anchor.value + 1)
                state = m.state
                if state is not None:  # the same secret, sealed under the new master key
                    with self._open_state(m) as secret:
                        state = successor._seal_state(secret)
                manifest = replace(
                    m,
                    epoch=new_epoch,
                    generation=m.generation + 1,
                    keys=keys,
                    audit=audit,
                    audit_keys=tuple(sealed),
                    anchor=anchor,
                    state=state,
                )
                successor._write_manifest_file(manifest, new_dir)
                header = {
                    k: v
                    for k, v in self._header.items()
                    if k not in ("wrapped_master", "mac", "checksum")
                }
                header["epoch"] = new_epoch
                header["manifest"] = MANIFEST_VERSION
                successor._header = successor._wrap_header(header, new_master, passphrase, params)
                atomic_write(self.path / HEADER_FILE, successor._header_bytes())  # commit
            except BaseException:
                new_master.wipe()
                raise
            finally:
                old_ring.wipe()
            old_dir, old_epoch = self.keys_dir, self.epoch
            self._adopt(successor, params)
            shutil.rmtree(old_dir, ignore_errors=True)
            if old_epoch == 1:
                _remove_root_side_files(self.path)
            fsync_dir(self.path)
            if manifest.anchor is not None and self._anchor is not None:
                self._advance_anchor(manifest.anchor.value)

    def _reencrypt(self, rec: KeyRecord, old: Keystore) -> KeyRecord:
        """``rec`` (sealed under ``old``'s master) sealed or MAC-ed under this one's."""
        if rec.kind == "reference":
            return self._mac_reference(rec)
        assert self._record_key is not None
        with old.secret(rec) as secret:
            nonce, sealed = self._record_key.seal(secret, canonical(rec.metadata(self.store_id)))
        return replace(rec, nonce=nonce, sealed=sealed)

    def _adopt(self, successor: Keystore, params: KdfParams) -> None:
        """Become ``successor`` (the rotated store), wiping the retired master key."""
        anchor = self._anchor
        self._anchor = None
        self.close()
        self._header = successor._header
        self._keys_str = f"{self.keys_dir}/"
        self._looked.clear()
        self._manifest_looked = None
        self.kdf = params
        self._master = successor._master
        self._record_key = successor._record_key
        self._mac_key = successor._mac_key
        self._manifest_key = successor._manifest_key
        self._manifest = None  # read back from the new epoch directory by refresh()
        self._manifest_stat = None
        self._anchor = anchor
        self.refresh()

    # --- side files (sealed master key blobs) ------------------------------------------

    def _side_path(self, name: str) -> Path:
        if not _SIDE_RE.match(name) or name in (HEADER_FILE, LOCK_FILE, MANIFEST_FILE):
            raise KeystoreError(f"invalid side file name {name!r}")
        if _ID_RE.match(name.removesuffix(".json")):
            raise KeystoreError(f"invalid side file name {name!r}")
        # Epoch 1 keeps them beside the header (as before manifests); later epochs in the
        # epoch's directory, so that a rotation switches them with the master key.
        return self.path / name if self.epoch == 1 else self.keys_dir / name

    def read_side_file(self, name: str) -> bytes | None:
        try:
            return self._side_path(name).read_bytes()
        except FileNotFoundError:
            return None

    def write_side_file(self, name: str, data: bytes) -> None:
        """Under the write lock: writers clean up temp files left by crashes, and must not
        take this write's temp file (not yet renamed) for one."""
        path = self._side_path(name)
        with file_lock(self.path / LOCK_FILE):
            atomic_write(path, data)

    def remove_side_file(self, name: str) -> bool:
        path = self._side_path(name)
        with file_lock(self.path / LOCK_FILE):
            return remove_durably(path)

    def side_file_path(self, name: str) -> Path:
        return self._side_path(name)

    # --- keystores written before manifests --------------------------------------------

    def _upgrade_legacy(self) -> None:
        """Give a store made before manifests its manifest (once, at the first unlock):
        the records that authenticate now become the live set, the old audit checkpoint
        becomes the chain's state, and the header starts naming the manifest, so from now
        on a missing manifest is an error."""
        master = self._require_master()
        with file_lock(self.path / LOCK_FILE):
            raw_header = _parse_header((self.path / HEADER_FILE).read_bytes(), self.path)
            if "manifest" in raw_header:  # another process upgraded it meanwhile
                self._header = raw_header
                self._manifest = self._read_manifest()
                self.refresh()
                return
            keys: dict[str, Entry] = {}
            labels: set[str] = set()
            for entry in sorted(os.scandir(self.keys_dir), key=lambda e: e.name):
                key_id = entry.name.removesuffix(".json")
                if not entry.name.endswith(".json") or not _ID_RE.match(key_id):
                    continue
                fs = self._read_record_file(key_id, entry.path, entry.stat().st_mtime_ns)
                if fs.record is None or fs.record.label in labels:
                    continue  # damaged, or a second record with the same label: not adopted
                labels.add(fs.record.label)
                keys[key_id] = Entry(fs.record.label, fs.record.kind, fs.digest)
            with aead.subkey(master, "anyhsm/v1/audit") as audit_key:
                state = _legacy_checkpoint(self.path / LEGACY_CHECKPOINT, audit_key)
                sealed = (self._seal_audit_key(audit_key, 1, 1),)
            manifest = Manifest(
                self.store_id, 1, generation=1, keys=keys, audit=state, audit_keys=sealed
            )
            self._write_manifest_file(manifest)
            header = {k: v for k, v in self._header.items() if k not in ("mac", "checksum")}
            header["epoch"] = 1
            header["manifest"] = MANIFEST_VERSION
            self._header = _seal_header(header, master)
            atomic_write(self.path / HEADER_FILE, self._header_bytes())
            remove_durably(self.path / LEGACY_CHECKPOINT)
            self.upgraded = True
        self.refresh()


def _records_dir_name(epoch: int) -> str:
    return KEYS_DIR if epoch == 1 else f"{KEYS_DIR}.{epoch}"


def _is_records_dir(name: str) -> bool:
    if name == KEYS_DIR:
        return True
    prefix, _, num = name.partition(".")
    return prefix == KEYS_DIR and num.isdigit()


def _remove_root_side_files(path: Path) -> None:
    """After leaving epoch 1: unlock blobs beside the header wrap the retired master key."""
    for entry in os.scandir(path):
        name = entry.name
        if entry.is_file() and name not in (HEADER_FILE, LOCK_FILE) and _SIDE_RE.match(name):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _parse_header(raw: bytes, hp: Path) -> dict[str, object]:
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
            f"{hp} was written by keystore format {version!r}; this anyhsm reads up to {VERSION}",
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
    return header


def _seal_header(header: dict[str, object], master: SecretBytes) -> dict[str, object]:
    """MAC (under the master key) and checksum a header."""
    header = {k: v for k, v in header.items() if k not in ("mac", "checksum")}
    with aead.subkey(master, "anyhsm/v1/header-mac") as mk:
        header["mac"] = hmac.digest(mk.buffer, canonical(header), "sha256").hex()
    header["checksum"] = hashlib.sha256(canonical(header)).hexdigest()
    return header


def _legacy_checkpoint(path: Path, key: SecretBytes) -> AuditState:
    """The audit state of a pre-manifest checkpoint file, when it authenticates."""
    try:
        d = json.loads(path.read_bytes())
        seq, mac = int(d["seq"]), bytes.fromhex(str(d["mac"]))
        check = bytes.fromhex(str(d["check"]))
    except (OSError, ValueError, KeyError, TypeError):
        return AuditState()
    want = hmac.digest(
        key.buffer, b"anyhsm-audit-checkpoint" + seq.to_bytes(8, "big") + mac, "sha256"
    )
    if not hmac.compare_digest(want, check) or not 0 <= seq <= MAX_SEQ or len(mac) != 32:
        return AuditState()
    return AuditState(1, seq, mac, None if seq else 0, GENESIS)
