"""The keystore manifest: the authenticated list of live records, the audit chain's
state, and a generation that only grows.

One file per master-key epoch (``<records dir>/MANIFEST``), MAC-ed under a key
derived from the master key and replaced atomically with every change. It is
what makes the store's *set* of records authentic, not just each record:

- a record that is not listed is never used (a deleted key's record restored
  from a backup is named as such through ``revoked``; one left by a write that
  was interrupted before it was acknowledged is dropped);
- a listed record whose file is gone, or whose bytes differ, is an error, never
  a silent fall-back to another record with the same label;
- labels are unique;
- the audit chain's state (``audit``) is bound to the same generation, so the
  log cannot be wiped, swapped or cut back without the manifest disagreeing;
- ``anchor`` names a monotonic counter outside the directory (a TPM NV counter)
  that holds the generation of the last significant change, so that even a
  rollback of the whole directory is detected where one is enrolled;
- ``policy`` binds the active spending policy (the SHA-256 of its file and a version
  that grows with each change) and ``state`` holds a random secret sealed under the
  master key, from which keys for state kept beside the keystore are derived (the
  spending policy's counters): both live under the same generation and anchor, and
  the state secret is sealed again by every rotation, so keys derived from it outlive
  master keys. A manifest holding either is format version 2 (older anyhsm refuses it
  instead of dropping them when it writes).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field, replace
from typing import Any

from anyhsm.audit import AuditState
from anyhsm.errors import KeystoreCorrupted, KeystoreTampered, UnsupportedFormatVersion
from anyhsm.secret import SecretBytes

FORMAT = "anyhsm-manifest"
VERSION = 2  # the newest read and written; 1 is still written while no v2 field is set
HEADER_VERSION = 1  # what a keystore header records (its presence marks a store with manifests)
FILE_NAME = "MANIFEST"
MAC_PURPOSE = "anyhsm/v1/manifest"


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Entry:
    """One live record: its label, kind, and the SHA-256 of its file's bytes."""

    label: str
    kind: str
    sha256: str


@dataclass(frozen=True)
class SealedAuditKey:
    """An audit MAC key, sealed under the master key, in force from entry ``from_seq``."""

    from_seq: int
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class AnchorRef:
    """Which external counter anchors the generation, and the value it should hold."""

    kind: str
    ref: str
    value: int


@dataclass(frozen=True)
class PolicyBinding:
    """The active spending policy as the keystore records it."""

    sha256: str  # of the policy file's bytes, hex
    version: int  # grows by one with every change (set or removal)


