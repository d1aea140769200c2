"""Fuzz the on-disk formats: keystore header, key records, the keystore manifest, audit log.

Each example copies a real deployment (made once per module: keys created and
signed with through open_hsm, handle closed so the audit state the manifest
records covers the whole log), mutates one file — raw byte edits, or JSON-aware edits that keep the
file parseable (for the header optionally with its plain checksum recomputed,
so the edit reaches the authenticated layers; for the manifest optionally with its
MAC recomputed under the real key, so the edit reaches the parser behind the MAC)
— and then loads, unlocks, signs or verifies. Properties:

- only anyhsm errors (HsmError subclasses) come out; the audit verifier
  returns ok=False and never raises;
- nothing reading the files changes them (every byte of every file compared);
- whatever still opens is exactly what was written (same store, same records,
  same audit entries; for the manifest: the same set of live keys and the same
  audit state); a damaged record never yields a signature from other key
  material, and never stops the other keys from signing.

The crashers this suite found keep their own targeted tests at the end: as
regression tests once fixed in the library, as strict xfails until then (and
the fuzz tests skipped exactly those inputs meanwhile; none is skipped now).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import PASSPHRASE

from anyhsm import open_hsm
from anyhsm.audit import MAX_SEQ, AuditKeyRing, AuditState, VerifyResult, verify_log
from anyhsm.config import Config
from anyhsm.crypto import secp256k1 as curve
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.errors import (
    AllProvidersFailed,
    AuditError,
    AuditTampered,
    HsmError,
    KeystoreCorrupted,
    KeystoreRolledBack,
    KeystoreTampered,
    ManifestMissing,
)
from anyhsm.factory import provider_context
from anyhsm.keystore import KeyRecord, Keystore
from anyhsm.keystore.manifest import MAC_PURPOSE as MANIFEST_MAC_PURPOSE
from anyhsm.keystore.store import canonical
from anyhsm.providers.software import SoftwareProvider
from anyhsm.secret import SecretBytes
from anyhsm.types import KeyType, SigScheme

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
DIGEST = hashlib.sha256(b"anyhsm fuzz").digest()
MANIFEST = "keystore/keys/MANIFEST"


# --- the base deployment -------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    root: Path  # parent of per-example copies
    dep: Path  # the pristine deployment directory
    files: dict[str, bytes]  # relative path -> bytes
    store_id: str
    keys: dict[str, tuple[str, bytes]]  # id -> (label, public key)
    records: dict[str, KeyRecord]  # id -> record as written
    audit_lines: list[dict[str, object]]
    live: dict[str, tuple[str, str, bytes]]  # every live record: id -> (label, kind, pub)
    audit_state: AuditState  # what the manifest records about the chain


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    root = tmp_path_factory.mktemp("fuzz")
    cfg = init_deployment(root / "base", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    with open_hsm(cfg, passphrase=PASSPHRASE) as hsm:
        hsm.generate_key("alpha")
        hsm.generate_key("beta", exportable=True)
        hsm.generate_key("hd", KeyType.BIP32)
        for label in ("alpha", "beta", "hd"):
            hsm.sign(label, DIGEST)
            hsm.sign(label, DIGEST, SigScheme.SCHNORR)
    dep = cfg.parent
    ks = Keystore.load(dep / "keystore")
    ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
    all_recs = ks.records()
    recs = {r.id: r for r in all_recs if r.kind == "sealed"}
    live = {r.id: (r.label, r.kind, r.public_key) for r in all_recs}
    store_id = ks.store_id
    state = ks.load_audit_state()
    ks.close()
    assert state.seq == len((dep / "audit.log").read_bytes().splitlines()) > 0
    lines = [json.loads(x) for x in (dep / "audit.log").read_bytes().splitlines()]
    return Base(
        root=root,
        dep=dep,
        files=snapshot(dep),
        store_id=store_id,
        keys={i: (r.label, r.public_key) for i, r in recs.items()},
        records=recs,
        audit_lines=lines,
        live=live,
        audit_state=state,
    )


@pytest.fixture
def copy_of(base: Base) -> Callable[[], Iterator[Path]]:
    """A fresh copy of the base deployment per hypothesis example."""

    def make() -> Iterator[Path]:
        with tempfile.TemporaryDirectory(dir=base.root) as d:
            dep = Path(d) / "dep"
            shutil.copytree(base.dep, dep)
            yield dep

    return make


def user_keys(base: Base) -> list[tuple[str, str, bytes]]:
    return [
        (i, label, pub) for i, (label, pub) in base.keys.items() if not label.startswith("anyhsm:")
    ]


# --- mutations -----------------------------------------------------------------------------

TOKENS = [b'"', b"{", b"}", b"[", b"]", b",", b":", b"0", b"-1", b"null", b"true", b"1e9",
          b"\\u0000", b"\\", b" ", b"\n", b"\x00", b"\xff", b"\xc3\xa9"]  # fmt: skip


@st.composite
def byte_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """1-4 raw edits: flip, overwrite, delete, insert, truncate, duplicate."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        n = len(out)
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate", "dup"]))
        pos = draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            out[pos] ^= draw(st.integers(1, 255))
        elif op == "set" and n:
            out[pos] = draw(st.integers(0, 255))
        elif op == "delete" and n:
            del out[pos : pos + draw(st.integers(1, 16))]
        elif op == "insert":
            ins = draw(st.one_of(st.sampled_from(TOKENS), st.binary(min_size=1, max_size=8)))
            out[pos:pos] = ins
        elif op == "truncate":
            del out[pos:]
        elif op == "dup" and n:
            chunk = bytes(out[pos : pos + draw(st.integers(1, 64))])
            out[pos:pos] = chunk
    return bytes(out)


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["", "00", "AA==", "sealed", "reference", "secp256k1", "bip32", "x" * 300]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)
Path_ = tuple[str | int, ...]


