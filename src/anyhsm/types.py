"""Value types shared by providers, the HSM handle and the Bitcoin layer.

Everything here is a frozen dataclass or an enum: algorithms and levels are
value objects, never string flags passed around loosely.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

KeyRef = str
"""A key is named by its stable id or by its operator-chosen label."""

INTERNAL_LABEL_PREFIX = "anyhsm:"
"""Labels with this prefix are anyhsm's own keys (the health probe key); operators
cannot create them and listings hide them. Providers persist the flag this way."""

HEALTH_PROBE_LABEL = INTERNAL_LABEL_PREFIX + "health-probe"
MAX_PATH_DEPTH = 255  # BIP32 keeps a key's depth in one byte


class SigScheme(enum.Enum):
    """Signature schemes a provider may offer."""

    ECDSA = "ecdsa"  # secp256k1 ECDSA, strict DER, low-S
    SCHNORR = "schnorr"  # BIP340 Schnorr, 64 bytes

    @classmethod
    def parse(cls, text: str) -> SigScheme:
        try:
            return cls(text.lower())
        except ValueError:
            names = ", ".join(s.value for s in cls)
            from anyhsm.errors import HsmError

            raise HsmError(
                f"unknown signature scheme {text!r}", hint=f"use one of: {names}"
            ) from None


class KeyType(enum.Enum):
    """Kinds of key material. Room is left for other curves."""

    SECP256K1 = "secp256k1"  # a single secp256k1 private key
    BIP32 = "bip32"  # a BIP32 seed (secp256k1 HD tree); signs with children by path
    BIP32_NODE = "bip32-node"  # an imported master xprv: chain code (32) || private key (32)
    ED25519 = "ed25519"  # reserved: no provider implements it yet
    P256 = "p256"  # reserved: no provider implements it yet

    @classmethod
    def parse(cls, text: str) -> KeyType:
        try:
            return cls(text.lower())
        except ValueError:
            names = ", ".join(t.value for t in cls)
            from anyhsm.errors import HsmError

            raise HsmError(f"unknown key type {text!r}", hint=f"use one of: {names}") from None


class SecurityLevel(enum.IntEnum):
    """How well a provider protects keys, in ascending order of strength."""

    SIMULATOR = 0  # in memory, for development only
    SOFTWARE = 1  # encrypted file keystore opened with a passphrase
    TPM = 2  # software keystore whose master key is sealed to a TPM
    HSM_WRAPPED = 3  # software keystore whose master key is wrapped by an HSM token
    HSM = 4  # keys generated and used inside a hardware security module

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")

    def __str__(self) -> str:
        """The label ("tpm"), not the number an IntEnum would print."""
        return self.label

    @classmethod
    def parse(cls, text: str) -> SecurityLevel:
        norm = text.strip().lower().replace("-", "_").upper()
        try:
            return cls[norm]
        except KeyError:
            names = ", ".join(level.label for level in cls)
            from anyhsm.errors import ConfigError

            raise ConfigError(
                f"unknown security level {text!r}", hint=f"use one of: {names}"
            ) from None

    @property
    def hardware_backed(self) -> bool:
        return self >= SecurityLevel.TPM


class Network(enum.Enum):
    """Bitcoin networks anyhsm knows."""

    MAINNET = "mainnet"
    TESTNET = "testnet"
    TESTNET4 = "testnet4"
    SIGNET = "signet"
    REGTEST = "regtest"

    @property
    def is_test(self) -> bool:
        return self is not Network.MAINNET


class Environment(enum.Enum):
    """Deployment environments; production is strictest."""

    DEVELOPMENT = "development"
    STAGING = "staging"
    PRODUCTION = "production"


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do; checked before any work is done."""

    key_types: frozenset[KeyType]
    schemes: frozenset[SigScheme]
    can_import: bool = False
    can_export: bool = False
    can_derive: bool = False  # BIP32 derivation inside the provider
    can_tweak: bool = False  # BIP341 taproot tweak of the private key inside the provider
    controls_nonce: bool = False  # deterministic nonces (RFC 6979 / low-R grinding) are possible
    persistent: bool = True
    can_batch: bool = False  # sign_batch: many digests with one key, derivations shared
    in_process: bool = False  # keys used in this process's memory: no device, no network

    def describe(self) -> dict[str, object]:
        return {
            "key_types": sorted(t.value for t in self.key_types),
            "schemes": sorted(s.value for s in self.schemes),
            "import": self.can_import,
            "export": self.can_export,
            "derive": self.can_derive,
            "tweak": self.can_tweak,
            "controls_nonce": self.controls_nonce,
            "persistent": self.persistent,
            "batch": self.can_batch,
            "in_process": self.in_process,
        }


