"""Key operations: create, import, list, show, delete, export.

Imported secrets come in as :class:`SecretBytes` or text the front end read under the
secret-file rule (:func:`anyhsm.fsutil.read_secret_source`); the checks that make an
import safe (the network of an xprv or WIF, a master xprv only, no character of a secret
quoted in an error) are made here, once, for every front end.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anyhsm.errors import HsmError, NetworkMismatch
from anyhsm.ops.data import Data, hex_bytes
from anyhsm.secret import SecretBytes
from anyhsm.types import KeyInfo, KeyRef, KeyType

if TYPE_CHECKING:
    from anyhsm.hsm import Hsm

MNEMONIC_WORDS = (12, 15, 18, 21, 24)


@dataclass(frozen=True)
class KeyList(Data):
    """``key list``: every key the handle knows (those in stores not open here with
    ``available`` false)."""

    keys: tuple[KeyInfo, ...]


@dataclass(frozen=True)
class CreatedKey:
    """A new key; with a mnemonic, whether its words were shown (and, once, the words)."""

    info: KeyInfo
    from_mnemonic: bool = False
    mnemonic: str | None = None  # set only for the one audited backup display

    def __repr__(self) -> str:  # the words never reach a repr or a log line
        return f"<CreatedKey {self.info.label} ({self.info.id})>"

    @property
    def mnemonic_shown(self) -> bool:
        return self.mnemonic is not None

    def to_dict(self) -> dict[str, object]:
        out = self.info.to_dict()
        if self.from_mnemonic:
            out["mnemonic_shown"] = self.mnemonic_shown
            if self.mnemonic is not None:
                out["mnemonic"] = self.mnemonic
        return out


@dataclass(frozen=True)
class ImportedKey:
    """An imported key, and the keys already in the store with the same secret (not
    refused: a deliberate second label is legitimate, but it is said)."""

    info: KeyInfo
    same_as: tuple[KeyInfo, ...] = ()

    @property
    def warnings(self) -> tuple[str, ...]:
        if not self.same_as:
            return ()
        labels = ", ".join(t.label for t in self.same_as)
        return (f"the same key is already in the store as {labels}",)

    def to_dict(self) -> dict[str, object]:
        return {**self.info.to_dict(), "warnings": list(self.warnings)}


@dataclass(frozen=True)
class DeletedKey(Data):
    deleted: str  # the key id
    label: str


@dataclass(frozen=True)
class ExportedKey(Data):
    exported: str  # the key id
    out: str
    label: str


def list_keys(hsm: Hsm) -> KeyList:
    return KeyList(tuple(hsm.list_keys()))


def show_key(hsm: Hsm, key: KeyRef) -> KeyInfo:
    return hsm.get_key(key)


def create_key(
    hsm: Hsm,
    label: str,
    key_type: KeyType = KeyType.SECP256K1,
    *,
    exportable: bool = False,
    mnemonic_words: int | None = None,
    show_mnemonic_once: bool = False,
) -> CreatedKey:
    """A new key in the active provider; ``mnemonic_words`` (BIP32 only) makes it from a
    fresh BIP39 mnemonic, shown only with ``show_mnemonic_once`` where an export of the
    key would be allowed (:func:`anyhsm.backup.create_mnemonic_key`, audited)."""
    if mnemonic_words is not None and (
        key_type is not KeyType.BIP32 or mnemonic_words not in MNEMONIC_WORDS
    ):
        raise HsmError(
            "a mnemonic makes a bip32 key of 12, 15, 18, 21 or 24 words",
            hint="--type bip32 --mnemonic-words N",
        )
    if show_mnemonic_once and mnemonic_words is None:
        raise HsmError(
            "--show-mnemonic-once needs --type bip32 --mnemonic-words N",
            hint="it shows the words of a new mnemonic, once",
        )
    if mnemonic_words is not None:
        from anyhsm.backup import create_mnemonic_key

        made = create_mnemonic_key(
            hsm, label, mnemonic_words, exportable=exportable, show_once=show_mnemonic_once
        )
        return CreatedKey(made.info, True, made.mnemonic)
    return CreatedKey(hsm.generate_key(label, key_type, exportable=exportable))


def _imported(hsm: Hsm, info: KeyInfo) -> ImportedKey:
    return ImportedKey(info, tuple(hsm.same_key_as(info)))


def import_mnemonic(
    hsm: Hsm, label: str, words: str, bip39_passphrase: str = "", *, exportable: bool = False
) -> ImportedKey:
    """An HD key from BIP39 words (checked: word list and checksum) and the optional
    BIP39 passphrase."""
    from anyhsm.bitcoin.bip39 import mnemonic_to_seed, validate_mnemonic

    validate_mnemonic(words)
    with mnemonic_to_seed(words, bip39_passphrase) as seed:
        return _imported(hsm, hsm.import_key(label, seed, KeyType.BIP32, exportable=exportable))


def import_xprv(hsm: Hsm, label: str, xprv: str, *, exportable: bool = False) -> ImportedKey:
    """An HD node from a master extended private key of the handle's network (PSBT
    signing matches keys by their master fingerprint, which a non-master xprv cannot
    give)."""
    from anyhsm.bitcoin.bip32 import ExtendedKey
    from anyhsm.errors import Bip32Error

    with _no_echo("xprv"), ExtendedKey.parse(xprv) as xkey:
        if not xkey.is_private:
            raise Bip32Error("an xpub holds no private key", hint="import the xprv")
        if xkey.depth != 0:
            raise Bip32Error(
                f"this xprv is at depth {xkey.depth}; PSBT signing matches keys by their master "
                "fingerprint, which a non-master xprv cannot give",
                hint="import the master xprv or the mnemonic",
            )
        if hsm.network not in xkey.networks:
            raise NetworkMismatch(
                f"the xprv is for {sorted(n.value for n in xkey.networks)}, "
                f"not the configured {hsm.network.value}"
            )
        with xkey.secret() as secret, SecretBytes(64) as node:
            node.buffer[:32] = xkey.chain_code
            node.buffer[32:] = secret.buffer
            info = hsm.import_key(label, node, KeyType.BIP32_NODE, exportable=exportable)
    return _imported(hsm, info)


def import_wif(hsm: Hsm, label: str, wif: str, *, exportable: bool = False) -> ImportedKey:
    """A single key from a WIF string of the handle's network."""
    from anyhsm.bitcoin.address import wif_decode

    with _no_echo("WIF key"):
        secret, networks, _compressed = wif_decode(wif)
    with secret:
        if hsm.network not in networks:
            raise NetworkMismatch(
                f"the WIF key is for {sorted(n.value for n in networks)}, "
                f"not the configured {hsm.network.value}"
            )
        info = hsm.import_key(label, secret, KeyType.SECP256K1, exportable=exportable)
    return _imported(hsm, info)


