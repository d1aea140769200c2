"""The software provider: keys sealed in the encrypted file keystore.

It is the embedded default and the base of the providers that reach the same keystore
by unsealing its master key instead of deriving it from the passphrase
(:mod:`anyhsm.providers.sealed`: TPM, PKCS#11 token wrap; they override
:meth:`SoftwareProvider._unlock`). It serves the keystore
(:class:`~anyhsm.provider.KeystoreServer`): the handle finds the deployment's anchor
through that, not through the class.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from anyhsm.errors import (
    AuthenticationFailed,
    ConfigError,
    ExportNotAllowed,
    KeyNotFound,
    KeystoreError,
)
from anyhsm.keystore import KdfParams, KeyRecord, Keystore
from anyhsm.provider import ProviderContext, check_sign_request
from anyhsm.providers import local_signing
from anyhsm.secret import SecretBytes, mlock_status
from anyhsm.types import (
    Capabilities,
    DerivedPublicKey,
    Environment,
    Health,
    KeyInfo,
    KeyRef,
    KeySpec,
    KeyType,
    SecurityLevel,
    SignParams,
    SigScheme,
)

MIN_PRODUCTION_PASSPHRASE = 32


def keystore_path(context: ProviderContext) -> Path:
    raw = context.software_settings.get("path", "keystore")
    if not isinstance(raw, str) or not raw:
        raise ConfigError("providers.software.path must be a non-empty string")
    p = Path(raw).expanduser()
    return p if p.is_absolute() else (context.config_dir / p)


def passphrase_problems(passphrase: SecretBytes | None, kdf: KdfParams) -> list[str]:
    """What makes this unlock unfit for production (empty if fine)."""
    out = list(kdf.weaknesses())
    if passphrase is not None:
        try:
            chars = len(bytes(passphrase.buffer).decode("utf-8"))
        except UnicodeDecodeError:
            chars = len(passphrase)
        if chars < MIN_PRODUCTION_PASSPHRASE:
            out.append(
                f"the passphrase has {chars} characters; production needs at least "
                f"{MIN_PRODUCTION_PASSPHRASE}"
            )
    return out


class SoftwareProvider:
    """Keys in the envelope-encrypted keystore, opened with the passphrase."""

    name = "software"

    def __init__(self, context: ProviderContext) -> None:
        self._ctx = context
        self._path = keystore_path(context)
        self._ks: Keystore | None = None

    # --- hooks for providers that unlock the same keystore another way ----------------

    def _unlock(self, keystore: Keystore) -> None:
        passphrase = self._ctx.passphrase
        if passphrase is None:
            raise AuthenticationFailed(
                f"no passphrase to open the keystore at {self._path}",
                hint="set ANYHSM_PASSPHRASE, use --passphrase-file, or enroll a TPM",
            )
        keystore.unlock_with_passphrase(passphrase)
        if self._ctx.environment is Environment.PRODUCTION:
            problems = passphrase_problems(passphrase, keystore.kdf)
            if problems:
                keystore.close()
                raise ConfigError(
                    "the keystore is not fit for production: " + "; ".join(problems),
                    hint="use a passphrase of 32+ characters and 'anyhsm keystore passwd' "
                    "to raise the KDF cost",
                )

    def _extra_entropy(self) -> bytes | None:
        """Extra randomness to mix into new keys (a TPM RNG); None by default."""
        return None

    # --- lifecycle ----------------------------------------------------------------------

    def open(self) -> None:
        ks = Keystore.load(self._path)
        self._unlock(ks)
        self._ks = ks

    def close(self) -> None:
        if self._ks is not None:
            self._ks.close()
            self._ks = None

    @property
    def keystore(self) -> Keystore:
        if self._ks is None:
            raise KeystoreError(f"provider {self.name!r} is not open")
        return self._ks

    def served_keystore(self) -> Keystore:
        """The open keystore whose sealed records are this provider's keys
        (:class:`~anyhsm.provider.KeystoreServer`)."""
        return self.keystore

    def health(self) -> Health:
        t0 = time.perf_counter()
        ks = self.keystore
        ks.refresh()
        details = {
            "keystore": str(self._path),
            "store_id": ks.store_id,
            "unlocked_by": ks.unlocked_by,
            "kdf": ks.kdf.name,
            "mlock": mlock_status(),
            "records": len(ks.records()),
        }
        if ks.unacknowledged:
            # Written but never listed: an interrupted create, or a replayed manifest.
            details["unacknowledged_records"] = ",".join(sorted(ks.unacknowledged))
        details["generation"] = ks.generation
        weak = ks.kdf.weaknesses()
        if weak:
            details["kdf_upgrade"] = "recommended: " + "; ".join(weak)
        if ks.problems:
            details["damaged_records"] = ",".join(sorted(ks.problems))
            return Health(
                self.name,
                False,
                "degraded",
                f"{len(ks.problems)} key record(s) fail authentication or are not the ones "
                "the manifest lists: " + "; ".join(e.message for e in ks.problems.values()),
                self.security_level(),
                (time.perf_counter() - t0) * 1000,
                details,
            )
        return Health(
            self.name,
            True,
            "ok",
            "",
            self.security_level(),
            (time.perf_counter() - t0) * 1000,
            details,
        )

    _CAPABILITIES = local_signing.local_capabilities(persistent=True)

    def capabilities(self) -> Capabilities:
        return self._CAPABILITIES

    def security_level(self) -> SecurityLevel:
        return SecurityLevel.SOFTWARE

    def production_ready(self) -> bool:
        return True

    def store_id(self) -> str:
        return f"keystore:{self.keystore.store_id}"

    # --- keys -----------------------------------------------------------------------------

    def _info(self, rec: KeyRecord) -> KeyInfo:
        return KeyInfo(
            id=rec.id,
            label=rec.label,
            provider=self.name,
            public_key=rec.public_key,
            key_type=rec.key_type,
            store=self.store_id(),
            exportable=rec.exportable,
            created_at=rec.created_at,
            chain_code=rec.chain_code,
        )

    def _sealed(self, key: KeyRef) -> KeyRecord:
        rec = self.keystore.find(key)
        if rec.kind != "sealed":
            raise KeyNotFound(
                f"key {rec.label!r} is not in this keystore: it lives in provider {rec.provider!r}",
                hint="keys are never moved between providers",
            )
        return rec

    def _store(
        self, label: str, key_type: KeyType, secret: bytearray | memoryview, exportable: bool
    ) -> KeyInfo:
        pub, chain = local_signing.vet_material(self.name, key_type, secret)
        with SecretBytes(secret) as sb:
            rec = self.keystore.add_sealed(
                label, key_type, sb, pub, exportable=exportable, chain_code=chain
            )
        return self._info(rec)

    def generate_key(self, spec: KeySpec) -> KeyInfo:
        buf = local_signing.fresh_material(self.name, spec.key_type, self._extra_entropy())
        try:
            return self._store(spec.label, spec.key_type, buf, spec.exportable)
        finally:
            buf[:] = bytes(len(buf))

    def import_key(
        self, label: str, secret: SecretBytes, key_type: KeyType, *, exportable: bool = False
    ) -> KeyInfo:
        return self._store(label, key_type, secret.buffer, exportable)

    def export_key(self, key: KeyRef) -> SecretBytes:
        rec = self._sealed(key)
        if not (rec.exportable and self._ctx.allow_export):
            raise ExportNotAllowed(
                f"key {rec.label!r} may not be exported",
                hint="only keys created or imported with exportable=true can be exported, and "
                "only when the configuration sets [policy] allow_export = true",
            )
        with self.keystore.secret(rec) as view:
            return SecretBytes(view)

    def list_keys(self) -> list[KeyInfo]:
        return [self._info(r) for r in self.keystore.records() if r.kind == "sealed"]

    def get_key(self, key: KeyRef) -> KeyInfo:
        return self._info(self._sealed(key))

    def public_key(self, key: KeyRef) -> bytes:
        return self._sealed(key).public_key

    def sign_digest(
        self, key: KeyRef, digest: bytes, scheme: SigScheme, params: SignParams | None = None
    ) -> bytes:
        p = check_sign_request(self, digest, scheme, params)
        ks = self.keystore
        rec = self._sealed(key)
        d = digest if type(digest) is bytes else bytes(digest)
        key_type = rec.key_type
        return ks.use_secret(
            rec, lambda view: local_signing.sign(self.name, key_type, view, d, scheme, p)
        )

    def sign_batch(
        self, key: KeyRef, requests: Sequence[tuple[bytes, SigScheme, SignParams | None]]
    ) -> list[bytes]:
        """Many digests with one key: one decryption, shared BIP32 parents."""
        checked = [(bytes(d), s, check_sign_request(self, d, s, p)) for d, s, p in requests]
        rec = self._sealed(key)
        key_type = rec.key_type
        return self.keystore.use_secret(
            rec, lambda view: local_signing.sign_batch(self.name, key_type, view, checked)
        )

    def derive_public(self, key: KeyRef, path: tuple[int, ...]) -> DerivedPublicKey:
        rec = self._sealed(key)
        with self.keystore.secret(rec) as view:
            return local_signing.derive_public(self.name, rec.key_type, view, path)

    def delete_key(self, key: KeyRef) -> None:
        self.keystore.delete(self._sealed(key).id)
