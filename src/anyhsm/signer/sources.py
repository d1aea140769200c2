"""Where the signer's keys are: this host's keystore, or a signing service.

A :class:`Source` offers the few things the commands need (the network, the HD keys, a
key by name, and three operations); :class:`LocalSource` answers them with the handle
and :mod:`anyhsm.ops`, :class:`RemoteSource` with :class:`anyhsm.client.Client` against
``anyhsm serve``, where the same operations run (``--addr``/``ANYHSM_ADDR``, connected by
:func:`anyhsm.cli.backend.connect`, the CLI's remote mode: the same token sources, the
same refusal of clear text beyond loopback, the same TLS options). So a Bitcoin Core node
and its keys may live on different hosts, and Core gets the same answers either way.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from anyhsm.errors import HsmError, ProviderUnavailable
from anyhsm.signer import _ops
from anyhsm.signer.keyindex import IndexedKey, KeyIndex, write_index
from anyhsm.types import Network

if TYPE_CHECKING:
    from anyhsm.cli.backend import RemoteBackend
    from anyhsm.config import Config
    from anyhsm.hsm import Hsm
    from anyhsm.ops.bitcoin import WalletDescriptors
    from anyhsm.signer.protocol import ServiceArgs
    from anyhsm.types import Environment, KeyInfo


class Source(Protocol):
    def network(self) -> Network: ...
    def hd_keys(self) -> list[IndexedKey]: ...
    def get_key(self, key: str) -> KeyInfo: ...
    def wallet_descriptors(self, key_id: str, account: int) -> WalletDescriptors: ...
    def descriptor_address(self, info: KeyInfo, descriptor: str) -> str: ...
    def sign_psbt(self, key_id: str, psbt: str) -> str: ...
    def __enter__(self) -> Source: ...
    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class LocalSource:
    """The keystore of this host's configuration, opened on first need (the network is
    the configuration's, known before anything is opened)."""

    def __init__(self, cfg: Config, *, interactive: bool = False) -> None:
        self._cfg = cfg
        self._interactive = interactive
        self._hsm: Hsm | None = None
        self.index_written = False

    def open(self) -> Hsm:
        if self._hsm is None:
            self._hsm = _ops.open_handle(self._cfg, interactive=self._interactive)
        return self._hsm

    def __enter__(self) -> LocalSource:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._hsm is not None:
            self._hsm.close()
            self._hsm = None

    def network(self) -> Network:
        return self._cfg.network

    def hd_keys(self) -> list[IndexedKey]:
        """The HD keys of the handle, written to the public index (refreshed)."""
        keys = [IndexedKey.of(i) for i in _ops.hd_keys(self.open())]
        self.index_written = write_index(_ops.index_path(self._cfg), KeyIndex.of(self._cfg, keys))
        return keys

    def get_key(self, key: str) -> KeyInfo:
        return self.open().get_key(key)

    def wallet_descriptors(self, key_id: str, account: int) -> WalletDescriptors:
        from anyhsm.ops.bitcoin import wallet_descriptors

        return wallet_descriptors(self.open(), key_id, account=account)

    def descriptor_address(self, info: KeyInfo, descriptor: str) -> str:
        return _ops.descriptor_address(self.open(), info, descriptor)

    def sign_psbt(self, key_id: str, psbt: str) -> str:
        from anyhsm.ops.psbt import sign_psbt

        return sign_psbt(self.open(), psbt, key_id).psbt.to_base64()


class RemoteSource:
    """A signing service: the client's keys, its network, its operations (each the same
    ops function the local source calls, run by the service under its policy and audit
    log, with the client's name as the principal)."""

    def __init__(self, backend: RemoteBackend) -> None:
        self._backend = backend
        self._client = backend.client
        self._network: Network | None = None

    def __enter__(self) -> RemoteSource:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._backend.close()

    def network(self) -> Network:
        """The service's network (its health report)."""
        if self._network is None:
            name = self._client.health().network
            try:
                self._network = Network(name)
            except ValueError:
                raise ProviderUnavailable(
                    "the service did not say which network it serves",
                    hint="check 'anyhsm --addr URL health'",
                ) from None
        return self._network

    def hd_keys(self) -> list[IndexedKey]:
        """The client's HD keys the service has open (no index: the service answers
        without a passphrase, and fast)."""
        from anyhsm.bitcoin.signer import HD_KEY_TYPES

        return [
            IndexedKey.of(info)
            for info in self._client.list_keys()
            if info.available
            and info.master_fingerprint is not None
            and info.key_type in HD_KEY_TYPES
        ]

    def get_key(self, key: str) -> KeyInfo:
        return self._client.get_key(key)

    def wallet_descriptors(self, key_id: str, account: int) -> WalletDescriptors:
        return self._client.wallet_descriptors(key_id, account=account)

    def descriptor_address(self, info: KeyInfo, descriptor: str) -> str:
        return self._client.descriptor_address(info.id, descriptor)

    def sign_psbt(self, key_id: str, psbt: str) -> str:
        report = self._client.sign_psbt(key_id, psbt).report
        signed = report.get("psbt")
        assert isinstance(signed, str)  # SignedPsbt parsed it
        return signed


class Context:
    """One invocation's surroundings: the request's service options and the (lazily
    loaded) configuration."""

    def __init__(self, service: ServiceArgs, config: _Loader) -> None:
        from anyhsm.cli.backend import service_address

        self._service = service
        self._config = config
        self.addr = service_address(service.addr)

    @property
    def remote(self) -> bool:
        return self.addr is not None

    def config(self) -> Config:
        return self._config.get()

    def optional_config(self) -> Config | None:
        """The configuration if one is found and loads: a signer using a service needs
        none, but reads ``[signer] key`` and the environment's secret-file rule from one."""
        try:
            return self._config.get()
        except HsmError:
            if not self.remote:
                raise
            return None

    def _environment(self) -> Environment:
        from anyhsm.types import Environment

        cfg = self.optional_config()
        return cfg.environment if cfg is not None else Environment.PRODUCTION

    def source(self, *, interactive: bool = False) -> Source:
        if self.addr is None:
            return LocalSource(self.config(), interactive=interactive)
        from anyhsm.cli.backend import ServiceOptions, connect

        s = self._service
        options = ServiceOptions(self.addr, s.token_file, s.ca_file, s.client_cert, s.client_key)
        return RemoteSource(connect(options, self._environment))


class _Loader(Protocol):
    def get(self) -> Config: ...
