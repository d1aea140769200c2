"""The simulator: an in-memory provider for development and tests only.

Keys vanish when it closes. Faults can be injected from its config table so
fallback, timeout and retry paths can be exercised against real code:

    [providers.simulator]
    latency_ms = 0        # added to every call, open included
    failure_rate = 0.0    # probability that a call fails (ProviderUnavailable)
    offline = false       # open() fails as if the device were absent
    fail_after = 0        # after N successful operations, every call fails (0 = never)
    hang = false          # open() blocks until closed (a device that never answers)
    seed = 0              # seed of the failure RNG, for reproducible runs
    corrupt_signatures = false  # return garbage signatures (health must catch this)

The factory refuses it on mainnet and in production.
"""

from __future__ import annotations

import os
import random
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from anyhsm.errors import (
    ConfigError,
    ExportNotAllowed,
    KeyExists,
    KeyNotFound,
    PolicyViolation,
    ProviderUnavailable,
)
from anyhsm.keystore.store import now_iso
from anyhsm.provider import ProviderContext, check_sign_request
from anyhsm.providers import local_signing
from anyhsm.secret import SecretBytes
from anyhsm.types import (
    Capabilities,
    DerivedPublicKey,
    Environment,
    Health,
    KeyInfo,
    KeyRef,
    KeySpec,
    KeyType,
    Network,
    SecurityLevel,
    SignParams,
    SigScheme,
)


@dataclass(frozen=True)
class Faults:
    latency_ms: float = 0.0
    failure_rate: float = 0.0
    offline: bool = False
    fail_after: int = 0
    hang: bool = False
    seed: int = 0
    corrupt_signatures: bool = False

    @classmethod
    def from_settings(cls, s: dict[str, object]) -> Faults:
        def num(name: str, default: float) -> float:
            v = s.get(name, default)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ConfigError(f"providers.simulator.{name} must be a non-negative number")
            return float(v)

        def flag(name: str) -> bool:
            v = s.get(name, False)
            if not isinstance(v, bool):
                raise ConfigError(f"providers.simulator.{name} must be true or false")
            return v

        rate = num("failure_rate", 0.0)
        if rate > 1:
            raise ConfigError("providers.simulator.failure_rate must be between 0 and 1")
        return cls(
            latency_ms=num("latency_ms", 0.0),
            failure_rate=rate,
            offline=flag("offline"),
            fail_after=int(num("fail_after", 0)),
            hang=flag("hang"),
            seed=int(num("seed", 0)),
            corrupt_signatures=flag("corrupt_signatures"),
        )


@dataclass
class _SimKey:
    info: KeyInfo
    secret: SecretBytes