def _paths(obj: object, prefix: Path_ = ()) -> Iterator[Path_]:
    if prefix:
        yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _get(obj: object, path: Path_) -> object:
    for p in path:
        obj = obj[p]  # type: ignore[index]
    return obj


def _edit_string(draw: st.DrawFn, s: str) -> str:
    """A near miss: one character changed, added or removed."""
    alphabet = "0123456789abcdefABCDEF+/=-:T. "
    if not s:
        return draw(st.sampled_from(alphabet))
    i = draw(st.integers(0, len(s) - 1))
    how = draw(st.sampled_from(["replace", "insert", "delete"]))
    c = draw(st.sampled_from(alphabet))
    if how == "replace":
        return s[:i] + c + s[i + 1 :]
    if how == "insert":
        return s[:i] + c + s[i:]
    return s[:i] + s[i + 1 :]


@st.composite
def json_mutation(
    draw: st.DrawFn, data: bytes, *, avoid: tuple[str, ...] = (), indent: int | None = 1
) -> tuple[bytes, Path_]:
    """One JSON-aware edit (replace, near-miss, delete, add a key); returns (bytes, path)."""
    doc = json.loads(data)
    paths = [p for p in _paths(doc) if not (p and p[0] in avoid)]
    path = draw(st.sampled_from(paths))
    parent = _get(doc, path[:-1])
    last = path[-1]
    old = _get(doc, path)
    op = draw(st.sampled_from(["replace", "near", "delete", "add"]))
    if op == "near" and isinstance(old, str):
        parent[last] = _edit_string(draw, old)  # type: ignore[index]
    elif op == "near" and isinstance(old, bool):
        parent[last] = not old  # type: ignore[index]
    elif op == "near" and isinstance(old, int):
        parent[last] = old + draw(st.sampled_from([-1, 1, 2**32, -(2**63)]))  # type: ignore[index]
    elif op == "delete":
        del parent[last]  # type: ignore[attr-defined]
    elif op == "add" and isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=8))] = draw(JSON_VALUES)
    else:
        parent[last] = draw(JSON_VALUES)  # type: ignore[index]
    text = json.dumps(doc, indent=indent, sort_keys=draw(st.booleans()))
    return text.encode() + b"\n", path


def with_checksum(data: bytes) -> bytes:
    """Recompute the header's plain (unkeyed) checksum, as any editor could."""
    doc = json.loads(data)
    if not isinstance(doc, dict):
        return data
    body = {k: v for k, v in doc.items() if k != "checksum"}
    doc["checksum"] = hashlib.sha256(canonical(body)).hexdigest()
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


# --- what "using" the files means -----------------------------------------------------------


def use_software_provider(dep: Path, base: Base) -> tuple[bool, set[str]]:
    """Open, list, health-check and sign with every key through the software provider.

    Returns (opened, ids of keys that signed). Every signature must verify under
    the public key recorded in the *base* store for that id.
    """
    ctx = provider_context(
        Config.load(dep / "anyhsm.toml", env={}), "software", SecretBytes(PASSPHRASE.encode())
    )
    prov = SoftwareProvider(ctx)
    try:
        prov.open()
    except HsmError:
        return False, set()
    signed: set[str] = set()
    try:
        listed = {k.id: (k.label, k.public_key) for k in prov.list_keys()}
        for key_id, value in listed.items():
            assert base.keys.get(key_id) == value, "a listed key differs from the one stored"
        prov.health()
        for key_id, label, pub in user_keys(base):
            for ref in (key_id, label):
                for scheme in (SigScheme.ECDSA, SigScheme.SCHNORR):
                    try:
                        sig = prov.sign_digest(ref, DIGEST, scheme)
                    except HsmError:
                        continue
                    if scheme is SigScheme.ECDSA:
                        assert curve.ecdsa_verify(pub, DIGEST, sig), "signature from other key"
                    else:
                        assert curve.schnorr_verify(curve.xonly(pub), DIGEST, sig)
                    signed.add(key_id)
    finally:
        prov.close()
    return True, signed


