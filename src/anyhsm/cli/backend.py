"""The one seam between the CLI's handlers and where the keys are: a local handle, or a
signing service (``--addr URL`` / ``ANYHSM_ADDR``, docs/service.md, "The CLI against a
service").

Both backends offer the same small interface for the commands a service serves
(``key list|show``, ``sign``, ``verify``, ``xpub``, ``address``, ``descriptor``, ``psbt
sign``, ``health``) and return the operations layer's result classes, so each handler
makes one call and renders one result, whichever side answered. The remote backend is
built from :class:`anyhsm.client.Client`, which raises the library's own error classes:
exit statuses and ``--json`` error objects are those of the local path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from anyhsm.errors import UsageError
from anyhsm.types import SigScheme

if TYPE_CHECKING:
    from anyhsm.bitcoin.psbt import Psbt
    from anyhsm.client import Client
    from anyhsm.config import Config
    from anyhsm.hsm import Hsm
    from anyhsm.ops.admin import HealthOutcome
    from anyhsm.ops.bitcoin import AddressResult, DescriptorResult, XpubResult
    from anyhsm.ops.keys import KeyList
    from anyhsm.ops.signing import DigestSignature, Verification
    from anyhsm.types import KeyInfo


@dataclass(frozen=True)
class PsbtSigned:
    """``psbt sign``'s outcome on either side: the signed PSBT, the report object
    (``psbt sign --json``) and the fee rate unrounded where known (text output)."""

    psbt: Psbt
    report: dict[str, object]
    fee_rate: float


class Backend(Protocol):
    def list_keys(self) -> KeyList: ...
    def show_key(self, key: str) -> KeyInfo: ...
    def sign(
        self, key: str, digest: bytes, scheme: SigScheme, path: str | None, tweak: bytes | None
    ) -> DigestSignature: ...
    def verify(
        self,
        key: str,
        digest: bytes,
        signature: bytes,
        scheme: SigScheme,
        path: str | None,
        tweak: bytes | None,
    ) -> Verification: ...
    def xpub(self, key: str, path: str | None, slip132: str | None) -> XpubResult: ...
    def address(self, key: str, path: str | None, kind: str) -> AddressResult: ...
    def descriptor(self, key: str, descriptor_type: str, account: int) -> DescriptorResult: ...
    def sign_psbt(self, psbt: Psbt, keys: Sequence[str] | None) -> PsbtSigned: ...
    def health(self) -> HealthOutcome: ...


class LocalBackend:
    """The operations layer on this process's handle (opened on first use)."""

    def __init__(self, hsm: Callable[[], Hsm], config: Callable[[], Config | None]) -> None:
        self._hsm = hsm
        self._config = config

    def list_keys(self) -> KeyList:
        from anyhsm.ops.keys import list_keys

        return list_keys(self._hsm())

    def show_key(self, key: str) -> KeyInfo:
        from anyhsm.ops.keys import show_key

        return show_key(self._hsm(), key)

    def _derivation(self, key: str, path: str | None) -> tuple[int, ...]:
        """A key whose provider cannot derive refuses any --path before it is parsed
        (unsupported_operation, as the library answers, not bip32_error)."""
        from anyhsm.bitcoin.bip32 import parse_path

        if not path:
            return ()
        hsm = self._hsm()
        info = hsm.get_key(key)
        if not hsm.capabilities(info.id).can_derive:
            from anyhsm.errors import UnsupportedOperation

            raise UnsupportedOperation(info.provider, "BIP32 derivation")
        return parse_path(path)

    def sign(
        self, key: str, digest: bytes, scheme: SigScheme, path: str | None, tweak: bytes | None
    ) -> DigestSignature:
        from anyhsm.ops.signing import sign_digest

        steps = self._derivation(key, path)
        return sign_digest(self._hsm(), key, digest, scheme, path=steps, tweak=tweak)

    def verify(
        self,
        key: str,
        digest: bytes,
        signature: bytes,
        scheme: SigScheme,
        path: str | None,
        tweak: bytes | None,
    ) -> Verification:
        from anyhsm.ops.signing import verify_digest

        steps = self._derivation(key, path)
        return verify_digest(self._hsm(), key, digest, signature, scheme, path=steps, tweak=tweak)

    def xpub(self, key: str, path: str | None, slip132: str | None) -> XpubResult:
        from anyhsm.ops.bitcoin import xpub

        return xpub(self._hsm(), key, path, slip132=slip132)

    def address(self, key: str, path: str | None, kind: str) -> AddressResult:
        from anyhsm.ops.bitcoin import address

        return address(self._hsm(), key, path, kind=kind)

    def descriptor(self, key: str, descriptor_type: str, account: int) -> DescriptorResult:
        from anyhsm.ops.bitcoin import descriptor

        return descriptor(self._hsm(), key, descriptor_type, account=account)

    def sign_psbt(self, psbt: Psbt, keys: Sequence[str] | None) -> PsbtSigned:
        from anyhsm.ops.psbt import sign_psbt

        res = sign_psbt(self._hsm(), psbt, None if keys is None else list(keys))
        return PsbtSigned(res.psbt, res.to_dict(), res.fee_rate)

    def health(self) -> HealthOutcome:
        from anyhsm.ops.admin import health

        return health(self._hsm, self._config())


class RemoteBackend:
    """The same operations, answered by a signing service through :class:`Client`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def close(self) -> None:
        self._client.close()

    def list_keys(self) -> KeyList:
        from anyhsm.ops.keys import KeyList

        return KeyList(tuple(self._client.list_keys()))

    def show_key(self, key: str) -> KeyInfo:
        return self._client.get_key(key)

    @staticmethod
    def _no_derivation(path: str | None, tweak: bytes | None) -> None:
        if path or tweak is not None:
            raise UsageError(
                "--path and --tweak are not offered against a service (--addr)",
                hint="the service signs and verifies with the key itself",
            )

    def sign(
        self, key: str, digest: bytes, scheme: SigScheme, path: str | None, tweak: bytes | None
    ) -> DigestSignature:
        from anyhsm.ops.signing import DigestSignature

        self._no_derivation(path, tweak)
        return DigestSignature(self._client.sign(key, digest, scheme), scheme, key)

    def verify(
        self,
        key: str,
        digest: bytes,
        signature: bytes,
        scheme: SigScheme,
        path: str | None,
        tweak: bytes | None,
    ) -> Verification:
        from anyhsm.ops.signing import Verification

        self._no_derivation(path, tweak)
        return Verification(self._client.verify(key, digest, signature, scheme))

    def xpub(self, key: str, path: str | None, slip132: str | None) -> XpubResult:
        return self._client.xpub(key, path, slip132=slip132)

    def address(self, key: str, path: str | None, kind: str) -> AddressResult:
        return self._client.address(key, path, kind=kind)

    def descriptor(self, key: str, descriptor_type: str, account: int) -> DescriptorResult:
        return self._client.descriptor(key, descriptor_type, account=account)

    def sign_psbt(self, psbt: Psbt, keys: Sequence[str] | None) -> PsbtSigned:
        if keys is None or len(keys) != 1:
            raise UsageError(
                "against a service (--addr), psbt sign signs with one key",
                hint="name exactly one KEY; --all-keys and repeated --key are local only",
            )
        res = self._client.sign_psbt(keys[0], psbt)
        return PsbtSigned(res.psbt, dict(res.report), res.fee_rate)

    def health(self) -> HealthOutcome:
        from anyhsm.ops.admin import HealthOutcome

        return HealthOutcome(self._client.health())
