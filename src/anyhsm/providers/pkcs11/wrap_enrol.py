"""Enrolling a keystore with a PKCS#11 token wrap: the library side of ``anyhsm pkcs11
wrap-enroll|wrap-unenroll``, through the one sealed-master-key path
(:mod:`anyhsm.unlock_blobs`) with the token's sealer
(:class:`~anyhsm.providers.pkcs11.wrap_token.TokenWrapSealer`).

The passphrase-wrapped copy of the master key in the keystore header is never touched:
the recovery passphrase keeps opening the same keys when the token is gone.
"""

from __future__ import annotations

from anyhsm import unlock_blobs
from anyhsm.keystore import Keystore
from anyhsm.provider import ProviderContext
from anyhsm.providers.pkcs11.wrap_blob import SIDE_FILE
from anyhsm.providers.pkcs11.wrap_token import TokenWrapSealer, not_enrolled

__all__ = ["enroll", "read_blob", "unenroll"]


def enroll(keystore: Keystore, context: ProviderContext) -> dict[str, object]:
    """Wrap the (unlocked) keystore's master key with the token (the AES wrap key is
    created there on first use), check the blob unwraps to it, and store the blob.
    Returns a summary without secrets."""
    return unlock_blobs.enrol(keystore, TokenWrapSealer(context))


def unenroll(keystore: Keystore) -> bool:
    """Remove the wrapped blob; True if there was one. The passphrase path is unaffected.
    Removing the file revokes nothing a saved copy opens:
    :meth:`anyhsm.hsm.Hsm.unenrol_token_wrap` also rotates the master key."""
    return bool(keystore.remove_side_file(SIDE_FILE))


def read_blob(keystore: Keystore) -> bytes:
    """The wrapped blob beside the keystore, or ProviderUnavailable (not enrolled)."""
    return unlock_blobs.read_named(keystore, SIDE_FILE, not_enrolled)
