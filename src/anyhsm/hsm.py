"""The HSM handle: routes each operation to the provider that owns the key,
enforces the security policy, and writes the audit log.

Keys are never swapped between stores: a key lives where it was made, and an
operation on a key whose store is not reachable fails with
:class:`ProviderUnavailable` naming the provider and the key. The keystore is the
key directory: a name resolves there first, to exactly one store, and a key kept in
a token is used only if the token's serial and the key's public key are the ones its
record binds (:class:`KeyBindingMismatch` otherwise); token objects the directory
does not know are never used (see ``_route``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from anyhsm.anchor import Anchor, OnRotated, open_anchor, token_sealer, tpm_sealer
from anyhsm.audit import AuditLog, VerifyResult, verify_log
from anyhsm.config import Config
from anyhsm.crypto import secp256k1 as curve
from anyhsm.errors import (
    AuditError,
    AuthenticationFailed,
    ConfigError,
    ExportNotAllowed,
    HsmError,
    HsmKeyError,
    InvalidDigest,
    InvalidKeyMaterial,
    KeyBindingMismatch,
    KeyExists,
    KeyLabelConflict,
    KeyNotFound,
    KeyNotInDirectory,
    PolicyViolation,
    ProviderError,
    ProviderUnavailable,
    SecurityLevelTooLow,
    UnsupportedOperation,
)
from anyhsm.factory import (
    PROVIDER_LEVELS,
    Attempt,
    ChainResult,
    enrolment_chain,
    floor_detail,
    floor_lowered,
    resolve_passphrase,
    signing_probe,
    walk_chain,
)
from anyhsm.hardening import process_status
from anyhsm.keystore import KdfParams, KeyRecord, Keystore
from anyhsm.provider import (
    BatchSigner,
    Bip32Deriver,
    KeyExporter,
    KeyImporter,
    Provider,
    ProviderContext,
)
from anyhsm.secret import SecretBytes, mlock_status
from anyhsm.types import (
    INTERNAL_LABEL_PREFIX,
    Capabilities,
    DerivedPublicKey,
    KeyInfo,
    KeyRef,
    KeySpec,
    KeyType,
    Network,
    SecurityLevel,
    SignParams,
    SigScheme,
)
from anyhsm.unlock_blobs import TPM_BLOB, WRAPPED_BLOB

log = logging.getLogger("anyhsm")
T = TypeVar("T")

_REFUSALS = (PolicyViolation, ExportNotAllowed)

OPERATE = "operate"
ENROLMENT = "enrolment"
"""Purposes of a handle: ``enrolment`` opens the keystore with the passphrase below the
floor and permits only enrolment and status (see :func:`open_for_enrolment`)."""


def failure_outcome(error: Exception, detail: dict[str, str]) -> str:
    """ "refused" for a decision of policy (naming its rules in ``detail``), else "error"."""
    if not isinstance(error, _REFUSALS):
        return "error"
    rules = sorted({str(d["rule"]) for d in error.details if "rule" in d})
    if rules:
        detail["rules"] = ",".join(rules)[:300]
    detail["reason"] = error.message[:300]
    return "refused"


def _digest_bytes(digest: object) -> bytes:
    """The one digest check of the signing paths: exactly 32 bytes, as ``bytes``."""
    if type(digest) is bytes and len(digest) == 32:
        return digest
    if not isinstance(digest, bytes | bytearray) or len(digest) != 32:
        raise InvalidDigest(
            "digest must be exactly 32 bytes",
            hint="hash the message first (for Bitcoin, the sighash)",
        )
    return bytes(digest)


def error_code(error: BaseException) -> str:
    """What the audit log records of a failure: the error's stable code, or the class name
    of an exception that is not an HsmError."""
    return error.code if isinstance(error, HsmError) else type(error).__name__


def digests_detail(digests: Sequence[bytes]) -> dict[str, str]:
    """What a batch signed: the digests themselves (not secret) for a few, else their
    SHA-256 (with the first), keeping the entry bounded."""
    if len(digests) <= 8:
        return {"digests": ",".join(d.hex() for d in digests)}
    return {
        "digests_sha256": hashlib.sha256(b"".join(digests)).hexdigest(),
        "first_digest": digests[0].hex(),
    }


@dataclass
class HealthReport:
    """What ``anyhsm health`` prints: the same shape whether the handle opened or not.

    ``ok`` says the active provider passed its check; ``degraded`` that the handle
    runs, but worse than the configuration asks for (each reason in
    ``degraded_reasons``, see :data:`DEGRADED_REASONS`). When nothing could be opened
    (:func:`health_from_failure`), ``ok`` is false, ``active_provider`` and
    ``security_level`` are None, ``providers`` holds every provider's reason and
    ``error`` the error's JSON object.
    """

    ok: bool
    active_provider: str | None
    security_level: SecurityLevel | None
    min_security_level: SecurityLevel | None
    environment: str | None
    network: str | None
    providers: list[dict[str, object]] = field(default_factory=list)
    audit: dict[str, object] = field(default_factory=dict)
    process: dict[str, object] = field(default_factory=dict)  # core dumps, dumpable, dontdump
    degraded_reasons: list[dict[str, str]] = field(default_factory=list)
    error: dict[str, object] | None = None

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reasons)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "ok": self.ok,
            "degraded": self.degraded,
            "degraded_reasons": self.degraded_reasons,
            "active_provider": self.active_provider,
            "security_level": (
                self.security_level.label if self.security_level is not None else None
            ),
            "min_security_level": (
                self.min_security_level.label if self.min_security_level is not None else None
            ),
            "environment": self.environment,
            "network": self.network,
            "providers": self.providers,
            "audit": self.audit,
            "process": self.process,
        }
        if self.error is not None:
            out["error"] = self.error
        return out


DEGRADED_REASONS: dict[str, str] = {
    "below_minimum": "the active provider is below the minimum security level "
    "(consented by fallback.allow_below_minimum)",
    "floor_lowered": "min_security_level is below the environment's default minimum",
    "fell_back": "the active provider is not the first of the chain",
    "provider_degraded": "the active provider reports itself degraded",
    "unacknowledged_records": "the keystore holds key records its manifest does not list",
    "anchor_not_checked": "the keystore's generation anchor was not checked at open",
    "audit_forward_errors": "audit entries could not be forwarded",
    "hardening_not_in_force": "process hardening is required here but not in force",
}
"""The ``code`` of each reason ``health`` may give for ``degraded`` (stable; the
``reason`` beside it says what exactly)."""


def _degraded(code: str, reason: str) -> dict[str, str]:
    assert code in DEGRADED_REASONS
    return {"code": code, "reason": reason}


class _Entry:
    """What the audit entry of one operation records, filled in as the operation learns
    it: the provider and key once routed, detail fields, the key asked for (``ref``,
    recorded when the operation fails before naming a key) and the outcome on success."""

    __slots__ = ("detail", "key_id", "outcome", "provider", "ref")

    def __init__(
        self,
        provider: str | None = None,
        *,
        detail: dict[str, str] | None = None,
        ref: object = None,
    ) -> None:
        self.provider = provider
        self.key_id: str | None = None
        self.detail: dict[str, str] = detail if detail is not None else {}
        self.ref = ref
        self.outcome = "ok"


class Hsm:
    """One handle over the fallback chain. Build it with :func:`open_hsm`.

    Threads: the key operations (sign, sign_many, verify, get_key, list_keys,
    derive_public, capabilities, health; generate, import and delete, which the handle
    serialises itself) may be called from several threads at once. ``reload``, ``close``
    and the changes of the master key (``rotate_master_key``, ``change_passphrase``,
    ``unenrol_tpm``, ``unenrol_token_wrap``) must not overlap other operations on the same
    handle (a front end drains its workers first). Other processes sharing the deployment
    need nothing: the keystore and the audit log are safe across processes."""

    def __init__(
        self,
        config: Config,
        passphrase: SecretBytes | None = None,
        *,
        audit_recovery: str | None = None,
        verify_only: bool = False,
        purpose: str = OPERATE,
        pin: SecretBytes | None = None,
    ) -> None:
        if purpose not in (OPERATE, ENROLMENT):
            raise ConfigError(f"unknown handle purpose {purpose!r}")
        self._config = config
        self._enrolment_only = purpose == ENROLMENT
        self._verify_only = verify_only
        self._passphrase = passphrase
        self._pin = pin  # the token PIN the caller gave (owned: wiped by close)
        self._audit_recovery = audit_recovery
        self.audit_recovery: dict[str, str] | None = None
        self._lock = threading.RLock()
        self._cache: dict[str, tuple[Provider, KeyInfo]] = {}
        self._unhealthy: dict[str, str] = {}
        self._audit: AuditLog | None = None
        self._anchor = Anchor.none()
        self._closed = False
        chain = (
            enrolment_chain(config, passphrase)
            if self._enrolment_only
            else walk_chain(config, passphrase, pin)
        )
        try:
            self._install(chain)
        except BaseException:
            chain.provider.close()
            raise

    # --- set-up ------------------------------------------------------------------------

    def _install(self, chain: ChainResult) -> None:
        """Adopt an opened chain: its anchor, checked; then (unless verify-only) the audit
        log, checked against the anchor's state, and the chain's outcome written to it.
        On failure what this opened is closed again (the caller closes the chain)."""
        self._min_level = self._config.effective_min_level
        self._levels: dict[str, SecurityLevel] = {}
        self._active = chain.provider
        self._probe_pub = chain.probe_public_key
        self._attempts = chain.attempts
        cfg = self._config
        anchor = open_anchor(cfg, chain.provider, chain.attempts, self._passphrase, self._pin)
        audit: AuditLog | None = None
        try:
            anchor.check_generation_anchor(cfg)
            if not self._verify_only:  # read-only: nothing appended, so nothing checked
                audit = self._open_audit(anchor)
            self._anchor, self._audit = anchor, audit
            if audit is not None:
                self._record_chain()
        except BaseException:
            if audit is not None:
                audit.close()
            anchor.close()
            raise

    def _open_audit(self, anchor: Anchor) -> AuditLog:
        audit, recovery = anchor.open_audit(self._config, self.audit_path, self._audit_recovery)
        self.audit_recovery = recovery
        if recovery is not None:
            # The first entry of the new chain says what was lost, and why it was accepted.
            audit.append("audit_recover", "ok", provider=self._active.name, detail=recovery)
            log.warning(
                "anyhsm: audit chain %s started after a recorded loss", recovery["new_chain"]
            )
        return audit

    def _record_chain(self) -> None:
        assert self._audit is not None
        for a in self._attempts:
            if a.status in ("ok", "not_tried"):
                continue
            log.warning("anyhsm: provider %s skipped: %s", a.name, a.reason)
            self._audit.append(
                "fallback_skip",
                a.status,
                provider=a.name,
                error=a.error_code or None,
                detail={"reason": a.reason[:300]},
            )
        first = self._config.fallback.chain[0]
        if self._enrolment_only:
            log.warning(
                "anyhsm: keystore opened with the passphrase for enrolment only (security "
                "level %s, minimum %s); key operations are refused on this handle",
                self.security_level.label,
                self._min_level.label,
            )
        elif self._active.name != first:
            log.warning(
                "anyhsm: fell back from %s to %s (security level %s)",
                first,
                self._active.name,
                self.security_level.label,
            )
        self._audit.append(
            "open",
            "ok",
            provider=self._active.name,
            detail={
                "security_level": self.security_level.label,
                "environment": self._config.environment.value,
                "network": self._config.network.value,
                "fallback": "yes" if self._active.name != first else "no",
                **floor_detail(self._config),
                **self._purpose_detail(),
            },
        )

    def _purpose_detail(self) -> dict[str, str]:
        """The open entry of an enrolment-only handle says so, and that it is below the floor."""
        if not self._enrolment_only:
            return {}
        below = self.security_level < self._min_level
        return {"purpose": ENROLMENT, "below_floor": "yes" if below else "no"}

    def _key_operations(self, what: str) -> None:
        """The guard of the enrolment-only handle: no key operation, whatever the key."""
        if self._enrolment_only:
            from anyhsm.errors import EnrolmentOnlyHandle

            raise EnrolmentOnlyHandle(
                f"{what} refused: this handle was opened only to enrol an unlock path "
                "(TPM, token wrap) below the security floor",
                hint="enrol the TPM or token wrap, then open the deployment normally",
            )

    @property
    def enrolment_only(self) -> bool:
        """True for a handle opened by :func:`open_for_enrolment`."""
        return self._enrolment_only

    # --- public facts ---------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def active_provider(self) -> str:
        return self._active.name

    @property
    def security_level(self) -> SecurityLevel:
        return self._active.security_level()

    @property
    def network(self) -> Network:
        return self._config.network

    @property
    def attempts(self) -> list[Attempt]:
        return list(self._attempts)

    def audit_latest(self, member: str) -> str | None:
        """``detail[member]`` of the newest audit entry that has it, MAC-verified
        (:meth:`anyhsm.audit.AuditLog.latest`): what the spending policy's rollback
        check reads (``state_seq``)."""
        return self._writer().latest(member)

    @property
    def audit_last_seq(self) -> int:
        """The sequence number of the last audit entry this handle wrote or saw (0 for a
        verify-only handle)."""
        return self._audit.last_seq if self._audit is not None else 0

    @property
    def audit_path(self) -> Path:
        cfg = self._config
        return cfg.audit.path or (cfg.config_dir / "audit.log")

    def _writer(self) -> AuditLog:
        """The open log every operation writes through; the one closed-handle check."""
        if self._closed:
            raise HsmError("the HSM handle is closed", hint="open a new one with open_hsm()")
        if self._audit is None:
            raise AuditError(
                "this handle was opened only to verify the audit log",
                hint="open a handle without verify_only to operate",
            )
        return self._audit

    @property
    def anchor(self) -> Anchor:
        """The keystore anchoring this deployment (:class:`~anyhsm.anchor.Anchor`): its
        facts (``unlocked_by``, ``epoch``, ``generation``, ``enrolled()``,
        ``generation_anchor_ref``) for front ends to show. Changes to it go through the
        handle's audited operations (:meth:`enrol_tpm`, :meth:`enrol_token_wrap`,
        :meth:`unenrol_tpm`, :meth:`unenrol_token_wrap`, :meth:`change_passphrase`,
        :meth:`rotate_master_key`), never through the keystore itself."""
        return self._anchor

    @property
    def keystore(self) -> Keystore:
        """The open keystore itself: for tests and diagnostics. Front ends use
        :attr:`anchor` and the audited operations instead."""
        return self._anchor.require()

    def record_event(
        self,
        op: str,
        outcome: str,
        detail: dict[str, str] | None = None,
        *,
        key_id: str | None = None,
        provider: str | None = None,
        error: str | None = None,
    ) -> None:
        """Write an event that is not a provider call (enrolment, recovery, signatures
        the PSBT signer discarded) to the audit log; ``provider`` defaults to the active
        one."""
        audit = self._writer()
        who = provider or self._active.name
        audit.append(op, outcome, provider=who, key_id=key_id, error=error, detail=detail)

    def provider_context(self, name: str) -> ProviderContext:
        """What provider ``name`` of this deployment is told, with the handle's passphrase
        and token PIN: for the unlock paths used beside the chain (the token-wrap
        enrolment, re-wrapping the master key during a rotation)."""
        from anyhsm.factory import provider_context

        return provider_context(self._config, name, self._passphrase, self._pin)

    def capabilities(self, key: KeyRef | None = None) -> Capabilities:
        """Capabilities of the provider holding ``key`` (or of the active one)."""
        if key is None:
            return self._active.capabilities()
        return self._route(key)[0].capabilities()

    def runs_in_process(self, key: KeyRef) -> bool:
        """Whether an operation on ``key`` is known to finish in this process without
        waiting on a device, the network or a disk flush: the key's route is cached (no
        lookup here), its provider declares ``in_process``, and the audit log neither
        fsyncs nor forwards each entry. False when unsure. The service runs such
        operations on its event loop: they take tens of microseconds, less than a hand-off
        to a worker thread."""
        audit = self._audit
        hit = self._cache.get(key) if isinstance(key, str) else None
        return (
            hit is not None
            and audit is not None
            and not audit.waits_per_entry
            and hit[0].capabilities().in_process
        )

    # --- routing ----------------------------------------------------------------------------

    def _open_providers(self) -> list[Provider]:
        own = self._anchor.owned_provider
        return [self._active] if own is None else [self._active, own]

    def _keystore_provider(self) -> Provider | None:
        """The provider that serves the key directory's sealed records (the keystore):
        the anchor knows it, whatever its class."""
        return self._anchor.provider

    def _other_stores(self) -> list[Provider]:
        """Open providers that are not the keystore: a token, the simulator."""
        kp = self._keystore_provider()
        return [p for p in self._open_providers() if p is not kp]

    def _route(self, key: KeyRef, *, fresh: bool = False) -> tuple[Provider, KeyInfo]:
        """Find the one store holding ``key``. The cache serves the signing hot path
        (the provider re-checks the key exists when it signs; a PKCS#11 provider also
        refuses a key object whose public key changed); ``fresh`` looks again, for
        answers that must reflect other processes' changes.

        With a keystore open, the keystore is the key directory and the only source of
        truth: a sealed record is a key of the keystore; a reference record names the
        provider, the store (token serial), the id and the public key of a key kept
        elsewhere, and all four are checked before the key is used. An object in a
        token that the directory does not know is never used. Without a keystore
        (development), the active provider alone answers."""
        self._key_operations("using a key")
        if not isinstance(key, str) or not key:
            raise KeyNotFound("a key must be named by its id or label")
        hit = None if fresh else self._cache.get(key)
        if hit is not None:
            return hit
        stale = self._cache.pop(key, None)
        if stale is not None:
            self._forget(stale[1])
        ks = self._anchor.keystore
        if ks is None:
            found = self._ask(self._active, key)
            if found is None:
                raise KeyNotFound(f"no key {key!r}", hint="list keys with 'anyhsm key list'")
            routed = (self._active, found)
        elif key.startswith(INTERNAL_LABEL_PREFIX):
            routed = self._route_internal(key)
        else:
            routed = self._route_directory(ks, key)
        info = routed[1]
        self._cache[info.id] = self._cache[info.label] = routed
        return routed

    def _ask(self, provider: Provider, key: str) -> KeyInfo | None:
        """One provider's answer for ``key``; None if it has none (internal keys are
        found only by their reserved labels)."""
        try:
            info = self._call(provider, lambda: provider.get_key(key))
        except KeyNotFound:
            return None
        if info.internal and not key.startswith(INTERNAL_LABEL_PREFIX):
            return None
        return info

    def _route_internal(self, key: str) -> tuple[Provider, KeyInfo]:
        """Internal keys (the health probe) live in each provider, outside the directory."""
        for provider in self._open_providers():
            info = self._ask(provider, key)
            if info is not None:
                return provider, info
        raise KeyNotFound(f"no key {key!r}")

    def _route_directory(self, ks: Keystore, key: str) -> tuple[Provider, KeyInfo]:
        try:
            rec = ks.find(key)
        except KeyNotFound:
            rec = None
        if rec is not None and rec.label.startswith(INTERNAL_LABEL_PREFIX):
            rec = None  # internal keys are found only by their reserved labels
        if rec is None:
            return self._route_outside_directory(key)
        if rec.kind == "sealed":
            kp = self._keystore_provider()
            assert kp is not None
            info = self._call(kp, lambda: kp.get_key(rec.id))
            routed: tuple[Provider, KeyInfo] = (kp, info)
        else:
            routed = self._route_reference(rec)
        if key != rec.id:
            self._check_label_unique(key, routed)
        return routed

    def _route_reference(self, rec: KeyRecord) -> tuple[Provider, KeyInfo]:
        """A key kept in another store: exactly that provider, exactly that store and
        id, and the public key the directory recorded when the key was made."""
        provider = next((p for p in self._open_providers() if p.name == rec.provider), None)
        if provider is None:
            why = next((a.reason for a in self._attempts if a.name == rec.provider), "")
            raise ProviderUnavailable(
                f"key {rec.label!r} lives in provider {rec.provider!r}, which is not "
                f"available{': ' + why if why else ''}",
                hint="keys are never moved between providers; restore that provider",
            )
        store = provider.store_id()
        if store != rec.store:
            raise KeyBindingMismatch(
                f"key {rec.label!r} (id {rec.id}) is bound to {rec.store} but provider "
                f"{provider.name!r} is connected to {store}: another token is configured; "
                "nothing was signed",
                hint="configure the token that holds the key (token_serial), or restore it",
            )
        info = self._ask(provider, rec.id)
        if info is None or info.id != rec.id:
            raise KeyNotFound(
                f"key {rec.label!r} (id {rec.id}) is no longer on {store} "
                f"(provider {provider.name!r})",
                hint="it was deleted from the token outside anyhsm; restore it from the "
                "token's backup, or remove its record with 'anyhsm key delete'",
            )
        if not hmac.compare_digest(info.public_key, rec.public_key):
            raise KeyBindingMismatch(
                f"key {rec.label!r} (id {rec.id}) on {store} (provider {provider.name!r}) "
                f"has public key {info.public_key.hex()}, but the key directory recorded "
                f"{rec.public_key.hex()}: the key object was replaced; nothing was signed",
                hint="investigate who can log in to the token; do not use this key object",
            )
        return provider, info

    def _check_label_unique(self, label: str, routed: tuple[Provider, KeyInfo]) -> None:
        """A label the directory resolved must name no other key in any open store."""
        provider, info = routed
        for other in self._other_stores():
            try:
                found = self._ask(other, label)
            except KeyNotFound:
                found = None
            except (ProviderUnavailable, ProviderError, UnsupportedOperation):
                continue  # cannot look (the directory still decides which key signs)
            except KeyBindingMismatch:
                raise
            except HsmKeyError as e:  # e.g. several token objects carry the label
                raise self._label_conflict(label, info, other.store_id(), e.message) from None
            if found is None or (other is provider and found.id == info.id):
                continue
            there = found.store or other.store_id()
            raise self._label_conflict(label, info, there, f"key {found.id}")

    def _label_conflict(self, label: str, info: KeyInfo, there: str, what: str) -> KeyLabelConflict:
        return KeyLabelConflict(
            f"label {label!r} names key {info.id} in {info.store} (provider {info.provider!r}, "
            f"in the key directory) and also {what} in {there}; refusing to choose",
            hint=f"refer to the key by its id ({info.id}), which resolves through the key "
            f"directory only, and remove or relabel the other object in {there}",
        )

    def _route_outside_directory(self, key: str) -> tuple[Provider, KeyInfo]:
        """Not in the directory: only an in-process store (the simulator) may answer;
        an object in a persistent store (a token) is refused, naming it."""
        for provider in self._other_stores():
            info = self._ask(provider, key)
            if info is None:
                continue
            if not provider.capabilities().persistent:
                return provider, info
            raise KeyNotInDirectory(
                f"{info.store or provider.store_id()} (provider {provider.name!r}) holds a key "
                f"{info.label!r} (id {info.id}) that the key directory has no record of: "
                "anyhsm did not make it, so it is never used",
                hint="another application or anyone with the token's user PIN can create "
                "such objects; use the keys listed by 'anyhsm key list'",
            )
        raise KeyNotFound(f"no key {key!r}", hint="list keys with 'anyhsm key list'")

    def _forget(self, info: KeyInfo) -> None:
        self._cache.pop(info.id, None)
        self._cache.pop(info.label, None)

    def _call(self, provider: Provider, fn: Callable[[], T]) -> T:
        """Run a provider call; provider-level failures mark it unhealthy."""
        try:
            result = fn()
        except (ProviderUnavailable, ProviderError) as e:
            self._mark_unhealthy(provider, e)
            raise
        if self._unhealthy:
            self._unhealthy.pop(provider.name, None)
        return result

    def _mark_unhealthy(self, provider: Provider, error: ProviderError) -> None:
        if not isinstance(error, UnsupportedOperation):
            self._unhealthy[provider.name] = error.message

    def _check_level(self, provider: Provider, info: KeyInfo) -> None:
        level = self._levels.get(provider.name)
        if level is None:
            level = self._levels[provider.name] = provider.security_level()
        minimum = self._min_level
        if level >= minimum:
            return
        if not self._config.fallback.allow_below_minimum:
            raise SecurityLevelTooLow(
                f"key {info.label!r} is in provider {provider.name!r} at level {level.label}, "
                f"below the minimum {minimum.label}",
                hint="use a key held by a hardware-backed provider",
            )

    def _audited(
        self,
        op: str,
        body: Callable[[_Entry], T],
        entry: _Entry,
        *,
        intent: Mapping[str, str] | None = None,
    ) -> T:
        """The one audited path of every operation: the closed-handle check, then (with
        ``intent``) a "started" entry written *before* ``body`` runs, so an operation that
        changes state (create, import, delete, export, enrol) never happens unless the
        audit log accepted its entry first; then one entry for the outcome: "ok" after
        ``body`` returned (its result is returned only once that entry is written),
        "refused" for a decision of policy, else "error" with the error's code.

        ``body`` fills in ``entry`` (the provider and key once routed, detail fields);
        when it fails before naming a key, the failure entry says which key was asked for
        (``entry.ref``)."""
        audit = self._writer()
        if intent is not None:
            audit.append(op, "started", provider=entry.provider, key_id=entry.key_id, detail=intent)
        try:
            result = body(entry)
        except Exception as e:
            detail = entry.detail
            if entry.key_id is None and entry.ref is not None:
                detail["key_ref"] = str(entry.ref)[:128]
            code = error_code(e)
            outcome = failure_outcome(e, detail)
            audit.append(
                op, outcome, provider=entry.provider, key_id=entry.key_id, error=code, detail=detail
            )
            raise
        audit.append(
            op, entry.outcome, provider=entry.provider, key_id=entry.key_id, detail=entry.detail
        )
        return result

    # --- key operations ----------------------------------------------------------------------

    @staticmethod
    def _check_label(label: str) -> None:
        if not isinstance(label, str) or not label.strip() or len(label) > 128:
            raise InvalidKeyMaterial("a key label must be 1 to 128 characters")
        if label.startswith(INTERNAL_LABEL_PREFIX):
            raise InvalidKeyMaterial(f"labels starting with {INTERNAL_LABEL_PREFIX!r} are reserved")
        if any(ord(c) < 32 for c in label):
            raise InvalidKeyMaterial("a key label may not contain control characters")

    def _check_label_free(self, label: str) -> None:
        """A new label names nothing yet: no directory record (reachable or not), and no
        object in an open store (a token object the directory does not know included),
        so that no label ever ends up in two stores through anyhsm."""
        try:
            self._route(label, fresh=True)
        except KeyNotInDirectory as e:
            raise KeyExists(
                f"a key labelled {label!r} already exists: {e.message}",
                hint="choose another label",
            ) from None
        except KeyNotFound:
            return
        except (ProviderUnavailable, KeyBindingMismatch, KeyLabelConflict):
            pass
        raise KeyExists(f"a key labelled {label!r} already exists", hint="choose another label")

    def _remember(self, provider: Provider, info: KeyInfo) -> None:
        """Record keys made outside the keystore in the key directory, bound to their
        provider, store (token serial), id and public key, all checked before each use."""
        ks = self._anchor.keystore
        if (
            ks is not None
            and provider is not self._keystore_provider()
            and provider.capabilities().persistent
        ):
            store = provider.store_id()
            rec = ks.add_reference(
                info.id,
                info.label,
                info.public_key,
                provider.name,
                store,
                created_at=info.created_at or None,  # one creation time, the store's own
            )
            if rec.id != info.id:  # ids of stores anyhsm supports are 32 hex digits
                ks.delete(rec.id)
                raise ProviderError(
                    f"provider {provider.name!r} gave key {info.label!r} an id the key "
                    f"directory cannot hold ({info.id!r}); it is not used",
                    hint="delete the key from that store; this provider is not supported",
                )
        self._cache[info.id] = self._cache[info.label] = (provider, info)

    def generate_key(
        self, label: str, key_type: KeyType = KeyType.SECP256K1, *, exportable: bool = False
    ) -> KeyInfo:
        """Create a key in the active provider (secp256k1 by default)."""
        self._key_operations("creating a key")
        provider = self._active

        def body(entry: _Entry) -> KeyInfo:
            self._check_label(label)
            self._check_label_free(label)
            spec = KeySpec(label, key_type, exportable)
            info = self._call(provider, lambda: provider.generate_key(spec))
            self._remember(provider, info)
            entry.key_id = info.id
            return info

        intent = {"label": str(label)[:128], "key_type": key_type.value}
        entry = _Entry(provider.name, detail={"label": str(label), "key_type": key_type.value})
        with self._lock:
            return self._audited("generate_key", body, entry, intent=intent)

    def import_key(
        self,
        label: str,
        secret: bytes | bytearray | SecretBytes,
        key_type: KeyType = KeyType.SECP256K1,
        *,
        exportable: bool = False,
    ) -> KeyInfo:
        """Import key material (32-byte secp256k1 scalar, or a 16-64 byte BIP32 seed)."""
        self._key_operations("importing a key")
        provider = self._active

        def body(entry: _Entry) -> KeyInfo:
            self._check_label(label)
            caps = provider.capabilities()
            if not caps.can_import or not isinstance(provider, KeyImporter):
                raise UnsupportedOperation(provider.name, "key import")
            self._check_label_free(label)
            own = not isinstance(secret, SecretBytes)
            sb = secret if isinstance(secret, SecretBytes) else SecretBytes(secret)
            try:
                info = self._call(
                    provider,
                    lambda: provider.import_key(label, sb, key_type, exportable=exportable),
                )
            finally:
                if own:
                    sb.wipe()
            self._remember(provider, info)
            entry.key_id = info.id
            twins = self.same_key_as(info)
            if twins:
                # The same secret under two labels: not refused (a deliberate second
                # label is legitimate), but said, and recorded in the audit entry.
                entry.detail["same_key_as"] = ",".join(t.id for t in twins)[:300]
                log.warning(
                    "anyhsm: the key imported as %r is already in the store as %s",
                    label,
                    ", ".join(repr(t.label) for t in twins),
                )
            return info

        intent = {"label": str(label)[:128], "key_type": key_type.value}
        entry = _Entry(provider.name, detail={"label": str(label), "key_type": key_type.value})
        with self._lock:
            return self._audited("import_key", body, entry, intent=intent)

    def same_key_as(self, info: KeyInfo) -> list[KeyInfo]:
        """Other keys with the same public key (and, for HD keys, chain code): the same
        seed or secret imported again under another label."""
        return [
            k
            for k in self.list_keys()
            if k.id != info.id
            and k.public_key == info.public_key
            and k.chain_code == info.chain_code
        ]

    def export_key(self, key: KeyRef) -> SecretBytes:
        """Private material of an exportable key, where provider and config allow it."""

        def body(entry: _Entry) -> SecretBytes:
            provider, info = self._route(key)
            entry.provider, entry.key_id = provider.name, info.id
            if not provider.capabilities().can_export or not isinstance(provider, KeyExporter):
                raise UnsupportedOperation(provider.name, "key export")
            return self._call(provider, lambda: provider.export_key(info.id))

        ref = str(key)[:128]
        entry = _Entry(detail={"key_ref": ref})
        return self._audited("export_key", body, entry, intent={"key_ref": ref})

    def list_keys(self) -> list[KeyInfo]:
        """Keys of the key directory (those whose store is not open here marked
        ``available=False``), and keys of an in-process store (the simulator); internal
        keys hidden. Token objects the directory does not know are not listed: they are
        never used. Without a keystore: the active provider's keys."""
        self._key_operations("listing keys")
        ks = self._anchor.keystore
        kp = self._keystore_provider()
        if ks is None or kp is None:
            return [i for i in self._call(self._active, self._active.list_keys) if not i.internal]
        out = [i for i in self._call(kp, kp.list_keys) if not i.internal]
        seen = {i.id for i in out}
        others = self._other_stores()
        stores = {p.name: p.store_id() for p in others}
        for rec in ks.records():
            if (
                rec.kind != "reference"
                or rec.id in seen
                or rec.label.startswith(INTERNAL_LABEL_PREFIX)
            ):
                continue
            seen.add(rec.id)
            if stores.get(rec.provider) == rec.store:
                out.append(self._reference_info(rec))
            else:  # its store is not open here: listed, marked, never used
                out.append(replace(self._reference_info(rec), available=False))
        for provider in others:
            if provider.capabilities().persistent:
                continue
            for info in self._call(provider, provider.list_keys):
                if not info.internal and info.id not in seen:
                    seen.add(info.id)
                    out.append(info)
        return out

    @staticmethod
    def _reference_info(rec: KeyRecord) -> KeyInfo:
        """What the directory records about a key kept in another store (checked
        against that store when the key is used)."""
        return KeyInfo(
            id=rec.id,
            label=rec.label,
            provider=rec.provider,
            public_key=rec.public_key,
            key_type=rec.key_type,
            store=rec.store,
            exportable=False,
            created_at=rec.created_at,
            chain_code=rec.chain_code,
        )

    def get_key(self, key: KeyRef) -> KeyInfo:
        return self._route(key, fresh=True)[1]

    def key_info(self, key: KeyRef) -> KeyInfo:
        """Like :meth:`get_key`, from the handle's routing when it knows the key: as fresh
        as the signing path (which looks again when a key is gone), without a lookup in
        the store. A caller that decides from it and then signs signs by the returned
        ``id``, so a key deleted meanwhile and replaced under its label is refused, never
        the one signed with."""
        return self._route(key)[1]

    def public_key(self, key: KeyRef) -> bytes:
        """33-byte compressed SEC1 public key."""
        return self._route(key, fresh=True)[1].public_key

    def derive_public(self, key: KeyRef, path: tuple[int, ...] | list[int]) -> DerivedPublicKey:
        """BIP32 child public data at ``path`` (computed inside the provider)."""
        provider, info = self._route(key)
        if not provider.capabilities().can_derive or not isinstance(provider, Bip32Deriver):
            raise UnsupportedOperation(provider.name, "BIP32 derivation", hint="use a single key")
        return self._call(provider, lambda: provider.derive_public(info.id, tuple(path)))

    # --- signing: one audited path for one digest and for a batch -------------------------------

    def sign(
        self,
        key: KeyRef,
        digest: bytes,
        scheme: SigScheme = SigScheme.ECDSA,
        *,
        params: SignParams | None = None,
    ) -> bytes:
        """Sign a 32-byte digest: strict DER low-S ECDSA, or 64-byte BIP340 Schnorr. One
        audit entry; the digest (not secret) says what was signed."""
        # The entry's detail is built here, before any check, so that a refused or failed
        # request is recorded with what was asked (the digest as given, up to 64 bytes).
        detail = {"scheme": scheme.value}
        if isinstance(digest, bytes | bytearray):
            detail["digest"] = digest[:64].hex()
        return self._sign(key, ((digest, scheme, params),), _Entry(detail=detail, ref=key), None)[0]

    def sign_many(
        self,
        key: KeyRef,
        requests: Sequence[tuple[bytes, SigScheme, SignParams | None]],
        *,
        context: Mapping[str, str] | None = None,
    ) -> list[bytes]:
        """Sign several digests with one key, in order. Providers that declare
        ``can_batch`` share the work (one decryption, BIP32 parents derived once);
        others sign one by one. One audit entry for the batch: the key, the schemes
        and the number of signatures (one entry per signature cost as much as a
        tenth of signing a PSBT input and said nothing more)."""
        detail = {**(context or {}), "requested": str(len(requests))}
        return self._sign(key, requests, _Entry(detail=detail, ref=key), context or {})

    def _sign(
        self,
        key: KeyRef,
        requests: Sequence[tuple[bytes, SigScheme, SignParams | None]],
        entry: _Entry,
        batch: Mapping[str, str] | None,
    ) -> list[bytes]:
        """The signing path of :meth:`sign` and :meth:`sign_many` (``batch``: the
        context of a batch, None for one digest), through :meth:`_audited`: the one
        digest check, routing (the cache first for one digest, the directory afresh for
        a batch), the floor, the provider's signature(s); a key gone meanwhile (deleted,
        or its label now naming another key in another process) is looked up again,
        never signed with."""

        def body(entry: _Entry) -> list[bytes]:
            reqs = [(_digest_bytes(d), scheme, params) for d, scheme, params in requests]
            hit = None if batch is not None else self._cache.get(key)
            provider, info = hit or self._route(key, fresh=batch is not None)
            entry.provider, entry.key_id = provider.name, info.id
            self._check_level(provider, info)
            try:
                sigs = self._signatures(provider, info.id, reqs)
            except KeyNotFound:
                self._forget(info)
                provider, info = self._route(key, fresh=True)
                entry.provider, entry.key_id = provider.name, info.id
                self._check_level(provider, info)
                sigs = self._signatures(provider, info.id, reqs)
            if batch is not None:
                entry.detail = {
                    **batch,
                    **digests_detail([r[0] for r in reqs]),
                    "scheme": ",".join(sorted({r[1].value for r in reqs})),
                    "signatures": str(len(reqs)),
                }
            return sigs

        return self._audited("sign", body, entry)

    def _signatures(
        self,
        provider: Provider,
        key_id: str,
        reqs: Sequence[tuple[bytes, SigScheme, SignParams | None]],
    ) -> list[bytes]:
        """The provider's signatures of ``reqs`` in order: one call for a batch where it
        declares ``can_batch``. Low-S strict DER is each provider's contract (the PKCS#11
        provider normalises what the token returns; libsecp256k1 output is low-S already),
        checked on raw providers by tests/conformance/test_provider_contract.py."""
        try:
            if len(reqs) == 1:
                d, scheme, params = reqs[0]
                return [provider.sign_digest(key_id, d, scheme, params)]
            if provider.capabilities().can_batch and isinstance(provider, BatchSigner):
                return provider.sign_batch(key_id, reqs)
            return [provider.sign_digest(key_id, d, s, p) for d, s, p in reqs]
        except (ProviderUnavailable, ProviderError) as e:
            self._mark_unhealthy(provider, e)
            raise

    def verify(
        self,
        key: KeyRef,
        digest: bytes,
        signature: bytes,
        scheme: SigScheme = SigScheme.ECDSA,
        *,
        path: tuple[int, ...] = (),
        tweak: bytes | None = None,
    ) -> bool:
        """Verify against the key's public key (no private operation)."""

        def body(entry: _Entry) -> bool:
            info = self._route(key)[1]
            entry.key_id = info.id
            pub = self.derive_public(key, path).public_key if path else info.public_key
            if scheme is SigScheme.ECDSA:
                ok = curve.ecdsa_verify(pub, bytes(digest), bytes(signature))
            else:
                xo = curve.xonly(pub)
                if tweak is not None:
                    xo, _ = curve.xonly_tweak_add(xo, tweak)
                ok = curve.schnorr_verify(xo, bytes(digest), bytes(signature))
            entry.detail["valid"] = "yes" if ok else "no"
            return ok

        return self._audited("verify", body, _Entry(ref=str(key)[:128]))

    def delete_key(self, key: KeyRef) -> None:
        """Delete a key from its store (binding checked first) and its directory record.
        A reference whose key its own store (same serial) no longer holds is removed
        from the directory alone."""

        def body(entry: _Entry) -> None:
            try:
                provider, info = self._route(key, fresh=True)  # binding checked first
            except KeyNotInDirectory:
                raise
            except KeyNotFound:
                gone = self._dangling_reference(key)
                if gone is None:
                    raise
                entry.provider, entry.key_id = gone.provider, gone.id
                entry.detail["removed"] = "directory record only: the key is no longer in its store"
                self._anchor.require().delete(gone.id)
                return
            entry.provider, entry.key_id = provider.name, info.id
            self._call(provider, lambda: provider.delete_key(info.id))
            self._forget(info)
            ks = self._anchor.keystore
            if ks is not None and provider is not self._keystore_provider():
                try:
                    rec = ks.find(info.id)
                except KeyNotFound:
                    return
                if rec.kind == "reference" and rec.id == info.id:
                    ks.delete(rec.id)

        ref = str(key)[:128]
        with self._lock:
            self._audited(
                "delete_key", body, _Entry(detail={"key_ref": ref}), intent={"key_ref": ref}
            )

    def _dangling_reference(self, key: str) -> KeyRecord | None:
        """The reference record ``key`` names when its own store (provider and serial
        as recorded) is reachable and holds no key with its id; else None."""
        ks = self._anchor.keystore
        if ks is None or not isinstance(key, str) or not key:
            return None
        try:
            rec = ks.find(key)
        except KeyNotFound:
            return None
        if rec.kind != "reference":
            return None
        provider = next((p for p in self._other_stores() if p.name == rec.provider), None)
        if provider is None or provider.store_id() != rec.store:
            return None
        info = self._ask(provider, rec.id)
        return rec if info is None or info.id != rec.id else None

    # --- the anchor: unlock paths, passphrase, master key (each one audited step) --------------

    def _handle_detail(self) -> dict[str, str]:
        return {"handle": ENROLMENT if self._enrolment_only else "normal"}

    def _admin(self, op: str, body: Callable[[_Entry], T], detail: Mapping[str, str]) -> T:
        """An administrative change to the anchor: audited as every operation is (a
        "started" entry first, then ok / refused / error), by the active provider."""
        entry = _Entry(self._active.name, detail=dict(detail))
        with self._lock:
            return self._audited(op, body, entry, intent=dict(detail))

    def enrol_tpm(self, *, force: bool = False) -> dict[str, object]:
        """Seal the keystore's master key to the configured TPM and anchor the keystore's
        generation in a TPM counter (``tpm_enroll``). Allowed on the enrolment-only
        handle. Re-enrolling from a keystore the TPM itself opened needs ``force`` (it
        normally follows a recovery with the passphrase). Returns the enrolment summary."""
        from anyhsm.tpm.enrollment import enroll
        from anyhsm.tpm.sealing import TpmSealer

        sealer = tpm_sealer(self._config)  # ConfigError before anything is written
        assert isinstance(sealer, TpmSealer)

        def body(entry: _Entry) -> dict[str, object]:
            ks = self._anchor.require()
            if ks.unlocked_by != "passphrase" and not force:
                raise HsmError(
                    f"the keystore was opened via {ks.unlocked_by}, not the passphrase",
                    hint="re-enrolling normally follows a recovery with the passphrase; "
                    "add --force",
                )
            summary = enroll(ks, sealer.settings)
            entry.detail["pcrs"] = str(summary["pcrs"])
            return summary

        return self._admin(
            "tpm_enroll", body, {"tcti": sealer.settings.tcti, **self._handle_detail()}
        )

    def tpm_status(self) -> dict[str, object]:
        """Enrolment and TPM state (``anyhsm tpm status``); reports TPM trouble, never
        raises for it. Not audited (it changes nothing). Allowed on the enrolment-only
        handle."""
        from anyhsm.tpm.enrollment import status
        from anyhsm.tpm.sealing import TpmSealer

        sealer = tpm_sealer(self._config)
        assert isinstance(sealer, TpmSealer)
        out = status(self._anchor.require(), sealer.settings)
        out["handle"] = self._handle_detail()["handle"]
        return out

    def enrol_token_wrap(self) -> dict[str, object]:
        """Wrap the keystore's master key with the AES key ``wrap_key_label`` inside the
        configured PKCS#11 token, created there when missing (``pkcs11_wrap_enroll``).
        Afterwards the keystore opens through the token whenever ``[providers.pkcs11]``
        names the wrap key, whether the chain lists ``pkcs11`` or ``pkcs11-wrapped``.
        Allowed on the enrolment-only handle. Returns the enrolment summary."""
        from anyhsm import unlock_blobs

        sealer = token_sealer(self._config, self._pin)  # ConfigError before anything is written

        def body(entry: _Entry) -> dict[str, object]:
            summary = unlock_blobs.enrol(self._anchor.require(), sealer)
            entry.detail["mechanism"] = str(summary.get("mechanism", ""))
            return summary

        return self._admin("pkcs11_wrap_enroll", body, self._handle_detail())

    def unenrol_tpm(self, current: SecretBytes | None) -> dict[str, object]:
        """Revoke the TPM unlock path (``tpm_unenroll``): a rotation to a fresh master key
        without the sealed blob (so a saved copy of it opens nothing), then the generation
        anchor leaves the manifest and its counter the TPM (when the TPM is configured).
        ``current``: the keystore passphrase, checked (the new master key is wrapped by
        it); may be None when nothing is enrolled. Returns ``{"unenrolled": bool, ...}``
        with the rotation's summary; not enrolled: a stale anchor is still dropped and the
        entry is a ``noop``."""
        from anyhsm.tpm.enrollment import unenroll_anchor
        from anyhsm.tpm.sealing import TpmSealer

        table = self._config.provider_settings("tpm")
        sealer = tpm_sealer(self._config) if "tcti" in table else None
        settings = sealer.settings if isinstance(sealer, TpmSealer) else None

        def drop_anchor() -> dict[str, str]:
            had = self._anchor.generation_anchor_ref is not None
            unenroll_anchor(self._anchor.require(), settings)
            return {"anchor": "removed" if had else "none"}

        return self._unenrol("tpm_unenroll", TPM_BLOB, current, drop_anchor)

    def unenrol_token_wrap(self, current: SecretBytes | None) -> dict[str, object]:
        """Revoke the token unlock path (``pkcs11_wrap_unenroll``): a rotation to a fresh
        master key without the wrapped blob, so a saved copy of it opens nothing. As
        :meth:`unenrol_tpm`."""
        return self._unenrol("pkcs11_wrap_unenroll", WRAPPED_BLOB, current, None)

    def _unenrol(
        self, op: str, blob: str, current: SecretBytes | None, after: OnRotated | None
    ) -> dict[str, object]:
        self._key_operations("unenrolling an unlock path (a master-key rotation)")
        ks = self._anchor.require()
        if ks.read_side_file(blob) is None:

            def noop(entry: _Entry) -> dict[str, object]:
                entry.outcome = "noop"
                if after is not None:
                    entry.detail.update(after())
                return {"unenrolled": False}

            return self._admin(op, noop, self._handle_detail())
        summary = self._rotate(
            op, self._require_current(current), current, drop={blob}, after=after
        )
        return {"unenrolled": True, **summary}

    def change_passphrase(
        self, current: SecretBytes | None, new: SecretBytes, *, kdf: KdfParams | None = None
    ) -> dict[str, object]:
        """Change the keystore passphrase and/or its KDF cost (``keystore_passwd``): a
        rotation to a fresh master key wrapped by ``new``, so the old passphrase and old
        copies of the header open nothing that exists after it. ``current`` is checked
        first (None: AuthenticationFailed, exit 5). Every enrolled unlock blob is made again
        for the new master key."""
        return self._rotate("keystore_passwd", new, self._require_current(current), kdf=kdf)

    def rotate_master_key(self, passphrase: SecretBytes | None) -> dict[str, object]:
        """A fresh master key, same passphrase (``rotate_master_key``): every key
        re-encrypted (see :meth:`Keystore.rotate`), every enrolled unlock blob made again,
        the audit key retired with the old master key; copies of the old one (a leaked
        backup plus passphrase) open nothing created after it. ``passphrase`` is the
        current passphrase, checked first (None: AuthenticationFailed, exit 5)."""
        current = self._require_current(passphrase)
        return self._rotate("rotate_master_key", current, current)

    # --- the spending policy's binding and state keys (for anyhsm.policy) -----------------

    def policy_binding(self) -> tuple[str, int] | None:
        """(SHA-256 hex of the active spending policy's file, its version) as the keystore
        manifest records it (authenticated, under the generation anchor), or None when no
        policy is set. Not audited (it changes nothing)."""
        return self._anchor.require().policy_binding()

    def set_policy_binding(self, sha256: str | None, detail: Mapping[str, str]) -> int:
        """Bind the spending policy whose file has SHA-256 ``sha256`` (None: remove it),
        audited as ``policy_set`` (started, then ok / error, with ``detail``); returns the
        new version. Refused on the enrolment-only handle."""
        self._key_operations("setting the spending policy")
        ks = self._anchor.require()

        def body(entry: _Entry) -> int:
            version = ks.set_policy_binding(sha256)
            entry.detail["version"] = str(version)
            return version

        return self._admin("policy_set", body, {**detail, "policy_sha256": sha256 or "none"})

    def state_key(self, purpose: str) -> SecretBytes:
        """A 32-byte key for MAC-ing state kept beside the keystore (the spending policy's
        counters), stable across master-key rotations (see :meth:`Keystore.state_key`);
        the caller wipes it. Refused on the enrolment-only handle."""
        self._key_operations("using a state key")
        return self._anchor.require().state_key(purpose)

    @staticmethod
    def _require_current(current: SecretBytes | None) -> SecretBytes:
        if current is None:
            raise AuthenticationFailed(
                "this needs the current keystore passphrase",
                hint="set ANYHSM_PASSPHRASE or pass --passphrase-file",
            )
        return current

    def _rotate(
        self,
        op: str,
        passphrase: SecretBytes,
        current: SecretBytes | None,
        *,
        kdf: KdfParams | None = None,
        drop: Collection[str] = (),
        after: OnRotated | None = None,
    ) -> dict[str, object]:
        """One audited rotation of the master key, which no other writer of the log can
        interleave with: the "started" entry is the last one under the old audit key, the
        outcome entry the first under the new one. Checked before it starts (one "error"
        entry if not): ``current`` opens the store, and every unlock blob to keep can be
        made again (its device configured). ``passphrase`` wraps the new master key; the
        blobs in ``drop`` are not carried over (revoked with the old key); ``after`` runs
        once the new key is in force, before the outcome entry."""
        self._key_operations("rotating the master key")
        ks = self._anchor.require()
        audit = self._writer()
        before = {"epoch": str(ks.epoch)}
        with self._lock:
            try:
                if current is not None:
                    self._anchor.check_passphrase(current)
                make = self._anchor.resealer(self._config, self._pin, drop=drop)
            except Exception as e:
                code = error_code(e)
                said = dict(before)
                outcome = failure_outcome(e, said)
                audit.append(op, outcome, provider=self._active.name, error=code, detail=said)
                raise
            with audit.exclusive() as append:
                append(op, "started", before)
                try:
                    self._anchor.rotate(passphrase, make, audit.position(), kdf=kdf)
                except Exception as e:
                    code = error_code(e)
                    append(op, "error", {**before, "error": code})
                    raise
                audit.switch_key()
                done = {"epoch": str(ks.epoch), "generation": str(ks.generation)}
                try:
                    extra = after() if after is not None else {}
                except Exception as e:
                    code = error_code(e)
                    append(op, "error", {**done, "error": code})
                    raise
                append(op, "ok", {**done, **extra})
                self._cache.clear()  # routes stay valid (same keys); looked up afresh anyway
        return {
            "rotated": True,
            "epoch": ks.epoch,
            "generation": ks.generation,
            "keys": sum(not r.label.startswith(INTERNAL_LABEL_PREFIX) for r in ks.records()),
            "audit_key": audit.key_id,
        }

    # --- health, reload, audit ----------------------------------------------------------------

    def health(self) -> HealthReport:
        """Re-check the active provider (status + signing probe); report the chain."""
        rows: list[dict[str, object]] = []
        ok = True
        degraded: list[dict[str, str]] = []
        for a in self._attempts:
            row = a.to_dict()
            if a.name == self._active.name:
                t0 = time.perf_counter()
                try:
                    h = self._active.health()
                    if h.status == "degraded":
                        degraded.append(_degraded("provider_degraded", h.reason or h.status))
                    if not h.ok:
                        raise ProviderUnavailable(h.reason or h.status)
                    signing_probe(self._active, self._probe_pub)
                    row.update(status="ok", reason=None, details=h.details)
                    self._unhealthy.pop(a.name, None)
                except HsmError as e:
                    ok = False
                    self._unhealthy[a.name] = e.message
                    row.update(status="unhealthy", reason=e.message, error_code=e.code)
                row["check_ms"] = round((time.perf_counter() - t0) * 1000, 3)
                row["active"] = True
            else:
                row["active"] = False
                if a.status not in ("ok", "not_tried"):
                    row["status"] = a.status
            rows.append(row)
        audit: dict[str, object] = {
            "path": str(self.audit_path),
            "last_seq": self._audit.last_seq if self._audit else 0,
        }
        audit["durability"] = self._config.audit.durability
        audit["key_source"] = "keystore" if self._anchor.keystore is not None else "key-file"
        audit["mlock"] = mlock_status()
        if self._audit is not None:
            audit["chain"] = self._audit.state.chain
            audit["audit_key"] = self._audit.key_id
            audit["forward"] = self._config.audit.forward
            audit["forward_errors"] = self._audit.forward_errors
        ks = self._anchor.keystore
        if ks is not None:
            audit["anchor"] = ks.anchor_status()
        process = process_status(self._config.environment)
        degraded += self._degraded_reasons(audit, process.ok)
        report = HealthReport(
            ok=ok,
            active_provider=self._active.name,
            security_level=self.security_level,
            min_security_level=self._config.effective_min_level,
            environment=self._config.environment.value,
            network=self._config.network.value,
            providers=rows,
            audit=audit,
            process=process.to_dict(),
            degraded_reasons=degraded,
        )
        self._writer().append("health", "ok" if ok else "error", provider=self._active.name)
        return report

    def _degraded_reasons(
        self, audit: Mapping[str, object], hardened: bool
    ) -> list[dict[str, str]]:
        """What makes this open handle run worse than its configuration asks for (the
        active provider's own "degraded" status is added by :meth:`health`)."""
        cfg = self._config
        out: list[dict[str, str]] = []
        level, minimum = self.security_level, cfg.effective_min_level
        if level < minimum:
            out.append(
                _degraded(
                    "below_minimum",
                    f"running {self._active.name} at security level {level.label}, below the "
                    f"minimum {minimum.label} (consented by fallback.allow_below_minimum)",
                )
            )
        if floor_lowered(cfg):
            detail = floor_detail(cfg)
            out.append(
                _degraded(
                    "floor_lowered",
                    f"min_security_level {detail['min_security_level']} is below the default "
                    f"{detail['default_min_security_level']} for {cfg.environment.value} on "
                    f"{cfg.network.value}",
                )
            )
        first = cfg.fallback.chain[0] if cfg.fallback.chain else self._active.name
        if self._active.name != first:
            skipped = "; ".join(
                f"{a.name}: {a.reason}"
                for a in self._attempts
                if a.status not in ("ok", "not_tried")
            )
            out.append(
                _degraded(
                    "fell_back",
                    f"fell back from {first} to {self._active.name}"
                    + (f" ({skipped})" if skipped else ""),
                )
            )
        ks = self._anchor.keystore
        if ks is not None and ks.unacknowledged:
            out.append(
                _degraded(
                    "unacknowledged_records",
                    f"{len(ks.unacknowledged)} key record(s) written but not listed by the "
                    "manifest (an interrupted create, or a replayed manifest): "
                    + ",".join(sorted(ks.unacknowledged)),
                )
            )
        anchor = audit.get("anchor")
        named = isinstance(anchor, Mapping) and anchor.get("kind") != "manifest"
        if named and isinstance(anchor, Mapping) and not anchor.get("checked"):
            why = anchor.get("problem") or anchor.get("note") or "not checked"
            out.append(_degraded("anchor_not_checked", f"{anchor.get('kind')}: {why}"))
        errors = audit.get("forward_errors")
        if isinstance(errors, int) and errors > 0:
            out.append(
                _degraded(
                    "audit_forward_errors",
                    f"{errors} audit entr{'y' if errors == 1 else 'ies'} could not be forwarded",
                )
            )
        if not hardened:
            out.append(
                _degraded(
                    "hardening_not_in_force",
                    f"process hardening is required in {cfg.environment.value} but not in "
                    "force (see 'process' for what failed)",
                )
            )
        return out

    def verify_audit(self) -> VerifyResult:
        """Verify the whole audit log chain against the state the keystore records."""
        if self._audit is not None:
            return self._audit.verify()
        path = self.audit_path
        store = self._anchor.audit_state_store(path)
        with store.audit_keys() as ring:
            return verify_log(path, ring, store.load_audit_state())

    def reload(self, config: Config | str | Path | None = None) -> None:
        """Re-read the configuration and re-run the chain. Keys stay where they are;
        the audit log continues (same chain) if its path and key are unchanged."""
        self._key_operations("reloading")
        with self._lock:
            if config is None:
                if self._config.source is None:
                    raise ConfigError("this handle was built from an in-memory Config; pass one")
                new_cfg = Config.load(self._config.source)
            else:
                new_cfg = config if isinstance(config, Config) else Config.load(config)
            self._writer().append("reload", "started", provider=self._active.name)
            old_cfg, old_attempts, old_probe = self._config, self._attempts, self._probe_pub
            old_active, old_anchor, old_audit = self._active, self._anchor, self._writer()
            try:
                chain = walk_chain(
                    new_cfg, self._passphrase or resolve_passphrase(new_cfg, None), self._pin
                )
            except HsmError as e:
                old_audit.append("reload", "error", provider=old_active.name, error=e.code)
                raise
            self._config = new_cfg
            self._cache.clear()
            self._unhealthy.clear()
            try:
                self._install(chain)
            except BaseException as e:
                chain.provider.close()
                self._config, self._attempts, self._probe_pub = old_cfg, old_attempts, old_probe
                self._active, self._anchor, self._audit = old_active, old_anchor, old_audit
                code = error_code(e)
                old_audit.append("reload", "error", provider=old_active.name, error=code)
                raise
            old_audit.close()
            old_anchor.close()
            if old_active is not self._active:
                old_active.close()
            assert self._audit is not None
            self._audit.append("reload", "ok", provider=self._active.name)

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            if self._audit is not None:
                try:
                    self._audit.append("close", "ok", provider=self._active.name)
                except AuditError:
                    log.error("anyhsm: could not write the close entry to the audit log")
                self._audit.close()
            self._anchor.close()
            self._active.close()
            if self._passphrase is not None:
                self._passphrase.wipe()
            if self._pin is not None:
                self._pin.wipe()
            self._closed = True

    def __enter__(self) -> Hsm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Hsm active={self.active_provider} level={self.security_level.label}>"


