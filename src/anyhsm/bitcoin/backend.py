"""What the Bitcoin layer needs from whatever holds the keys: the signing backend.

The PSBT signer works with any object that has these six methods, as Bitcoin Core's
``SigningProvider`` and rust-bitcoin's ``GetKey`` let their signers work with any key
source. :class:`anyhsm.hsm.Hsm` satisfies it structurally (``mypy --strict`` checks
that in ``_hsm_is_a_backend`` below),
so the signer never sees the handle's configuration, routing or keystore: the policy
and the network are the caller's arguments.

Every method is public data or a signature of a 32-byte digest: the Bitcoin layer
computes the digests, the backend signs them blind. No method hands out a private key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from anyhsm.types import Capabilities, DerivedPublicKey, KeyInfo, KeyRef, SignParams, SigScheme

SignRequest = tuple[bytes, SigScheme, SignParams | None]
"""One digest to sign: the 32 bytes, the scheme, and the path / tweak / nonce options."""


class SigningBackend(Protocol):
    """Keys by reference, their public data, and signatures of digests, in batches.

    ``record_event`` writes what the signer decided (signed, refused, signatures it
    discarded) to the backend's audit log; a backend without one may drop the events,
    but one that keeps a log must refuse to sign when an entry cannot be written.
    """

    def get_key(self, key: KeyRef) -> KeyInfo:
        """The key named by label or id (raises :class:`~anyhsm.errors.KeyNotFound`)."""
        ...

    def list_keys(self) -> list[KeyInfo]:
        """Every key the backend knows (``available=False`` for keys it cannot use now)."""
        ...

    def capabilities(self, key: KeyRef) -> Capabilities:
        """What the store holding ``key`` can do (derive, tweak, which schemes)."""
        ...

    def derive_public(self, key: KeyRef, path: tuple[int, ...]) -> DerivedPublicKey:
        """BIP32 child public data of an HD key at ``path`` below its master."""
        ...

    def sign_many(
        self,
        key: KeyRef,
        requests: Sequence[SignRequest],
        *,
        context: Mapping[str, str] | None = None,
    ) -> list[bytes]:
        """Sign several digests with one key, in order: strict-DER low-S ECDSA or
        64-byte BIP340 signatures. ``context`` (txid, input indexes) is for the log."""
        ...

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
        """Write an event that is not a signature (``psbt_sign``, ``sign_discarded``)."""
        ...


if TYPE_CHECKING:  # mypy proves here that the handle is a signing backend
    from anyhsm.hsm import Hsm

    def _hsm_is_a_backend(hsm: Hsm) -> SigningBackend:
        return hsm


__all__ = ["SignRequest", "SigningBackend"]
