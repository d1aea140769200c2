"""Addresses and WIF keys: scriptPubKey <-> address for every network, with full validation.

An address names a *family* of networks (testnet, testnet4 and signet share
prefixes; regtest shares their Base58 prefixes), so decoding answers with the
family and the caller's network must be a member. A well-formed address of
another network raises :class:`anyhsm.errors.NetworkMismatch`; anything
malformed raises :class:`anyhsm.errors.AddressError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from anyhsm.bitcoin import networks as nets
from anyhsm.bitcoin.encoding import (
    b58check_decode,
    b58check_encode,
    bech32_decode,
    hash160,
    segwit_decode,
    segwit_encode,
)
from anyhsm.bitcoin.script import (
    ScriptType,
    classify,
    p2pkh,
    p2sh,
    p2tr,
    p2wpkh,
    witness_script_pubkey,
)
from anyhsm.bitcoin.taproot import taproot_output_key
from anyhsm.crypto import secp256k1
from anyhsm.errors import (
    AddressError,
    EncodingError,
    InvalidKeyMaterial,
    NetworkMismatch,
    ScriptError,
)
from anyhsm.secret import SecretBytes, wipe
from anyhsm.types import Network

# Longest valid Bech32 string is 90 characters; Base58 addresses are ~35. Reject
# long input before any big-integer work.
_MAX_ADDRESS_LEN = 90


@dataclass(frozen=True)
class AddressInfo:
    """A decoded, validated address."""

    script_pubkey: bytes
    networks: frozenset[Network]  # the family the address is valid on
    type: ScriptType
    witness_version: int | None = None


def _fail(address: str, why: str) -> AddressError:
    shown = address if len(address) <= _MAX_ADDRESS_LEN else address[:20] + "..."
    return AddressError(f"invalid address {shown!r}: {why}", hint="check the address for typos")


def _parse_segwit(address: str, hrp: str) -> AddressInfo:
    family = nets.networks_for_hrp(hrp)
    if not family:
        raise _fail(address, f"human-readable part {hrp!r} belongs to no Bitcoin network")
    try:
        version, program = segwit_decode(hrp, address)
        spk = witness_script_pubkey(version, program)
    except (EncodingError, ScriptError) as e:
        raise _fail(address, e.message) from None
    return AddressInfo(spk, family, classify(spk).type, version)


def _parse_base58(address: str) -> AddressInfo:
    try:
        payload = b58check_decode(address)
    except EncodingError as e:
        raise _fail(address, e.message) from None
    if len(payload) != 21:
        raise _fail(address, f"Base58 payload is {len(payload)} bytes, expected 21")
    prefix, body = payload[0], payload[1:]
    p2pkh_family = frozenset(p.network for p in nets.all_params() if p.p2pkh_prefix == prefix)
    p2sh_family = frozenset(p.network for p in nets.all_params() if p.p2sh_prefix == prefix)
    if p2pkh_family:
        return AddressInfo(p2pkh(body), p2pkh_family, ScriptType.P2PKH)
    if p2sh_family:
        return AddressInfo(p2sh(body), p2sh_family, ScriptType.P2SH)
    raise _fail(address, f"version byte {prefix:#04x} belongs to no Bitcoin network")


def parse_address(address: str) -> AddressInfo:
    """Decode and fully validate ``address`` without choosing a network.

    Bech32/Bech32m (BIP173/BIP350: checksum variant per witness version, HRP,
    padding, program length) or Base58Check (checksum, length, version byte).
    """
    if not isinstance(address, str):
        raise AddressError("an address must be text")
    if not address or len(address) > _MAX_ADDRESS_LEN:
        raise _fail(address, "wrong length")
    bech_error: str | None = None
    try:
        hrp, _, _ = bech32_decode(address)
    except EncodingError as e:
        bech_error = e.message
    else:
        return _parse_segwit(address, hrp)
    sep = address.rfind("1")
    if sep > 0 and nets.networks_for_hrp(address[:sep]):
        # Looks like a segwit address of a known network: report the Bech32 error.
        raise _fail(address, bech_error)
    return _parse_base58(address)


def _check_network(address: str, info: AddressInfo, network: Network) -> None:
    if network not in info.networks:
        raise NetworkMismatch(
            f"address {address!r} is for {nets.describe_family(info.networks)}, "
            f"not {network.value}",
            hint=f"use an address of the {network.value} network",
        )


def check_address(address: str, network: Network) -> AddressInfo:
    """:func:`parse_address`, then require ``network`` to be in the address's family."""
    info = parse_address(address)
    _check_network(address, info, network)
    return info


def script_from_address(address: str, network: Network) -> bytes:
    """The scriptPubKey paid by ``address`` on ``network``.

    Raises AddressError if malformed, NetworkMismatch if valid on other networks only.
    """
    return check_address(address, network).script_pubkey


def address_from_script(script_pubkey: bytes, network: Network) -> str | None:
    """The address of a scriptPubKey on ``network``, or None if it has none
    (P2PK, bare multisig, OP_RETURN, non-standard)."""
    p = nets.params(network)
    info = classify(script_pubkey)
    if info.type is ScriptType.P2PKH:
        return b58check_encode(bytes([p.p2pkh_prefix]) + info.data)
    if info.type is ScriptType.P2SH:
        return b58check_encode(bytes([p.p2sh_prefix]) + info.data)
    if info.witness_version is not None:
        return segwit_encode(p.bech32_hrp, info.witness_version, info.data)
    return None


