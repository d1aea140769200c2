"""The signer's public key index, and the rule that picks the one key Core sees.

Bitcoin Core calls ``enumerate`` before every wallet operation that needs the signer, so
it must be fast and must work without the keystore passphrase. The keystore's records
are authenticated with the master key, which the passphrase (or a TPM, or a token)
unlocks; so ``enumerate`` reads a small public file instead: each HD key's id, label,
master fingerprint and provider, written by ``anyhsm-signer setup`` and refreshed by every
signer command that opens the keystore (getdescriptors, displayaddress, signtx). It holds
nothing secret (a master fingerprint is what every PSBT and descriptor names the key by)
and is written 0644, atomically.

It is not authenticated, and need not be: it only decides what ``enumerate`` answers.
Every command that touches a key opens the real keystore, picks the key again by the
same rule from the authenticated key directory, and refuses when the ``--fingerprint``
Core gives is not that key's; so editing the index can make ``enumerate`` answer wrongly
(Core then gets an error from the next command), never make anything sign with another
key. An index that others than its owner (or root) may write, of another deployment or
network, or malformed, is ignored, as if absent.

The rule (issue 11's public contract): the key named by ``ANYHSM_SIGNER_KEY``, else by
``[signer] key`` in the config, else the only HD key of the store; several and none
named is an error saying so, and so is none.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anyhsm.errors import ConfigError, KeyLabelConflict, KeyNotFound

if TYPE_CHECKING:
    from anyhsm.config import Config
    from anyhsm.types import KeyInfo

FORMAT = "anyhsm-signer-index"
VERSION = 1
DEFAULT_NAME = "signer-public.json"
ENV_KEY = "ANYHSM_SIGNER_KEY"
MAX_INDEX_BYTES = 1 << 20
log = logging.getLogger("anyhsm")
_HEX8 = re.compile(r"[0-9a-f]{8}")


@dataclass(frozen=True)
class IndexedKey:
    """What ``enumerate`` needs of one HD key; all of it public."""

    id: str
    label: str
    fingerprint: str  # master fingerprint, 8 lowercase hex digits
    provider: str

    @property
    def model(self) -> str:
        """The ``model`` Core shows as the signer's name (``enumeratesigners``)."""
        return f"anyhsm {self.provider}"

    def to_dict(self) -> dict[str, str]:
        return {
            "id": self.id,
            "label": self.label,
            "fingerprint": self.fingerprint,
            "provider": self.provider,
        }

    @classmethod
    def of(cls, info: KeyInfo) -> IndexedKey:
        fp = info.master_fingerprint
        if fp is None:
            raise ValueError(f"key {info.label!r} is not an HD key")
        return cls(info.id, info.label, fp.hex(), info.provider)


@dataclass(frozen=True)
class KeyIndex:
    """The HD keys of one deployment (its config file and network)."""

    config: str
    network: str
    keys: tuple[IndexedKey, ...]

    @classmethod
    def of(cls, cfg: Config, keys: Iterable[IndexedKey]) -> KeyIndex:
        return cls(_config_id(cfg), cfg.network.value, tuple(sorted(keys, key=_order)))

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config,
            "network": self.network,
            "keys": [k.to_dict() for k in self.keys],
        }
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> KeyIndex:
        """ValueError for anything that is not an index this version writes."""
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError("not an anyhsm-signer index of this version")
        config, network, keys = d.get("config"), d.get("network"), d.get("keys")
        if not isinstance(config, str) or not isinstance(network, str):
            raise ValueError("config and network must be strings")
        if not isinstance(keys, list):
            raise ValueError("keys must be a list")
        out = []
        for k in keys:
            if not isinstance(k, dict):
                raise ValueError("a key entry must be an object")
            fields = [k.get(n) for n in ("id", "label", "fingerprint", "provider")]
            if not all(isinstance(f, str) and f for f in fields):
                raise ValueError("a key entry needs id, label, fingerprint and provider")
            key = IndexedKey(*(str(f) for f in fields))
            if not _HEX8.fullmatch(key.fingerprint):
                raise ValueError(f"fingerprint {key.fingerprint!r} is not 8 lowercase hex digits")
            out.append(key)
        return cls(config, network, tuple(out))


