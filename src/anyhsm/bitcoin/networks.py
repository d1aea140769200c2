"""Per-network constants: address prefixes, WIF prefix, Bech32 HRP, BIP32 versions, BIP44 coin type.

Testnet, testnet4 and signet share every prefix, and regtest shares their Base58
prefixes, so an address (or a WIF key, or an xpub) names a *family* of networks,
never one network. Code that checks "is this for my network?" must therefore ask
whether the configured network is *in* the family (see :func:`address_networks`).
"""

from __future__ import annotations

from dataclasses import dataclass

from anyhsm.errors import HsmError
from anyhsm.types import Network


@dataclass(frozen=True)
class NetworkParams:
    """Encoding constants of one network."""

    network: Network
    p2pkh_prefix: int  # Base58Check version byte of P2PKH addresses
    p2sh_prefix: int  # Base58Check version byte of P2SH addresses
    wif_prefix: int  # Base58Check version byte of WIF private keys
    bech32_hrp: str  # human-readable part of segwit addresses (BIP173)
    xprv_version: bytes  # BIP32 serialisation version of extended private keys
    xpub_version: bytes  # BIP32 serialisation version of extended public keys
    coin_type: int  # BIP44 coin type (unhardened value)

    @property
    def name(self) -> str:
        return self.network.value


_XPRV = bytes.fromhex("0488ade4")
_XPUB = bytes.fromhex("0488b21e")
_TPRV = bytes.fromhex("04358394")
_TPUB = bytes.fromhex("043587cf")


def _test(network: Network, hrp: str) -> NetworkParams:
    return NetworkParams(network, 0x6F, 0xC4, 0xEF, hrp, _TPRV, _TPUB, 1)


_PARAMS: dict[Network, NetworkParams] = {
    Network.MAINNET: NetworkParams(Network.MAINNET, 0x00, 0x05, 0x80, "bc", _XPRV, _XPUB, 0),
    Network.TESTNET: _test(Network.TESTNET, "tb"),
    Network.TESTNET4: _test(Network.TESTNET4, "tb"),
    Network.SIGNET: _test(Network.SIGNET, "tb"),
    Network.REGTEST: _test(Network.REGTEST, "bcrt"),
}


def params(network: Network) -> NetworkParams:
    """The constants of ``network``."""
    try:
        return _PARAMS[network]
    except KeyError:
        raise HsmError(f"unknown network {network!r}") from None


def all_params() -> tuple[NetworkParams, ...]:
    """Every known network's constants, mainnet first."""
    return tuple(_PARAMS.values())


def networks_for_base58_prefix(prefix: int) -> frozenset[Network]:
    """Networks whose P2PKH or P2SH version byte is ``prefix`` (empty if none)."""
    return frozenset(
        p.network for p in _PARAMS.values() if prefix in (p.p2pkh_prefix, p.p2sh_prefix)
    )


def networks_for_wif_prefix(prefix: int) -> frozenset[Network]:
    """Networks whose WIF version byte is ``prefix`` (empty if none)."""
    return frozenset(p.network for p in _PARAMS.values() if p.wif_prefix == prefix)


def networks_for_hrp(hrp: str) -> frozenset[Network]:
    """Networks whose segwit HRP is ``hrp`` (case-insensitive; empty if none)."""
    low = hrp.lower()
    return frozenset(p.network for p in _PARAMS.values() if p.bech32_hrp == low)


def networks_for_bip32_version(version: bytes) -> frozenset[Network]:
    """Networks whose xprv or xpub version is ``version`` (empty if none)."""
    return frozenset(
        p.network for p in _PARAMS.values() if version in (p.xprv_version, p.xpub_version)
    )


def describe_family(networks: frozenset[Network]) -> str:
    """Human text for a family, in a stable order: ``"testnet/testnet4/signet"``."""
    order = list(_PARAMS)
    names = [n.value for n in sorted(networks, key=order.index)]
    return "/".join(names) if names else "no known network"


def address_networks(address: str) -> frozenset[Network]:
    """The family of networks on which ``address`` is valid.

    The address is fully validated first (checksum, prefix, witness version and
    program); a malformed address raises :class:`anyhsm.errors.AddressError`.
    ``Network.X in address_networks(addr)`` is the right network check.
    """
    # Imported here: address.py builds on this module.
    from anyhsm.bitcoin.address import parse_address

    return parse_address(address).networks