def meaning(line: bytes) -> dict[str, object]:
    """An audit entry as data: its MAC as bytes (the hex text may vary in case or
    whitespace, which bytes.fromhex ignores, without changing what is authenticated)."""
    entry = json.loads(line)
    assert isinstance(entry, dict)
    entry["mac"] = bytes.fromhex(str(entry["mac"]))
    return entry


def audit_of(dep: Path) -> tuple[AuditKeyRing, AuditState]:
    """The chain's key ring and recorded state, from the (intact) manifest; wipe the ring."""
    ks = Keystore.load(dep / "keystore")
    try:
        ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
        return ks.audit_keys(), ks.load_audit_state()
    finally:
        ks.close()


def verify_with(dep: Path, log: Path | None = None) -> VerifyResult:
    """verify_log over ``log`` (default: the deployment's) against the manifest's state."""
    ring, state = audit_of(dep)
    with ring:
        return verify_log(log or dep / "audit.log", ring, state)


def manifest_key_of(dep: Path) -> SecretBytes:
    """The manifest's MAC key (derived from the master key): what a test needs to make an
    edit that reaches the parser behind the MAC. The caller wipes it."""
    ks = Keystore.load(dep / "keystore")
    try:
        ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
        return ks.subkey(MANIFEST_MAC_PURPOSE)
    finally:
        ks.close()


def remac(raw: bytes, key: SecretBytes) -> bytes:
    """``raw`` (a manifest's text, possibly edited) with its "mac" replaced by the MAC the
    keystore computes over the parsed body; the text is otherwise kept byte for byte."""
    doc = json.loads(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("mac"), str):
        return raw
    old = doc.pop("mac")
    new = hmac.digest(key.buffer, canonical(doc), "sha256").hex()
    return raw.replace(old.encode(), new.encode()) if old else raw


# --- keystore header -------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_fuzz_keystore_header(
    base: Base, copy_of: Callable[[], Iterator[Path]], data: st.DataObject
) -> None:
    original = base.files["keystore/keystore.json"]
    kind = data.draw(st.sampled_from(["bytes", "json", "json+checksum"]), label="kind")
    if kind == "bytes":
        mutated = data.draw(byte_mutation(original), label="mutated")
    else:
        # KDF parameters with a valid checksum are covered by the targeted tests below.
        mutated, _ = data.draw(json_mutation(original, avoid=("kdf",)), label="edit")
        if kind == "json+checksum":
            mutated = with_checksum(mutated)
    for dep in copy_of():
        (dep / "keystore" / "keystore.json").write_bytes(mutated)
        before = snapshot(dep)
        opened, signed = use_software_provider(dep, base)
        assert snapshot(dep) == before, "reading the keystore changed a file"
        if opened:  # only an edit that changes nothing may open
            assert json.loads(mutated) == json.loads(original)
            assert signed == {i for i, _, _ in user_keys(base)}


# --- key records -------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_fuzz_key_record(
    base: Base, copy_of: Callable[[], Iterator[Path]], data: st.DataObject
) -> None:
    key_id, _, _ = data.draw(st.sampled_from(user_keys(base)), label="key")
    name = f"keystore/keys/{key_id}.json"
    original = base.files[name]
    if data.draw(st.booleans(), label="raw"):
        mutated = data.draw(byte_mutation(original), label="mutated")
    else:
        mutated, _ = data.draw(json_mutation(original), label="edit")
    for dep in copy_of():
        (dep / name).write_bytes(mutated)
        before = snapshot(dep)
        opened, signed = use_software_provider(dep, base)
        assert snapshot(dep) == before, "reading the keystore changed a file"
        assert opened, "a damaged record must not stop the keystore from opening"
        others = {i for i, _, _ in user_keys(base)} - {key_id}
        assert others <= signed, "a damaged record stopped other keys from signing"
        ks = Keystore.load(dep / "keystore")
        ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
        try:
            loaded = {r.id: r for r in ks.records()}
            if key_id in loaded:  # it authenticated: it must be exactly what was written
                assert loaded[key_id] == base.records[key_id]
                assert key_id not in ks.problems
            else:
                assert isinstance(ks.problems.get(key_id), HsmError)
                assert key_id not in signed
        finally:
            ks.close()


