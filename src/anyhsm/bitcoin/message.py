"""Signed messages: BIP137 ("Bitcoin Signed Message") and BIP322 (see :mod:`anyhsm.bitcoin.bip322`).

Signing never touches a private key here: the caller passes ``sign_digest``, a function that
signs a 32-byte digest (an HSM provider does the work), and the rest is public computation.

- BIP137: ``sign_digest`` returns a DER ECDSA signature. The recovery id is found by trying
  0..3 with libsecp256k1 public-key recovery (coincurve) and comparing with the known key.
  The header byte is 27-30 (uncompressed P2PKH), 31-34 (compressed P2PKH), 35-38
  (P2SH-P2WPKH) or 39-42 (P2WPKH).
  Verification also accepts header 31-34 for P2WPKH and P2SH-P2WPKH addresses, as Electrum,
  Sparrow, Trezor's and most other verifiers do (Electrum signs segwit addresses that way).
  BIP137 cannot sign for taproot addresses: use BIP322.
- BIP322: :func:`sign_message_bip322` signs for the address of one key, in the simple
  format for P2WPKH and P2TR (BIP86 key path) and the full format for P2PKH and
  P2SH-P2WPKH; for P2TR ``sign_digest`` returns a 64-byte BIP340 signature made with the
  *tweaked* key (internal key tweaked by ``anyhsm.bitcoin.taproot.taproot_tweak(xonly,
  None)``; providers take it as a sign parameter). Signatures carry BIP322's prefix
  (``smp``/``ful``), unless ``prefix=False`` asks for the unprefixed form of verifiers
  older than BIP322 1.0.0. Multisig, script addresses and proofs of funds are
  :func:`anyhsm.bitcoin.bip322.sign_bip322`'s.

Verification answers the same way in every format: ``True`` for a valid signature,
``False`` for a well-formed one that is not valid (wrong message, key or address, a bad
signature, a sighash type or script BIP322 does not allow), and :class:`MessageError` only
for input that is not a signature at all (not base64, not a witness stack / transaction /
PSBT, a 65-byte BIP137 signature with an impossible header) or a BIP322 signature whose
verification is *inconclusive* (it relies on rules reserved for upgrades).
:func:`anyhsm.bitcoin.bip322.verify_bip322` gives BIP322's full verdict (state, reason,
the lock time and age a signature needs, the outputs a proof of funds spends).

ECDSA nonces: the digest signer decides. :class:`EcdsaNonce` names the two choices a
front end offers (plain RFC 6979, or RFC 6979 ground to a low R value as Bitcoin Core
signs) and maps them to ``SignParams.grind_low_r``.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable, Sequence

from coincurve import PublicKey

from anyhsm.bitcoin.address import parse_address, script_from_address
from anyhsm.bitcoin.bip322 import (
    Bip322Format,
    Bip322Key,
    Bip322State,
    Bip322Utxo,
    bip322_message_hash,
    bip322_to_sign,
    bip322_to_spend,
    decode_witness,
    encode_witness,
    message_bytes,
    p2tr_bip86_script,
    sign_bip322,
    verify_bip322,
)
from anyhsm.bitcoin.encoding import compact_size, hash160, sha256d
from anyhsm.bitcoin.presets import OutputType
from anyhsm.bitcoin.script import ScriptType, p2pkh, p2sh, p2wpkh
from anyhsm.bitcoin.tx import OutPoint, TxOut
from anyhsm.crypto import secp256k1 as ec
from anyhsm.errors import HsmError, MessageError
from anyhsm.types import Network

SignDigest = Callable[[bytes], bytes]
"""Signs a 32-byte digest and returns the signature (DER ECDSA, or 64-byte BIP340)."""

MESSAGE_MAGIC = b"\x18Bitcoin Signed Message:\n"
_MAX_BIP137_TEXT = 4096  # a BIP137 signature is 88 characters


class EcdsaNonce(enum.StrEnum):
    """How an ECDSA signature's nonce is made: plain RFC 6979 (as most wallets and the
    BIP322 vectors), or RFC 6979 retried with a counter until R is low (Bitcoin Core's
    ``CKey::Sign``; one byte shorter signatures half of the time)."""

    RFC6979 = "rfc6979"
    LOW_R = "low-r"

    @property
    def grind_low_r(self) -> bool:
        """The ``SignParams.grind_low_r`` that asks a provider for this nonce."""
        return self is EcdsaNonce.LOW_R


_BIP137_BASE = {
    OutputType.P2PKH: 31,  # compressed; uncompressed keys use 27
    OutputType.P2SH_P2WPKH: 35,
    OutputType.P2WPKH: 39,
}


def _output_type(value: OutputType | str) -> OutputType:
    if isinstance(value, OutputType):
        return value
    try:
        return OutputType(value.strip().lower().replace("_", "-"))
    except ValueError:
        raise MessageError(
            f"unknown address type {value!r}", hint="use p2pkh, p2sh-p2wpkh, p2wpkh or p2tr"
        ) from None


# --- BIP137 -----------------------------------------------------------------------------------


def message_hash(message: bytes | str) -> bytes:
    """BIP137 digest: sha256d(0x18 "Bitcoin Signed Message:\\n" || compact_size(len) || msg)."""
    data = message_bytes(message)
    return sha256d(MESSAGE_MAGIC + compact_size(len(data)) + data)


def _recover(digest: bytes, compact: bytes, recid: int, compressed: bool) -> bytes | None:
    try:
        pub = PublicKey.from_signature_and_message(compact + bytes([recid]), digest, hasher=None)
    except (ValueError, TypeError):  # coincurve: no key for this recovery id
        return None
    return pub.format(compressed=compressed)


def _normalized_der(der: bytes, what: str) -> tuple[int, int]:
    try:
        return ec.normalize_low_s(*ec.der_decode(der))
    except ec.CurveError as exc:
        raise MessageError(f"the signer returned an invalid {what}: {exc}") from None


def sign_message_bip137(
    sign_digest: SignDigest,
    pubkey33: bytes,
    message: bytes | str,
    address_type: OutputType | str = OutputType.P2PKH,
) -> str:
    """A base64 BIP137 signature of ``message`` by the key ``pubkey33`` (33 or 65 bytes).

    ``sign_digest`` must return a DER ECDSA signature of the digest it is given.
    """
    kind = _output_type(address_type)
    if kind not in _BIP137_BASE:
        raise MessageError(
            f"BIP137 cannot sign for {kind.value} addresses",
            hint="use BIP322 (sign_message_bip322) for taproot and script addresses",
        )
    if not ec.valid_public_key(pubkey33) or len(pubkey33) not in (33, 65):
        raise MessageError("the public key is not a valid secp256k1 key")
    compressed = len(pubkey33) == 33
    if not compressed and kind is not OutputType.P2PKH:
        raise MessageError("segwit addresses need a compressed public key")
    digest = message_hash(message)
    r, s = _normalized_der(sign_digest(digest), "DER signature")
    compact = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    target = bytes(pubkey33)
    for recid in range(4):
        if _recover(digest, compact, recid, compressed) == target:
            header = (_BIP137_BASE[kind] if compressed else 27) + recid
            return base64.b64encode(bytes([header]) + compact).decode("ascii")
    raise MessageError(
        "the signature does not belong to the given public key",
        hint="check that the signing key and the public key are the same key",
    )


def _b64decode(text: str) -> bytes:
    if not isinstance(text, str):
        raise MessageError("a signature must be base64 text")
    t = text.strip()
    if len(t) > _MAX_BIP137_TEXT:
        raise MessageError("signature text is too long")
    try:
        return base64.b64decode(t, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError("the signature is not valid base64") from None


def recover_bip137(message: bytes | str, signature_b64: str) -> tuple[bytes, OutputType | None]:
    """The public key a BIP137 signature was made with, and the address type its header names
    (None for the 31-34 header, which also serves Electrum-style segwit signatures)."""
    pub, kind = _recover_bip137(message, signature_b64)
    if pub is None:
        raise MessageError("no public key can be recovered from this signature")
    return pub, kind


def _recover_bip137(
    message: bytes | str, signature_b64: str
) -> tuple[bytes | None, OutputType | None]:
    raw = _b64decode(signature_b64)
    if len(raw) != 65:
        raise MessageError(f"a BIP137 signature is 65 bytes, not {len(raw)}")
    header = raw[0]
    if not 27 <= header <= 42:
        raise MessageError(f"BIP137 header byte {header} is not in 27..42")
    r = int.from_bytes(raw[1:33], "big")
    s = int.from_bytes(raw[33:], "big")
    if not (0 < r < ec.CURVE_ORDER and 0 < s < ec.CURVE_ORDER):
        raise MessageError("BIP137 signature values are out of range")
    recid = (header - 27) % 4
    compressed = header >= 31
    pub = _recover(message_hash(message), raw[1:], recid, compressed)
    kind: OutputType | None
    if header < 31:
        kind = OutputType.P2PKH
    elif header < 35:
        kind = None
    elif header < 39:
        kind = OutputType.P2SH_P2WPKH
    else:
        kind = OutputType.P2WPKH
    return pub, kind


def _scripts_for(pub: bytes, kind: OutputType | None) -> list[bytes]:
    if kind is OutputType.P2PKH:
        return [p2pkh(hash160(pub))]
    h = hash160(pub)
    if kind is OutputType.P2SH_P2WPKH:
        return [p2sh(hash160(p2wpkh(h)))]
    if kind is OutputType.P2WPKH:
        return [p2wpkh(h)]
    # header 31-34: compressed P2PKH, or (Electrum-style) the key's segwit addresses
    return [p2pkh(h), p2wpkh(h), p2sh(hash160(p2wpkh(h)))]


def verify_message_bip137(
    address: str, message: bytes | str, signature_b64: str, network: Network
) -> bool:
    """True if ``signature_b64`` is a BIP137 signature of ``message`` for ``address``.

    Malformed input (signature, or an address of another network) raises an HsmError;
    a well-formed signature that does not match returns False.
    """
    script = script_from_address(address, network)
    if parse_address(address).type is ScriptType.P2TR:
        raise MessageError(
            "BIP137 signatures cannot prove taproot addresses", hint="verify with BIP322"
        )
    pub, kind = _recover_bip137(message, signature_b64)
    return pub is not None and script in _scripts_for(pub, kind)


# --- BIP322 ------------------------------------------------------------------------------------

_BIP322_SINGLE_KEY = {
    OutputType.P2WPKH: Bip322Format.SIMPLE,
    OutputType.P2TR: Bip322Format.SIMPLE,
    OutputType.P2PKH: Bip322Format.FULL,
    OutputType.P2SH_P2WPKH: Bip322Format.FULL,
}


def sign_message_bip322(
    sign_digest: SignDigest,
    pubkey33: bytes,
    message: bytes | str,
    address_type: OutputType | str = OutputType.P2WPKH,
    *,
    fmt: Bip322Format | None = None,
    prefix: bool = True,
    proof_of_funds: Sequence[tuple[OutPoint, int]] = (),
) -> str:
    """A BIP322 signature for the address of ``address_type`` of ``pubkey33``.

    ``proof_of_funds``: outpoints and amounts (sats) of outputs paying this same
    address, which the signature then also proves control of (a proof-of-funds
    signature; segwit address types only, as a P2PKH output would need its whole
    previous transaction). The amounts are the signer's claims: a verifier checks them
    against the UTXO set.

    ``fmt`` None: simple for P2WPKH and P2TR, full for P2PKH and P2SH-P2WPKH (the simple
    format is for native segwit only). For P2WPKH, P2SH-P2WPKH and P2PKH ``sign_digest``
    returns DER ECDSA; for P2TR a 64-byte BIP340 signature made with the BIP86-tweaked
    key (see the module docstring). ``prefix=False`` drops the ``smp``/``ful`` prefix."""
    kind = _output_type(address_type)
    if len(pubkey33) != 33 or not ec.valid_public_key(pubkey33):
        raise MessageError("BIP322 signing needs a 33-byte compressed public key")
    if kind not in _BIP322_SINGLE_KEY:
        raise MessageError(
            f"BIP322 signing for one key covers p2pkh, p2sh-p2wpkh, p2wpkh and p2tr, not "
            f"{kind.value}",
            hint="use anyhsm.bitcoin.bip322.sign_bip322 for script addresses",
        )
    h = hash160(pubkey33)
    if kind is OutputType.P2TR:
        challenge = p2tr_bip86_script(pubkey33)
        key = Bip322Key(pubkey33, schnorr=lambda digest, _tweak: sign_digest(digest))
    else:
        challenge = {
            OutputType.P2WPKH: p2wpkh(h),
            OutputType.P2PKH: p2pkh(h),
            OutputType.P2SH_P2WPKH: p2sh(hash160(p2wpkh(h))),
        }[kind]
        key = Bip322Key(pubkey33, ecdsa=sign_digest)
    utxos = [Bip322Utxo(outpoint, TxOut(amount, challenge)) for outpoint, amount in proof_of_funds]
    if utxos:
        if kind is OutputType.P2PKH:
            raise MessageError(
                "a proof of funds for a p2pkh address needs the previous transactions",
                hint="use anyhsm.bitcoin.bip322.sign_bip322 with Bip322Utxo.prev_tx",
            )
        fmt = Bip322Format.PROOF_OF_FUNDS
    signature = sign_bip322(
        message, challenge, [key], fmt=fmt or _BIP322_SINGLE_KEY[kind], proof_of_funds=utxos
    )
    return signature[3:] if not prefix else signature


def verify_message_bip322(
    address: str, message: bytes | str, signature_b64: str, network: Network
) -> bool:
    """True if ``signature_b64`` is a valid BIP322 signature (simple, full or proof of
    funds; an unprefixed one is taken as simple) of ``message`` by ``address``; False if
    it is well formed but not valid. Raises MessageError for a signature that cannot be
    decoded or whose verification is inconclusive, an address error for a bad address."""
    result = verify_bip322(address, message, signature_b64, network)
    if result.state is Bip322State.INCONCLUSIVE:
        raise MessageError(
            f"BIP322 verification is inconclusive: {result.reason}",
            hint="the signature relies on rules reserved for upgrades; it is neither valid "
            "nor invalid to this verifier",
        )
    return result.valid


def is_bip137_signature(signature_b64: str) -> bool:
    """The one rule telling the formats apart: a BIP322 prefix (smp, ful, pof) is BIP322;
    base64 of 65 bytes with a 27..42 header is BIP137; anything else is taken as an
    unprefixed BIP322 simple signature."""
    text = signature_b64.strip() if isinstance(signature_b64, str) else ""
    if text[:3] in ("smp", "ful", "pof") or len(text) > 100:  # 65 bytes are 88 characters
        return False
    try:
        raw = _b64decode(text)
    except HsmError:
        return False
    return len(raw) == 65 and 27 <= raw[0] <= 42


def verify_message(
    address: str, message: bytes | str, signature_b64: str, network: Network
) -> bool:
    """Verify either format (:func:`is_bip137_signature` tells which). Same answers as the
    two functions it calls."""
    if is_bip137_signature(signature_b64):
        return verify_message_bip137(address, message, signature_b64, network)
    text = signature_b64.strip() if isinstance(signature_b64, str) else signature_b64
    return verify_message_bip322(address, message, text, network)


__all__ = [
    "MESSAGE_MAGIC",
    "EcdsaNonce",
    "SignDigest",
    "bip322_message_hash",
    "bip322_to_sign",
    "bip322_to_spend",
    "decode_witness",
    "encode_witness",
    "is_bip137_signature",
    "message_hash",
    "recover_bip137",
    "sign_message_bip137",
    "sign_message_bip322",
    "verify_message",
    "verify_message_bip137",
    "verify_message_bip322",
]