# --- addresses of single keys ---------------------------------------------------------------


class AddressKind(enum.Enum):
    """The single-key address kinds a wallet derives."""

    P2PKH = "p2pkh"
    P2SH_P2WPKH = "p2sh-p2wpkh"
    P2WPKH = "p2wpkh"
    P2TR = "p2tr"  # BIP86: key-path only, internal key tweaked with TapTweak(P)

    @classmethod
    def parse(cls, text: str | AddressKind) -> AddressKind:
        if isinstance(text, AddressKind):
            return text
        norm = text.strip().lower().replace("_", "-")
        for kind in cls:
            if kind.value == norm:
                return kind
        names = ", ".join(k.value for k in cls)
        raise AddressError(f"unknown address kind {text!r}", hint=f"use one of: {names}")


def _compressed(pubkey: bytes) -> bytes:
    if len(pubkey) != 33 or pubkey[0] not in (2, 3):
        raise AddressError("a 33-byte compressed public key is needed for this address kind")
    if not secp256k1.valid_public_key(pubkey):
        raise AddressError("the public key is not a point on secp256k1")
    return bytes(pubkey)


def bip86_output_key(pubkey33: bytes) -> bytes:
    """BIP86 x-only output key: the compressed key's x, tweaked with TapTweak(x)."""
    xonly = _compressed(pubkey33)[1:]
    try:
        return taproot_output_key(xonly, None)[0]
    except ScriptError as e:
        raise AddressError(e.message) from None


def script_for_pubkey(pubkey33: bytes, kind: AddressKind | str) -> bytes:
    """The scriptPubKey of a single compressed key for ``kind``."""
    k = AddressKind.parse(kind)
    pub = _compressed(pubkey33)
    if k is AddressKind.P2PKH:
        return p2pkh(hash160(pub))
    if k is AddressKind.P2WPKH:
        return p2wpkh(hash160(pub))
    if k is AddressKind.P2SH_P2WPKH:
        return p2sh(hash160(p2wpkh(hash160(pub))))
    return p2tr(bip86_output_key(pub))


def redeem_script_for_pubkey(pubkey33: bytes, kind: AddressKind | str) -> bytes | None:
    """The P2SH redeem script a kind needs (the P2WPKH program for p2sh-p2wpkh), else None."""
    k = AddressKind.parse(kind)
    if k is AddressKind.P2SH_P2WPKH:
        return p2wpkh(hash160(_compressed(pubkey33)))
    return None


def address_for_pubkey(pubkey33: bytes, kind: AddressKind | str, network: Network) -> str:
    """Address of one compressed public key: p2pkh, p2sh-p2wpkh, p2wpkh or p2tr (BIP86)."""
    addr = address_from_script(script_for_pubkey(pubkey33, kind), network)
    if addr is None:  # pragma: no cover - every kind above has an address
        raise AddressError("no address for this script")
    return addr


# --- WIF ------------------------------------------------------------------------------------


def wif_encode(secret: bytes | bytearray, network: Network, compressed: bool = True) -> str:
    """Wallet Import Format of a 32-byte private key.

    The result is a Python ``str`` and cannot be wiped: show it, never keep it.
    """
    if len(secret) != 32 or not secp256k1.valid_secret(secret):
        raise InvalidKeyMaterial("a private key is 32 bytes, between 1 and the curve order - 1")
    payload = bytearray([nets.params(network).wif_prefix])
    payload += secret
    if compressed:
        payload.append(1)
    try:
        return b58check_encode(bytes(payload))
    finally:
        wipe(payload)


def wif_decode(text: str) -> tuple[SecretBytes, frozenset[Network], bool]:
    """(secret, network family, compressed) of a WIF key; the caller wipes the secret.

    The family is mainnet or all test networks (they share the WIF prefix).
    """
    if not isinstance(text, str) or not 40 <= len(text) <= 60:
        raise EncodingError("a WIF private key is 51 or 52 Base58 characters")
    try:
        raw = bytearray(b58check_decode(text))
    except EncodingError as e:
        raise EncodingError(f"invalid WIF private key: {e.message}") from None
    try:
        if len(raw) == 34 and raw[33] == 1:
            compressed = True
        elif len(raw) == 33:
            compressed = False
        else:
            raise EncodingError(
                "invalid WIF private key: wrong length or compression flag",
                hint="a WIF key encodes 32 bytes, optionally followed by 0x01",
            )
        family = nets.networks_for_wif_prefix(raw[0])
        if not family:
            raise EncodingError(f"invalid WIF private key: unknown version byte {raw[0]:#04x}")
        key = SecretBytes(memoryview(raw)[1:33])
        if not secp256k1.valid_secret(key.buffer):
            key.wipe()
            raise InvalidKeyMaterial("WIF private key is zero or not below the curve order")
        return key, family, compressed
    finally:
        wipe(raw)


__all__ = [
    "AddressInfo",
    "AddressKind",
    "address_for_pubkey",
    "address_from_script",
    "bip86_output_key",
    "check_address",
    "parse_address",
    "redeem_script_for_pubkey",
    "script_for_pubkey",
    "script_from_address",
    "wif_decode",
    "wif_encode",
]