@dataclass(frozen=True)
class KeySpec:
    """What to generate."""

    label: str
    key_type: KeyType = KeyType.SECP256K1
    exportable: bool = False


@dataclass(frozen=True)
class KeyInfo:
    """Public facts about a key. Never holds secret material."""

    id: str
    label: str
    provider: str
    public_key: bytes  # 33-byte compressed SEC1 (for BIP32 keys: the master public key)
    key_type: KeyType = KeyType.SECP256K1
    store: str = ""  # where the key lives (e.g. "keystore:<id>", "pkcs11:<serial>")
    exportable: bool = False
    created_at: str = ""
    chain_code: bytes | None = field(default=None, repr=False)  # BIP32 master chain code (public)
    available: bool = True  # False: the key directory knows it, but its store is not open here

    @property
    def internal(self) -> bool:
        return self.label.startswith(INTERNAL_LABEL_PREFIX)

    @property
    def master_fingerprint(self) -> bytes | None:
        """BIP32 master fingerprint (HASH160 of the master public key, 4 bytes) of an HD
        key, which PSBTs and descriptors name it by; None for a single key."""
        if self.chain_code is None:
            return None
        import hashlib

        sha = hashlib.sha256(self.public_key).digest()
        return hashlib.new("ripemd160", sha).digest()[:4]

    def to_dict(self) -> dict[str, object]:
        fp = self.master_fingerprint
        out: dict[str, object] = {
            "id": self.id,
            "label": self.label,
            "provider": self.provider,
            "public_key": self.public_key.hex(),
            "key_type": self.key_type.value,
            "store": self.store,
            "exportable": self.exportable,
            "created_at": self.created_at,
            "master_fingerprint": None if fp is None else fp.hex(),
            "available": self.available,
        }
        return out


@dataclass(frozen=True)
class SignParams:
    """Extra instructions for one signature, beyond key, digest and scheme.

    ``path``: BIP32 child indexes below the key's master (needs ``can_derive``).
    ``tweak``: a 32-byte scalar added to the (even-Y) private key before a
    Schnorr signature, as BIP341 key-path spends need (needs ``can_tweak``).
    ``aux_rand``: BIP340 auxiliary randomness; None means fresh random bytes.
    ``grind_low_r``: retry the RFC 6979 nonce with extra entropy until R is
    low, as Bitcoin Core does; a preference, honoured where the provider
    ``controls_nonce`` and ignored where the device picks its own nonces.
    """

    path: tuple[int, ...] = ()
    tweak: bytes | None = None
    aux_rand: bytes | None = None
    grind_low_r: bool = False


@dataclass(frozen=True)
class DerivedPublicKey:
    """A BIP32 child's public data: enough to build an xpub."""

    public_key: bytes  # 33-byte compressed
    chain_code: bytes
    depth: int
    parent_fingerprint: bytes
    child_number: int
    master_fingerprint: bytes


@dataclass(frozen=True)
class Health:
    """The outcome of a provider's health check."""

    provider: str
    ok: bool
    status: str  # "ok", or a short reason why not
    reason: str = ""
    security_level: SecurityLevel | None = None
    elapsed_ms: float = 0.0
    details: Mapping[str, object] = field(default_factory=dict)  # numbers as numbers

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.provider,
            "status": self.status,
            "reason": self.reason,
            "security_level": self.security_level.label
            if self.security_level is not None
            else None,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "details": dict(self.details),
        }
