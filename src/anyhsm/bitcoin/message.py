"""Signed messages: BIP137 ("Bitcoin Signed Message") and BIP322 "simple" signatures.

Signing never touches a private key here: the caller passes ``sign_digest``, a function that
signs a 32-byte digest (an HSM provider does the work), and the rest is public computation.

- BIP137: ``sign_digest`` returns a DER ECDSA signature. The recovery id is found by trying
  0..3 with libsecp256k1 public-key recovery (coincurve) and comparing with the known key.
  The header byte is 27-30 (uncompressed P2PKH), 31-34 (compressed P2PKH), 35-38
  (P2SH-P2WPKH) or 39-42 (P2WPKH).
  Verification also accepts header 31-34 for P2WPKH and P2SH-P2WPKH addresses, as Electrum,
  Sparrow, Trezor's and most other verifiers do (Electrum signs segwit addresses that way).
  BIP137 cannot sign for taproot addresses: use BIP322.
- BIP322 (simple): for P2WPKH ``sign_digest`` returns a DER ECDSA signature of the BIP143
  SIGHASH_ALL digest; for P2TR (BIP86 key path) it returns a 64-byte BIP340 signature of the
  BIP341 SIGHASH_DEFAULT digest made with the *tweaked* key (internal key tweaked by
  ``anyhsm.bitcoin.taproot.taproot_tweak(xonly, None)``; providers take it as a sign
  parameter). Signatures are the base64 witness, unprefixed; the verifier also accepts the
  ``smp`` prefix of the newer BIP322 revision. Verification supports P2WPKH and P2TR key-path
  addresses and applies BIP322's required rules for them (SIGHASH_ALL/DEFAULT only, strict
  DER, low S).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence

from coincurve import PublicKey

from anyhsm.bitcoin.address import parse_address, script_from_address
from anyhsm.bitcoin.encoding import (
    as_stream,
    compact_size,
    hash160,
    read_compact_size,
    read_var_bytes,
    sha256d,
    tagged_hash,
    var_bytes,
)
from anyhsm.bitcoin.presets import OutputType
from anyhsm.bitcoin.script import ScriptType, p2pkh, p2sh, p2tr, p2wpkh
from anyhsm.bitcoin.sighash import (
    SIGHASH_ALL,
    SIGHASH_DEFAULT,
    bip143_sighash,
    bip341_sighash,
)
from anyhsm.bitcoin.taproot import taproot_output_key
from anyhsm.bitcoin.tx import OutPoint, Transaction, TxIn, TxOut
from anyhsm.crypto import secp256k1 as ec
from anyhsm.errors import EncodingError, HsmError, MessageError, ScriptError
from anyhsm.types import Network

SignDigest = Callable[[bytes], bytes]
"""Signs a 32-byte digest and returns the signature (DER ECDSA, or 64-byte BIP340)."""

MESSAGE_MAGIC = b"\x18Bitcoin Signed Message:\n"
_MAX_MESSAGE = 1 << 20  # 1 MiB: larger "messages" are a misuse
_MAX_SIGNATURE_TEXT = 4096

_BIP137_BASE = {
    OutputType.P2PKH: 31,  # compressed; uncompressed keys use 27
    OutputType.P2SH_P2WPKH: 35,
    OutputType.P2WPKH: 39,
}


def _message_bytes(message: bytes | str) -> bytes:
    data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
    if len(data) > _MAX_MESSAGE:
        raise MessageError(f"message of {len(data)} bytes is too long (limit 1 MiB)")
    return data


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
    data = _message_bytes(message)
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
    if len(t) > _MAX_SIGNATURE_TEXT:
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


def bip322_message_hash(message: bytes | str) -> bytes:
    """BIP322 message hash: the BIP340 tagged hash "BIP0322-signed-message" of the message."""
    return tagged_hash("BIP0322-signed-message", _message_bytes(message))


def bip322_to_spend(message: bytes | str, script_pubkey: bytes) -> Transaction:
    """The virtual ``to_spend`` transaction committing to the message and the challenge."""
    script_sig = b"\x00\x20" + bip322_message_hash(message)
    return Transaction(
        version=0,
        inputs=[TxIn(OutPoint(bytes(32), 0xFFFFFFFF), script_sig, 0)],
        outputs=[TxOut(0, bytes(script_pubkey))],
        locktime=0,
    )


def bip322_to_sign(to_spend: Transaction, witness: Sequence[bytes] = ()) -> Transaction:
    """The virtual ``to_sign`` transaction spending ``to_spend`` to OP_RETURN."""
    return Transaction(
        version=0,
        inputs=[TxIn(OutPoint(to_spend.txid(), 0), b"", 0, list(witness))],
        outputs=[TxOut(0, b"\x6a")],
        locktime=0,
    )


def encode_witness(stack: Sequence[bytes]) -> bytes:
    """Consensus encoding of a witness stack (the body of a BIP322 simple signature)."""
    return compact_size(len(stack)) + b"".join(var_bytes(item) for item in stack)


def decode_witness(data: bytes) -> list[bytes]:
    stream = as_stream(data)
    try:
        count = read_compact_size(stream, "witness item count")
        if count > 1000:
            raise MessageError("witness has too many items")
        items = [read_var_bytes(stream, "witness item", limit=10_000) for _ in range(count)]
    except EncodingError as exc:
        raise MessageError(f"the signature is not a witness stack: {exc.message}") from None
    if stream.read(1):
        raise MessageError("the signature has bytes after its witness stack")
    return items


def _bip322_p2tr_parts(pubkey33: bytes) -> tuple[bytes, bytes]:
    """(output key Q, scriptPubKey) of the BIP86 output of a compressed key."""
    try:
        q, _ = taproot_output_key(ec.xonly(pubkey33), None)
    except (ec.CurveError, ScriptError) as exc:
        raise MessageError(f"cannot build the taproot output: {exc}") from None
    return q, p2tr(q)


def sign_message_bip322(
    sign_digest: SignDigest,
    pubkey33: bytes,
    message: bytes | str,
    address_type: OutputType | str = OutputType.P2WPKH,
) -> str:
    """A base64 BIP322 simple signature for the P2WPKH or P2TR (BIP86) address of ``pubkey33``.

    For P2WPKH ``sign_digest`` returns DER ECDSA; for P2TR it returns a 64-byte BIP340
    signature made with the BIP86-tweaked key (see the module docstring).
    """
    kind = _output_type(address_type)
    if len(pubkey33) != 33 or not ec.valid_public_key(pubkey33):
        raise MessageError("BIP322 signing needs a 33-byte compressed public key")
    if kind is OutputType.P2WPKH:
        h = hash160(pubkey33)
        to_spend = bip322_to_spend(message, p2wpkh(h))
        to_sign = bip322_to_sign(to_spend)
        digest = bip143_sighash(to_sign, 0, p2pkh(h), 0, SIGHASH_ALL)
        r, s = _normalized_der(sign_digest(digest), "DER signature")
        der = ec.der_encode(r, s)
        if not ec.ecdsa_verify(pubkey33, digest, der):
            raise MessageError("the signature does not verify with the given public key")
        stack = [der + bytes([SIGHASH_ALL]), bytes(pubkey33)]
    elif kind is OutputType.P2TR:
        q, spk = _bip322_p2tr_parts(pubkey33)
        to_spend = bip322_to_spend(message, spk)
        to_sign = bip322_to_sign(to_spend)
        digest = bip341_sighash(to_sign, 0, [TxOut(0, spk)], SIGHASH_DEFAULT)
        sig = bytes(sign_digest(digest))
        if len(sig) != 64 or not ec.schnorr_verify(q, digest, sig):
            raise MessageError(
                "the Schnorr signature does not verify for the taproot output key",
                hint="sign with the key tweaked by TapTweak(internal key) (BIP86)",
            )
        stack = [sig]
    else:
        raise MessageError(
            f"BIP322 signing is implemented for p2wpkh and p2tr, not {kind.value}",
            hint="use sign_message_bip137 for p2pkh",
        )
    return base64.b64encode(encode_witness(stack)).decode("ascii")


def _verify_p2wpkh(message: bytes | str, script: bytes, stack: list[bytes]) -> bool:
    if len(stack) != 2:
        return False
    sig, pub = stack
    if len(pub) != 33 or p2wpkh(hash160(pub)) != script or not sig:
        return False
    if sig[-1] != SIGHASH_ALL:  # BIP322 required rule: SIGHASH_ALL only
        return False
    to_sign = bip322_to_sign(bip322_to_spend(message, script), stack)
    digest = bip143_sighash(to_sign, 0, p2pkh(hash160(pub)), 0, SIGHASH_ALL)
    return ec.ecdsa_verify(pub, digest, sig[:-1])  # strict DER and low S


def _verify_p2tr(message: bytes | str, script: bytes, stack: list[bytes]) -> bool:
    if len(stack) != 1:
        return False  # script path or annex: not supported for simple key-path proofs
    sig = stack[0]
    if len(sig) == 64:
        hash_type = SIGHASH_DEFAULT
    elif len(sig) == 65 and sig[64] == SIGHASH_ALL:
        hash_type = SIGHASH_ALL
    else:
        return False
    to_sign = bip322_to_sign(bip322_to_spend(message, script), stack)
    digest = bip341_sighash(to_sign, 0, [TxOut(0, script)], hash_type)
    return ec.schnorr_verify(script[2:], digest, sig[:64])


def verify_message_bip322(
    address: str, message: bytes | str, signature_b64: str, network: Network
) -> bool:
    """True if ``signature_b64`` is a valid BIP322 simple signature of ``message`` by
    ``address`` (P2WPKH or P2TR). Malformed input raises an HsmError; a signature that does
    not verify returns False."""
    info = parse_address(address)
    script = script_from_address(address, network)
    text = signature_b64.strip() if isinstance(signature_b64, str) else signature_b64
    if isinstance(text, str) and text.startswith("smp"):
        text = text[3:]
    raw = _b64decode(text)
    if not raw:
        raise MessageError("the signature is empty")
    stack = decode_witness(raw)
    if info.type is ScriptType.P2WPKH:
        return _verify_p2wpkh(message, script, stack)
    if info.type is ScriptType.P2TR:
        return _verify_p2tr(message, script, stack)
    raise MessageError(
        f"BIP322 verification is implemented for P2WPKH and P2TR addresses, not {info.type.value}",
        hint="verify P2PKH signatures with BIP137",
    )


def verify_message(
    address: str, message: bytes | str, signature_b64: str, network: Network
) -> bool:
    """Verify either format: a 65-byte signature with a 27..42 header is BIP137, else BIP322."""
    try:
        raw = _b64decode(signature_b64)
    except HsmError:
        raw = b""
    if len(raw) == 65 and 27 <= raw[0] <= 42:
        return verify_message_bip137(address, message, signature_b64, network)
    return verify_message_bip322(address, message, signature_b64, network)


__all__ = [
    "MESSAGE_MAGIC",
    "SignDigest",
    "bip322_message_hash",
    "bip322_to_sign",
    "bip322_to_spend",
    "decode_witness",
    "encode_witness",
    "message_hash",
    "recover_bip137",
    "sign_message_bip137",
    "sign_message_bip322",
    "verify_message",
    "verify_message_bip137",
    "verify_message_bip322",
]