def test_swapped_records_are_refused(base: Base, copy_of: Callable[[], Iterator[Path]]) -> None:
    """Two records exchanged under each other's file names: neither signs."""
    (a, _, _), (b, _, _) = user_keys(base)[:2]
    for dep in copy_of():
        pa, pb = dep / f"keystore/keys/{a}.json", dep / f"keystore/keys/{b}.json"
        ra, rb = pa.read_bytes(), pb.read_bytes()
        pa.write_bytes(rb)
        pb.write_bytes(ra)
        opened, signed = use_software_provider(dep, base)
        assert opened
        assert a not in signed and b not in signed


def test_record_with_ciphertext_of_another_key_is_refused(
    base: Base, copy_of: Callable[[], Iterator[Path]]
) -> None:
    """Metadata of key A with nonce+ciphertext of key B: AAD binding refuses it."""
    (a, _, _), (b, _, _) = user_keys(base)[:2]
    for dep in copy_of():
        pa = dep / f"keystore/keys/{a}.json"
        doc_a = json.loads(pa.read_bytes())
        doc_b = json.loads((dep / f"keystore/keys/{b}.json").read_bytes())
        doc_a["nonce"], doc_a["ciphertext"] = doc_b["nonce"], doc_b["ciphertext"]
        pa.write_text(json.dumps(doc_a))
        opened, signed = use_software_provider(dep, base)
        assert opened
        assert a not in signed and b in signed


# --- audit log and checkpoint ------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_fuzz_audit_log(
    base: Base, copy_of: Callable[[], Iterator[Path]], data: st.DataObject
) -> None:
    original = base.files["audit.log"]
    lines = original.split(b"\n")[:-1]
    kind = data.draw(st.sampled_from(["bytes", "line-bytes", "line-json", "lines"]), label="kind")
    if kind == "bytes":
        mutated = data.draw(byte_mutation(original), label="mutated")
    elif kind == "lines":  # delete, duplicate, swap or drop the tail of whole lines
        i = data.draw(st.integers(0, len(lines) - 1), label="i")
        j = data.draw(st.integers(0, len(lines) - 1), label="j")
        op = data.draw(st.sampled_from(["delete", "dup", "swap", "tail"]), label="op")
        new = list(lines)
        if op == "delete":
            del new[i]
        elif op == "dup":
            new.insert(j, new[i])
        elif op == "swap":
            new[i], new[j] = new[j], new[i]
        else:
            new = new[:i]
        mutated = b"".join(x + b"\n" for x in new)
    else:
        i = data.draw(st.integers(0, len(lines) - 1), label="line")
        if kind == "line-bytes":
            line = data.draw(byte_mutation(lines[i]), label="line-mutated")
        else:
            line, _ = data.draw(json_mutation(lines[i], indent=None), label="edit")
            line = line.rstrip(b"\n")
        mutated = b"\n".join([*lines[:i], line, *lines[i + 1 :]]) + b"\n"
    for dep in copy_of():
        log = dep / "audit.log"
        log.write_bytes(mutated)
        ring, state = audit_of(dep)
        before = snapshot(dep)
        with ring:
            result = verify_log(log, ring, state)  # must not raise
        assert snapshot(dep) == before, "verifying changed a file"
        if result.ok:  # only an edit that changes no entry may verify
            assert [meaning(x) for x in mutated.splitlines()] == [
                meaning(x) for x in original.splitlines()
            ]
        else:
            assert result.reason


def read_only_use(
    dep: Path, *, through_hsm: bool = True
) -> tuple[dict[str, tuple[str, str, bytes]], AuditState] | None:
    """Everything that reads a store without writing to it: unlock, list, the audit state
    and keys, verify_log; a verify-only open_hsm (which would create the health-probe key
    of a store that has none, so not for manifests forged with the key). Returns (live
    records, audit state) when all of it opened, None when the store refused with an
    anyhsm error (anything else escapes and fails the test)."""
    try:
        ks = Keystore.load(dep / "keystore")
        ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
        try:
            live = {r.id: (r.label, r.kind, r.public_key) for r in ks.records()}
            ks.refresh()
            state = ks.load_audit_state()
            with ks.audit_keys() as ring:
                verify_log(dep / "audit.log", ring, state)
        finally:
            ks.close()
        if through_hsm:
            with open_hsm(dep / "anyhsm.toml", passphrase=PASSPHRASE, verify_only=True) as h:
                h.verify_audit()
    except HsmError:
        return None
    return live, state


