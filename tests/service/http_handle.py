"""The HTTP interface for the handle-level contract suite (tests/conformance): the
deployment served by the signing service on a free loopback port, each operation a
request through :class:`anyhsm.client.Client` (answers checked against the OpenAPI
document by the client's transport hook below), failures raised as the library's classes.

The service has no key management endpoints (deliberately), so creating, importing,
exporting and deleting keys go through the served handle itself, in this process (the
simulator's keys live in that handle's memory); everything else is HTTP. The client is
an admin client (every key, every op).

Plug-in: ``OPENERS["http"] = open_http`` in tests/conformance/interfaces.py (imported
at the end of that module, or lazily: this one imports it) and an ``"http": [...]`` entry
in tests/conformance/conftest.py's INTERFACE_BACKENDS. The derived-key and health
results are the CLI adapter's shapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.conformance.interfaces import FEATURES, CliDerived, CliHealth, _path_text

from anyhsm import Hsm, open_hsm
from anyhsm.audit import VerifyResult
from anyhsm.client import Client
from anyhsm.service.settings import ClientSpec, Op, ServiceSettings
from anyhsm.service.tokens import hash_token, new_token
from anyhsm.types import Capabilities, KeyInfo, KeyType, SecurityLevel, SignParams, SigScheme


class HttpHandle:
    interface = "http"
    # a batch reports malformed items one by one (Vault's batch_input) where the library
    # refuses the whole batch, so sign_many differs; path and tweak are offered
    missing = FEATURES - {"sign_path", "tweak"}

    def __init__(self, admin: Hsm, served: Hsm, client: Client) -> None:
        self._admin = admin  # key management (no endpoint for it)
        self._served = served
        self.client = client
        health = client.health()
        assert health.ok and health.active_provider is not None
        self._active = health.active_provider
        # readiness names the level; health's to_dict() drops the simulator's (level 0 is
        # falsy there: reported to H2)
        self._level = SecurityLevel.parse(client.ready().security_level)
        self._audit_path = Path(str(health.audit["path"]))

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
        return n

    def capabilities(self, key: str | None = None) -> Capabilities:
        return self._served.capabilities(key)  # the service prints no capabilities

    def generate_key(self, label: str, key_type: KeyType = KeyType.SECP256K1) -> KeyInfo:
        self._admin.generate_key(label, key_type)
        return self.client.get_key(label)

    def import_key(self, label: str, secret: bytes) -> KeyInfo:
        self._admin.import_key(label, secret)
        return self.client.get_key(label)

    def export_key(self, key: str) -> object:
        return self._admin.export_key(key)

    def list_keys(self) -> list[KeyInfo]:
        return self.client.list_keys()

    def get_key(self, key: str) -> KeyInfo:
        return self.client.get_key(key)

    def public_key(self, key: str) -> bytes:
        return self.client.public_key(key)

    def delete_key(self, key: str) -> None:
        self._admin.delete_key(key)

    def derive_public(self, key: str, path: Sequence[int]) -> CliDerived:
        from anyhsm.bitcoin.bip32 import ExtendedKey

        xpub = ExtendedKey.parse(self.client.xpub(key, _path_text(path)).xpub)
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
        assert p.aux_rand is None and not p.grind_low_r, "the service takes path and tweak"
        path = _path_text(p.path) if p.path else None
        return self.client.sign(key, digest, scheme, path=path, tweak=p.tweak)

    def sign_many(
        self, key: str, requests: Sequence[tuple[bytes, SigScheme, SignParams | None]]
    ) -> list[bytes]:
        raise AssertionError("see HttpHandle.missing")

    def verify(
        self,
        key: str,
        digest: bytes,
        signature: bytes,
        scheme: SigScheme = SigScheme.ECDSA,
        *,
        path: tuple[int, ...] = (),
    ) -> bool:
        text = _path_text(path) if path else None
        return self.client.verify(key, digest, signature, scheme, path=text)

    def health(self) -> CliHealth:
        report = self.client.health()
        raw = report.to_dict()
        return CliHealth(report.ok, report.active_provider, report.providers, raw)

    def verify_audit(self) -> VerifyResult:
        return self.client.verify_audit()

    def close(self) -> None:
        self.client.close()


@contextlib.contextmanager
def open_http(config: Path, env: Mapping[str, str]) -> Iterator[HttpHandle]:
    from tests.service.conftest import serve

    served = open_hsm(config)
    admin = served
    token = new_token()
    settings = ServiceSettings(
        rate_limit_per_s=0,
        clients=(ClientSpec("conformance", hash_token(token), ("*",), frozenset(Op)),),
    )
    url, _, stop = serve(served, settings)
    client = Client(url, token)
    try:
        yield HttpHandle(admin, served, client)
    finally:
        client.close()
        stop()
        served.close()
