"""Bitcoin key operations: extended public keys, addresses, descriptors, messages.

Every address and descriptor handed out is one the key can spend: a taproot output for a
key whose provider cannot make a tweaked BIP340 signature is refused
(:func:`anyhsm.bitcoin.capability.require_spendable`), since coins sent there would be
stuck. The network is the handle's.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anyhsm.bitcoin.address import AddressKind, address_for_pubkey, script_for_pubkey
from anyhsm.bitcoin.bip32 import ExtendedKey, KeyOrigin, format_path, parse_path
from anyhsm.bitcoin.bip322 import Bip322Format
from anyhsm.bitcoin.capability import require_spendable, signing_refusal
from anyhsm.bitcoin.message import EcdsaNonce
from anyhsm.bitcoin.presets import OutputType, Purpose, account_path, address_path, purpose_for
from anyhsm.errors import HsmError, MessageError, UnsupportedOperation
from anyhsm.ops.data import Data
from anyhsm.types import KeyInfo, KeyRef, Network, SignParams, SigScheme

if TYPE_CHECKING:
    from anyhsm.bitcoin.bip322 import Bip322Format
    from anyhsm.bitcoin.message import EcdsaNonce
    from anyhsm.bitcoin.tx import OutPoint
    from anyhsm.hsm import Hsm

SLIP132_FORMS = ("ypub", "zpub", "Ypub", "Zpub", "upub", "vpub", "Upub", "Vpub")

PathArg = Sequence[int] | str | None
"""A derivation path: child indexes, text (``m/84'/0'/0'``, ``84h/0h``), or None (none given;
``-`` in text means none too)."""


class DescriptorType(enum.StrEnum):
    """The single-key descriptor types anyhsm hands out (``descriptor --type``)."""

    PKH = "pkh"
    SH_WPKH = "sh-wpkh"
    WPKH = "wpkh"
    TR = "tr"

    @property
    def output_type(self) -> OutputType:
        return _DESCRIPTOR_OUTPUTS[self]

    @classmethod
    def parse(cls, text: str | DescriptorType) -> DescriptorType:
        if isinstance(text, DescriptorType):
            return text
        norm = text.strip().lower().replace("_", "-").replace("(", "-").rstrip(")")
        for t in cls:
            if t.value == norm:
                return t
        raise HsmError(f"unknown descriptor type {text!r}", hint="use pkh, sh-wpkh, wpkh or tr")


_DESCRIPTOR_OUTPUTS = {
    DescriptorType.PKH: OutputType.P2PKH,
    DescriptorType.SH_WPKH: OutputType.P2SH_P2WPKH,
    DescriptorType.WPKH: OutputType.P2WPKH,
    DescriptorType.TR: OutputType.P2TR,
}


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class XpubResult(Data):
    xpub: str  # in the SLIP-132 form when one was asked for
    key: str  # the key's label
    path: str
    master_fingerprint: str
    origin: str  # [fingerprint/path]
    network: Network


@dataclass(frozen=True)
class AddressResult(Data):
    address: str
    type: AddressKind
    key: str
    path: str | None  # None for a single key
    public_key: bytes
    script_pubkey: bytes
    network: Network


@dataclass(frozen=True)
class DescriptorResult(Data):
    """An output descriptor (with checksum). For an HD key: the account's multipath
    descriptor and its receive and change branches; for a single key, the key as is
    (``receive``, ``change``, ``account``, ``origin`` null)."""

    descriptor: str
    type: DescriptorType
    key: str
    account: int | None
    receive: str | None = None
    change: str | None = None
    origin: str | None = None
    master_fingerprint: str | None = None


@dataclass(frozen=True)
class RefusedType(Data):
    type: DescriptorType
    reason: str


@dataclass(frozen=True)
class WalletDescriptors(Data):
    """Every descriptor type the key can spend, for one account (a watch-only wallet's
    import, Bitcoin Core's ``getdescriptors``); the types it cannot spend, with why."""

    key: str
    account: int
    master_fingerprint: str | None
    descriptors: tuple[DescriptorResult, ...]
    refused: tuple[RefusedType, ...] = ()


@dataclass(frozen=True)
class MessageSignature(Data):
    signature: str  # base64
    address: str
    type: AddressKind
    format: str  # "bip137" | "bip322"
    key: str
    path: str | None
    bip322_format: Bip322Format | None = None  # simple | full (None: BIP137, or unprefixed)
    nonce: EcdsaNonce | None = None  # the ECDSA nonce rule (None for taproot: BIP340)


@dataclass(frozen=True)
class MessageVerification(Data):
    """The verdict on a message signature. ``state``: valid, invalid or (BIP322 only)
    inconclusive (the signature uses rules the verifier does not know; then ``error``
    says so). For a valid BIP322 signature ``locktime`` and ``sequence`` say from when it
    is valid, and a proof of funds lists the outputs it claims (``proven``: whether they
    exist unspent is for the chain to say)."""

    valid: bool
    address: str
    network: Network
    format: str  # "bip137" | "bip322"
    state: str  # "valid" | "invalid" | "inconclusive"
    reason: str | None = None
    bip322_format: str | None = None  # simple | full | proof-of-funds
    locktime: int | None = None
    sequence: int | None = None
    proven: tuple[ProvenOutput, ...] = ()
    error: HsmError | None = None

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        if self.error is None:
            del out["error"]
        return out


@dataclass(frozen=True)
class ProvenOutput(Data):
    txid: str
    vout: int
    amount: int
    script_pubkey: bytes


# --- keys and paths --------------------------------------------------------------------------


def signing_key(hsm: Hsm, key: KeyRef) -> tuple[KeyInfo, bool]:
    """(key, is HD) for a key that can sign Bitcoin transactions; UnsupportedOperation
    for another type."""
    from anyhsm.bitcoin.signer import HD_KEY_TYPES, SIGNING_KEY_TYPES

    info = hsm.get_key(key)
    if info.key_type not in SIGNING_KEY_TYPES:
        raise UnsupportedOperation(
            info.provider,
            f"Bitcoin keys of type {info.key_type.value}",
            hint="use a secp256k1 or bip32 key",
        )
    hd = info.key_type in HD_KEY_TYPES and hsm.capabilities(info.id).can_derive
    return info, hd


def path_of(path: PathArg) -> tuple[int, ...] | None:
    """Child indexes, or None when no path was given (None, or ``-`` in text)."""
    if path is None:
        return None
    if isinstance(path, str):
        return None if path.strip() == "-" else parse_path(path)
    return tuple(path)


def key_path(hsm: Hsm, info: KeyInfo, hd: bool, path: PathArg) -> tuple[int, ...] | None:
    """``path`` for this key, the key's ability asked before the path is parsed: a key
    that cannot derive (a single key, a PKCS#11 key) takes no path but ``m`` (or none),
    and any other is UnsupportedOperation, as :meth:`Hsm.derive_public` answers, whether
    or not the path would parse."""
    if hd:
        return path_of(path)
    if path is None:
        return None
    if isinstance(path, str):
        text = path.strip()
        if text == "-":
            return None
        if text in ("m", "M"):
            return ()
        steps: tuple[int, ...] = (0,)  # any other text: refused below, never parsed
    else:
        steps = tuple(path)
    _refuse_path_for_single(hsm, info, steps)
    return steps


def _refuse_path_for_single(hsm: Hsm, info: KeyInfo, path: tuple[int, ...] | None) -> None:
    if path:
        caps = hsm.capabilities(info.id)
        what = (
            "BIP32 derivation"
            if not caps.can_derive
            else f"BIP32 derivation from the single (non-HD) key {info.label!r}"
        )
        raise UnsupportedOperation(
            info.provider, what, hint="omit PATH (or give m): a single key is used as is"
        )


def _pubkey(hsm: Hsm, info: KeyInfo, hd: bool, path: tuple[int, ...] | None) -> bytes:
    if not hd:
        _refuse_path_for_single(hsm, info, path)
        return info.public_key
    return hsm.derive_public(info.id, path or ()).public_key


def _extended(hsm: Hsm, info: KeyInfo, path: tuple[int, ...]) -> tuple[ExtendedKey, bytes]:
    """The xpub of an HD key at ``path`` on the handle's network, and the master
    fingerprint."""
    d = hsm.derive_public(info.id, path)
    xpub = ExtendedKey(
        network=hsm.network,
        depth=d.depth,
        parent_fingerprint=d.parent_fingerprint,
        child_number=d.child_number,
        chain_code=d.chain_code,
        public_key=d.public_key,
    )
    return xpub, d.master_fingerprint


# --- xpub / address / descriptor -------------------------------------------------------------


def xpub(hsm: Hsm, key: KeyRef, path: PathArg = None, *, slip132: str | None = None) -> XpubResult:
    """The extended public key of an HD key at ``path`` (default m)."""
    info, hd = signing_key(hsm, key)
    if not hd:  # before the path is parsed: no path makes a single key an xpub
        raise UnsupportedOperation(
            info.provider,
            f"extended public keys of the single key {info.label!r} (it has no chain code)",
            hint="use 'anyhsm address' or 'anyhsm key show' for its public key",
        )
    at = path_of(path) or ()
    if slip132 is not None and slip132 not in SLIP132_FORMS:
        raise HsmError(
            f"unknown SLIP-132 form {slip132!r}", hint="use one of: " + ", ".join(SLIP132_FORMS)
        )
    ext, mfp = _extended(hsm, info, at)
    return XpubResult(
        xpub=ext.to_string(slip132) if slip132 else str(ext),
        key=info.label,
        path=format_path(at),
        master_fingerprint=mfp.hex(),
        origin=KeyOrigin(mfp, at).to_string(),
        network=hsm.network,
    )


def address(
    hsm: Hsm, key: KeyRef, path: PathArg = None, *, kind: AddressKind | str = AddressKind.P2WPKH
) -> AddressResult:
    """The address of a key: an HD key at ``path`` (default: the BIP44/49/84/86 path of
    the kind, account 0, index 0), a single key as is."""
    kind = AddressKind.parse(kind)
    info, hd = signing_key(hsm, key)
    require_spendable(
        hsm.capabilities(info.id), info.provider, info.label, kind is AddressKind.P2TR
    )
    at = key_path(hsm, info, hd, path)
    if hd and at is None:
        at = address_path(purpose_for(OutputType(kind.value)), hsm.network)
    pub = _pubkey(hsm, info, hd, at)
    return AddressResult(
        address=address_for_pubkey(pub, kind, hsm.network),
        type=kind,
        key=info.label,
        path=format_path(at) if hd and at is not None else None,
        public_key=pub,
        script_pubkey=script_for_pubkey(pub, kind),
        network=hsm.network,
    )


def descriptor(
    hsm: Hsm,
    key: KeyRef,
    descriptor_type: DescriptorType | str = DescriptorType.WPKH,
    *,
    account: int = 0,
) -> DescriptorResult:
    """The output descriptor of a key for a watch-only wallet: an HD key's account
    (BIP44/49/84/86 layout, ``<0;1>/*``), a single key as is (no account)."""
    dtype = DescriptorType.parse(descriptor_type)
    info, hd = signing_key(hsm, key)
    return _descriptor(hsm, info, hd, dtype, account)


def _descriptor(
    hsm: Hsm, info: KeyInfo, hd: bool, dtype: DescriptorType, account: int
) -> DescriptorResult:
    from anyhsm.bitcoin.descriptor import Descriptor, DescriptorKey

    otype = dtype.output_type
    require_spendable(
        hsm.capabilities(info.id), info.provider, info.label, otype is OutputType.P2TR
    )
    if hd:
        apath = account_path(Purpose(purpose_for(otype)), hsm.network, account)
        ext, mfp = _extended(hsm, info, apath)
        origin = KeyOrigin(mfp, apath)
        desc = Descriptor.from_account_key(otype, ext, origin)
        receive, change = desc.branches()
        return DescriptorResult(
            descriptor=str(desc),
            type=dtype,
            key=info.label,
            account=account,
            receive=str(receive),
            change=str(change),
            origin=origin.to_string(),
            master_fingerprint=mfp.hex(),
        )
    if account:
        _refuse_path_for_single(hsm, info, (0,))
    single = Descriptor(otype, DescriptorKey.single(info.public_key))
    return DescriptorResult(descriptor=str(single), type=dtype, key=info.label, account=None)


def wallet_descriptors(hsm: Hsm, key: KeyRef, *, account: int = 0) -> WalletDescriptors:
    """The descriptors of every type (pkh, sh-wpkh, wpkh, tr) the key can spend, for one
    account; a type its provider cannot sign for is listed in ``refused``, not handed out."""
    info, hd = signing_key(hsm, key)
    caps = hsm.capabilities(info.id)
    made: list[DescriptorResult] = []
    refused: list[RefusedType] = []
    for dtype in DescriptorType:
        taproot = dtype is DescriptorType.TR
        scheme = SigScheme.SCHNORR if taproot else SigScheme.ECDSA
        why = signing_refusal(caps, info.provider, scheme, tweak=taproot)
        if why is not None:
            refused.append(RefusedType(dtype, why))
            continue
        made.append(_descriptor(hsm, info, hd, dtype, account))
    fp = info.master_fingerprint
    return WalletDescriptors(
        key=info.label,
        account=account,
        master_fingerprint=None if fp is None else fp.hex(),
        descriptors=tuple(made),
        refused=tuple(refused),
    )


# --- messages --------------------------------------------------------------------------------


def sign_message(
    hsm: Hsm,
    key: KeyRef,
    message: str | bytes,
    path: PathArg = None,
    *,
    kind: AddressKind | str | None = None,
    bip322: bool = False,
    bip322_format: Bip322Format | str | None = None,
    prefix: bool = True,
    nonce: EcdsaNonce | str = "low-r",
    proof_of_funds: Sequence[str] = (),
) -> MessageSignature:
    """Sign a message for the key's address of ``kind`` (default p2pkh for BIP137, p2wpkh
    for BIP322): a BIP137 compact signature, or a BIP322 one (needed for taproot): simple
    for p2wpkh/p2tr and full for p2pkh/p2sh-p2wpkh unless ``bip322_format`` says,
    prefixed (``smp``/``ful``) unless ``prefix`` is false. ECDSA nonces are ground to low
    R by default, as the PSBT signer does (``nonce="rfc6979"``: plain RFC 6979, as most
    wallets and the BIP322 vectors); BIP340 aux randomness follows the signer's rule
    (:func:`anyhsm.bitcoin.signer.schnorr_aux`). ``proof_of_funds``: ``TXID:VOUT:SATS``
    of outputs paying the same address, for a BIP322 proof-of-funds signature."""
    from anyhsm.bitcoin.bip322 import Bip322Format, split_signature
    from anyhsm.bitcoin.message import EcdsaNonce, sign_message_bip137, sign_message_bip322
    from anyhsm.bitcoin.signer import schnorr_aux

    akind = AddressKind.parse(kind or ("p2wpkh" if bip322 else "p2pkh"))
    funds = [_funds_spec(text) for text in proof_of_funds]
    if funds and not bip322:
        raise MessageError("a proof of funds is a BIP322 signature", hint="add --bip322")
    ecdsa_nonce = EcdsaNonce(nonce)
    fmt = None if bip322_format is None else Bip322Format(bip322_format)
    if fmt is not None and not bip322:
        raise MessageError("a BIP322 format needs --bip322", hint="add --bip322")
    if akind is AddressKind.P2TR and not bip322:
        raise MessageError(
            "BIP137 cannot sign for taproot addresses", hint="add --bip322 for a BIP322 signature"
        )
    info, hd = signing_key(hsm, key)
    at = key_path(hsm, info, hd, path)
    pub = _pubkey(hsm, info, hd, at)
    sign_path = (at or ()) if hd else ()
    otype = OutputType(akind.value)

    def ecdsa(digest: bytes) -> bytes:
        params = SignParams(path=sign_path, grind_low_r=ecdsa_nonce.grind_low_r)
        return hsm.sign(info.id, digest, SigScheme.ECDSA, params=params)

    if bip322 and akind is AddressKind.P2TR:
        from anyhsm.bitcoin.taproot import taproot_tweak
        from anyhsm.crypto.secp256k1 import xonly

        tweak = taproot_tweak(xonly(pub), None)
        aux = schnorr_aux(hsm.config.policy)

        def schnorr(digest: bytes) -> bytes:
            params = SignParams(path=sign_path, tweak=tweak, aux_rand=aux)
            return hsm.sign(info.id, digest, SigScheme.SCHNORR, params=params)

        sig = sign_message_bip322(
            schnorr, pub, message, otype, fmt=fmt, prefix=prefix, proof_of_funds=funds
        )
    elif bip322:
        sig = sign_message_bip322(
            ecdsa, pub, message, otype, fmt=fmt, prefix=prefix, proof_of_funds=funds
        )
    else:
        sig = sign_message_bip137(ecdsa, pub, message, otype)
    made: Bip322Format | None = fmt
    if bip322 and prefix:
        made = split_signature(sig)[0]
    return MessageSignature(
        signature=sig,
        address=address_for_pubkey(pub, akind, hsm.network),
        type=akind,
        format="bip322" if bip322 else "bip137",
        key=info.label,
        path=format_path(at) if hd and at is not None else None,
        bip322_format=made,
        nonce=ecdsa_nonce if akind is not AddressKind.P2TR else None,
    )


def _funds_spec(text: str) -> tuple[OutPoint, int]:
    """``TXID:VOUT:SATS`` (txid as shown, ASCII digits) -> (outpoint, amount)."""
    from anyhsm.bitcoin.tx import OutPoint

    parts = text.strip().split(":")
    ok = len(parts) == 3 and len(parts[0]) == 64
    ok = ok and all(c in "0123456789abcdefABCDEF" for c in parts[0])
    ok = ok and all(p.isascii() and p.isdigit() for p in parts[1:])
    if not ok or int(parts[1]) > 0xFFFFFFFF or not 0 < int(parts[2]) <= 21_000_000 * 10**8:
        raise MessageError(
            f"proof of funds {text[:80]!r} is not TXID:VOUT:SATS",
            hint="e.g. 4a5e1e4b...:0:150000 (a 64-hex txid, the output index, the amount in sats)",
        )
    return OutPoint(bytes.fromhex(parts[0])[::-1], int(parts[1])), int(parts[2])


def verify_message(
    address: str, message: str | bytes, signature: str, network: Network | None = None
) -> MessageVerification:
    """The verdict on a BIP137 or BIP322 signature for ``address``; without a network,
    the address's own (the first of its family) decides. Needs no keys and no handle. A
    BIP322 prefix (smp, ful, pof) is BIP322; a 65-byte signature with a 27..42 header is
    BIP137; anything else an unprefixed BIP322 simple signature (as
    :func:`anyhsm.bitcoin.message.verify_message`). A signature that cannot be decoded
    raises MessageError."""
    from anyhsm.bitcoin.address import parse_address
    from anyhsm.bitcoin.bip322 import Bip322State, verify_bip322
    from anyhsm.bitcoin.message import is_bip137_signature, verify_message_bip137
    from anyhsm.errors import MessageError as Inconclusive

    if network is None:
        network = sorted(parse_address(address).networks, key=lambda n: n.value)[0]
    if is_bip137_signature(signature):
        ok = verify_message_bip137(address, message, signature, network)
        return MessageVerification(
            ok, address, network, "bip137", "valid" if ok else "invalid",
            None if ok else "the signature is not by this address's key",
        )  # fmt: skip
    res = verify_bip322(address, message, signature, network)
    valid = res.state is Bip322State.VALID
    error = None
    if res.state is Bip322State.INCONCLUSIVE:
        error = Inconclusive(
            f"BIP322 verification is inconclusive: {res.reason}",
            hint="the signature uses rules this verifier does not know; it is neither "
            "valid nor invalid here",
        )
    return MessageVerification(
        valid=valid,
        address=address,
        network=network,
        format="bip322",
        state=res.state.value,
        reason=res.reason,
        bip322_format=res.format.value,
        locktime=res.locktime if valid else None,
        sequence=res.sequence if valid else None,
        proven=tuple(
            ProvenOutput(p.outpoint.txid[::-1].hex(), p.outpoint.vout, p.amount, p.script_pubkey)
            for p in res.proven
        ),
        error=error,
    )
