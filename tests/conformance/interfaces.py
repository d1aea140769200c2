"""The interfaces the handle-level contract suite runs through, as HWI runs its device
tests through each of its front ends.

Every interface gives the suite one object with the same operations (:class:`Handle`):

- ``library``: the :class:`anyhsm.Hsm` handle itself, in this process;
- ``cli``: the real ``anyhsm ... --json`` command in a child process per operation
  (tests/support/cli.py). Each answer is checked against the JSON shape docs/cli.md
  documents, and each failure against the error contract (one ``{"error": ...}``
  object on stdout, the exit status of its class), then turned back into the anyhsm
  error class named by its code, so the tests' ``pytest.raises(KeyNotFound)`` hold at
  every level.

A third interface (the HTTP client) plugs in by adding a class with these operations
and an entry in :data:`OPENERS`. Operations an interface does not offer are named in
its ``missing`` set (see :data:`FEATURES`); the suite skips just those checks there.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest
from tests.support.cli import cli

from anyhsm import Hsm, open_hsm
from anyhsm.audit import VerifyResult
from anyhsm.bitcoin.bip32 import ExtendedKey
from anyhsm.errors import HsmError
from anyhsm.types import Capabilities, KeyInfo, KeyType, SecurityLevel, SignParams, SigScheme

FEATURES = frozenset({"sign_path", "tweak", "sign_many"})
"""Operations not every interface offers: signing or verifying at a BIP32 path, with a
taproot tweak, and many digests in one call (the CLI's ``sign`` takes one plain digest)."""


class Handle(Protocol):
    """What the contract suite calls: the handle's operations, whatever the interface."""

    interface: str
    missing: frozenset[str]

    @property
    def active_provider(self) -> str: ...
    @property
    def security_level(self) -> SecurityLevel: ...
    @property
    def audit_path(self) -> Path: ...
    def rounds(self, n: int) -> int: ...
    def capabilities(self, key: str | None = None) -> Capabilities: ...
    def generate_key(self, label: str, key_type: KeyType = KeyType.SECP256K1) -> KeyInfo: ...
    def import_key(self, label: str, secret: bytes) -> KeyInfo: ...
    def export_key(self, key: str) -> object: ...
    def list_keys(self) -> list[KeyInfo]: ...
    def get_key(self, key: str) -> KeyInfo: ...
    def public_key(self, key: str) -> bytes: ...
    def delete_key(self, key: str) -> None: ...
    def derive_public(self, key: str, path: Sequence[int]) -> object: ...
    def sign(
        self,
        key: str,
        digest: bytes,
        scheme: SigScheme = SigScheme.ECDSA,
        *,
        params: SignParams | None = None,
    ) -> bytes: ...
    def sign_many(
        self, key: str, requests: Sequence[tuple[bytes, SigScheme, SignParams | None]]
    ) -> list[bytes]: ...
    def verify(
        self,
        key: str,
        digest: bytes,
        signature: bytes,
        scheme: SigScheme = SigScheme.ECDSA,
        *,
        path: tuple[int, ...] = (),
    ) -> bool: ...
    def health(self) -> object: ...
    def verify_audit(self) -> VerifyResult: ...
    def close(self) -> None: ...


def need(handle: Handle, feature: str) -> None:
    """Skip the rest of a test on an interface that does not offer ``feature``."""
    assert feature in FEATURES, feature
    if feature in handle.missing:
        pytest.skip(f"the {handle.interface} interface offers no {feature.replace('_', ' ')}")


# --- library ------------------------------------------------------------------------------


class LibraryHandle:
    """The Hsm handle as it is: every operation, every round."""

    interface = "library"
    missing: frozenset[str] = frozenset()

    def __init__(self, hsm: Hsm) -> None:
        self._hsm = hsm

    def rounds(self, n: int) -> int:
        return n

    def __getattr__(self, name: str) -> object:
        return getattr(self._hsm, name)


# --- CLI ----------------------------------------------------------------------------------

_Shape = Mapping[str, tuple[type | None, ...]]

KEY_SHAPE: _Shape = {
    "id": (str,),
    "label": (str,),
    "provider": (str,),
    "public_key": (str,),
    "key_type": (str,),
    "store": (str,),
    "exportable": (bool,),
    "created_at": (str,),
    "master_fingerprint": (str, None),
    "available": (bool,),
}
SHAPES: Mapping[str, _Shape] = {
    "key": KEY_SHAPE,
    "key list": {"keys": (list,)},
    "key delete": {"deleted": (str,), "label": (str,)},
    "key export": {"exported": (str,), "out": (str,)},
    "sign": {"signature": (str,), "scheme": (str,), "key": (str,)},
    "verify": {"valid": (bool,)},
    "xpub": {
        "key": (str,),
        "master_fingerprint": (str,),
        "network": (str,),
        "origin": (str,),
        "path": (str,),
        "xpub": (str,),
    },
    "health": {
        "ok": (bool,),
        "degraded": (bool,),
        "degraded_reasons": (list,),
        "active_provider": (str, None),
        "security_level": (str, None),
        "min_security_level": (str, None),
        "environment": (str, None),
        "network": (str, None),
        "providers": (list,),
        "audit": (dict,),
        "process": (dict,),
    },
    "health provider": {
        "name": (str,),
        "status": (str,),
        "reason": (str, None),
        "elapsed_ms": (int, float),
        "security_level": (str,),
        "error_code": (str, None),
        "active": (bool,),
        "details": (dict,),
    },
    "audit verify": {
        "ok": (bool,),
        "entries": (int,),
        "first_bad_line": (int, None),
        "reason": (str, None),
        "checkpoint_seq": (int, None),
        "chain": (int,),
    },
    "error": {"code": (str,), "error": (str,), "message": (str,)},
}


def check_shape(what: str, obj: object) -> dict[str, object]:
    """``obj`` is a JSON object with every member docs/cli.md lists for ``what``, each of
    its type (None: JSON null; a bool is never taken for a number). Members added later
    are allowed: a program relying on the documented ones keeps working."""
    assert isinstance(obj, dict), f"{what}: not a JSON object: {obj!r}"
    for member, types in SHAPES[what].items():
        assert member in obj, f"{what}: no {member!r} in {sorted(obj)}"
        value = obj[member]
        ok = any(_is(value, t) for t in types)
        assert ok, f"{what}.{member} = {value!r} is not {types}"
    return obj


def _is(value: object, t: type | None) -> bool:
    if t is None:
        return value is None
    return isinstance(value, t) and not (isinstance(value, bool) and t is not bool)


def _error_classes() -> dict[str, type[HsmError]]:
    out: dict[str, type[HsmError]] = {}
    todo: list[type[HsmError]] = [HsmError]
    while todo:
        cls = todo.pop()
        out.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return out


def _raise_error(proc_code: int, body: object, argv: Sequence[str]) -> None:
    """The CLI failed: check the error contract, then raise the error class it names."""
    assert isinstance(body, dict) and set(body) >= {"error"}, f"{argv}: {body!r}"
    err = check_shape("error", body["error"])
    classes = _error_classes()
    code = str(err["code"])
    assert code in classes, f"{argv}: unknown error code {code!r}"
    cls = classes[code]
    assert err["error"] == cls.__name__, f"{argv}: {err['error']!r} for code {code!r}"
    assert proc_code == cls.exit_code, f"{argv}: exit {proc_code}, {code} is {cls.exit_code}"
    exc = cls.__new__(cls)
    hint = err.get("hint")
    HsmError.__init__(exc, str(err["message"]), hint=hint if isinstance(hint, str) else None)
    raise exc


@dataclass(frozen=True)
class CliDerived:
    """What ``anyhsm xpub KEY PATH`` says about the child key."""

    public_key: bytes
    chain_code: bytes
    depth: int
    child_number: int


@dataclass(frozen=True)
class CliHealth:
    ok: bool
    active_provider: str | None
    providers: list[dict[str, object]]
    raw: dict[str, object]


def _path_text(path: Sequence[int]) -> str:
    """``m/...`` as an operator writes it; an index out of range is written as it is, for
    the CLI to refuse."""
    steps = [f"{i - 0x80000000}'" if 0x80000000 <= i <= 0xFFFFFFFF else str(i) for i in path]
    return "/".join(["m", *steps])


def key_info(obj: dict[str, object]) -> KeyInfo:
    obj = check_shape("key", obj)
    return KeyInfo(
        id=str(obj["id"]),
        label=str(obj["label"]),
        provider=str(obj["provider"]),
        public_key=bytes.fromhex(str(obj["public_key"])),
        key_type=KeyType(str(obj["key_type"])),
        store=str(obj["store"]),
        exportable=bool(obj["exportable"]),
        created_at=str(obj["created_at"]),
        available=bool(obj["available"]),
    )


class CliHandle:
    """The deployment through ``anyhsm --config CFG --json ...``, one child process per
    operation, with only the environment the deployment needs (passphrase, PIN)."""

    interface = "cli"
    missing = frozenset({"sign_many"})  # `sign --path/--tweak`, but one digest per call

    def __init__(self, config: Path, env: Mapping[str, str]) -> None:
        self.config = config
        self.env = dict(env)
        self._scratch = Path(tempfile.mkdtemp(prefix="anyhsm-cli-", dir=config.parent))
        report = self.health()
        assert report.ok, report.raw
        assert report.active_provider is not None
        self._active = report.active_provider
        level = report.raw["security_level"]
        self._level = SecurityLevel.parse(str(level))
        audit = report.raw["audit"]
        assert isinstance(audit, dict) and isinstance(audit.get("path"), str)
        self._audit_path = Path(audit["path"])

    # one CLI run

    def run(self, *args: str, stdin: str | None = None, ok_codes: tuple[int, ...] = (0,)) -> object:
        argv = ["--config", str(self.config), "--json", *args]
        proc = cli(*argv, env=self.env, stdin=stdin)
        assert "Traceback" not in proc.stderr, proc.stderr
        try:
            body = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"{args}: stdout is not one JSON document: {proc.stdout!r}")
        if proc.returncode not in ok_codes:
            _raise_error(proc.returncode, body, args)
        assert isinstance(body, dict) and "error" not in body, f"{args}: {body!r}"
        return body

    # Handle

    @property
    def active_provider(self) -> str:
        return self._active

    @property
    def security_level(self) -> SecurityLevel:
        return self._level

    @property
    def audit_path(self) -> Path:
        return self._audit_path

    def rounds(self, n: int) -> int:
        """Repetitions of a probabilistic check: a few (each is a process), not ``n``."""
        return min(n, 3)

    def capabilities(self, key: str | None = None) -> Capabilities:
        """What the library says this deployment can do (the CLI prints no capabilities):
        the suite then checks that the CLI behaves accordingly."""
        with contextlib.closing(open_hsm(self.config)) as hsm:
            return hsm.capabilities(key)

    def generate_key(self, label: str, key_type: KeyType = KeyType.SECP256K1) -> KeyInfo:
        out = self.run("key", "create", "--label", label, "--type", key_type.value)
        assert isinstance(out, dict)
        return key_info(out)

    def import_key(self, label: str, secret: bytes) -> KeyInfo:
        out = self.run("key", "import", "--label", label, "--secret-file", "-", stdin=secret.hex())
        assert isinstance(out, dict) and isinstance(out.get("warnings"), list)
        return key_info(out)

    def export_key(self, key: str) -> bytes:
        target = self._scratch / "export.out"
        out = check_shape("key export", self.run("key", "export", key, "--out", str(target)))
        assert out["out"] == str(target)
        return target.read_bytes()

    def list_keys(self) -> list[KeyInfo]:
        out = check_shape("key list", self.run("key", "list"))
        keys = out["keys"]
        assert isinstance(keys, list)
        return [key_info(k) for k in keys]

    def get_key(self, key: str) -> KeyInfo:
        out = self.run("key", "show", key)
        assert isinstance(out, dict)
        return key_info(out)

    def public_key(self, key: str) -> bytes:
        return self.get_key(key).public_key

    def delete_key(self, key: str) -> None:
        out = check_shape("key delete", self.run("key", "delete", key, "--yes"))
        assert key in (out["deleted"], out["label"])

    def derive_public(self, key: str, path: Sequence[int]) -> CliDerived:
        out = check_shape("xpub", self.run("xpub", key, _path_text(path)))
        xpub = ExtendedKey.parse(str(out["xpub"]))
        return CliDerived(xpub.public_key, xpub.chain_code, xpub.depth, xpub.child_number)

    def sign(
        self,
        key: str,
        digest: bytes,
        scheme: SigScheme = SigScheme.ECDSA,
        *,
        params: SignParams | None = None,
    ) -> bytes:
        p = params or SignParams()
        assert p.aux_rand is None and not p.grind_low_r, "the CLI takes --path and --tweak only"
        argv = ["sign", "--key", key, "--digest", digest.hex(), "--scheme", scheme.value]
        if p.path:
            argv += ["--path", _path_text(p.path)]
        if p.tweak is not None:
            argv += ["--tweak", p.tweak.hex()]
        out = check_shape("sign", self.run(*argv))
        assert out["scheme"] == scheme.value and out["key"] == key
        return bytes.fromhex(str(out["signature"]))

    def sign_many(
        self, key: str, requests: Sequence[tuple[bytes, SigScheme, SignParams | None]]
    ) -> list[bytes]:
        raise AssertionError("the CLI has no batch signing (see Handle.missing)")

    def verify(
        self,
        key: str,
        digest: bytes,
        signature: bytes,
        scheme: SigScheme = SigScheme.ECDSA,
        *,
        path: tuple[int, ...] = (),
    ) -> bool:
        argv = ["verify", "--key", key, "--digest", digest.hex(), "--signature", signature.hex()]
        if path:
            argv += ["--path", _path_text(path)]
        out = check_shape("verify", self.run(*argv, "--scheme", scheme.value, ok_codes=(0, 1)))
        return bool(out["valid"])

    def health(self) -> CliHealth:
        out = check_shape("health", self.run("health", ok_codes=(0, 4)))
        providers = out["providers"]
        assert isinstance(providers, list)
        rows = [check_shape("health provider", row) for row in providers]
        active = out["active_provider"]
        return CliHealth(bool(out["ok"]), None if active is None else str(active), rows, out)

    def verify_audit(self) -> VerifyResult:
        out = check_shape("audit verify", self.run("audit", "verify", ok_codes=(0, 8)))
        first_bad, seq = out["first_bad_line"], out["checkpoint_seq"]
        return VerifyResult(
            ok=bool(out["ok"]),
            entries=int(str(out["entries"])),
            first_bad_line=None if first_bad is None else int(str(first_bad)),
            reason=str(out["reason"] or ""),
            checkpoint_seq=None if seq is None else int(str(seq)),
            chain=int(str(out["chain"])),
        )

    def close(self) -> None:
        pass


# --- how each interface is opened on a deployment ----------------------------------------


@contextlib.contextmanager
def open_library(config: Path, env: Mapping[str, str]) -> Iterator[Handle]:
    hsm = open_hsm(config)
    try:
        yield LibraryHandle(hsm)  # type: ignore[misc]
    finally:
        hsm.close()


@contextlib.contextmanager
def open_cli(config: Path, env: Mapping[str, str]) -> Iterator[Handle]:
    yield CliHandle(config, env)


def open_http(config: Path, env: Mapping[str, str]) -> contextlib.AbstractContextManager[Handle]:
    """The deployment served by the real service on a free loopback port, reached through
    anyhsm.client (tests/service/http_handle.py, imported here lazily: it builds on this
    module's adapters)."""
    from tests.service.http_handle import open_http as serve

    return serve(config, env)


OPENERS: Mapping[
    str, Callable[[Path, Mapping[str, str]], contextlib.AbstractContextManager[Handle]]
]
OPENERS = {"library": open_library, "cli": open_cli, "http": open_http}
