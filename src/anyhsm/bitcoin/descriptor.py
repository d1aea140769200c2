"""Output script descriptors (BIP380-382, 386, 389) for the single-key wallets anyhsm signs for.

Supported: ``pkh(KEY)``, ``sh(wpkh(KEY))``, ``wpkh(KEY)`` and ``tr(KEY)`` (key path only, the
BIP86 tweak). KEY is a hex public key or an xpub/tpub, optionally with a key origin
``[d34db33f/84'/0'/0']``, followed by unhardened steps, at most one BIP389 multipath step
``<0;1>`` and an optional final ``*``. Descriptors are public documents: private keys
(xprv, WIF) are refused without being decoded, and so are hardened steps after an xpub, which
would need one. Other descriptor kinds (multisig, ``wsh``, script trees...) raise
:class:`DescriptorError` naming what is supported.

The checksum is the BIP380 ``descsum`` algorithm. ``str(descriptor)`` is a canonical form
(lowercase hex, one hardened marker) followed by its checksum.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from anyhsm.bitcoin.address import address_from_script
from anyhsm.bitcoin.bip32 import HARDENED, ExtendedKey, KeyOrigin
from anyhsm.bitcoin.encoding import hash160
from anyhsm.bitcoin.presets import OutputType
from anyhsm.bitcoin.script import p2pkh, p2sh, p2tr, p2wpkh
from anyhsm.bitcoin.taproot import taproot_output_key
from anyhsm.crypto import secp256k1 as ec
from anyhsm.errors import Bip32Error, DescriptorError, NetworkMismatch
from anyhsm.types import Network

MAX_DESCRIPTOR_LEN = 4096

# --- BIP380 checksum ----------------------------------------------------------------------------

_INPUT_CHARSET = (
    "0123456789()[],'/*abcdefgh@:$%{}"
    "IJKLMNOPQRSTUVWXYZ&+-.;<=>?!^_|~"
    'ijklmnopqrstuvwxyzABCDEFGH`#"\\ '
)
_INPUT_INDEX = {c: i for i, c in enumerate(_INPUT_CHARSET)}
_CHECKSUM_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GENERATOR = (0xF5DEE51989, 0xA9FDCA3312, 0x1BAB10E32D, 0x3706B1677A, 0x644D626FFD)


def _polymod(symbols: list[int]) -> int:
    chk = 1
    for value in symbols:
        top = chk >> 35
        chk = (chk & 0x7FFFFFFFF) << 5 ^ value
        for i in range(5):
            if (top >> i) & 1:
                chk ^= _GENERATOR[i]
    return chk


def _expand(text: str) -> list[int]:
    symbols: list[int] = []
    groups: list[int] = []
    for pos, c in enumerate(text):
        v = _INPUT_INDEX.get(c)
        if v is None:
            raise DescriptorError(
                f"invalid character {c!r} at position {pos} of the descriptor",
                hint="descriptors use printable ASCII only (BIP380 character set)",
            )
        symbols.append(v & 31)
        groups.append(v >> 5)
        if len(groups) == 3:
            symbols.append(groups[0] * 9 + groups[1] * 3 + groups[2])
            groups = []
    if len(groups) == 1:
        symbols.append(groups[0])
    elif len(groups) == 2:
        symbols.append(groups[0] * 3 + groups[1])
    return symbols


def descriptor_checksum(body: str) -> str:
    """The 8-character BIP380 checksum of a descriptor (given without ``#...``)."""
    if "#" in body:
        raise DescriptorError("give the descriptor without its '#' checksum")
    c = _polymod([*_expand(body), 0, 0, 0, 0, 0, 0, 0, 0]) ^ 1
    return "".join(_CHECKSUM_CHARSET[(c >> (5 * (7 - i))) & 31] for i in range(8))


def add_checksum(body: str) -> str:
    """``body#checksum``."""
    return f"{body}#{descriptor_checksum(body)}"


def split_checksum(text: str, *, require: bool = False) -> tuple[str, str | None]:
    """Split ``body#checksum`` and verify the checksum (if present, or if ``require``)."""
    body, sep, given = text.partition("#")
    if not sep:
        if require:
            raise DescriptorError("the descriptor has no checksum", hint="append '#' + checksum")
        _expand(body)  # character set check
        return body, None
    if len(given) != 8:
        raise DescriptorError(
            f"descriptor checksum must be 8 characters, got {len(given)}",
            hint="copy the whole descriptor again",
        )
    if any(c not in _CHECKSUM_CHARSET for c in given):
        raise DescriptorError("descriptor checksum has a character outside the bech32 set")
    if descriptor_checksum(body) != given:
        raise DescriptorError(
            "descriptor checksum does not match",
            hint="the descriptor was changed or mistyped; copy it again from its source",
        )
    return body, given


# --- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DerivedKey:
    """One public key a descriptor produces, and where it comes from (for PSBT fields)."""

    pubkey: bytes  # 33 bytes compressed; 65 uncompressed (pkh only); 32 x-only (tr only)
    origin: KeyOrigin | None

    @property
    def xonly(self) -> bytes:
        return self.pubkey if len(self.pubkey) == 32 else ec.xonly(self.pubkey)


Step = tuple[int, ...]  # one derivation step: one index, or the alternatives of a multipath step


@dataclass(frozen=True)
class DescriptorKey:
    """A KEY expression: a single public key, or an xpub with steps (and maybe ``*``)."""

    origin: KeyOrigin | None = None
    pubkey: bytes | None = None
    xpub: ExtendedKey | None = None
    steps: tuple[Step, ...] = ()
    wildcard: bool = False
    _parents: dict[int, ExtendedKey] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if (self.pubkey is None) == (self.xpub is None):
            raise DescriptorError("a key expression holds one public key or one xpub")
        if self.xpub is not None and self.xpub.is_private:
            raise DescriptorError("descriptors hold public keys only; use the neutered xpub")
        if self.pubkey is not None and (self.steps or self.wildcard):
            raise DescriptorError("a single public key cannot have derivation steps")
        multipath = 0
        for step in self.steps:
            if not step or len(set(step)) != len(step):
                raise DescriptorError("a multipath step needs distinct alternatives")
            if any(not 0 <= i < HARDENED for i in step):
                raise DescriptorError(
                    "hardened steps (or indexes >= 2^31) cannot be derived from an xpub",
                    hint="put the xpub of the last hardened step in the descriptor",
                )
            multipath += len(step) > 1
        if multipath > 1:
            raise DescriptorError("a key may have at most one multipath <a;b> step (BIP389)")
        if self.xpub is not None and self.xpub.depth + len(self.steps) + self.wildcard > 255:
            raise DescriptorError("derivation would exceed the BIP32 maximum depth of 255")

    @classmethod
    def single(cls, pubkey: bytes, origin: KeyOrigin | None = None) -> DescriptorKey:
        return cls(origin=origin, pubkey=bytes(pubkey))

    @classmethod
    def extended(
        cls,
        xpub: ExtendedKey,
        steps: tuple[Step, ...] = (),
        *,
        wildcard: bool = True,
        origin: KeyOrigin | None = None,
    ) -> DescriptorKey:
        return cls(
            origin=origin, xpub=xpub, steps=tuple(tuple(s) for s in steps), wildcard=wildcard
        )

    @property
    def branch_count(self) -> int:
        """Number of alternatives of the multipath step (1 without one)."""
        return max((len(s) for s in self.steps), default=1)

    def branch_path(self, branch: int = 0) -> tuple[int, ...]:
        """The fixed steps after the xpub for one branch (without the wildcard index)."""
        if not 0 <= branch < self.branch_count:
            raise DescriptorError(
                f"branch {branch} does not exist; this key has {self.branch_count} branch(es)"
            )
        return tuple(s[branch] if len(s) > 1 else s[0] for s in self.steps)

    def derive(self, index: int | None = None, branch: int = 0) -> DerivedKey:
        """The key at ``index`` (for a ``*`` key) on ``branch`` (for a multipath key)."""
        if self.pubkey is not None:
            if index is not None:
                raise DescriptorError("the key is not ranged (no /*); give no index")
            if branch != 0:
                raise DescriptorError("a single public key has only branch 0")
            return DerivedKey(self.pubkey, self.origin)
        assert self.xpub is not None
        path = self.branch_path(branch)
        if self.wildcard:
            if index is None:
                raise DescriptorError("the descriptor is ranged (/*); give an index")
            if isinstance(index, bool) or not 0 <= index < HARDENED:
                raise DescriptorError(f"index {index!r} is out of range 0..2^31-1")
        elif index is not None:
            raise DescriptorError("the key is not ranged (no /*); give no index")
        parent = self._parents.get(branch)
        try:
            if parent is None:
                parent = self.xpub.derive(path)
                self._parents[branch] = parent
            key = parent if index is None else parent.derive([index])
        except Bip32Error as exc:
            raise DescriptorError(f"cannot derive the key: {exc.message}") from None
        full = path if index is None else (*path, index)
        origin = (
            self.origin.child(full)
            if self.origin is not None
            else KeyOrigin(self.xpub.fingerprint, full)
        )
        return DerivedKey(key.public_key, origin)

    def to_string(self, hardened_marker: str = "'") -> str:
        out = "" if self.origin is None else self.origin.to_string(hardened_marker)
        if self.pubkey is not None:
            return out + self.pubkey.hex()
        assert self.xpub is not None
        out += str(self.xpub)
        for step in self.steps:
            out += "/" + (str(step[0]) if len(step) == 1 else "<" + ";".join(map(str, step)) + ">")
        return out + ("/*" if self.wildcard else "")

    def __str__(self) -> str:
        return self.to_string()


# --- descriptors ---------------------------------------------------------------------------

_WRAPPERS = {
    OutputType.P2PKH: ("pkh(", ")"),
    OutputType.P2SH_P2WPKH: ("sh(wpkh(", "))"),
    OutputType.P2WPKH: ("wpkh(", ")"),
    OutputType.P2TR: ("tr(", ")"),
}


@dataclass(frozen=True)
class Descriptor:
    """A single-key output descriptor: ``pkh``, ``sh(wpkh)``, ``wpkh`` or ``tr`` (key path)."""

    output_type: OutputType
    key: DescriptorKey
    hardened_marker: str = "'"

    def __post_init__(self) -> None:
        if self.output_type not in _WRAPPERS:
            raise DescriptorError(
                f"{self.output_type.value} descriptors are not supported",
                hint="use pkh, sh(wpkh), wpkh or tr",
            )
        if self.hardened_marker not in ("'", "h"):
            raise DescriptorError("the hardened marker of a descriptor is ' or h")
        pub = self.key.pubkey
        if pub is not None:
            _check_single_key(pub, self.output_type)
        elif self.key.xpub is not None and self.key.xpub.script_hint is not None:
            raise DescriptorError("descriptors take xpub/tpub keys, not SLIP-132 forms")

    @classmethod
    def from_account_key(
        cls,
        output_type: OutputType,
        account_xpub: ExtendedKey,
        origin: KeyOrigin | None = None,
        *,
        change: int | None = None,
        hardened_marker: str = "'",
    ) -> Descriptor:
        """``[origin]xpub/<0;1>/*`` (``change=None``) or ``.../0/*`` / ``.../1/*``."""
        xpub = account_xpub.neuter() if account_xpub.is_private else account_xpub
        if xpub.script_hint is not None:  # drop the SLIP-132 form; descriptors use xpub
            xpub = ExtendedKey.parse(str(xpub))
        if change is None:
            steps: tuple[Step, ...] = ((0, 1),)
        elif change in (0, 1):
            steps = ((change,),)
        else:
            raise DescriptorError(f"change must be 0, 1 or None (both), not {change!r}")
        if origin is not None and origin.fingerprint == b"\0\0\0\0":
            raise DescriptorError("a key origin needs the master key's fingerprint")
        return cls(
            output_type,
            DescriptorKey.extended(xpub, steps, wildcard=True, origin=origin),
            hardened_marker,
        )

    # --- text ---------------------------------------------------------------------------

    def body(self) -> str:
        """The descriptor without checksum."""
        start, end = _WRAPPERS[self.output_type]
        return start + self.key.to_string(self.hardened_marker) + end

    @property
    def checksum(self) -> str:
        return descriptor_checksum(self.body())

    def to_string(self, *, checksum: bool = True) -> str:
        body = self.body()
        return add_checksum(body) if checksum else body

    def __str__(self) -> str:
        return self.to_string()

    # --- ranges and branches -----------------------------------------------------------------

    @property
    def is_ranged(self) -> bool:
        return self.key.wildcard

    @property
    def is_multipath(self) -> bool:
        return self.key.branch_count > 1

    @property
    def branch_count(self) -> int:
        return self.key.branch_count

    def branches(self) -> tuple[Descriptor, ...]:
        """BIP389: one single-path descriptor per multipath alternative (itself if none)."""
        if not self.is_multipath:
            return (self,)
        k = self.key
        assert k.xpub is not None
        return tuple(
            Descriptor(
                self.output_type,
                DescriptorKey.extended(
                    k.xpub,
                    tuple((i,) for i in k.branch_path(b)),
                    wildcard=k.wildcard,
                    origin=k.origin,
                ),
                self.hardened_marker,
            )
            for b in range(self.branch_count)
        )

    # --- derivation ----------------------------------------------------------------------------

    def derive(self, index: int | None = None, *, branch: int = 0) -> DerivedKey:
        """The public key (and its origin) at ``index`` on ``branch``."""
        return self.key.derive(index, branch)

    def script_pubkey(self, index: int | None = None, *, branch: int = 0) -> bytes:
        """The output script at ``index`` (ranged descriptors) on ``branch`` (multipath)."""
        pub = self.derive(index, branch=branch).pubkey
        if self.output_type is OutputType.P2PKH:
            return p2pkh(hash160(pub))
        if self.output_type is OutputType.P2WPKH:
            return p2wpkh(hash160(pub))
        if self.output_type is OutputType.P2SH_P2WPKH:
            return p2sh(hash160(p2wpkh(hash160(pub))))
        xonly = pub if len(pub) == 32 else pub[1:]
        return p2tr(taproot_output_key(xonly, None)[0])

    def redeem_script(self, index: int | None = None, *, branch: int = 0) -> bytes | None:
        """The P2SH redeem script (``sh(wpkh)`` only), else None."""
        if self.output_type is not OutputType.P2SH_P2WPKH:
            return None
        return p2wpkh(hash160(self.derive(index, branch=branch).pubkey))

    def address(self, index: int | None, network: Network, *, branch: int = 0) -> str:
        """The address at ``index`` on ``network`` (the xpub must be of that network)."""
        xpub = self.key.xpub
        if xpub is not None and network not in xpub.networks:
            raise NetworkMismatch(
                f"the descriptor's key is for {xpub.network.value}, not {network.value}",
                hint="use a descriptor with a key of the configured network",
            )
        addr = address_from_script(self.script_pubkey(index, branch=branch), network)
        if addr is None:  # pragma: no cover - every supported type has an address
            raise DescriptorError("this output script has no address")
        return addr


def _check_single_key(pub: bytes, output_type: OutputType) -> None:
    n = len(pub)
    if n == 32:
        if output_type is not OutputType.P2TR:
            raise DescriptorError("x-only (64 hex) keys are only allowed in tr()")
        ok = ec.valid_public_key(b"\x02" + pub)
    elif n == 65:
        if output_type is not OutputType.P2PKH:
            raise DescriptorError(
                "uncompressed public keys are only allowed in pkh()",
                hint="segwit and taproot outputs need compressed keys",
            )
        ok = pub[0] == 4 and ec.valid_public_key(pub)
    elif n == 33:
        ok = pub[0] in (2, 3) and ec.valid_public_key(pub)
    else:
        raise DescriptorError(f"a public key is 33, 65 or (in tr) 32 bytes, not {n}")
    if not ok:
        raise DescriptorError("the public key is not a point on secp256k1")


# --- parsing -------------------------------------------------------------------------------

_HEX = re.compile(r"[0-9a-fA-F]+")
_INDEX = re.compile(r"[0-9]{1,10}")
_ORIGIN_STEP = re.compile(r"([0-9]{1,10})(['h]?)")
_PRIVATE_PREFIXES = ("xprv", "tprv", "yprv", "zprv", "Yprv", "Zprv", "uprv", "vprv", "Uprv", "Vprv")
_SLIP132_PUB = ("ypub", "zpub", "Ypub", "Zpub", "upub", "vpub", "Upub", "Vpub")
_UNSUPPORTED = (
    "pk",
    "sh",
    "wsh",
    "multi",
    "sortedmulti",
    "multi_a",
    "sortedmulti_a",
    "combo",
    "raw",
    "addr",
    "rawtr",
    "musig",
)
_SUPPORTED_HINT = "anyhsm supports pkh(KEY), sh(wpkh(KEY)), wpkh(KEY) and tr(KEY)"


def parse_descriptor(text: str, *, require_checksum: bool = False) -> Descriptor:
    """Parse one of the supported descriptors; the checksum is verified when present."""
    if not isinstance(text, str):
        raise DescriptorError("a descriptor must be text")
    if len(text) > MAX_DESCRIPTOR_LEN:
        raise DescriptorError(f"descriptor of {len(text)} characters is too long")
    body, _ = split_checksum(text.strip(), require=require_checksum)
    if body.count("(") != body.count(")"):
        raise DescriptorError("the descriptor's parentheses are unbalanced")
    matched = _match_wrapper(body)
    if matched is None:
        raise _unsupported(body)
    otype, inner = matched
    if otype is OutputType.P2TR and "," in inner:
        raise DescriptorError(
            "tr() with a script tree is not supported; only key-path tr(KEY)",
            hint=_SUPPORTED_HINT,
        )
    key, marker = _parse_key(inner, otype)
    return Descriptor(otype, key, marker)


def _match_wrapper(body: str) -> tuple[OutputType, str] | None:
    for otype, (start, end) in _WRAPPERS.items():
        if body.startswith(start) and body.endswith(end) and len(body) > len(start + end):
            return otype, body[len(start) : -len(end)]
    return None


def _unsupported(body: str) -> DescriptorError:
    name = body.split("(", 1)[0]
    if "(" in body and name in (*_UNSUPPORTED, "pkh", "wpkh", "tr"):
        return DescriptorError(
            f"{body[:60]!r} is not a supported descriptor form", hint=_SUPPORTED_HINT
        )
    return DescriptorError(
        f"{name[:30]!r} is not a known descriptor function", hint=_SUPPORTED_HINT
    )


def _parse_origin(text: str) -> tuple[KeyOrigin, str | None]:
    fp, sep, rest = text.partition("/")
    if len(fp) != 8 or not _HEX.fullmatch(fp):
        raise DescriptorError(f"key origin fingerprint {fp[:20]!r} is not 8 hex digits")
    if sep and not rest:
        raise DescriptorError("key origin ends with '/'")
    path: list[int] = []
    marker: str | None = None
    for part in rest.split("/") if rest else []:
        m = _ORIGIN_STEP.fullmatch(part)
        if m is None:
            raise DescriptorError(
                f"key origin step {part[:20]!r} is invalid",
                hint="write steps as numbers, hardened ones with ' or h",
            )
        value = int(m.group(1))
        if value >= HARDENED:
            raise DescriptorError(f"key origin step {value} is out of range 0..2^31-1")
        if m.group(2):
            marker = marker or m.group(2)
            value |= HARDENED
        path.append(value)
    return KeyOrigin(bytes.fromhex(fp), tuple(path)), marker


def _parse_key(text: str, otype: OutputType) -> tuple[DescriptorKey, str]:
    origin: KeyOrigin | None = None
    marker: str | None = None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise DescriptorError("key origin has no closing ']'")
        origin, marker = _parse_origin(text[1:close])
        text = text[close + 1 :]
    if "[" in text or "]" in text:
        raise DescriptorError("misplaced '[' or ']': a key has at most one key origin, first")
    if not text:
        raise DescriptorError("key origin is not followed by a key")
    keytext, *parts = text.split("/")
    if keytext.startswith(_PRIVATE_PREFIXES) or _looks_like_wif(keytext):
        raise DescriptorError(
            "the descriptor contains a private key; anyhsm accepts public descriptors only",
            hint="export the descriptor with xpubs (the private key stays in the HSM)",
        )
    if keytext.startswith(_SLIP132_PUB):
        raise DescriptorError(
            f"{keytext[:4]} keys are not valid in descriptors",
            hint="convert it to xpub/tpub: str(ExtendedKey.parse(key))",
        )
    default_marker = marker or "'"
    if keytext.startswith(("xpub", "tpub")):
        try:
            xpub = ExtendedKey.parse(keytext)
        except Bip32Error as exc:
            raise DescriptorError(f"bad extended public key: {exc.message}") from None
        steps, wildcard = _parse_steps(parts)
        return DescriptorKey(origin, None, xpub, steps, wildcard), default_marker
    if parts:
        raise DescriptorError("a hex public key cannot have derivation steps")
    if not _HEX.fullmatch(keytext) or len(keytext) not in (64, 66, 130):
        raise DescriptorError(
            f"{keytext[:20]!r} is not a public key",
            hint="give 66 hex digits (compressed key), 64 (x-only, tr only) or an xpub",
        )
    pub = bytes.fromhex(keytext)
    _check_single_key(pub, otype)
    return DescriptorKey(origin, pub), default_marker


def _parse_steps(parts: list[str]) -> tuple[tuple[Step, ...], bool]:
    steps: list[Step] = []
    wildcard = False
    for pos, part in enumerate(parts):
        if wildcard:
            raise DescriptorError("'*' must be the last step")
        if part == "*":
            wildcard = True
            continue
        if part in ("*'", "*h", "*H"):
            raise DescriptorError(
                "hardened wildcard '*h' needs the private key",
                hint="anyhsm descriptors derive public keys only; use /*",
            )
        if part.startswith("<") and part.endswith(">") and len(part) > 2:
            alts = part[1:-1].split(";")
            if len(alts) < 2:
                raise DescriptorError("a multipath step <a;b> needs at least two alternatives")
            steps.append(tuple(_index(a, pos) for a in alts))
            continue
        steps.append((_index(part, pos),))
    return tuple(steps), wildcard


def _index(part: str, pos: int) -> int:
    if part and part[-1] in "'hH" and _INDEX.fullmatch(part[:-1]):
        raise DescriptorError(
            f"hardened step {part!r} cannot be derived from an xpub",
            hint="put the xpub of the last hardened step in the descriptor",
        )
    if not _INDEX.fullmatch(part):
        raise DescriptorError(f"derivation step {pos + 1} ({part[:20]!r}) is not a number")
    value = int(part)
    if value >= HARDENED:
        raise DescriptorError(f"derivation step {value} is out of range 0..2^31-1")
    return value


def _looks_like_wif(text: str) -> bool:
    return 51 <= len(text) <= 52 and text[0] in "5KLc9"


__all__ = [
    "DerivedKey",
    "Descriptor",
    "DescriptorKey",
    "add_checksum",
    "descriptor_checksum",
    "parse_descriptor",
    "split_checksum",
]
