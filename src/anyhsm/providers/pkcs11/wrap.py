"""Wrap mode: an AES key inside a PKCS#11 token protects the software keystore's master key.

The token keeps a 256-bit AES key (label ``wrap_key_label`` in ``[providers.pkcs11]``),
generated inside it as a sensitive, never-extractable token object. The keystore's
master key is encrypted under it and the result is stored beside the keystore
(``pkcs11-wrapped.json``), so the keystore opens without a passphrase only where the
token is present and logged in. The passphrase-wrapped copy in the keystore header
is untouched: the recovery passphrase still opens the same keys when the token is gone.

Three modules do the work, this one is the provider:

- :mod:`~anyhsm.providers.pkcs11.wrap_blob`: the blob's file format;
- :mod:`~anyhsm.providers.pkcs11.wrap_token`: the token crypto (GCM, or RFC 5649 key
  wrap) and the token's :class:`~anyhsm.unlock_blobs.MasterKeySealer`;
- :mod:`~anyhsm.providers.pkcs11.wrap_enrol`: enrolment, through the one
  sealed-master-key path shared with the TPM (:mod:`anyhsm.unlock_blobs`).
"""

from __future__ import annotations

from anyhsm.provider import ProviderContext
from anyhsm.providers.pkcs11.wrap_blob import SIDE_FILE, WrapMechanism, WrappedBlob
from anyhsm.providers.pkcs11.wrap_enrol import enroll, read_blob, unenroll
from anyhsm.providers.pkcs11.wrap_token import (
    PROVIDER_NAME,
    TokenWrapSealer,
    unwrap_master_key,
    wrap_master_key,
)
from anyhsm.providers.sealed import SealedKeystoreProvider

__all__ = [
    "SIDE_FILE",
    "Pkcs11WrappedProvider",
    "TokenWrapSealer",
    "WrapMechanism",
    "WrappedBlob",
    "enroll",
    "read_blob",
    "unenroll",
    "unwrap_master_key",
    "wrap_master_key",
]


class Pkcs11WrappedProvider(SealedKeystoreProvider):
    """The software keystore, opened by a master key that a PKCS#11 token unwraps.

    Its settings are the ``[providers.pkcs11]`` ones (module, token, PIN, and
    ``wrap_key_label``): the factory passes them in ``context.settings``.
    """

    name = PROVIDER_NAME

    def __init__(self, context: ProviderContext) -> None:
        sealer = TokenWrapSealer(context)
        super().__init__(context, sealer)
        self.wrap_settings = sealer.settings