def open_hsm(
    config: Config | str | Path | None = None,
    *,
    passphrase: SecretBytes | str | bytes | None = None,
    audit_recovery: str | None = None,
    verify_only: bool = False,
    pin: SecretBytes | str | bytes | None = None,
) -> Hsm:
    """Open the configured fallback chain and return the HSM handle.

    ``config`` is a path to a TOML file or a :class:`Config`; None reads
    ``ANYHSM_CONFIG``. The passphrase, when one is needed, comes from the
    argument, ``ANYHSM_PASSPHRASE`` or ``[providers.software] passphrase_file``.

    ``audit_recovery`` (a reason, recorded) starts a new audit chain when the log does
    not match the state the keystore records (:class:`AuditStateMismatch`); the old
    log is moved aside, and the new chain's first entry says what was lost.

    ``verify_only`` opens the keystore but not the log for writing: a handle for
    :meth:`Hsm.verify_audit` that works on a damaged log and appends nothing.

    ``pin`` is the PKCS#11 user PIN when the caller has it (a prompt, a secret store);
    without it the token providers read ``pin_file`` or ``ANYHSM_PKCS11_PIN``
    (:func:`anyhsm.credentials.resolve_pin` finds it the same way for a front end).
    The handle keeps its own copies of the passphrase and PIN and wipes them on close.
    """
    cfg, pw = _config_and_passphrase(config, passphrase)
    return Hsm(cfg, pw, audit_recovery=audit_recovery, verify_only=verify_only, pin=_own_pin(pin))


