"""Passphrase key derivation: memory-hard (Argon2id by default, scrypt supported).

Parameters are stored with the keystore so they can be raised later
(``keystore passwd`` re-encrypts the store under new ones; :func:`estimate_ms`
measures what they cost here).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from anyhsm.errors import ConfigError, KeystoreCorrupted, UnsupportedFormatVersion
from anyhsm.secret import SecretBytes

# What production requires at least (OWASP 2023 guidance for Argon2id / scrypt).
PRODUCTION_MIN_ARGON2_MEMORY_KIB = 64 * 1024
PRODUCTION_MIN_ARGON2_ITERATIONS = 3
PRODUCTION_MIN_SCRYPT_N = 2**17
MIN_SALT = 16
MAX_ARGON2_MEMORY_KIB = 4 * 1024 * 1024
MAX_SCRYPT_N = 2**24


@dataclass(frozen=True)
class KdfParams:
    """A KDF choice with its cost parameters and salt."""

    name: str = "argon2id"  # "argon2id" | "scrypt"
    memory_kib: int = 64 * 1024  # argon2id memory cost
    iterations: int = 3  # argon2id time cost
    lanes: int = 1  # argon2id parallelism
    n: int = 2**17  # scrypt CPU/memory cost
    r: int = 8
    p: int = 1
    salt: bytes = b""

    def with_salt(self) -> KdfParams:
        return KdfParams(
            self.name, self.memory_kib, self.iterations, self.lanes, self.n, self.r, self.p,
            os.urandom(16),
        )  # fmt: skip

    def weaknesses(self) -> list[str]:
        """Reasons these parameters are too weak for production (empty if fine)."""
        out = []
        if self.name == "argon2id":
            if self.memory_kib < PRODUCTION_MIN_ARGON2_MEMORY_KIB:
                out.append(
                    f"argon2id memory_kib={self.memory_kib} is below "
                    f"{PRODUCTION_MIN_ARGON2_MEMORY_KIB}"
                )
            if self.iterations < PRODUCTION_MIN_ARGON2_ITERATIONS:
                out.append(
                    f"argon2id iterations={self.iterations} is below "
                    f"{PRODUCTION_MIN_ARGON2_ITERATIONS}"
                )
        elif self.name == "scrypt" and self.n < PRODUCTION_MIN_SCRYPT_N:
            out.append(f"scrypt n={self.n} is below {PRODUCTION_MIN_SCRYPT_N}")
        return out

    def to_dict(self) -> dict[str, object]:
        common: dict[str, object] = {
            "name": self.name,
            "salt": base64.b64encode(self.salt).decode(),
        }
        if self.name == "argon2id":
            common.update(memory_kib=self.memory_kib, iterations=self.iterations, lanes=self.lanes)
        else:
            common.update(n=self.n, r=self.r, p=self.p)
        return common

    @classmethod
    def from_dict(cls, data: object) -> KdfParams:
        if not isinstance(data, dict):
            raise KeystoreCorrupted("keystore header: 'kdf' is not an object")
        name = data.get("name")
        if name not in ("argon2id", "scrypt"):
            raise UnsupportedFormatVersion(
                f"keystore uses an unknown KDF {name!r}",
                hint="upgrade anyhsm to a version that knows it",
            )
        try:
            salt = base64.b64decode(str(data["salt"]), validate=True)
            if name == "argon2id":
                params = cls(
                    "argon2id",
                    memory_kib=_int(data["memory_kib"]),
                    iterations=_int(data["iterations"]),
                    lanes=_int(data["lanes"]),
                    salt=salt,
                )
            else:
                params = cls(
                    "scrypt", n=_int(data["n"]), r=_int(data["r"]), p=_int(data["p"]), salt=salt
                )
            params.check_bounds()
            return params
        except (KeyError, ValueError, TypeError) as e:
            raise KeystoreCorrupted(f"keystore header: bad KDF parameters ({e})") from None

    def check_bounds(self) -> None:
        """Reject values the KDF refuses, and values so large that a forged header
        could make unlocking exhaust memory or time (ValueError)."""
        if len(self.salt) < MIN_SALT:
            raise ValueError(f"salt of {len(self.salt)} bytes is shorter than {MIN_SALT}")
        if self.name == "argon2id":
            if not 1 <= self.lanes <= 64:
                raise ValueError(f"lanes={self.lanes} is outside 1..64")
            if not 8 * self.lanes <= self.memory_kib <= MAX_ARGON2_MEMORY_KIB:
                raise ValueError(f"memory_kib={self.memory_kib} is outside 8*lanes..4 GiB")
            if not 1 <= self.iterations <= 64:
                raise ValueError(f"iterations={self.iterations} is outside 1..64")
        else:
            if self.n < 2 or self.n & (self.n - 1) or self.n > MAX_SCRYPT_N:
                raise ValueError(f"scrypt n={self.n} is not a power of two in 2..2^24")
            if not 1 <= self.r <= 64 or not 1 <= self.p <= 16:
                raise ValueError(f"scrypt r={self.r}, p={self.p} out of range")
            if 128 * self.r * self.n > MAX_ARGON2_MEMORY_KIB * 1024:
                raise ValueError("scrypt parameters need more than 4 GiB of memory")

    @classmethod
    def from_settings(cls, settings: object) -> KdfParams:
        """KDF choice from a ``[providers.software.kdf]`` config table (no salt)."""
        if settings is None:
            return cls()
        if not isinstance(settings, dict):
            raise ConfigError("providers.software.kdf must be a table")
        name = str(settings.get("name", "argon2id"))
        if name not in ("argon2id", "scrypt"):
            raise ConfigError(f"unknown KDF {name!r}", hint="use argon2id or scrypt")
        try:
            if name == "argon2id":
                params = cls(
                    "argon2id",
                    memory_kib=int(settings.get("memory_kib", 64 * 1024)),
                    iterations=int(settings.get("iterations", 3)),
                    lanes=int(settings.get("lanes", 1)),
                )
            else:
                params = cls(
                    "scrypt",
                    n=int(settings.get("n", 2**17)),
                    r=int(settings.get("r", 8)),
                    p=int(settings.get("p", 1)),
                )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"providers.software.kdf: {e}") from None
        return params.checked_for_config()

    def checked_for_config(self) -> KdfParams:
        """These parameters with a placeholder salt checked for bounds (ConfigError)."""
        try:
            replace_salt = KdfParams(
                self.name, self.memory_kib, self.iterations, self.lanes, self.n, self.r, self.p,
                bytes(MIN_SALT),
            )  # fmt: skip
            replace_salt.check_bounds()
        except ValueError as e:
            raise ConfigError(f"providers.software.kdf: {e}") from None
        return self


def _int(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{v!r} is not a positive integer")
    return v


def derive_kek(passphrase: SecretBytes, params: KdfParams) -> SecretBytes:
    """Derive the 32-byte key-encryption key from the passphrase."""
    if params.name == "argon2id":
        kdf: Argon2id | Scrypt = Argon2id(
            salt=params.salt,
            length=32,
            iterations=params.iterations,
            lanes=params.lanes,
            memory_cost=params.memory_kib,
        )
    else:
        kdf = Scrypt(salt=params.salt, length=32, n=params.n, r=params.r, p=params.p)
    # cryptography returns bytes; copy into a wipeable buffer at once.
    try:
        return SecretBytes(kdf.derive(bytes(passphrase.buffer)))
    except (ValueError, MemoryError) as e:
        raise KeystoreCorrupted(f"keystore KDF parameters are unusable ({e})") from None


# --- how long a KDF takes here -------------------------------------------------------------

_PROBE_ARGON2_KIB = 16 * 1024
_PROBE_SCRYPT_N = 2**14


def _cost(params: KdfParams) -> float:
    if params.name == "argon2id":
        return float(params.memory_kib * params.iterations)
    return float(params.n * params.r * params.p)


def estimate_ms(params: KdfParams) -> float:
    """About how long deriving a key with ``params`` takes on this machine, measured on a
    scaled-down run and extrapolated by cost (both KDFs grow about linearly with
    memory × passes), so even a 4 GiB setting is estimated in tens of milliseconds."""
    import time

    if params.name == "argon2id":
        probe = KdfParams(
            "argon2id",
            memory_kib=min(params.memory_kib, _PROBE_ARGON2_KIB),
            iterations=1,
            lanes=min(params.lanes, 4),
        )
    else:
        probe = KdfParams("scrypt", n=min(params.n, _PROBE_SCRYPT_N), r=params.r, p=1)
    probe = probe.with_salt()
    with SecretBytes(b"anyhsm kdf timing probe") as pw:
        t0 = time.perf_counter()
        derive_kek(pw, probe).wipe()
        elapsed = (time.perf_counter() - t0) * 1000
    return elapsed * _cost(params) / _cost(probe)


def open_time_problem(params: KdfParams, timeout_ms: float) -> str | None:
    """Why a store with ``params`` would not open within ``timeout_ms`` (the bound on a
    provider's open, which includes this KDF), or None. Keeps a margin of a fifth for the
    rest of the open and a busier machine."""
    est = estimate_ms(params)
    if est <= 0.8 * timeout_ms:
        return None
    return (
        f"deriving the passphrase key takes about {est:.0f} ms here, more than 80% of the "
        f"{timeout_ms:.0f} ms the provider has to open: every open would time out"
    )