@dataclass(frozen=True)
class SealedSecret:
    """A secret sealed under the master key (AES-GCM, AAD from :func:`state_secret_aad`)."""

    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class Manifest:
    store_id: str
    epoch: int
    generation: int = 0
    keys: dict[str, Entry] = field(default_factory=dict)
    revoked: frozenset[str] = frozenset()
    audit: AuditState = field(default_factory=AuditState)
    audit_keys: tuple[SealedAuditKey, ...] = ()
    anchor: AnchorRef | None = None
    policy: PolicyBinding | None = None
    policy_version: int = 0  # of the last change, kept when the policy is removed
    state: SealedSecret | None = None

    def label_owner(self, label: str) -> str | None:
        for key_id, e in self.keys.items():
            if e.label == label:
                return key_id
        return None

    def next(self, **changes: Any) -> Manifest:
        """A copy with ``changes`` and the generation advanced by one."""
        return replace(self, generation=self.generation + 1, **changes)

    # --- bytes ---------------------------------------------------------------------------

    def body(self) -> dict[str, object]:
        v2 = self.policy is not None or self.policy_version > 0 or self.state is not None
        out: dict[str, object] = {
            "format": FORMAT,
            "version": 2 if v2 else 1,
            "store_id": self.store_id,
            "epoch": self.epoch,
            "generation": self.generation,
            "keys": {
                k: {"label": e.label, "kind": e.kind, "sha256": e.sha256}
                for k, e in sorted(self.keys.items())
            },
            "revoked": sorted(self.revoked),
            "audit": self.audit.to_dict()
            | {
                "keys": [
                    {
                        "from": k.from_seq,
                        "nonce": base64.b64encode(k.nonce).decode(),
                        "ciphertext": base64.b64encode(k.ciphertext).decode(),
                    }
                    for k in self.audit_keys
                ]
            },
            "anchor": None
            if self.anchor is None
            else {"kind": self.anchor.kind, "ref": self.anchor.ref, "value": self.anchor.value},
        }
        if v2:
            out["policy"] = {
                "sha256": None if self.policy is None else self.policy.sha256,
                "version": self.policy_version,
            }
            out["state"] = (
                None
                if self.state is None
                else {
                    "nonce": base64.b64encode(self.state.nonce).decode(),
                    "ciphertext": base64.b64encode(self.state.ciphertext).decode(),
                }
            )
        return out

    def to_bytes(self, mac_key: SecretBytes) -> bytes:
        body = self.body()
        body["mac"] = hmac.digest(mac_key.buffer, _canonical(body), "sha256").hex()
        return json.dumps(body, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes, mac_key: SecretBytes, where: str) -> Manifest:
        """Parse and authenticate; KeystoreCorrupted / KeystoreTampered otherwise."""
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise KeystoreCorrupted(f"{where} is not valid JSON (truncated or damaged)") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise KeystoreCorrupted(f"{where} is not an anyhsm keystore manifest")
        version = d.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise UnsupportedFormatVersion(
                f"{where} has manifest format {version!r}; this anyhsm reads up to {VERSION}",
                hint="upgrade anyhsm; nothing was changed",
            )
        mac = str(d.pop("mac", ""))
        want = hmac.digest(mac_key.buffer, _canonical(d), "sha256").hex()
        if not hmac.compare_digest(want.encode(), mac.encode("utf-8", "replace")):
            raise KeystoreTampered(
                f"{where} fails authentication (edited, or from another keystore)",
                hint="restore the keystore directory from backup",
            )
        try:
            keys = {
                str(k): Entry(str(v["label"]), str(v["kind"]), str(v["sha256"]))
                for k, v in d["keys"].items()
            }
            audit = d["audit"]
            sealed = tuple(
                SealedAuditKey(
                    int(k["from"]),
                    base64.b64decode(k["nonce"], validate=True),
                    base64.b64decode(k["ciphertext"], validate=True),
                )
                for k in audit["keys"]
            )
            a = d["anchor"]
            anchor = (
                None if a is None else AnchorRef(str(a["kind"]), str(a["ref"]), int(a["value"]))
            )
            generation, epoch = d["generation"], d["epoch"]
            if type(generation) is not int or type(epoch) is not int:
                raise ValueError("generation and epoch are integers")
            policy, policy_version, state = _v2_fields(d) if version >= 2 else (None, 0, None)
            return cls(
                store_id=str(d["store_id"]),
                epoch=epoch,
                generation=generation,
                keys=keys,
                revoked=frozenset(str(x) for x in d["revoked"]),
                audit=AuditState.from_dict(audit),
                audit_keys=sealed,
                anchor=anchor,
                policy=policy,
                policy_version=policy_version,
                state=state,
            )
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as e:
            raise KeystoreCorrupted(f"{where} is missing or has a bad field ({e})") from None


def _v2_fields(d: dict[str, Any]) -> tuple[PolicyBinding | None, int, SealedSecret | None]:
    p = d["policy"]
    version = p["version"]
    if type(version) is not int or version < 0:
        raise ValueError("policy version is a non-negative integer")
    sha = p["sha256"]
    if sha is not None and (not isinstance(sha, str) or len(bytes.fromhex(sha)) != 32):
        raise ValueError("policy sha256 is 32 bytes of hex")
    policy = None if sha is None else PolicyBinding(sha, version)
    st = d["state"]
    state = (
        None
        if st is None
        else SealedSecret(
            base64.b64decode(st["nonce"], validate=True),
            base64.b64decode(st["ciphertext"], validate=True),
        )
    )
    return policy, version, state


def state_secret_aad(store_id: str) -> bytes:
    """What the state secret's seal binds: its purpose and the store."""
    return _canonical({"purpose": "anyhsm/v1/state-secret", "store_id": store_id})


def file_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def audit_key_aad(store_id: str, chain: int, from_seq: int) -> bytes:
    return _canonical(
        {"purpose": "anyhsm/v1/audit-key", "store_id": store_id, "chain": chain, "from": from_seq}
    )
