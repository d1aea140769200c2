"""BIP32 hierarchical deterministic keys: paths, extended keys, key origins.

Private child derivation is done by libsecp256k1 (:mod:`anyhsm.crypto.secp256k1`); the private
key of an :class:`ExtendedKey` lives in a :class:`SecretBytes` and intermediate keys are wiped.
Its ``repr`` never shows key material; ``str(key)`` of a private key is its xprv, which *is*
the secret, so only call it to export on purpose.

Version bytes: ``xprv``/``xpub`` (mainnet) and ``tprv``/``tpub`` (every test network) are the
canonical forms and what ``str()`` gives. The SLIP-132 forms (``ypub``, ``zpub``, ``Ypub``,
``Zpub``, their private and testnet ``u``/``v``/``U``/``V`` siblings) are accepted on import,
where they record the script type they imply (:attr:`ExtendedKey.script_hint`), and produced
only on an explicit :meth:`ExtendedKey.to_string` request.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from anyhsm.bitcoin.encoding import b58check_encode, b58decode, hash160, sha256d
from anyhsm.bitcoin.networks import networks_for_bip32_version, params
from anyhsm.bitcoin.presets import OutputType
from anyhsm.crypto import secp256k1 as ec
from anyhsm.errors import Bip32Error, EncodingError
from anyhsm.secret import SecretBytes, wipe
from anyhsm.types import MAX_PATH_DEPTH, Network

HARDENED = 0x80000000
MAX_DEPTH = MAX_PATH_DEPTH
_SERIALIZED_LEN = 78

# --- version bytes (BIP32 + SLIP-132) -------------------------------------------------------


@dataclass(frozen=True)
class _Version:
    name: str
    family: Network  # MAINNET or TESTNET (the test family)
    private: bool
    hint: OutputType | None


_VERSION_TABLE: dict[bytes, _Version] = {}


def _add(
    hex_version: str, name: str, family: Network, private: bool, hint: OutputType | None
) -> None:
    _VERSION_TABLE[bytes.fromhex(hex_version)] = _Version(name, family, private, hint)


_M, _T = Network.MAINNET, Network.TESTNET
for _hex, _name, _fam, _priv, _hint in (
    ("0488ade4", "xprv", _M, True, None),
    ("0488b21e", "xpub", _M, False, None),
    ("049d7878", "yprv", _M, True, OutputType.P2SH_P2WPKH),
    ("049d7cb2", "ypub", _M, False, OutputType.P2SH_P2WPKH),
    ("0295b005", "Yprv", _M, True, OutputType.P2SH_P2WSH),
    ("0295b43f", "Ypub", _M, False, OutputType.P2SH_P2WSH),
    ("04b2430c", "zprv", _M, True, OutputType.P2WPKH),
    ("04b24746", "zpub", _M, False, OutputType.P2WPKH),
    ("02aa7a99", "Zprv", _M, True, OutputType.P2WSH),
    ("02aa7ed3", "Zpub", _M, False, OutputType.P2WSH),
    ("04358394", "tprv", _T, True, None),
    ("043587cf", "tpub", _T, False, None),
    ("044a4e28", "uprv", _T, True, OutputType.P2SH_P2WPKH),
    ("044a5262", "upub", _T, False, OutputType.P2SH_P2WPKH),
    ("024285b5", "Uprv", _T, True, OutputType.P2SH_P2WSH),
    ("024289ef", "Upub", _T, False, OutputType.P2SH_P2WSH),
    ("045f18bc", "vprv", _T, True, OutputType.P2WPKH),
    ("045f1cf6", "vpub", _T, False, OutputType.P2WPKH),
    ("02575048", "Vprv", _T, True, OutputType.P2WSH),
    ("02575483", "Vpub", _T, False, OutputType.P2WSH),
):
    _add(_hex, _name, _fam, _priv, _hint)

_VERSION_BY_NAME: dict[str, bytes] = {v.name: k for k, v in _VERSION_TABLE.items()}
VERSION_NAMES: tuple[str, ...] = tuple(_VERSION_BY_NAME)


def _family(network: Network) -> Network:
    return Network.MAINNET if network is Network.MAINNET else Network.TESTNET


def _canonical_version(family: Network, private: bool) -> bytes:
    p = params(family)
    return p.xprv_version if private else p.xpub_version


# The canonical versions come from the network table; the SLIP-132 table must agree with it.
for _fam, _x in ((Network.MAINNET, "x"), (Network.TESTNET, "t")):
    if (_VERSION_BY_NAME[_x + "prv"], _VERSION_BY_NAME[_x + "pub"]) != (
        params(_fam).xprv_version,
        params(_fam).xpub_version,
    ):  # pragma: no cover - a broken table is a programming error
        raise RuntimeError("BIP32 version table disagrees with anyhsm.bitcoin.networks")


# --- paths ------------------------------------------------------------------------------------

_STEP = re.compile(r"([0-9]{1,10})(['hH]?)")


def parse_path(text: str) -> tuple[int, ...]:
    """``m/84'/0'/0'/0/5`` (or ``84h/0H/0h/0/5``, with or without the ``m/``) to indexes.

    ``m`` alone (or an empty string) is the empty path. Hardened steps may be marked with
    ``'``, ``h`` or ``H``.
    """
    if not isinstance(text, str):
        raise Bip32Error("a derivation path must be text such as m/84'/0'/0'")
    t = text.strip()
    if len(t) > 4096:
        raise Bip32Error("derivation path is too long")
    if t in ("", "m", "M", "m/", "M/"):
        return ()
    parts = t.split("/")
    if parts[0] in ("m", "M"):
        parts = parts[1:]
    if parts and parts[-1] == "":
        parts = parts[:-1]  # tolerate one trailing slash
    if len(parts) > MAX_DEPTH:
        raise Bip32Error(f"derivation path has {len(parts)} steps; BIP32 allows at most 255")
    out: list[int] = []
    for pos, part in enumerate(parts, start=1):
        m = _STEP.fullmatch(part)
        if m is None:
            raise Bip32Error(
                f"derivation path step {pos} ({part[:20]!r}) is not a number",
                hint="write steps like 84' or 84h (hardened) and 0 (normal), e.g. m/84'/0'/0'/0/5",
            )
        value = int(m.group(1))
        if value >= HARDENED:
            raise Bip32Error(
                f"derivation path step {pos} ({value}) is out of range",
                hint="indexes are 0..2147483647; mark hardened steps with ' or h instead",
            )
        out.append(value | HARDENED if m.group(2) else value)
    return tuple(out)


def format_path(indexes: Sequence[int], hardened_marker: str = "'", *, prefix: str = "m") -> str:
    """Indexes to text: ``(84|H, 0|H, 0|H, 0, 5)`` -> ``m/84'/0'/0'/0/5``.

    ``prefix=""`` leaves out the leading ``m/`` (as in a key origin's path).
    """
    if hardened_marker not in ("'", "h", "H"):
        raise Bip32Error(f"hardened marker must be ', h or H, not {hardened_marker!r}")
    for i in indexes:
        if not isinstance(i, int) or not 0 <= i <= 0xFFFFFFFF:
            raise Bip32Error(f"derivation index {i!r} is out of range 0..2^32-1")
    steps = [str(i - HARDENED) + hardened_marker if i >= HARDENED else str(i) for i in indexes]
    if prefix:
        steps.insert(0, prefix)
    return "/".join(steps)


def _as_path(path: str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(path, str):
        return parse_path(path)
    out = tuple(path)
    for i in out:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i <= 0xFFFFFFFF:
            raise Bip32Error(f"derivation index {i!r} is out of range 0..2^32-1")
    return out


def fingerprint_of(pubkey33: bytes) -> bytes:
    """BIP32 key fingerprint: the first 4 bytes of hash160 of the compressed public key."""
    if len(pubkey33) != 33 or pubkey33[0] not in (2, 3):
        raise Bip32Error("a fingerprint is computed from a 33-byte compressed public key")
    return hash160(pubkey33)[:4]


# --- key origins ------------------------------------------------------------------------------

_FINGERPRINT = re.compile(r"[0-9a-fA-F]{8}")


@dataclass(frozen=True)
class KeyOrigin:
    """Where a key comes from: master fingerprint + path, written ``[d34db33f/84'/0'/0']``."""

    fingerprint: bytes
    path: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, bytes | bytearray | memoryview) or (
            len(self.fingerprint) != 4
        ):
            raise Bip32Error("a key origin fingerprint is exactly 4 bytes")
        object.__setattr__(self, "fingerprint", bytes(self.fingerprint))
        object.__setattr__(self, "path", _as_path(self.path))

    @classmethod
    def unchecked(cls, fingerprint: bytes, path: tuple[int, ...]) -> KeyOrigin:
        """A key origin from values valid by construction (a reader's 4 bytes and
        unsigned 32-bit steps, such as a PSBT key origin's ``struct.unpack``): the checks
        of ``__post_init__`` skipped, which cost more than decoding the field."""
        if type(fingerprint) is not bytes or len(fingerprint) != 4 or type(path) is not tuple:
            return cls(fingerprint, path)
        origin = object.__new__(cls)
        object.__setattr__(origin, "fingerprint", fingerprint)
        object.__setattr__(origin, "path", path)
        return origin

    def to_string(self, hardened_marker: str = "'", *, brackets: bool = True) -> str:
        body = self.fingerprint.hex()
        if self.path:
            body += "/" + format_path(self.path, hardened_marker, prefix="")
        return f"[{body}]" if brackets else body

    def __str__(self) -> str:
        return self.to_string()

    @classmethod
    def parse(cls, text: str) -> KeyOrigin:
        """Parse ``[d34db33f/84'/0'/0']`` (the brackets are optional)."""
        if not isinstance(text, str):
            raise Bip32Error("a key origin must be text such as [d34db33f/84'/0'/0']")
        t = text.strip()
        if t.startswith("[") != t.endswith("]") or (t.startswith("[") and len(t) < 2):
            raise Bip32Error(f"key origin {t[:40]!r} has unbalanced brackets")
        if t.startswith("["):
            t = t[1:-1]
        fp, _, rest = t.partition("/")
        if not _FINGERPRINT.fullmatch(fp):
            raise Bip32Error(
                f"key origin fingerprint {fp[:20]!r} is not 8 hex digits",
                hint="write it like [d34db33f/84'/0'/0']",
            )
        if _ and not rest:
            raise Bip32Error("key origin path is empty after '/'")
        if rest.startswith(("m/", "M/")) or rest in ("m", "M"):
            raise Bip32Error("a key origin path starts right after the fingerprint, without m/")
        return cls(bytes.fromhex(fp), parse_path(rest) if rest else ())

    def child(self, path: str | Sequence[int]) -> KeyOrigin:
        """This origin extended by ``path`` (relative)."""
        return KeyOrigin(self.fingerprint, self.path + _as_path(path))


# --- extended keys ----------------------------------------------------------------------------


def _err(what: str, hint: str | None = None) -> Bip32Error:
    return Bip32Error(f"invalid extended key: {what}", hint=hint)


class ExtendedKey:
    """A BIP32 extended key (xprv or xpub). Immutable; a private one can be wiped.

    Use as a context manager (or call :meth:`wipe`) to clear the private key when done.
    """

    __slots__ = (
        "_chain_code",
        "_child_number",
        "_depth",
        "_network",
        "_parent_fingerprint",
        "_public_key",
        "_script_hint",
        "_secret",
    )

    def __init__(
        self,
        *,
        network: Network,
        depth: int,
        parent_fingerprint: bytes,
        child_number: int,
        chain_code: bytes,
        public_key: bytes,
        secret: SecretBytes | None = None,
        script_hint: OutputType | None = None,
    ) -> None:
        """Low-level constructor; ``secret`` (if any) is taken over, not copied.

        Prefer :meth:`from_seed`, :meth:`parse` and :meth:`derive`.
        """
        if not 0 <= depth <= MAX_DEPTH:
            raise Bip32Error(f"depth {depth} is out of range 0..255")
        if len(parent_fingerprint) != 4 or len(chain_code) != 32:
            raise Bip32Error("parent fingerprint is 4 bytes and chain code 32 bytes")
        if not 0 <= child_number <= 0xFFFFFFFF:
            raise Bip32Error(f"child number {child_number} is out of range")
        if depth == 0 and (parent_fingerprint != b"\0\0\0\0" or child_number != 0):
            raise Bip32Error("a depth-0 key has parent fingerprint 0 and child number 0")
        if len(public_key) != 33 or not ec.valid_public_key(public_key):
            raise Bip32Error("public key is not a valid 33-byte compressed secp256k1 point")
        if secret is not None and (
            len(secret) != 32 or ec.public_key(secret.buffer) != bytes(public_key)
        ):
            raise Bip32Error("the private key does not match the public key")
        self._network = _family(network)
        self._depth = depth
        self._parent_fingerprint = bytes(parent_fingerprint)
        self._child_number = child_number
        self._chain_code = bytes(chain_code)
        self._public_key = bytes(public_key)
        self._secret = secret
        self._script_hint = script_hint

    # --- construction ---------------------------------------------------------------

    @classmethod
    def from_seed(
        cls, seed: bytes | bytearray | SecretBytes, network: Network = Network.MAINNET
    ) -> ExtendedKey:
        """The BIP32 master key of a 16..64-byte seed (e.g. a BIP39 seed)."""
        buf = seed.buffer if isinstance(seed, SecretBytes) else bytearray(seed)
        try:
            key, chain = ec.bip32_master(buf)
        except ec.CurveError as exc:
            raise Bip32Error(str(exc)) from None
        finally:
            if not isinstance(seed, SecretBytes):
                wipe(buf)
        try:
            pub = ec.public_key(key)
            return cls(
                network=network,
                depth=0,
                parent_fingerprint=b"\0\0\0\0",
                child_number=0,
                chain_code=chain,
                public_key=pub,
                secret=SecretBytes.take(key),
            )
        finally:
            wipe(key)

    @classmethod
    def parse(cls, text: str) -> ExtendedKey:
        """Parse an xprv/xpub/tprv/tpub or SLIP-132 string; every defect raises Bip32Error."""
        if not isinstance(text, str):
            raise _err("expected text")
        t = text.strip()
        if not 100 <= len(t) <= 120:
            raise _err(f"{len(t)} characters; an extended key is 111")
        raw = bytearray(_b58(t))
        try:
            if len(raw) != _SERIALIZED_LEN + 4:
                raise _err(f"bad length: {len(raw) - 4} bytes where an extended key has 78")
            body = raw[:_SERIALIZED_LEN]
            if not hmac.compare_digest(sha256d(bytes(body))[:4], bytes(raw[_SERIALIZED_LEN:])):
                raise _err("invalid checksum", hint="check for a typing error")
            key = cls._from_payload(body)
            wipe(body)
            return key
        finally:
            wipe(raw)

    @classmethod
    def _from_payload(cls, body: bytearray) -> ExtendedKey:
        version = _VERSION_TABLE.get(bytes(body[0:4]))
        if version is None:
            raise _err(
                f"unknown extended key version {bytes(body[0:4]).hex()}",
                hint="expected xprv/xpub/tprv/tpub or a SLIP-132 form such as zpub",
            )
        depth = body[4]
        parent_fp = bytes(body[5:9])
        child = int.from_bytes(body[9:13], "big")
        chain = bytes(body[13:45])
        if depth == 0 and parent_fp != b"\0\0\0\0":
            raise _err("zero depth with non-zero parent fingerprint")
        if depth == 0 and child != 0:
            raise _err("zero depth with non-zero index")
        prefix = body[45]
        if version.private:
            if prefix in (2, 3):
                raise _err(f"prvkey version / pubkey mismatch ({version.name} holds a public key)")
            if prefix != 0:
                raise _err(f"invalid prvkey prefix {prefix:02x}")
            secret = SecretBytes(memoryview(body)[46:78])
            if not ec.valid_secret(secret.buffer):
                zero = not any(secret.buffer)
                secret.wipe()
                raise _err(
                    "private key 0 not in 1..n-1"
                    if zero
                    else "private key not in 1..n-1: it is not below the curve order n"
                )
            try:
                pub = ec.public_key(secret.buffer)
            except ec.CurveError:
                secret.wipe()
                raise _err("private key not in 1..n-1") from None
        else:
            if prefix == 0:
                raise _err(f"pubkey version / prvkey mismatch ({version.name} holds a private key)")
            if prefix not in (2, 3):
                raise _err(f"invalid pubkey prefix {prefix:02x}")
            pub = bytes(body[45:78])
            if not ec.valid_public_key(pub):
                raise _err(f"invalid pubkey {pub.hex()}: not a point on secp256k1")
            secret = None
        return cls(
            network=version.family,
            depth=depth,
            parent_fingerprint=parent_fp,
            child_number=child,
            chain_code=chain,
            public_key=pub,
            secret=secret,
            script_hint=version.hint,
        )

    # --- properties -------------------------------------------------------------------

    @property
    def network(self) -> Network:
        """Network family: MAINNET, or TESTNET for every test network (tprv/tpub)."""
        return self._network

    @property
    def networks(self) -> frozenset[Network]:
        """Every network on which this key's canonical version is valid."""
        return networks_for_bip32_version(_canonical_version(self._network, False))

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def parent_fingerprint(self) -> bytes:
        return self._parent_fingerprint

    @property
    def child_number(self) -> int:
        return self._child_number

    @property
    def chain_code(self) -> bytes:
        return self._chain_code

    @property
    def public_key(self) -> bytes:
        """33-byte compressed public key."""
        return self._public_key

    @property
    def identifier(self) -> bytes:
        """hash160 of the public key."""
        return hash160(self._public_key)

    @property
    def fingerprint(self) -> bytes:
        """This key's own fingerprint (hash160(public key)[:4])."""
        return hash160(self._public_key)[:4]

    @property
    def is_private(self) -> bool:
        return self._secret is not None

    @property
    def script_hint(self) -> OutputType | None:
        """The script type a SLIP-132 version implied on import (None for x/t forms)."""
        return self._script_hint

    def secret(self) -> SecretBytes:
        """A copy of the 32-byte private key, which the caller must wipe."""
        return SecretBytes(self._live_secret())

    def _live_secret(self) -> bytearray:
        if self._secret is None:
            raise Bip32Error("this is a public extended key; it holds no private key")
        if self._secret.wiped:
            raise Bip32Error("this extended key has been wiped")
        return self._secret.buffer

    # --- derivation -------------------------------------------------------------------

    def derive(self, path: str | Sequence[int]) -> ExtendedKey:
        """The descendant at ``path`` (relative to this key).

        A text path starting with ``m`` is only accepted on a master key (depth 0), so that an
        absolute path is never silently applied below an account key.
        """
        if isinstance(path, str) and path.strip()[:1] in ("m", "M") and self._depth != 0:
            raise Bip32Error(
                f"path {path.strip()[:40]!r} starts at the master key, but this key has depth "
                f"{self._depth}",
                hint="give a path relative to this key, e.g. 0/5",
            )
        steps = _as_path(path)
        if self._depth + len(steps) > MAX_DEPTH:
            raise Bip32Error("derivation would exceed the BIP32 maximum depth of 255")
        if not steps:
            return self._copy()
        if self._secret is None:
            return self._derive_public(steps)
        return self._derive_private(steps)

    def _derive_public(self, steps: tuple[int, ...]) -> ExtendedKey:
        pub, chain = self._public_key, self._chain_code
        parent = pub
        for index in steps:
            if index >= HARDENED:
                raise Bip32Error(
                    f"cannot derive hardened step {format_path([index], prefix='')} from a "
                    "public key",
                    hint="derive hardened steps from the private key (or use its xpub below them)",
                )
            parent = pub
            try:
                pub, chain = ec.bip32_ckd_pub(pub, chain, index)
            except ec.CurveError as exc:
                raise Bip32Error(str(exc)) from None
        return ExtendedKey(
            network=self._network,
            depth=self._depth + len(steps),
            parent_fingerprint=hash160(parent)[:4],
            child_number=steps[-1],
            chain_code=chain,
            public_key=pub,
        )

    def _derive_private(self, steps: tuple[int, ...]) -> ExtendedKey:
        try:
            key, chain, parent_pub, pub = ec.bip32_derive_priv(
                self._live_secret(), self._chain_code, steps
            )
        except ec.CurveError as exc:
            raise Bip32Error(str(exc)) from None
        try:
            return ExtendedKey(
                network=self._network,
                depth=self._depth + len(steps),
                parent_fingerprint=hash160(parent_pub)[:4],
                child_number=steps[-1],
                chain_code=chain,
                public_key=pub,
                secret=SecretBytes.take(key),
            )
        finally:
            wipe(key)

    def _copy(self) -> ExtendedKey:
        return ExtendedKey(
            network=self._network,
            depth=self._depth,
            parent_fingerprint=self._parent_fingerprint,
            child_number=self._child_number,
            chain_code=self._chain_code,
            public_key=self._public_key,
            secret=None if self._secret is None else SecretBytes(self._live_secret()),
            script_hint=self._script_hint,
        )

    def neuter(self) -> ExtendedKey:
        """The public extended key (xprv -> xpub); a public key returns an equal copy."""
        return ExtendedKey(
            network=self._network,
            depth=self._depth,
            parent_fingerprint=self._parent_fingerprint,
            child_number=self._child_number,
            chain_code=self._chain_code,
            public_key=self._public_key,
            script_hint=self._script_hint,
        )

    # --- serialisation ----------------------------------------------------------------

    def to_string(self, version: str | None = None) -> str:
        """Base58Check serialisation; ``version`` picks a form by name ("zpub", "tprv"...).

        Without ``version`` the canonical xprv/xpub (tprv/tpub on test networks) is used.
        The version must match the key's kind (private/public) and network family.
        """
        buf = self._serialize(version)
        try:
            return b58check_encode(bytes(buf))
        finally:
            wipe(buf)

    def serialize(self, version: str | None = None) -> bytes:
        """The 78-byte BIP32 serialisation (contains the private key for a private key)."""
        buf = self._serialize(version)
        try:
            return bytes(buf)
        finally:
            wipe(buf)

    def _serialize(self, version: str | None) -> bytearray:
        if version is None:
            vbytes = _canonical_version(self._network, self.is_private)
        else:
            found = _VERSION_BY_NAME.get(version) if isinstance(version, str) else None
            if found is None:
                raise Bip32Error(
                    f"unknown extended key version {version!r}",
                    hint="use one of " + ", ".join(VERSION_NAMES),
                )
            info = _VERSION_TABLE[found]
            if info.private != self.is_private:
                raise Bip32Error(
                    f"cannot write a {'private' if self.is_private else 'public'} key as {version}",
                    hint="call neuter() first to export the public key"
                    if self.is_private
                    else "a public key cannot be written in a private form",
                )
            if info.family is not self._network:
                raise Bip32Error(
                    f"{version} is a {info.family.value} version but this key is for "
                    f"{self._network.value}",
                    hint="use a version of the key's own network",
                )
            vbytes = found
        out = bytearray(vbytes)
        out += bytes([self._depth]) + self._parent_fingerprint
        out += self._child_number.to_bytes(4, "big") + self._chain_code
        if self._secret is None:
            out += self._public_key
        else:
            out += b"\0"
            out += self._live_secret()
        return out

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        kind = "private" if self.is_private else "public"
        child = format_path([self._child_number], prefix="") if self._depth else "master"
        wiped = " wiped" if self._secret is not None and self._secret.wiped else ""
        return (
            f"<ExtendedKey {kind}{wiped} {self._network.value} depth={self._depth} "
            f"child={child} fingerprint={self.fingerprint.hex()} "
            f"parent={self._parent_fingerprint.hex()}>"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExtendedKey):
            return NotImplemented
        if (
            self._network is not other._network
            or self._depth != other._depth
            or self._parent_fingerprint != other._parent_fingerprint
            or self._child_number != other._child_number
            or self._chain_code != other._chain_code
            or self._public_key != other._public_key
            or self.is_private != other.is_private
        ):
            return False
        if self._secret is None or other._secret is None:
            return True
        return self._secret.equals(other._secret)

    def __hash__(self) -> int:
        return hash((self._public_key, self._chain_code, self._depth, self._child_number))

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("ExtendedKey cannot be pickled; serialise it explicitly")

    # --- wiping -----------------------------------------------------------------------

    def wipe(self) -> None:
        """Clear the private key (no-op for a public key). The key is unusable afterwards."""
        if self._secret is not None:
            self._secret.wipe()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()


def _b58(text: str) -> bytes:
    try:
        return b58decode(text)
    except EncodingError as exc:
        raise _err(f"not Base58: {exc.message}") from None