def health_from_failure(
    error: HsmError, config: Config | None = None, attempts: Sequence[Attempt] | None = None
) -> HealthReport:
    """The health report of a deployment whose handle could not be opened: ``ok`` false,
    no active provider, and every provider's reason, taken from the chain's attempts the
    error carries (:func:`anyhsm.factory.walk_chain` and the keystore opening put them in
    ``error.details``); without them (a configuration error, a verdict on the store), each
    provider of the configured chain with the error's message. ``error`` holds the
    error's JSON object, so one shape serves both outcomes. ``attempts``: the chain of a
    handle that opened but whose check itself failed (the audit log refused the entry)."""
    rows: list[dict[str, object]] = [
        {**d, "active": False} for d in error.details if "name" in d and "status" in d
    ]
    if not rows and attempts:
        rows = [{**a.to_dict(), "active": False} for a in attempts]
    if not rows and config is not None:
        for name in config.fallback.chain:
            level = PROVIDER_LEVELS.get(name)
            row = Attempt(name, "unavailable", error.message, 0.0, level, error.code).to_dict()
            rows.append({**row, "active": False})
    return HealthReport(
        ok=False,
        active_provider=None,
        security_level=None,
        min_security_level=config.effective_min_level if config is not None else None,
        environment=config.environment.value if config is not None else None,
        network=config.network.value if config is not None else None,
        providers=rows,
        audit=(
            {"path": str(config.audit.path or config.config_dir / "audit.log")}
            if config is not None
            else {}
        ),
        process=process_status(config.environment).to_dict() if config is not None else {},
        error=error.to_dict(),
    )


