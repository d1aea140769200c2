"""Fuzz the on-disk formats: keystore header, key records, audit log, audit checkpoint.

Each example copies a real deployment (made once per module: keys created and
signed with through open_hsm, handle closed so the checkpoint covers the whole
log), mutates one file — raw byte edits, or JSON-aware edits that keep the
file parseable (for the header optionally with its plain checksum recomputed,
so the edit reaches the authenticated layers) — and then loads, unlocks, signs
or verifies. Properties:

- only anyhsm errors (HsmError subclasses) come out; the audit verifier
  returns ok=False and never raises;
- nothing reading the files changes them (every byte of every file compared);
- whatever still opens is exactly what was written (same store, same records,
  same audit entries); a damaged record never yields a signature from other
  key material, and never stops the other keys from signing.

The crashers this suite found keep their own targeted tests at the end: as
regression tests once fixed in the library, as strict xfails until then (and
the fuzz tests skipped exactly those inputs meanwhile; none is skipped now).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
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
from anyhsm.audit import parse_checkpoint, verify_log
from anyhsm.config import Config
from anyhsm.crypto import secp256k1 as curve
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.errors import AuditError, AuditTampered, HsmError, KeystoreCorrupted
from anyhsm.factory import provider_context
from anyhsm.hsm import AUDIT_KEY_PURPOSE, CHECKPOINT_FILE
from anyhsm.keystore import KeyRecord, Keystore
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
    recs = {r.id: r for r in ks.records() if r.kind == "sealed"}
    store_id = ks.store_id
    ks.close()
    lines = [json.loads(x) for x in (dep / "audit.log").read_bytes().splitlines()]
    return Base(
        root=root,
        dep=dep,
        files=snapshot(dep),
        store_id=store_id,
        keys={i: (r.label, r.public_key) for i, r in recs.items()},
        records=recs,
        audit_lines=lines,
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


def audit_key_of(dep: Path) -> SecretBytes:
    ks = Keystore.load(dep / "keystore")
    try:
        ks.unlock_with_passphrase(SecretBytes(PASSPHRASE.encode()))
        return ks.subkey(AUDIT_KEY_PURPOSE)
    finally:
        ks.close()


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
        checkpoint = (dep / "keystore" / CHECKPOINT_FILE).read_bytes()
        key = audit_key_of(dep)
        before = snapshot(dep)
        result = verify_log(log, key, checkpoint)  # must not raise
        assert snapshot(dep) == before, "verifying changed a file"
        if result.ok:  # only an edit that changes no entry may verify
            assert [meaning(x) for x in mutated.splitlines()] == [
                meaning(x) for x in original.splitlines()
            ]
        else:
            assert result.reason


@FUZZ
@given(data=st.data())
def test_fuzz_audit_checkpoint(
    base: Base, copy_of: Callable[[], Iterator[Path]], data: st.DataObject
) -> None:
    original = base.files[f"keystore/{CHECKPOINT_FILE}"]
    if data.draw(st.booleans(), label="raw"):
        mutated = data.draw(byte_mutation(original), label="mutated")
    else:
        mutated, _ = data.draw(json_mutation(original, indent=None), label="edit")
    for dep in copy_of():
        cp = dep / "keystore" / CHECKPOINT_FILE
        cp.write_bytes(mutated)
        key = audit_key_of(dep)
        before = snapshot(dep)
        result = verify_log(dep / "audit.log", key, cp.read_bytes())  # must not raise
        assert snapshot(dep) == before
        if result.ok:
            assert parse_checkpoint(mutated) == parse_checkpoint(original)


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
            result = verify_log(log, audit_key_of(dep), None)
            assert not result.ok and result.first_bad_line == 1
        else:
            log = dep / "audit.log"
            log.write_bytes(log.read_bytes() + DEEP[:60_000] + b"\n")
            with pytest.raises(AuditTampered):
                open_hsm(dep / "anyhsm.toml", passphrase=PASSPHRASE)


@pytest.mark.parametrize("target", ["checkpoint", "audit-tail"])
def test_infinite_sequence_number(
    base: Base, copy_of: Callable[[], Iterator[Path]], target: str
) -> None:
    """Regression test for a bug this suite found (fixed in 6d88009).

    Before the fix: parse_checkpoint and read_tail call int() on a JSON number without catching
    OverflowError: a checkpoint or last audit entry with seq 1e999 (infinity) makes
    verify_log / open_hsm raise OverflowError instead of reporting tampering.
    """
    for dep in copy_of():
        if target == "checkpoint":
            cp = dep / "keystore" / CHECKPOINT_FILE
            cp.write_bytes(cp.read_bytes().replace(b'"seq":', b'"seq":1e999,"x":'))
            result = verify_log(dep / "audit.log", audit_key_of(dep), cp.read_bytes())
            assert not result.ok
        else:
            log = dep / "audit.log"
            raw = log.read_bytes()
            head, _, last = raw[:-1].rpartition(b"\n")
            last = last.replace(b'"seq":', b'"seq":1e999,"x":')
            log.write_bytes(head + b"\n" + last + b"\n")
            with pytest.raises(AuditTampered):
                open_hsm(dep / "anyhsm.toml", passphrase=PASSPHRASE)


SEQ_2_64 = 2**64


@pytest.mark.parametrize("target", ["checkpoint", "tail-batched", "tail-fsync"])
def test_sequence_number_beyond_64_bits(
    base: Base,
    copy_of: Callable[[], Iterator[Path]],
    target: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression test for a bug this suite found (fixed: sequence numbers are bounded).

    Before the fix: read_tail and parse_checkpoint accepted any positive int as seq, but
    checkpoint_mac packs it in 8 bytes: a seq >= 2^64 raised OverflowError in verify_log,
    in every fsync-mode operation, and silently killed the batched flusher thread.
    """
    died: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda a: died.append(repr(a.exc_value)))
    for dep in copy_of():
        if target == "checkpoint":
            cp = dep / "keystore" / CHECKPOINT_FILE
            doc = json.loads(cp.read_bytes())
            doc["seq"] = SEQ_2_64
            cp.write_text(json.dumps(doc))
            result = verify_log(dep / "audit.log", audit_key_of(dep), cp.read_bytes())
            assert not result.ok
            continue
        cfg = dep / "anyhsm.toml"
        if target == "tail-fsync":
            cfg.write_text(cfg.read_text().replace('"batched"', '"fsync"'))
        log = dep / "audit.log"
        head, _, last = log.read_bytes()[:-1].rpartition(b"\n")
        entry = json.loads(last)
        entry["seq"] = SEQ_2_64
        log.write_bytes(head + b"\n" + json.dumps(entry).encode() + b"\n")
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


