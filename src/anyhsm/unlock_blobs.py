"""Unlock blobs (the master key sealed to a TPM, or wrapped by a PKCS#11 token) across a
master-key rotation.

A rotation revokes every copy of the old master key. The blobs that should keep
working are made again for the new key before the rotation commits (a device
that cannot be reached aborts it, so the store never loses an unlock path by
accident); the ones an unenrolment drops are simply not carried over.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from anyhsm.config import Config
from anyhsm.errors import ConfigError, KeystoreError
from anyhsm.keystore import Keystore
from anyhsm.secret import SecretBytes

TPM_BLOB = "tpm-sealed.json"
WRAPPED_BLOB = "pkcs11-wrapped.json"

Resealer = Callable[[SecretBytes], dict[str, bytes]]


def enrolled_blobs(keystore: Keystore) -> list[str]:
    return [name for name in (TPM_BLOB, WRAPPED_BLOB) if keystore.read_side_file(name) is not None]


def resealer(config: Config, keystore: Keystore, *, drop: Collection[str] = ()) -> Resealer:
    """A function that makes, for a new master key, every blob enrolled now except
    ``drop``. Raises before anything is written when a needed device is not configured."""
    keep = [name for name in enrolled_blobs(keystore) if name not in drop]
    if TPM_BLOB in keep and "tcti" not in config.provider_settings("tpm"):
        raise ConfigError(
            "the keystore is enrolled with a TPM, but [providers.tpm] is not configured",
            hint="configure the TPM to re-seal the new master key, or 'anyhsm tpm unenroll'",
        )

    def make(master: SecretBytes) -> dict[str, bytes]:
        """Each new blob is opened again and compared before the rotation may commit, so
        a rotation never leaves an unlock path that does not work."""
        out: dict[str, bytes] = {}
        if TPM_BLOB in keep:
            from anyhsm.tpm.sealing import seal, unseal
            from anyhsm.tpm.settings import TpmSettings

            settings = TpmSettings.from_mapping(config.provider_settings("tpm"))
            blob = seal(settings, master)
            with unseal(settings, blob) as back:
                _same(back, master, "the TPM")
            out[TPM_BLOB] = blob
        if WRAPPED_BLOB in keep:
            from anyhsm.factory import provider_context
            from anyhsm.providers.pkcs11.wrap import unwrap_master_key, wrap_master_key

            context = provider_context(config, "pkcs11-wrapped", None)
            blob = wrap_master_key(context, master)
            with unwrap_master_key(context, blob) as back:
                _same(back, master, "the token")
            out[WRAPPED_BLOB] = blob
        return out

    return make


def _same(back: SecretBytes, master: SecretBytes, device: str) -> None:
    if not back.equals(master):
        raise KeystoreError(
            f"{device} returned another key than the one it sealed; nothing was rotated",
            hint="check the device; the keystore is unchanged",
        )