@FUZZ
@given(data=st.data())
def test_fuzz_manifest(
    base: Base, copy_of: Callable[[], Iterator[Path]], data: st.DataObject
) -> None:
    """The MANIFEST (live records, revoked ids, audit state and sealed audit keys,
    generation, anchor) edited: open, refresh and verify only ever raise anyhsm errors and
    change no file; an edit the MAC does not catch must change nothing (the same live keys,
    the same audit state); an edit made with the MAC key (reaching the parser) still only
    gives anyhsm errors."""
    original = base.files[MANIFEST]
    kind = data.draw(st.sampled_from(["bytes", "json", "json+mac"]), label="kind")
    if kind == "bytes":
        mutated = data.draw(byte_mutation(original), label="mutated")
    else:
        mutated, _ = data.draw(json_mutation(original, avoid=("mac",)), label="edit")
    for dep in copy_of():
        if kind == "json+mac":
            with manifest_key_of(dep) as key:
                mutated = remac(mutated, key)
        (dep / MANIFEST).write_bytes(mutated)
        before = snapshot(dep)
        opened, signed = use_software_provider(dep, base)
        seen = read_only_use(dep, through_hsm=kind != "json+mac")
        assert snapshot(dep) == before, "reading the keystore changed a file"
        if kind == "json+mac":
            continue  # made with the key: robustness only (anyhsm errors, no file changed)
        assert (seen is not None) == opened
        if seen is not None:  # the MAC let it through: it must mean the same
            live, state = seen
            assert live == base.live, "an edited manifest opened with another set of keys"
            assert state == base.audit_state, "an edited manifest moved the audit state"
            assert signed == {i for i, _, _ in user_keys(base)}
        # A writing open either refuses or sees exactly the original store and chain.
        try:
            hsm = open_hsm(dep / "anyhsm.toml", passphrase=PASSPHRASE)
        except HsmError:
            assert seen is None
            continue
        with hsm:
            assert seen is not None, "open_hsm accepted a manifest the keystore refused"
            listed = {k.id: (k.label, k.public_key) for k in hsm.list_keys()}
            assert listed == {
                i: (label, pub)
                for i, (label, _, pub) in base.live.items()
                if not label.startswith("anyhsm:")  # internal keys are not listed
            }
            assert hsm.verify_audit().ok


def test_deleted_manifest_is_refused_and_nothing_changes(
    base: Base, copy_of: Callable[[], Iterator[Path]]
) -> None:
    """Without the manifest the live set cannot be authenticated: every way in refuses
    with ManifestMissing (the software provider with an anyhsm error), nothing is
    rewritten, and no new chain is started over the existing log."""
    for dep in copy_of():
        (dep / MANIFEST).unlink()
        before = snapshot(dep)
        ks = Keystore.load(dep / "keystore")
        with pytest.raises(ManifestMissing):
            ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
        ks.close()
        for verify_only in (True, False):
            with pytest.raises(ManifestMissing):
                open_hsm(dep / "anyhsm.toml", passphrase=PASSPHRASE, verify_only=verify_only)
        assert use_software_provider(dep, base) == (False, set())
        assert snapshot(dep) == before


def test_replayed_manifest(base: Base, copy_of: Callable[[], Iterator[Path]]) -> None:
    """An older MANIFEST put back (from a backup) after a key was deleted and another one
    created: the tombstone and the newer record beside it give the replay away
    (KeystoreRolledBack), with the log cut back to the old manifest's point or not.
    Put back over a period in which only signing happened, it opens, but the log still
    verifies in full against it (the replay hides no entry)."""
    old_manifest = base.files[MANIFEST]
    old_log = base.files["audit.log"]
    for dep in copy_of():
        cfg = dep / "anyhsm.toml"
        with open_hsm(cfg, passphrase=PASSPHRASE) as hsm:
            for _ in range(3):
                hsm.sign("alpha", DIGEST)
        entries = len((dep / "audit.log").read_bytes().splitlines())
        (dep / MANIFEST).write_bytes(old_manifest)
        with open_hsm(cfg, passphrase=PASSPHRASE) as hsm:
            result = hsm.verify_audit()
            assert result.ok, result.reason
            assert result.entries == entries + 1  # + this open
            hsm.sign("alpha", DIGEST)
        with open_hsm(cfg, passphrase=PASSPHRASE) as hsm:
            hsm.delete_key("beta")
            for n in range(3):
                hsm.generate_key(f"later-{n}")
        for cut in (False, True):
            (dep / MANIFEST).write_bytes(old_manifest)
            if cut:
                (dep / "audit.log").write_bytes(old_log)
            before = snapshot(dep)
            ks = Keystore.load(dep / "keystore")
            with pytest.raises(KeystoreRolledBack):
                ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
            ks.close()
            with pytest.raises(KeystoreRolledBack):
                open_hsm(cfg, passphrase=PASSPHRASE)
            assert use_software_provider(dep, base) == (False, set())
            assert snapshot(dep) == before


