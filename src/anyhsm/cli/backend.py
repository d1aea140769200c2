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

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from anyhsm.errors import ConfigError, UsageError
from anyhsm.types import SigScheme

if TYPE_CHECKING:
    from anyhsm.bitcoin.psbt import Psbt
    from anyhsm.client import Client
    from anyhsm.config import Config
    from anyhsm.hsm import Hsm
    from anyhsm.ops.admin import HealthOutcome
    from anyhsm.ops.bitcoin import AddressResult, DescriptorResult, XpubResult
    from anyhsm.ops.keys import KeyList
    from anyhsm.ops.policy import ApprovalAccepted, ApprovalRequest, PolicyCheck, PolicyShow
    from anyhsm.ops.signing import DigestSignature, Verification
    from anyhsm.types import Environment, KeyInfo


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
    def approval_request(self, key: str | None, psbt: Psbt, expires_in: int) -> ApprovalRequest: ...
    def check_policy(self, key: str | None, psbt: Psbt) -> PolicyCheck: ...
    def show_policy(self) -> PolicyShow: ...
    def submit_approval(
        self, txid: str, pubkey: str, signature: str, expires: int, policy: str | None
    ) -> ApprovalAccepted: ...


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

    def approval_request(self, key: str | None, psbt: Psbt, expires_in: int) -> ApprovalRequest:
        from anyhsm.ops.policy import approval_request

        return approval_request(self._hsm(), psbt, key, expires_in=expires_in)

    def check_policy(self, key: str | None, psbt: Psbt) -> PolicyCheck:
        from anyhsm.ops.policy import check_psbt

        return check_psbt(self._hsm(), psbt, key)

    def show_policy(self) -> PolicyShow:
        from anyhsm.ops.policy import show_policy

        return show_policy(self._hsm())

    def submit_approval(
        self, txid: str, pubkey: str, signature: str, expires: int, policy: str | None
    ) -> ApprovalAccepted:
        from anyhsm.ops.policy import submit_approval

        return submit_approval(self._hsm(), txid, pubkey, signature, expires, policy=policy)


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

    @property
    def client(self) -> Client:
        return self._client

    def sign(
        self, key: str, digest: bytes, scheme: SigScheme, path: str | None, tweak: bytes | None
    ) -> DigestSignature:
        from anyhsm.ops.signing import DigestSignature

        sig = self._client.sign(key, digest, scheme, path=path or None, tweak=tweak)
        return DigestSignature(sig, scheme, key)

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

        valid = self._client.verify(key, digest, signature, scheme, path=path or None, tweak=tweak)
        return Verification(valid)

    def xpub(self, key: str, path: str | None, slip132: str | None) -> XpubResult:
        return self._client.xpub(key, path, slip132=slip132)

    def address(self, key: str, path: str | None, kind: str) -> AddressResult:
        return self._client.address(key, path, kind=kind)

    def descriptor(self, key: str, descriptor_type: str, account: int) -> DescriptorResult:
        return self._client.descriptor(key, descriptor_type, account=account)

    def sign_psbt(self, psbt: Psbt, keys: Sequence[str] | None) -> PsbtSigned:
        """One key, several (one policy decision), or None: every key the client may use
        (``--all-keys`` against a service)."""
        selection = keys[0] if keys is not None and len(keys) == 1 else keys
        res = self._client.sign_psbt(selection, psbt)
        return PsbtSigned(res.psbt, dict(res.report), res.fee_rate)

    def health(self) -> HealthOutcome:
        from anyhsm.ops.admin import HealthOutcome

        return HealthOutcome(self._client.health())

    def approval_request(self, key: str | None, psbt: Psbt, expires_in: int) -> ApprovalRequest:
        if key is None:
            raise UsageError("against a service, name the key: --key LABEL")
        return self._client.approval_request(key, psbt, expires_in=expires_in)

    def check_policy(self, key: str | None, psbt: Psbt) -> PolicyCheck:
        from anyhsm.client import policy_check_result

        if key is None:
            raise UsageError("against a service, name the key: --key LABEL")
        return policy_check_result(self._client.check_policy(key, psbt))

    def show_policy(self) -> PolicyShow:
        from anyhsm.client import policy_show_result

        return policy_show_result(self._client.show_policy())

    def submit_approval(
        self, txid: str, pubkey: str, signature: str, expires: int, policy: str | None
    ) -> ApprovalAccepted:
        return self._client.submit_approval(txid, pubkey, signature, expires, policy=policy)


# --- reaching a service: the CLI's --addr and anyhsm-signer's, one implementation ------------


def service_address(given: str | None) -> str | None:
    """The service to talk to: ``given`` (``--addr``), else ``ANYHSM_ADDR``; None for the
    local path."""
    return given or os.environ.get("ANYHSM_ADDR") or None


@dataclass(frozen=True)
class ServiceOptions:
    """How a front end reaches a service: ``--addr``, ``--token-file``, ``--ca-file`` (or
    ``ANYHSM_CA_FILE``), ``--client-cert``/``--client-key``. The token itself is never
    an option (it would be in argv): ``ANYHSM_TOKEN`` or the token file."""

    addr: str
    token_file: str | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


def connect(options: ServiceOptions, environment: Callable[[], Environment]) -> RemoteBackend:
    """The client for ``options.addr``: refused in clear text beyond loopback; the token
    from ``--token-file`` (read under the secret-file rule of ``environment()``) or
    ``ANYHSM_TOKEN``; TLS from the CA file and, for mutual TLS, the client certificate."""
    import ssl

    from anyhsm.client import Client

    refuse_clear_text(options.addr)
    token = service_token(options.token_file, environment)
    ca = options.ca_file or os.environ.get("ANYHSM_CA_FILE") or None
    cert, key = options.client_cert, options.client_key
    if key and not cert:
        raise UsageError("--client-key needs --client-cert")
    try:
        client = Client(options.addr, token, cafile=ca, certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the TLS files: {e.strerror or e}") from None
    return RemoteBackend(client)


def service_token(token_file: str | None, environment: Callable[[], Environment]) -> str:
    """The bearer token: the file's content (a regular file, not a symlink, mode 600
    under production's rule), else ``ANYHSM_TOKEN``; UsageError when neither gives one."""
    from anyhsm.fsutil import read_secret_file

    if token_file:
        with read_secret_file(Path(token_file), "service token", environment()) as secret:
            try:
                return secret.reveal().decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ConfigError(
                    f"the service token file {token_file} is not UTF-8 text"
                ) from None
    token = os.environ.get("ANYHSM_TOKEN", "").strip()
    if not token:
        raise UsageError(
            "no token for the service",
            hint="set ANYHSM_TOKEN or pass --token-file FILE (mode 600)",
        )
    return token


def refuse_clear_text(addr: str | None) -> None:
    """The bearer token crosses the network only inside TLS: plain ``http://`` is for a
    loopback service (the default listen address), refused for any other host."""
    import ipaddress
    import urllib.parse

    if not addr:
        return
    parts = urllib.parse.urlsplit(addr if "://" in addr else f"http://{addr}")
    if parts.scheme != "http":
        return
    host = (parts.hostname or "").lower()
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise UsageError(
            f"refusing to send the service token in clear text to {host or addr!r}",
            hint="use an https:// address (with --ca-file), or http only to a loopback service",
        )