class SimulatorProvider:
    """In-memory keys with injectable faults."""

    name = "simulator"

    def __init__(self, context: ProviderContext) -> None:
        self._ctx = context
        self.faults = Faults.from_settings(context.settings)
        self._rng = random.Random(self.faults.seed)  # noqa: S311 - fault timing, not crypto
        self._keys: dict[str, _SimKey] = {}
        self._lock = threading.Lock()
        self._ops = 0
        self._store = f"simulator:{secrets.token_hex(8)}"
        self._closed = threading.Event()
        self._open = False

    def _fault(self, what: str) -> None:
        f = self.faults
        if f.latency_ms:
            time.sleep(f.latency_ms / 1000)
        with self._lock:
            self._ops += 1
            ops = self._ops
            roll = self._rng.random()
        if f.fail_after and ops > f.fail_after:
            raise ProviderUnavailable(
                f"simulator: injected failure after {f.fail_after} operations ({what})",
                hint="this is a configured fault (providers.simulator.fail_after)",
            )
        if f.failure_rate and roll < f.failure_rate:
            raise ProviderUnavailable(
                f"simulator: injected random failure ({what})",
                hint="this is a configured fault (providers.simulator.failure_rate)",
            )

    def open(self) -> None:
        # Defence in depth: the factory already refuses it, but a simulator built
        # directly must not serve production or mainnet either.
        if self._ctx.environment is Environment.PRODUCTION or self._ctx.network is Network.MAINNET:
            raise PolicyViolation(
                f"the simulator is refused in {self._ctx.environment.value} on "
                f"{self._ctx.network.value}",
                hint="use the software, tpm or pkcs11 provider",
            )
        if self.faults.hang:
            self._closed.wait()
            raise ProviderUnavailable("simulator: hung device closed")
        if self.faults.offline:
            raise ProviderUnavailable(
                "simulator: device offline",
                hint="this is a configured fault (providers.simulator.offline)",
            )
        if self.faults.latency_ms:
            time.sleep(self.faults.latency_ms / 1000)
        self._open = True

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            for k in self._keys.values():
                k.secret.wipe()
            self._keys.clear()
        self._open = False

    def health(self) -> Health:
        t0 = time.perf_counter()
        try:
            self._fault("health")
        except ProviderUnavailable as e:
            return Health(
                self.name,
                False,
                "unavailable",
                e.message,
                self.security_level(),
                (time.perf_counter() - t0) * 1000,
            )
        return Health(
            self.name,
            True,
            "ok",
            "",
            self.security_level(),
            (time.perf_counter() - t0) * 1000,
            {"keys": len(self._keys), "ops": self._ops},
        )

    _CAPABILITIES = local_signing.local_capabilities(persistent=False)
    _WAITING = replace(_CAPABILITIES, in_process=False)

    def capabilities(self) -> Capabilities:
        """Those of any in-process store, except that injected latency or a hang makes
        calls wait, as a device's do (so the service sends them to a worker)."""
        f = self.faults
        return self._WAITING if f.latency_ms or f.hang else self._CAPABILITIES

    def security_level(self) -> SecurityLevel:
        return SecurityLevel.SIMULATOR

    def production_ready(self) -> bool:
        return False

    def store_id(self) -> str:
        return self._store

    def _find(self, key: KeyRef) -> _SimKey:
        with self._lock:
            k = self._keys.get(key)
            if k is None:
                k = next((v for v in self._keys.values() if v.info.label == key), None)
        if k is None:
            raise KeyNotFound(f"no key {key!r} in the simulator")
        return k

    def _add(
        self, label: str, key_type: KeyType, secret: bytearray | memoryview, exportable: bool
    ) -> KeyInfo:
        pub, chain = local_signing.vet_material(self.name, key_type, secret)
        info = KeyInfo(
            id=secrets.token_hex(16),
            label=label,
            provider=self.name,
            public_key=pub,
            key_type=key_type,
            store=self._store,
            exportable=exportable,
            created_at=now_iso(),
            chain_code=chain,
        )
        with self._lock:
            if any(v.info.label == label for v in self._keys.values()):
                raise KeyExists(f"a key labelled {label!r} already exists")
            self._keys[info.id] = _SimKey(info, SecretBytes(secret))
        return info

    def generate_key(self, spec: KeySpec) -> KeyInfo:
        self._fault("generate_key")
        buf = local_signing.fresh_material(self.name, spec.key_type)
        try:
            return self._add(spec.label, spec.key_type, buf, spec.exportable)
        finally:
            buf[:] = bytes(len(buf))

    def import_key(
        self, label: str, secret: SecretBytes, key_type: KeyType, *, exportable: bool = False
    ) -> KeyInfo:
        self._fault("import_key")
        return self._add(label, key_type, secret.buffer, exportable)

    def export_key(self, key: KeyRef) -> SecretBytes:
        self._fault("export_key")
        k = self._find(key)
        if not (k.info.exportable and self._ctx.allow_export):
            raise ExportNotAllowed(f"key {k.info.label!r} may not be exported")
        return SecretBytes(k.secret.buffer)

    def list_keys(self) -> list[KeyInfo]:
        self._fault("list_keys")
        with self._lock:
            return [k.info for k in self._keys.values()]

    def get_key(self, key: KeyRef) -> KeyInfo:
        self._fault("get_key")
        return self._find(key).info

    def public_key(self, key: KeyRef) -> bytes:
        return self.get_key(key).public_key

    def sign_digest(
        self, key: KeyRef, digest: bytes, scheme: SigScheme, params: SignParams | None = None
    ) -> bytes:
        p = check_sign_request(self, digest, scheme, params)
        self._fault("sign")
        k = self._find(key)
        sig = local_signing.sign(
            self.name, k.info.key_type, k.secret.buffer, bytes(digest), scheme, p
        )
        if self.faults.corrupt_signatures:
            return os.urandom(len(sig))
        return sig

    def sign_batch(
        self, key: KeyRef, requests: Sequence[tuple[bytes, SigScheme, SignParams | None]]
    ) -> list[bytes]:
        checked = [(bytes(d), s, check_sign_request(self, d, s, p)) for d, s, p in requests]
        self._fault("sign")
        k = self._find(key)
        sigs = local_signing.sign_batch(self.name, k.info.key_type, k.secret.buffer, checked)
        if self.faults.corrupt_signatures:
            return [os.urandom(len(sig)) for sig in sigs]
        return sigs

    def derive_public(self, key: KeyRef, path: tuple[int, ...]) -> DerivedPublicKey:
        self._fault("derive")
        k = self._find(key)
        return local_signing.derive_public(self.name, k.info.key_type, k.secret.buffer, path)

    def delete_key(self, key: KeyRef) -> None:
        self._fault("delete_key")
        k = self._find(key)
        with self._lock:
            self._keys.pop(k.info.id, None)
        k.secret.wipe()