def test_manifest_of_another_store_is_refused(
    base: Base, copy_of: Callable[[], Iterator[Path]], tmp_path: Path
) -> None:
    """A MANIFEST copied from another keystore (same passphrase) fails authentication."""
    other = init_deployment(tmp_path / "other", SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF)
    foreign = (other.parent / MANIFEST).read_bytes()
    for dep in copy_of():
        (dep / MANIFEST).write_bytes(foreign)
        with pytest.raises(KeystoreTampered):
            Keystore.load(dep / "keystore").unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_audit_tail_when_opening(
    base: Base, copy_of: Callable[[], Iterator[Path]], data: st.DataObject
) -> None:
    """A damaged last entry: open_hsm (which chains onto the tail) refuses with an anyhsm
    error and leaves every file as it was."""
    original = base.files["audit.log"]
    lines = original.split(b"\n")[:-1]
    line, _ = data.draw(json_mutation(lines[-1], indent=None), label="edit")
    mutated = b"\n".join([*lines[:-1], line.rstrip(b"\n")]) + b"\n"
    for dep in copy_of():
        (dep / "audit.log").write_bytes(mutated)
        before = snapshot(dep)
        try:
            hsm = open_hsm(dep / "anyhsm.toml", passphrase=PASSPHRASE)
        except HsmError:
            assert snapshot(dep) == before
            continue
        try:  # it opened: the tail still parsed; the chain must then flag the edit
            result = hsm.verify_audit()
            if meaning(line) != meaning(lines[-1]):
                assert not result.ok
        finally:
            hsm.close()


# --- targeted cases -----------------------------------------------------------------------------


def _header_with(base: Base, **kdf: object) -> bytes:
    doc = json.loads(base.files["keystore/keystore.json"])
    doc["kdf"].update(kdf)
    return with_checksum(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "kdf",
    [
        {"salt": ""},
        {"salt": base64.b64encode(b"1234").decode()},
        {"memory_kib": 1},
        {"lanes": 1000},
        {"name": "scrypt", "n": 3, "r": 8, "p": 1},
    ],
    ids=["empty-salt", "short-salt", "memory-1", "lanes-1000", "scrypt-n-3"],
)
def test_header_with_invalid_kdf_parameters(
    base: Base, copy_of: Callable[[], Iterator[Path]], kdf: dict[str, object]
) -> None:
    """Regression test for a bug this suite found (fixed in 6d88009).

    Before the fix: KDF parameters come from the header before anything authenticates it
    (its checksum is unkeyed); values cryptography refuses (salt < 8 bytes, memory_kib <
    8 * lanes, scrypt n not a power of two) escaped unlock_with_passphrase as a bare
    ValueError instead of KeystoreCorrupted, and nothing bounded the memory asked for.
    """
    for dep in copy_of():
        (dep / "keystore" / "keystore.json").write_bytes(_header_with(base, **kdf))
        with pytest.raises(HsmError):
            ks = Keystore.load(dep / "keystore")
            ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))


def test_header_with_huge_kdf_cost_is_refused_before_deriving(
    base: Base, copy_of: Callable[[], Iterator[Path]]
) -> None:
    """An edited header (checksum recomputed) asking for 1 TiB of memory or 2^40
    passes must be refused as corrupted, not run."""
    for kdf in ({"memory_kib": 2**30}, {"iterations": 2**40}, {"lanes": 2**20}):
        for dep in copy_of():
            (dep / "keystore" / "keystore.json").write_bytes(_header_with(base, **kdf))
            with pytest.raises(HsmError):
                ks = Keystore.load(dep / "keystore")
                ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))


def test_header_with_weaker_kdf_and_valid_checksum_is_tampered(
    base: Base, copy_of: Callable[[], Iterator[Path]]
) -> None:
    """A well-formed but edited KDF block: the passphrase no longer opens the store."""
    for dep in copy_of():
        (dep / "keystore" / "keystore.json").write_bytes(_header_with(base, iterations=2))
        ks = Keystore.load(dep / "keystore")
        with pytest.raises(HsmError):
            ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))


