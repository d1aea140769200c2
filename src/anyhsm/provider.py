"""The contract every provider meets.

Providers hold keys and sign 32-byte digests; they know nothing of Bitcoin.
Optional abilities (import, export, BIP32 derivation) are separate small
protocols whose presence is declared by :meth:`Provider.capabilities`, never
discovered with ``hasattr``. :func:`require` turns a missing capability into
:class:`~anyhsm.errors.UnsupportedOperation` before any work is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from anyhsm.errors import Bip32Error, InvalidDigest, ProviderError, UnsupportedOperation
from anyhsm.types import (
    MAX_PATH_DEPTH,
    Capabilities,
    DerivedPublicKey,
    Environment,
    Health,
    KeyInfo,
    KeyRef,
    KeySpec,
    KeyType,
    Network,
    SecurityLevel,
    SignParams,
    SigScheme,
)

if TYPE_CHECKING:
    from anyhsm.keystore import Keystore
    from anyhsm.secret import SecretBytes


@dataclass(frozen=True)
class ProviderContext:
    """What the factory tells a provider about the deployment it serves."""

    environment: Environment
    network: Network
    config_dir: Path
    settings: dict[str, object] = field(default_factory=dict)  # the provider's own config table
    software_settings: dict[str, object] = field(default_factory=dict)  # [providers.software]
    passphrase: SecretBytes | None = None
    # The PKCS#11 user PIN when the caller gave it (a prompt, a service's secret store);
    # None: the provider reads its pin_file or ANYHSM_PKCS11_PIN. Only token providers get it.
    pin: SecretBytes | None = field(default=None, repr=False, compare=False)
    allow_export: bool = False
    timeout_s: float = 2.0


@runtime_checkable
class Provider(Protocol):
    """A backend that holds keys and signs digests."""

    name: str

    def open(self) -> None:
        """Connect and authenticate; raise a typed error if that is impossible."""

    def close(self) -> None:
        """Release sessions and wipe secrets held in memory."""

    def health(self) -> Health:
        """Report reachability and state (the handle adds the signing probe)."""

    def capabilities(self) -> Capabilities: ...

    def security_level(self) -> SecurityLevel: ...

    def production_ready(self) -> bool:
        """Whether this provider may serve a production deployment at all."""

    def store_id(self) -> str:
        """Identity of the store the keys live in; the same store reached two
        ways (passphrase or TPM) has one id, so fallback loses no key."""

    def generate_key(self, spec: KeySpec) -> KeyInfo: ...

    def list_keys(self) -> list[KeyInfo]: ...

    def get_key(self, key: KeyRef) -> KeyInfo: ...

    def public_key(self, key: KeyRef) -> bytes: ...

    def sign_digest(
        self, key: KeyRef, digest: bytes, scheme: SigScheme, params: SignParams | None = None
    ) -> bytes: ...

    def delete_key(self, key: KeyRef) -> None: ...


@runtime_checkable
class KeyImporter(Protocol):
    """Providers that accept key material from outside (``can_import``)."""

    def import_key(
        self, label: str, secret: SecretBytes, key_type: KeyType, *, exportable: bool = False
    ) -> KeyInfo: ...


@runtime_checkable
class KeyExporter(Protocol):
    """Providers that can hand out private material (``can_export``), when allowed."""

    def export_key(self, key: KeyRef) -> SecretBytes: ...


@runtime_checkable
class BatchSigner(Protocol):
    """Providers that sign many digests with one key in one call (``can_batch``),
    sharing the work common to them (decryption, BIP32 derivation of shared parents)."""

    def sign_batch(
        self, key: KeyRef, requests: Sequence[tuple[bytes, SigScheme, SignParams | None]]
    ) -> list[bytes]: ...


@runtime_checkable
class Bip32Deriver(Protocol):
    """Providers that derive BIP32 children inside themselves (``can_derive``)."""

    def derive_public(self, key: KeyRef, path: tuple[int, ...]) -> DerivedPublicKey: ...


@runtime_checkable
class KeystoreServer(Protocol):
    """Providers whose keys are the sealed records of the software keystore (software,
    tpm, pkcs11-wrapped: each opens that one keystore its own way). The role is declared
    by the provider's registry spec (``opens_keystore``), never guessed from the class:
    see :func:`served_keystore`."""

    def served_keystore(self) -> Keystore:
        """The open keystore whose sealed records this provider signs with."""
        ...


def served_keystore(provider: Provider) -> Keystore | None:
    """The keystore ``provider`` serves when its registry spec declares that it opens the
    keystore (:class:`KeystoreServer`), else None: how the handle finds the deployment's
    anchor among the providers it opened, whatever their classes."""
    from anyhsm import registry

    spec = registry.spec(provider.name)
    if spec is None or not spec.opens_keystore:
        return None
    if not isinstance(provider, KeystoreServer):
        raise ProviderError(
            f"provider {provider.name!r} is declared to open the keystore but serves none",
            hint="a provider whose spec sets opens_keystore implements served_keystore()",
        )
    return provider.served_keystore()


def require(provider: Provider, capability: str, ok: bool, hint: str | None = None) -> None:
    """Raise UnsupportedOperation unless ``ok``; call before doing any work."""
    if not ok:
        raise UnsupportedOperation(provider.name, capability, hint=hint)


_NO_PARAMS = SignParams()


def check_path(path: tuple[int, ...]) -> None:
    """Reject a BIP32 path that no provider can derive, before any work: more than
    255 steps, or an index outside 0..2^32-1."""
    if len(path) > MAX_PATH_DEPTH:
        raise Bip32Error(
            f"a BIP32 path of {len(path)} steps is deeper than the maximum of {MAX_PATH_DEPTH}"
        )
    for index in path:
        if type(index) is not int or not 0 <= index <= 0xFFFFFFFF:
            raise Bip32Error(
                f"BIP32 index {index!r} is out of range",
                hint="indexes are 0..2^32-1; hardened ones are 2^31 and up",
            )


def check_sign_request(
    provider: Provider, digest: bytes, scheme: SigScheme, params: SignParams | None
) -> SignParams:
    """Validate a sign request against the provider's capabilities up front."""
    if (
        params is None
        and type(digest) is bytes
        and len(digest) == 32
        and scheme in provider.capabilities().schemes
    ):
        return _NO_PARAMS  # the common case, checked cheaply
    if not isinstance(digest, bytes | bytearray) or len(digest) != 32:
        raise InvalidDigest(
            "digest must be exactly 32 bytes",
            hint="hash the message first (for Bitcoin, the sighash)",
        )
    caps = provider.capabilities()
    require(provider, f"the {scheme.value} signature scheme", scheme in caps.schemes)
    p = params or SignParams()
    if p.path:
        require(provider, "BIP32 derivation", caps.can_derive, "use the key as a single key")
        check_path(p.path)
    if p.tweak is not None:
        require(provider, "taproot key tweaking", caps.can_tweak)
        if scheme is not SigScheme.SCHNORR:
            raise UnsupportedOperation(provider.name, "a tweak with ECDSA")
        if len(p.tweak) != 32:
            raise InvalidDigest("a tweak must be 32 bytes")
        from anyhsm.crypto.secp256k1 import CURVE_ORDER  # loaded only for a tweak

        if int.from_bytes(p.tweak, "big") >= CURVE_ORDER:
            raise InvalidDigest(
                "a tweak must be below the secp256k1 group order (BIP341 fails such a tweak)",
                hint="a taproot tweak is tagged_hash('TapTweak', key || merkle root)",
            )
    if p.aux_rand is not None and len(p.aux_rand) != 32:
        raise InvalidDigest("aux_rand must be 32 bytes")
    return p
