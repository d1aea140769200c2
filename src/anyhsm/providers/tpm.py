"""The TPM provider: the software keystore, opened by a master key sealed to a TPM.

TPMs have no secp256k1, so keys stay in the software keystore (same store,
same store id, same keys as the passphrase opens); what changes is how the
keystore is unlocked: the master key is unsealed by the TPM
(:class:`~anyhsm.tpm.sealing.TpmSealer`, through the one sealed-master-key provider,
:class:`~anyhsm.providers.sealed.SealedKeystoreProvider`) instead of being derived from
a passphrase. Signing happens in this process as for the software provider. The
security gain: the keystore files alone (a stolen disk or backup) do not open without
this TPM, and nobody has to type or store a passphrase on this machine.

What the TPM adds to that path: the keystore's generation is checked against the TPM
NV counter its manifest names, and new keys may mix in the TPM's random bytes.

tpm2-pytss is imported on the first TPM call, never at import time.
"""

from __future__ import annotations

from anyhsm.errors import HsmError
from anyhsm.keystore import Keystore
from anyhsm.provider import ProviderContext
from anyhsm.providers.sealed import SealedKeystoreProvider
from anyhsm.tpm.counter import TpmCounter
from anyhsm.tpm.device import tpm_random
from anyhsm.tpm.enrollment import enroll, status, unenroll
from anyhsm.tpm.sealing import TpmSealer
from anyhsm.tpm.settings import TpmSettings

__all__ = ["TpmProvider", "enroll", "status", "unenroll"]

EXTRA_ENTROPY_BYTES = 64  # enough for the largest new secret (a 64-byte BIP32 seed)


class TpmProvider(SealedKeystoreProvider):
    """Keys in the software keystore, unlocked by the TPM-sealed master key."""

    name = "tpm"

    def __init__(self, context: ProviderContext) -> None:
        self.tpm_settings = TpmSettings.from_mapping(
            context.settings, default_timeout_s=context.timeout_s
        )
        super().__init__(context, TpmSealer(self.tpm_settings))

    def _after_unlock(self, keystore: Keystore) -> None:
        """Check the keystore against the TPM counter its manifest names: a store older
        than the counter (KeystoreRolledBack), or a counter gone or replaced
        (AnchorMissing, AnchorMismatch), fails closed; these are keystore errors, so no
        fallback provider opens the store instead."""
        named = keystore.generation_anchor_ref()
        if named is not None and named[0] == TpmCounter.kind:
            keystore.attach_generation_anchor(TpmCounter.at(self.tpm_settings, named[1]))

    def _extra_entropy(self) -> bytes | None:
        """TPM random bytes when ``use_rng`` is set; the key generator XORs them into
        os.urandom output, so they can add entropy but never remove any. If the TPM
        is unreachable, key generation fails rather than silently skip the TPM."""
        if not self.tpm_settings.use_rng:
            return None
        return tpm_random(self.tpm_settings, EXTRA_ENTROPY_BYTES)

    def _extra_health(self, details: dict[str, object], problem: str) -> str:
        """Report the generation counter the keystore names (its value read live) and
        return the first problem: a counter that is gone or not ours is one."""
        named = self.keystore.generation_anchor_ref()
        if named is None or named[0] != TpmCounter.kind:
            details["generation_counter"] = "none (the keystore names no TPM counter)"
            return problem
        counter = TpmCounter.at(self.tpm_settings, named[1])
        if details.get("tpm_reachable") != "yes":
            details["generation_counter"] = f"{counter.ref} (TPM unreachable)"
            return problem
        try:
            details["generation_counter"] = f"{counter.ref} = {counter.read()}"
        except HsmError as exc:
            details["generation_counter"] = f"{counter.ref} ({exc.code})"
            return problem or f"the generation counter {counter.ref}: {exc.message}"
        return problem
