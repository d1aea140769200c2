"""The TPM provider: the software keystore, opened by a master key sealed to a TPM.

TPMs have no secp256k1, so keys stay in the software keystore (same store,
same store id, same keys as the passphrase opens); what changes is how the
keystore is unlocked: the master key is unsealed by the TPM instead of being
derived from a passphrase. Signing happens in this process as for the software
provider. The security gain: the keystore files alone (a stolen disk or
backup) do not open without this TPM, and nobody has to type or store a
passphrase on this machine.

tpm2-pytss is imported on the first TPM call, never at import time.
"""

from __future__ import annotations

import time

from anyhsm.errors import HsmError
from anyhsm.keystore import Keystore
from anyhsm.provider import ProviderContext
from anyhsm.providers.software import SoftwareProvider, unlock_path_health
from anyhsm.tpm.counter import TpmCounter
from anyhsm.tpm.device import tpm_info, tpm_random
from anyhsm.tpm.enrollment import SIDE_FILE, enroll, read_blob, status, unenroll
from anyhsm.tpm.errors import TpmPolicyMismatch
from anyhsm.tpm.sealing import unseal
from anyhsm.tpm.settings import TpmSettings
from anyhsm.types import Health, SecurityLevel

__all__ = ["TpmProvider", "enroll", "status", "unenroll"]

EXTRA_ENTROPY_BYTES = 64  # enough for the largest new secret (a 64-byte BIP32 seed)


class TpmProvider(SoftwareProvider):
    """Keys in the software keystore, unlocked by the TPM-sealed master key."""

    name = "tpm"

    def __init__(self, context: ProviderContext) -> None:
        super().__init__(context)
        self.tpm_settings = TpmSettings.from_mapping(
            context.settings, default_timeout_s=context.timeout_s
        )

    def _unlock(self, keystore: Keystore) -> None:
        """Unseal the master key with the TPM (never a passphrase), then check the
        keystore against the TPM counter its manifest names: a store older than the
        counter (KeystoreRolledBack), or a counter gone or replaced (AnchorMissing,
        AnchorMismatch), fails closed; these are keystore errors, so no fallback
        provider opens the store instead."""
        blob = read_blob(keystore)
        with unseal(self.tpm_settings, blob) as master:
            keystore.unlock_with_master_key(master, via="tpm")
        try:
            named = keystore.generation_anchor_ref()
            if named is not None and named[0] == TpmCounter.kind:
                keystore.attach_generation_anchor(TpmCounter.at(self.tpm_settings, named[1]))
        except BaseException:
            keystore.close()  # wipes the master key just unsealed
            raise

    def _extra_entropy(self) -> bytes | None:
        """TPM random bytes when ``use_rng`` is set; the key generator XORs them into
        os.urandom output, so they can add entropy but never remove any. If the TPM
        is unreachable, key generation fails rather than silently skip the TPM."""
        if not self.tpm_settings.use_rng:
            return None
        return tpm_random(self.tpm_settings, EXTRA_ENTROPY_BYTES)

    def security_level(self) -> SecurityLevel:
        return SecurityLevel.TPM

    def production_ready(self) -> bool:
        return True

    def health(self) -> Health:
        """The keystore's health plus: TPM reachable, its maker and firmware, and the
        sealed blob present and still unsealable to this keystore's master key."""
        t0 = time.perf_counter()
        base = super().health()
        details = dict(base.details)
        details["tcti"] = self.tpm_settings.tcti
        details["pcrs"] = ",".join(str(p) for p in self.tpm_settings.pcrs) or "none"
        details["pcr_bank"] = self.tpm_settings.pcr_bank
        details["tpm_rng"] = "mixed into new keys" if self.tpm_settings.use_rng else "not used"
        problem = ""
        try:
            info = tpm_info(self.tpm_settings)
            details["tpm_reachable"] = "yes"
            details["tpm_manufacturer"] = info["manufacturer"]
            details["tpm_vendor"] = info["vendor"]
            details["tpm_firmware"] = info["firmware_version"]
            details["tpm_in_lockout"] = info["in_lockout"]
        except HsmError as exc:
            details["tpm_reachable"] = "no"
            problem = f"TPM unreachable: {exc.message}"
        raw = self.keystore.read_side_file(SIDE_FILE)
        details["sealed_blob"] = "present" if raw is not None else "absent"
        if raw is None:
            problem = problem or "the sealed master key is gone (unenrolled)"
        elif not problem:
            try:
                with unseal(self.tpm_settings, raw) as master, self.keystore.master_key() as mk:
                    matches = master.equals(mk)
                details["unsealable"] = "yes" if matches else "no (another master key)"
                if not matches:
                    problem = "the sealed master key no longer matches this keystore"
            except HsmError as exc:
                details["unsealable"] = "no"
                if isinstance(exc, TpmPolicyMismatch):
                    details["changed_pcrs"] = ",".join(str(p) for p in exc.changed_pcrs)
                problem = f"the sealed master key does not unseal: {exc.message}"
        problem = self._counter_health(details, problem)
        return unlock_path_health(self.name, self.security_level(), base, t0, details, problem)

    def _counter_health(self, details: dict[str, object], problem: str) -> str:
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
