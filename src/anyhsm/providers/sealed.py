"""The software keystore opened by a master key a device unseals (a TPM, a PKCS#11 token).

One provider class for every sealed-master-key unlock path: the keys, the store id and
the signing are the software keystore's (same store as the passphrase opens, so a
fallback loses no key); what changes is how the keystore is unlocked, by the
:class:`~anyhsm.unlock_blobs.MasterKeySealer` the provider is built with, and the level
that unlock path reaches. Health adds the unlock path's own check: the device answers and
the blob still unseals to this keystore's master key.
"""

from __future__ import annotations

import time

from anyhsm import unlock_blobs
from anyhsm.keystore import Keystore
from anyhsm.provider import ProviderContext
from anyhsm.providers.software import SoftwareProvider
from anyhsm.types import Health, SecurityLevel
from anyhsm.unlock_blobs import MasterKeySealer


class SealedKeystoreProvider(SoftwareProvider):
    """Keys in the software keystore, unlocked by ``sealer`` (never by a passphrase)."""

    def __init__(self, context: ProviderContext, sealer: MasterKeySealer) -> None:
        super().__init__(context)
        self.sealer = sealer

    def _unlock(self, keystore: Keystore) -> None:
        unlock_blobs.unlock(keystore, self.sealer)
        try:
            self._after_unlock(keystore)
        except BaseException:
            keystore.close()  # wipes the master key just unsealed
            raise

    def _after_unlock(self, keystore: Keystore) -> None:
        """A hook for what the unlock path checks once the keystore is open (the TPM's
        generation counter); nothing by default."""

    def security_level(self) -> SecurityLevel:
        return self.sealer.level

    def production_ready(self) -> bool:
        return True

    def health(self) -> Health:
        """The keystore's health, degraded when the unlock path would no longer open it
        (device unreachable, blob gone or no longer this keystore's master key): keys stay
        usable until the provider closes, but the next open would fail."""
        t0 = time.perf_counter()
        base = super().health()
        details = dict(base.details)
        path, problem = unlock_blobs.health(self.keystore, self.sealer)
        details.update(path)
        problem = self._extra_health(details, problem)
        elapsed = base.elapsed_ms + (time.perf_counter() - t0) * 1000
        level = self.security_level()
        if problem:
            reason = problem + "; the keystore stays open until closed, and the recovery "
            reason += "passphrase opens it"
            if base.reason:
                reason = base.reason + "; " + reason
            return Health(self.name, False, "degraded", reason, level, elapsed, details)
        return Health(self.name, base.ok, base.status, base.reason, level, elapsed, details)

    def _extra_health(self, details: dict[str, object], problem: str) -> str:
        """A hook adding the unlock path's own details; returns the first problem."""
        return problem