def _order(k: IndexedKey) -> tuple[str, str]:
    return (k.label, k.id)


def _config_id(cfg: Config) -> str:
    return str(cfg.source) if cfg.source is not None else str(cfg.config_dir)


def read_index(path: Path, cfg: Config) -> KeyIndex | None:
    """The index at ``path`` if it is one this deployment can use; None (and a log line
    saying why, unless it is simply absent) otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("signer key index %s ignored: %s", path, e.strerror or e)
        return None
    try:
        st = os.fstat(fd)
        why = _unsafe(st)
        if why is None:
            with os.fdopen(fd, "rb") as f:
                fd = -1
                raw = f.read(MAX_INDEX_BYTES + 1)
            if len(raw) > MAX_INDEX_BYTES:
                why = "it is too large"
    finally:
        if fd >= 0:
            os.close(fd)
    if why is not None:
        log.warning("signer key index %s ignored: %s", path, why)
        return None
    try:
        index = KeyIndex.from_json(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        log.warning("signer key index %s ignored: %s", path, e)
        return None
    if index.config != _config_id(cfg) or index.network != cfg.network.value:
        log.warning(
            "signer key index %s ignored: it belongs to %s on %s",
            path,
            index.config,
            index.network,
        )
        return None
    return index


def _unsafe(st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if st.st_uid not in (os.geteuid(), 0):
        return f"it belongs to uid {st.st_uid}, not to this user or root"
    if st.st_mode & 0o022:
        return "group or others may write it"
    return None


def write_index(path: Path, index: KeyIndex) -> bool:
    """Write the index when it differs from what is there; False (with a warning) when
    it cannot be written (the signer still works: enumerate then opens the keystore)."""
    from anyhsm.fsutil import atomic_write

    data = index.to_json()
    try:
        if path.read_bytes() == data:
            return True
    except OSError:
        pass
    try:
        atomic_write(path, data, mode=0o644)
    except OSError as e:
        log.warning("cannot write the signer key index %s: %s", path, e.strerror or e)
        return False
    return True


def wanted_key(cfg: Config | None) -> tuple[str | None, str]:
    """(the key named for Core, where it is named): ``ANYHSM_SIGNER_KEY``, else
    ``[signer] key`` in the config (a signer using a service may have none), else
    (None, "")."""
    from anyhsm.signer import _ops

    env = os.environ.get(ENV_KEY, "").strip()
    if env:
        return env, ENV_KEY
    if cfg is None:
        return None, ""
    configured = _ops.configured_key(cfg)
    if configured:
        return configured, f"[signer] key in {_config_id(cfg)}"
    return None, ""


def select(keys: Sequence[IndexedKey], wanted: str | None, source: str) -> IndexedKey:
    """The one key exposed: the one ``wanted`` names (label or id), else the only one."""
    if wanted is not None:
        found = [k for k in keys if wanted in (k.label, k.id)]
        if len(found) == 1:
            return found[0]
        if found:
            raise KeyLabelConflict(
                f"{wanted!r} ({source}) names {len(found)} HD keys",
                hint="name the key by its id (anyhsm key list)",
            )
        raise KeyNotFound(
            f"no HD key {wanted!r} in this deployment ({source})",
            hint="list the keys with 'anyhsm key list'; Core needs a bip32 key",
        )
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise KeyNotFound(
            "this deployment has no HD (BIP32) key for Bitcoin Core",
            hint="create one: anyhsm key create --label LABEL --type bip32",
        )
    labels = ", ".join(sorted(k.label for k in keys))
    raise ConfigError(
        f"this deployment has {len(keys)} HD keys ({labels}) and none is named for "
        "Bitcoin Core, which takes exactly one signer",
        hint=f'name one with {ENV_KEY}=LABEL or [signer] key = "LABEL" in the config',
    )


__all__ = [
    "DEFAULT_NAME",
    "ENV_KEY",
    "IndexedKey",
    "KeyIndex",
    "read_index",
    "select",
    "wanted_key",
    "write_index",
]
