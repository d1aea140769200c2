"""The keystore's unlock paths: its master key sealed by a device (a TPM, a PKCS#11 token)
and stored beside the keystore, so that the keystore opens without the passphrase
wherever that device is.

One small protocol, :class:`MasterKeySealer`, and one path for everything done with a
sealed master key, whatever the device: enrol (seal, unseal again and compare, store),
unenrol, read the blob, check that it still opens the keystore (health), and make every
blob again for a new master key during a rotation (:func:`resealer_for`). The two sealers are
:class:`anyhsm.tpm.sealing.TpmSealer` and
:class:`anyhsm.providers.pkcs11.wrap_token.TokenWrapSealer`; the provider that opens the
keystore through either is :class:`anyhsm.providers.sealed.SealedKeystoreProvider`.

The passphrase-wrapped copy of the master key in the keystore header is never touched
here: the recovery passphrase keeps opening the same keys whatever happens to a device.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Protocol

from anyhsm.errors import ConfigError, HsmError, KeystoreError
from anyhsm.secret import SecretBytes
from anyhsm.types import SecurityLevel

if TYPE_CHECKING:
    from anyhsm.keystore import Keystore

TPM_BLOB = "tpm-sealed.json"
WRAPPED_BLOB = "pkcs11-wrapped.json"
BLOB_FILES: tuple[str, ...] = (TPM_BLOB, WRAPPED_BLOB)
"""Every unlock blob a keystore may hold, in the order the keystore is opened by them."""

Resealer = Callable[[SecretBytes], Mapping[str, bytes]]


class MasterKeySealer(Protocol):
    """A device that seals the keystore's 32-byte master key into an opaque blob and
    unseals it again (the key never leaves the device in the clear at rest)."""

    name: str  # how it unlocks the keystore (Keystore.unlocked_by): "tpm", "pkcs11"
    device: str  # for messages: "the TPM", "the token"
    blob_file: str  # the side file beside the keystore
    level: SecurityLevel  # the level of a keystore opened this way

    def seal(self, master: SecretBytes) -> bytes:
        """The blob for ``master`` (the device may check its own round trip)."""
        ...

    def unseal(self, blob: bytes) -> SecretBytes:
        """The master key in ``blob``; a typed error (device absent, blob altered, policy
        not met) otherwise. The caller wipes the result."""
        ...

    def not_enrolled(self, keystore: Keystore) -> HsmError:
        """The error for a keystore that holds no blob of this device."""
        ...

    def blob_facts(self, blob: bytes) -> dict[str, object]:
        """What a blob says about itself (no secret): for summaries and health."""
        ...

    def device_health(self) -> tuple[dict[str, object], str]:
        """Health details of the device (its settings, reachability) and the problem that
        would stop it unsealing ("" when none)."""
        ...

    def failure_facts(self, error: HsmError) -> dict[str, object]:
        """Facts worth reporting about an unseal failure (a TPM's changed PCRs)."""
        ...


def read_blob(keystore: Keystore, sealer: MasterKeySealer) -> bytes:
    """The sealer's blob beside the keystore, or its "not enrolled" error."""
    return read_named(keystore, sealer.blob_file, sealer.not_enrolled)


def read_named(
    keystore: Keystore, blob_file: str, not_enrolled: Callable[[Keystore], HsmError]
) -> bytes:
    """The blob ``blob_file`` beside the keystore, or the error ``not_enrolled`` makes."""
    raw = keystore.read_side_file(blob_file)
    if raw is None:
        raise not_enrolled(keystore)
    return raw


def seal_checked(sealer: MasterKeySealer, master: SecretBytes) -> bytes:
    """Seal ``master`` and unseal the blob again: a blob is returned only if the device
    gives back exactly the key it sealed, so no unlock path that does not work is stored."""
    blob = sealer.seal(master)
    with sealer.unseal(blob) as back:
        if not back.equals(master):
            raise KeystoreError(
                f"{sealer.device} returned another key than the one it sealed; nothing was written",
                hint="check the device; the keystore is unchanged",
            )
    return blob


def enrol(
    keystore: Keystore,
    sealer: MasterKeySealer,
    *,
    before_store: Callable[[], dict[str, object]] | None = None,
) -> dict[str, object]:
    """Seal the (unlocked) keystore's master key and store the blob atomically beside the
    keystore, replacing an earlier one only once the new one is known to work.
    ``before_store`` runs after sealing, before anything is written (the TPM anchors the
    generation there); what it returns joins the summary. Returns a summary, no secret."""
    with keystore.master_key() as master:
        blob = seal_checked(sealer, master)
    extra = before_store() if before_store is not None else {}
    replaced = keystore.read_side_file(sealer.blob_file) is not None
    keystore.write_side_file(sealer.blob_file, blob)
    if keystore.read_side_file(sealer.blob_file) != blob:
        raise KeystoreError(
            f"{sealer.blob_file} did not read back as written", hint="check the disk"
        )
    return {
        "enrolled": True,
        "file": str(keystore.side_file_path(sealer.blob_file)),
        **extra,
        **sealer.blob_facts(blob),
        "replaced": replaced,
    }


def unenrol(keystore: Keystore, sealer: MasterKeySealer) -> bool:
    """Remove the blob; True if there was one. Removing the file revokes nothing a saved
    copy of it could open: :meth:`anyhsm.hsm.Hsm.unenrol_tpm` and
    :meth:`~anyhsm.hsm.Hsm.unenrol_token_wrap` rotate the master key without it."""
    return bool(keystore.remove_side_file(sealer.blob_file))


def unlock(keystore: Keystore, sealer: MasterKeySealer) -> None:
    """Open ``keystore`` with the master key its blob holds (never a passphrase)."""
    with sealer.unseal(read_blob(keystore, sealer)) as master:
        keystore.unlock_with_master_key(master, via=sealer.name)


def opens_keystore(keystore: Keystore, sealer: MasterKeySealer, blob: bytes) -> None:
    """Raise unless ``blob`` unseals to a key that opens the keystore at ``keystore.path``
    as stored on disk (a fresh load, so a key that only matches memory does not pass)."""
    from anyhsm.keystore import Keystore

    with sealer.unseal(blob) as master:
        probe = Keystore.load(keystore.path)
        try:
            probe.unlock_with_master_key(master, via=sealer.name)
        finally:
            probe.close()


def health(keystore: Keystore, sealer: MasterKeySealer) -> tuple[dict[str, object], str]:
    """Health details of the unlock path of an open keystore, and its problem ("" when it
    would open the keystore again): the device, the blob present, and the blob unsealing
    to this keystore's master key."""
    details, problem = sealer.device_health()
    raw = keystore.read_side_file(sealer.blob_file)
    details["unlock_blob"] = "present" if raw is not None else "absent"
    if raw is None:
        return details, problem or "the sealed master key is gone (unenrolled)"
    if problem:
        return details, problem
    try:
        details["blob"] = sealer.blob_facts(raw)
        with sealer.unseal(raw) as master, keystore.master_key() as mk:
            matches = master.equals(mk)
    except HsmError as exc:
        details["unseals"] = "no"
        details.update(sealer.failure_facts(exc))
        return details, f"{sealer.device} does not unseal the master key: {exc.message}"
    details["unseals"] = "yes" if matches else "no (another master key)"
    return details, "" if matches else "the sealed master key no longer matches this keystore"


def enrolled_blobs(keystore: Keystore) -> list[str]:
    """The unlock blobs the keystore holds (names from :data:`BLOB_FILES`)."""
    return [name for name in BLOB_FILES if keystore.read_side_file(name) is not None]


def resealer_for(
    keystore: Keystore, sealers: Mapping[str, MasterKeySealer], *, drop: Collection[str] = ()
) -> Resealer:
    """A function that makes, for a new master key, every blob enrolled now except
    ``drop``, each with the sealer ``sealers`` holds for its file. Raises before anything
    is written when a needed sealer is missing (its device is not configured), so a
    rotation never loses an unlock path by accident; a device that cannot be reached
    aborts the rotation (the store keeps its old master key)."""
    keep = [name for name in enrolled_blobs(keystore) if name not in drop]
    missing = [name for name in keep if name not in sealers]
    if missing:
        raise ConfigError(
            f"the keystore is enrolled with {', '.join(missing)}, but the device that made "
            "it is not configured here",
            hint="configure it ([providers.tpm] tcti, [providers.pkcs11] wrap_key_label) to "
            "re-seal the new master key, or unenrol it first",
        )
    chosen = [sealers[name] for name in keep]

    def make(master: SecretBytes) -> dict[str, bytes]:
        """Each new blob is opened again and compared before the rotation may commit."""
        return {s.blob_file: seal_checked(s, master) for s in chosen}

    return make


__all__ = [
    "BLOB_FILES",
    "TPM_BLOB",
    "WRAPPED_BLOB",
    "MasterKeySealer",
    "Resealer",
    "enrol",
    "enrolled_blobs",
    "health",
    "opens_keystore",
    "read_blob",
    "read_named",
    "resealer_for",
    "seal_checked",
    "unenrol",
    "unlock",
]