def open_for_enrolment(
    config: Config | str | Path | None = None,
    *,
    passphrase: SecretBytes | str | bytes | None = None,
    pin: SecretBytes | str | bytes | None = None,
) -> Hsm:
    """An administrative handle for enrolling an unlock path (``tpm enroll``, ``pkcs11
    wrap-enroll``) and reporting its status, where the chain cannot reach its floor
    until that path exists (a fresh production mainnet deployment): the keystore is
    opened with the passphrase even below the floor, the audit log is written as usual
    (the ``open`` entry carries ``purpose = enrolment`` and ``below_floor``), and every
    key operation (sign, create, import, export, list, delete, rotate) raises
    :class:`~anyhsm.errors.EnrolmentOnlyHandle`. The floor is lowered for nothing else.
    """
    cfg, pw = _config_and_passphrase(config, passphrase)
    return Hsm(cfg, pw, purpose=ENROLMENT, pin=_own_pin(pin))


def _own_pin(pin: SecretBytes | str | bytes | None) -> SecretBytes | None:
    """The handle's own copy of a PIN the caller gave (the caller's stays the caller's)."""
    if pin is None:
        return None
    if isinstance(pin, SecretBytes):
        return SecretBytes(pin.buffer)
    return SecretBytes(pin.encode() if isinstance(pin, str) else pin)


def _config_and_passphrase(
    config: Config | str | Path | None, passphrase: SecretBytes | str | bytes | None
) -> tuple[Config, SecretBytes | None]:
    if config is None:
        env = os.environ.get("ANYHSM_CONFIG")
        if not env:
            raise ConfigError("no configuration given", hint="pass a path or set ANYHSM_CONFIG")
        config = env
    cfg = config if isinstance(config, Config) else Config.load(config)
    pw = resolve_passphrase(cfg, passphrase)
    own = pw if not isinstance(passphrase, SecretBytes) else SecretBytes(pw.buffer) if pw else None
    return cfg, own


__all__ = [
    "DEGRADED_REASONS",
    "ENROLMENT",
    "PROVIDER_LEVELS",
    "HealthReport",
    "Hsm",
    "ProviderContext",
    "health_from_failure",
    "open_for_enrolment",
    "open_hsm",
]