@pytest.mark.parametrize("field", ["checksum", "mac"])
def test_non_ascii_header_digest(
    base: Base, copy_of: Callable[[], Iterator[Path]], field: str
) -> None:
    """Regression test for a bug this suite found (fixed in 6d88009).

    Before the fix: Keystore.load and Keystore._check_header_mac pass header strings to
    hmac.compare_digest, which raises TypeError for non-ASCII str: one damaged character in
    the checksum or mac crashes loading instead of giving
    KeystoreCorrupted/KeystoreTampered.
    """
    doc = json.loads(base.files["keystore/keystore.json"])
    doc[field] = "\u00e9" + doc[field][1:]
    raw = json.dumps(doc).encode()
    if field == "mac":
        raw = with_checksum(raw)  # reach the MAC check behind the checksum
    for dep in copy_of():
        (dep / "keystore" / "keystore.json").write_bytes(raw)
        with pytest.raises(HsmError):
            ks = Keystore.load(dep / "keystore")
            ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))


DEEP = b"[" * 100_000


@pytest.mark.parametrize("target", ["header", "record", "audit-line", "audit-tail"])
def test_deeply_nested_json(base: Base, copy_of: Callable[[], Iterator[Path]], target: str) -> None:
    """Regression test for a bug this suite found (fixed in 6d88009).

    Before the fix: json.loads of deeply nested input raises RecursionError, which Keystore.load,
    KeyRecord.from_json (via Keystore.refresh), verify_log and read_tail do not catch: a
    damaged file crashes the reader instead of giving KeystoreCorrupted / AuditTampered /
    ok=False, and one such record makes every records() call fail.
    """
    for dep in copy_of():
        if target == "header":
            (dep / "keystore" / "keystore.json").write_bytes(DEEP)
            with pytest.raises(KeystoreCorrupted):
                Keystore.load(dep / "keystore")
        elif target == "record":
            key_id = user_keys(base)[0][0]
            (dep / "keystore" / "keys" / f"{key_id}.json").write_bytes(DEEP)
            opened, signed = use_software_provider(dep, base)
            assert opened and key_id not in signed and len(signed) == len(user_keys(base)) - 1
        elif target == "audit-line":
            log = dep / "audit.log"
            log.write_bytes(DEEP + b"\n" + log.read_bytes())
            result = verify_with(dep, log)
            assert not result.ok and result.first_bad_line == 1
        else:
            log = dep / "audit.log"
            log.write_bytes(log.read_bytes() + DEEP[:60_000] + b"\n")
            with pytest.raises(AuditTampered):
                open_hsm(dep / "anyhsm.toml", passphrase=PASSPHRASE)


def edit_manifest_seq(dep: Path, literal: bytes, *, with_mac: bool) -> None:
    """Set the audit sequence number in the manifest's text to ``literal`` (optionally with
    the MAC recomputed under the real key, so the value reaches the parser)."""
    mp = dep / MANIFEST
    raw, n = re.subn(rb'"seq": \d+', b'"seq": ' + literal, mp.read_bytes(), count=1)
    assert n == 1
    if with_mac:
        with manifest_key_of(dep) as key:
            raw = remac(raw, key)
    mp.write_bytes(raw)


def refuses_to_open(dep: Path, error: type[HsmError]) -> None:
    """Unlocking refuses with ``error``, a verify-only and a writing open_hsm with it (or,
    for a damaged store, with the chain's AllProvidersFailed); no file is changed."""
    before = snapshot(dep)
    ks = Keystore.load(dep / "keystore")
    with pytest.raises(error):
        ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
    ks.close()
    for verify_only in (True, False):
        with pytest.raises((error, AllProvidersFailed)):
            open_hsm(dep / "anyhsm.toml", passphrase=PASSPHRASE, verify_only=verify_only)
    assert snapshot(dep) == before


def forge_last_line(log: Path, edit: Callable[[bytes], bytes], *, append: bool) -> None:
    """Edit the last entry of ``log`` in place, or append an edited copy of it."""
    raw = log.read_bytes()
    head, _, last = raw[:-1].rpartition(b"\n")
    new = edit(last)
    log.write_bytes(raw + new + b"\n" if append else head + b"\n" + new + b"\n")


@pytest.mark.parametrize(
    "target", ["manifest", "manifest+mac", "audit-tail", "audit-beyond-recorded"]
)
def test_infinite_sequence_number(
    base: Base, copy_of: Callable[[], Iterator[Path]], target: str
) -> None:
    """Regression test for a bug this suite found (fixed in 6d88009), carried over to the
    manifest.

    Before the fix: parse_checkpoint and read_tail called int() on a JSON number without
    catching OverflowError: a checkpoint or last audit entry with seq 1e999 (infinity) made
    verify_log / open_hsm raise OverflowError instead of reporting tampering. The chain's
    state now lives in the manifest: seq 1e999 there (with or without a valid MAC), on the
    recorded last entry, or on a forged entry after it, is refused with an anyhsm error.
    """

    def inf(line: bytes) -> bytes:
        return line.replace(b'"seq":', b'"seq":1e999,"x":')

    for dep in copy_of():
        if target.startswith("manifest"):
            with_mac = target == "manifest+mac"
            edit_manifest_seq(dep, b"1e999", with_mac=with_mac)
            refuses_to_open(dep, KeystoreCorrupted if with_mac else KeystoreTampered)
            assert use_software_provider(dep, base) == (False, set())
            continue
        log = dep / "audit.log"
        forge_last_line(log, inf, append=target == "audit-beyond-recorded")
        result = verify_with(dep)
        assert not result.ok and result.first_bad_line == len(log.read_bytes().splitlines())
        before = snapshot(dep)
        with pytest.raises(AuditTampered if target == "audit-beyond-recorded" else AuditError):
            open_hsm(dep / "anyhsm.toml", passphrase=PASSPHRASE)
        assert snapshot(dep) == before