def test_truncation_with_the_checkpoint_deleted(
    base: Base, copy_of: Callable[[], Iterator[Path]]
) -> None:
    """Regression test for a bug this suite found (fixed in 6d88009).

    Before the fix: verify_log treats a missing checkpoint as 'no checkpoint yet', so deleting
    audit-checkpoint.json and cutting the log's tail verifies as intact; the keystore should
    remember that a checkpoint exists (or verify should require one for a non-empty log).
    """
    for dep in copy_of():
        log = dep / "audit.log"
        lines = log.read_bytes().split(b"\n")[:-1]
        log.write_bytes(b"".join(x + b"\n" for x in lines[:-3]))
        (dep / "keystore" / CHECKPOINT_FILE).unlink()
        with open_hsm(dep / "anyhsm.toml", passphrase=PASSPHRASE) as hsm:
            assert not hsm.verify_audit().ok


def test_truncation_is_caught_by_the_checkpoint(
    base: Base, copy_of: Callable[[], Iterator[Path]]
) -> None:
    for dep in copy_of():
        log = dep / "audit.log"
        lines = log.read_bytes().split(b"\n")[:-1]
        log.write_bytes(b"".join(x + b"\n" for x in lines[:-3]))
        result = verify_log(
            log, audit_key_of(dep), (dep / "keystore" / CHECKPOINT_FILE).read_bytes()
        )
        assert not result.ok
        assert result.first_bad_line == len(lines) - 2
        assert "truncated" in result.reason
