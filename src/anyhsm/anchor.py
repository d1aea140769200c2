"""The keystore as the deployment's anchor.

Whatever provider signs, one keystore anchors a real deployment: it holds the audit
log's MAC keys and its checkpoint (the chain's authenticated state), it is the key
directory (a sealed record for each key it keeps, a reference record binding each key
kept elsewhere to its provider, store and public key), it names the generation anchor
(a TPM NV counter) that detects a rollback of the whole directory, and it has its unlock
paths: the passphrase, and the master key sealed by a TPM or wrapped by a token.

:func:`open_anchor` finds it: the keystore the active provider serves when that provider
declares it serves one (:func:`anyhsm.provider.served_keystore`, never its class), else
the keystore opened beside the chain the way it can be opened (TPM, token wrap, then
passphrase), else none (a development set-up without a keystore, whose audit state lives
in a MAC-ed file). :class:`Anchor` is what the handle (:class:`anyhsm.hsm.Hsm`) holds;
the handle audits every change made to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

from anyhsm import registry, unlock_blobs
from anyhsm.audit import AuditLog, AuditStateStore, recover_chain
from anyhsm.audit_file_state import FileAuditState
from anyhsm.audit_forward import forwarder_for
from anyhsm.config import Config
from anyhsm.errors import AuditError, ConfigError, HsmError
from anyhsm.factory import (
    PROVIDER_LEVELS,
    STORE_VERDICTS,
    Attempt,
    common_cause,
    load_provider_class,
    provider_context,
    restate,
    run_bounded,
)
from anyhsm.keystore import KdfParams, Keystore
from anyhsm.provider import Provider, served_keystore
from anyhsm.secret import SecretBytes
from anyhsm.unlock_blobs import TPM_BLOB, WRAPPED_BLOB, MasterKeySealer

log = logging.getLogger("anyhsm")

UNLOCK_PATHS: Mapping[str, str] = {TPM_BLOB: "tpm", WRAPPED_BLOB: "pkcs11-wrap"}
"""The name of each unlock path (as ``init`` and ``health`` report it) by its blob file."""


class Anchor:
    """The keystore anchoring a deployment, and the provider serving its sealed records
    (the active provider, or one opened only for this and closed with the anchor).
    ``keystore`` is None in a development set-up without one."""

    def __init__(
        self, keystore: Keystore | None, provider: Provider | None, *, owned: bool = False
    ) -> None:
        self.keystore = keystore
        self.provider = provider
        self._owned = owned

    @classmethod
    def none(cls) -> Anchor:
        return cls(None, None)

    @property
    def owned_provider(self) -> Provider | None:
        """The provider opened only to reach the keystore (an open store of its own)."""
        return self.provider if self._owned else None

    def close(self) -> None:
        if self._owned and self.provider is not None:
            self.provider.close()

    def require(self) -> Keystore:
        """The keystore, or ConfigError when this deployment has none open."""
        if self.keystore is None:
            raise ConfigError(
                "this deployment has no software keystore open",
                hint="add [providers.software] to the configuration",
            )
        return self.keystore

    # --- facts (read-only; what front ends may show) ---------------------------------------

    @property
    def present(self) -> bool:
        return self.keystore is not None

    @property
    def unlocked_by(self) -> str | None:
        """How the keystore was opened: "passphrase", "tpm", "pkcs11"; None without one."""
        return self.keystore.unlocked_by if self.keystore is not None else None

    @property
    def epoch(self) -> int | None:
        return self.keystore.epoch if self.keystore is not None else None

    @property
    def generation(self) -> int | None:
        return self.keystore.generation if self.keystore is not None else None

    @property
    def generation_anchor_ref(self) -> tuple[str, str] | None:
        """(kind, ref) of the generation anchor the manifest names (a TPM counter)."""
        return self.keystore.generation_anchor_ref() if self.keystore is not None else None

    def enrolled(self) -> list[str]:
        """The unlock paths enrolled beside the passphrase ("tpm", "pkcs11-wrap")."""
        if self.keystore is None:
            return []
        return [UNLOCK_PATHS[b] for b in unlock_blobs.enrolled_blobs(self.keystore)]

    def describe(self) -> dict[str, object]:
        """The facts above as plain data (no secret)."""
        ks = self.keystore
        if ks is None:
            return {"keystore": None}
        return {
            "keystore": str(ks.path),
            "store_id": ks.store_id,
            "unlocked_by": ks.unlocked_by,
            "epoch": ks.epoch,
            "generation": ks.generation,
            "enrolled": self.enrolled(),
            "generation_anchor": ks.anchor_status(),
        }

    # --- the generation anchor ---------------------------------------------------------------

    def check_generation_anchor(self, config: Config) -> None:
        """A store opened without the TPM (passphrase, token wrap) is still checked against
        the TPM counter its manifest names, whenever the TPM is configured and answers: a
        fallback must not be a way around rollback detection. Unreachable: reported."""
        ks = self.keystore
        if ks is None:
            return
        named = ks.generation_anchor_ref()
        if named is None or ks.anchor_attached or named[0] != "tpm-nv-counter":
            return
        table = config.provider_settings("tpm")
        if "tcti" not in table:
            ks.anchor_problem = "the TPM is not configured here, so the counter was not read"
            return
        from anyhsm.tpm.counter import TpmCounter
        from anyhsm.tpm.settings import TpmSettings

        settings = TpmSettings.from_mapping(table)
        try:
            run_bounded(
                lambda: ks.attach_generation_anchor(TpmCounter.at(settings, named[1])),
                config.fallback.timeout_ms / 1000,
                "TPM generation counter",
            )
        except STORE_VERDICTS:
            raise
        except HsmError as e:
            ks.anchor_problem = f"the TPM counter could not be read: {e.message}"
            log.warning("anyhsm: keystore anchor not checked: %s", e.message)

    # --- the audit chain --------------------------------------------------------------------

    def audit_state_store(self, path: Path) -> AuditStateStore:
        """The chain's state lives in the keystore manifest (beside the log, in a MAC-ed
        file keyed from a file, only for development without a keystore)."""
        return self.keystore if self.keystore is not None else FileAuditState(path)

    def open_audit(
        self, config: Config, path: Path, recovery_reason: str | None
    ) -> tuple[AuditLog, dict[str, str] | None]:
        """The audit log, checked against the state this anchor records before anything
        is appended; with ``recovery_reason``, a new chain after an accepted loss (the
        caller writes the detail returned as the new chain's first entry)."""
        store = self.audit_state_store(path)
        recovery: dict[str, str] | None = None
        if recovery_reason is not None:
            _, recovery = recover_chain(path, store, recovery_reason)
        audit = AuditLog(
            path,
            store,
            durability=config.audit.durability,
            flush_interval_ms=config.audit.flush_interval_ms,
            forwarder=forwarder_for(config.audit),
        )
        return audit, recovery

    # --- unlock paths -------------------------------------------------------------------------

    def sealers(
        self,
        config: Config,
        pin: SecretBytes | None = None,
        blobs: Collection[str] = unlock_blobs.BLOB_FILES,
    ) -> dict[str, MasterKeySealer]:
        """The sealer of each unlock path in ``blobs`` this configuration can reach (by
        blob file): the TPM with ``[providers.tpm] tcti``, the token wrap with
        ``wrap_key_label``. Only those asked for are built (a token's settings are not
        even parsed for a rotation that keeps no token blob)."""
        out: dict[str, MasterKeySealer] = {}
        if TPM_BLOB in blobs and "tcti" in config.provider_settings("tpm"):
            out[TPM_BLOB] = tpm_sealer(config)
        if WRAPPED_BLOB in blobs and "wrap_key_label" in config.provider_settings("pkcs11"):
            out[WRAPPED_BLOB] = token_sealer(config, pin)
        return out

    def check_passphrase(self, passphrase: SecretBytes) -> None:
        """WrongPassphrase unless ``passphrase`` opens this store (asked for every change
        of the master key, even where a TPM or token opened the store)."""
        self.require().check_passphrase(passphrase)

    def rotate(
        self,
        passphrase: SecretBytes,
        reseal: unlock_blobs.Resealer,
        audit_position: tuple[int, bytes, int],
        *,
        kdf: KdfParams | None = None,
    ) -> None:
        """A fresh master key wrapped by ``passphrase`` (see :meth:`Keystore.rotate`)."""
        self.require().rotate(passphrase, kdf=kdf, reseal=reseal, audit_position=audit_position)

    def resealer(
        self, config: Config, pin: SecretBytes | None, *, drop: Collection[str] = ()
    ) -> unlock_blobs.Resealer:
        """Makes every enrolled blob but ``drop`` again for a new master key."""
        ks = self.require()
        keep = [b for b in unlock_blobs.enrolled_blobs(ks) if b not in drop]
        return unlock_blobs.resealer_for(ks, self.sealers(config, pin, keep), drop=drop)


def tpm_sealer(config: Config) -> MasterKeySealer:
    """The TPM's sealer for ``[providers.tpm]``, or ConfigError naming the table to add."""
    from anyhsm.tpm.sealing import TpmSealer
    from anyhsm.tpm.settings import TpmSettings

    table = config.provider_settings("tpm")
    if "tcti" not in table:
        raise ConfigError(
            "no [providers.tpm] tcti in the configuration",
            hint='add tcti = "device:/dev/tpmrm0" (or a swtpm TCTI)',
        )
    return TpmSealer(TpmSettings.from_mapping(table))


def token_sealer(config: Config, pin: SecretBytes | None) -> MasterKeySealer:
    """The token wrap's sealer for ``[providers.pkcs11]``, or ConfigError without
    ``wrap_key_label``."""
    if "wrap_key_label" not in config.provider_settings("pkcs11"):
        raise ConfigError(
            "no [providers.pkcs11] wrap_key_label in the configuration",
            hint='add wrap_key_label = "anyhsm-wrap" (the AES key is created in the token)',
        )
    from anyhsm.providers.pkcs11.wrap_token import TokenWrapSealer

    return TokenWrapSealer(provider_context(config, "pkcs11-wrapped", None, pin))


def open_anchor(
    config: Config,
    active: Provider,
    attempts: Sequence[Attempt],
    passphrase: SecretBytes | None,
    pin: SecretBytes | None = None,
) -> Anchor:
    """The keystore holds the audit key and the key directory. When the active provider
    serves it, that one; when the active provider is not keystore-based (PKCS#11, the
    simulator), the keystore opened anyway, the way it can be: TPM, token-wrapped, then
    passphrase (:data:`anyhsm.registry.KEYSTORE_OPEN_ORDER`). None when the configuration
    names no way to open a keystore. Every way failing raises the common cause (a wrong
    passphrase or PIN, the lock) or AuditError, with each attempt in ``details``."""
    ks = served_keystore(active)
    if ks is not None:
        return Anchor(ks, active)
    configured = set(config.providers) | set(config.fallback.chain)
    if "wrap_key_label" in config.provider_settings("pkcs11"):
        # A token wrap opens the keystore whether or not the chain lists
        # "pkcs11-wrapped" (docs/pkcs11/README.md, "Wrap mode").
        configured.add("pkcs11-wrapped")
    if not registry.opens_keystore(configured):
        return Anchor.none()
    reasons: list[str] = []
    failures: list[HsmError] = []
    rows: list[dict[str, object]] = []
    for name in registry.KEYSTORE_OPEN_ORDER:
        if name not in configured:
            continue
        t0 = time.perf_counter()
        provider: Provider | None = None
        try:
            ctx = provider_context(config, name, passphrase, pin)
            provider = load_provider_class(name)(ctx)
            run_bounded(provider.open, ctx.timeout_s, f"keystore via {name}")
            opened = served_keystore(provider)
            if opened is None:  # a registry spec that opens no keystore: a bug, said plainly
                raise AuditError(f"provider {name!r} opened no keystore")
        except HsmError as e:
            if provider is not None:
                _close_quietly(provider)
            reasons.append(f"{name}: {e.message}")
            failures.append(e)
            elapsed = (time.perf_counter() - t0) * 1000
            level = PROVIDER_LEVELS.get(name)
            row = Attempt(name, "unavailable", e.message, elapsed, level, e.code).to_dict()
            rows.append({**row, "purpose": "keystore"})
            continue
        return Anchor(opened, provider, owned=True)
    what = "cannot open the keystore that holds the audit key (" + "; ".join(reasons) + ")"
    cause = common_cause(failures)
    # Every way failed on a credential (wrong or missing passphrase, PIN) or the lock:
    # that is the error (exit 5 / 10), not a damaged audit log.
    err = (
        restate(cause, what)
        if cause is not None
        else AuditError(
            what,
            hint="provide the keystore passphrase (ANYHSM_PASSPHRASE), or enroll a TPM / token",
        )
    )
    # The chain's attempts (the active provider opened) and each way to the keystore,
    # so 'health' can show them all (anyhsm.hsm.health_from_failure).
    err.details = [a.to_dict() for a in attempts] + rows
    raise err


def _close_quietly(provider: Provider) -> None:
    try:
        provider.close()
    except HsmError:
        log.debug("closing %s after a failed keystore open raised", provider.name)


OnRotated = Callable[[], Mapping[str, str]]
"""What an audited rotation does once the new master key is in force, before its ``ok``
entry (the TPM unenrolment drops its generation anchor); returns detail for that entry."""


__all__ = [
    "UNLOCK_PATHS",
    "Anchor",
    "OnRotated",
    "open_anchor",
    "token_sealer",
    "tpm_sealer",
]