def import_secret(
    hsm: Hsm,
    label: str,
    secret_hex: SecretBytes,
    key_type: KeyType = KeyType.SECP256K1,
    *,
    exportable: bool = False,
) -> ImportedKey:
    """Raw key material given as hexadecimal text (a secp256k1 scalar or a BIP32 seed).
    Text that is not hexadecimal is refused with one message quoting none of it."""
    text = secret_hex.buffer.decode("ascii", "replace")
    with SecretBytes(hex_bytes(text, "secret file")) as sb:
        return _imported(hsm, hsm.import_key(label, sb, key_type, exportable=exportable))


@contextmanager
def _no_echo(what: str) -> Iterator[None]:
    """Decoding errors that would quote a character of the secret (``invalid Base58
    character 'x'``) are replaced by one that does not."""
    from anyhsm.errors import Bip32Error, EncodingError

    try:
        yield
    except (EncodingError, Bip32Error) as e:
        if "'" in e.message or '"' in e.message:
            raise type(e)(
                f"the {what} is not valid: it holds a character that is not allowed",
                hint="check it for a typing error",
            ) from None
        raise


def delete_key(hsm: Hsm, key: KeyRef) -> DeletedKey:
    """Delete a key (irreversible; the front end asks for the confirmation)."""
    info = hsm.get_key(key)
    hsm.delete_key(info.id)
    return DeletedKey(info.id, info.label)


def export_key(hsm: Hsm, key: KeyRef, out: Path) -> ExportedKey:
    """Write an exportable key's secret, as hex, to ``out`` (created 0600, atomically):
    secrets are written to files only, never returned for printing."""
    from anyhsm.fsutil import atomic_write

    info = hsm.get_key(key)
    with hsm.export_key(info.id) as secret:
        atomic_write(out, secret.buffer.hex().encode() + b"\n")
    return ExportedKey(info.id, str(out), info.label)