SEQ_2_64 = 2**64


@pytest.mark.parametrize(
    "target", ["manifest-2^64", "manifest-2^63", "tail-batched", "tail-fsync", "beyond-fsync"]
)
def test_sequence_number_beyond_64_bits(
    base: Base,
    copy_of: Callable[[], Iterator[Path]],
    target: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression test for a bug this suite found (fixed: sequence numbers are bounded),
    carried over to the manifest.

    Before the fix: read_tail and parse_checkpoint accepted any positive int as seq, but
    checkpoint_mac packed it in 8 bytes: a seq >= 2^64 raised OverflowError in verify_log,
    in every fsync-mode operation, and silently killed the batched flusher thread. Now a
    manifest recording seq 2^64 or 2^63 (one past MAX_SEQ), even with a valid MAC, is
    corrupted; a log whose recorded or next entry claims such a seq is refused at open;
    and no thread dies on the way.
    """
    died: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda a: died.append(repr(a.exc_value)))
    for dep in copy_of():
        if target.startswith("manifest"):
            seq = SEQ_2_64 if target == "manifest-2^64" else MAX_SEQ + 1
            edit_manifest_seq(dep, str(seq).encode(), with_mac=True)
            refuses_to_open(dep, KeystoreCorrupted)
            continue
        cfg = dep / "anyhsm.toml"
        if target.endswith("fsync"):
            cfg.write_text(cfg.read_text().replace('"batched"', '"fsync"'))

        def big(line: bytes) -> bytes:
            entry = json.loads(line)
            entry["seq"] = SEQ_2_64
            return json.dumps(entry).encode()

        forge_last_line(dep / "audit.log", big, append=target.startswith("beyond"))
        assert not verify_with(dep).ok
        try:
            hsm = open_hsm(cfg, passphrase=PASSPHRASE)
        except AuditError:
            continue  # refusing to chain onto a forged tail is right
        try:
            for _ in range(3):
                with contextlib.suppress(HsmError):
                    hsm.sign("alpha", DIGEST)
                time.sleep(0.03)  # let the batched flusher run
            assert not hsm.verify_audit().ok
        finally:
            hsm.close()
        assert not died, f"a thread died: {died}"
    assert not died, f"a thread died: {died}"


def test_truncation_with_the_manifest_deleted(
    base: Base, copy_of: Callable[[], Iterator[Path]]
) -> None:
    """Regression test for a bug this suite found (fixed in 6d88009), carried over to the
    manifest.

    Before the fix: verify_log treated a missing checkpoint as 'no checkpoint yet', so
    deleting audit-checkpoint.json and cutting the log's tail verified as intact. The
    chain's state is in the manifest now; deleting it together with the log's tail makes
    every open fail closed (ManifestMissing) instead of verifying the cut log or starting
    a new chain.
    """
    for dep in copy_of():
        log = dep / "audit.log"
        lines = log.read_bytes().split(b"\n")[:-1]
        log.write_bytes(b"".join(x + b"\n" for x in lines[:-3]))
        (dep / MANIFEST).unlink()
        refuses_to_open(dep, ManifestMissing)


def test_truncation_is_caught_by_the_manifest(
    base: Base, copy_of: Callable[[], Iterator[Path]]
) -> None:
    for dep in copy_of():
        log = dep / "audit.log"
        lines = log.read_bytes().split(b"\n")[:-1]
        log.write_bytes(b"".join(x + b"\n" for x in lines[:-3]))
        result = verify_with(dep)
        assert not result.ok
        assert result.first_bad_line == len(lines) - 2
        assert "truncated" in result.reason
        before = snapshot(dep)
        with pytest.raises(AuditError):  # AuditStateMismatch: nothing is appended
            open_hsm(dep / "anyhsm.toml", passphrase=PASSPHRASE)
        assert snapshot(dep) == before
