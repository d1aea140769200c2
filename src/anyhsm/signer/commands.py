"""The signer's commands: each checks the chain, picks the key, and makes one call into
:mod:`anyhsm.ops` (HWI's ``commands.py`` under its ``_cli.py`` is the model).

Every command but ``enumerate`` (and ``setup``) needs ``--fingerprint``, opens the
keystore, picks the exposed key from the authenticated key directory by the rule of
:mod:`anyhsm.signer.keyindex`, refreshes the public index, and refuses unless the
fingerprint is that key's. ``--chain`` is checked against the configured network first,
before anything is opened: a mismatch is an error, never a signature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from anyhsm.errors import (
    ConfigError,
    HsmError,
    KeyLabelConflict,
    KeyNotFound,
    ProviderUnavailable,
    UnsupportedOperation,
)
from anyhsm.signer import _ops
from anyhsm.signer.keyindex import (
    IndexedKey,
    KeyIndex,
    read_index,
    select,
    wanted_key,
    write_index,
)
from anyhsm.signer.protocol import Request, SignerError, check_chain, error_code

if TYPE_CHECKING:
    from anyhsm.config import Config
    from anyhsm.hsm import Hsm
    from anyhsm.types import KeyInfo

Answer = dict[str, object] | list[dict[str, object]]


def _signer(key: IndexedKey) -> dict[str, object]:
    """One element of enumerate's array (doc/external-signer.md: at least
    ``fingerprint``; Core shows ``model`` as the signer's name)."""
    return {"fingerprint": key.fingerprint, "model": key.model}


def _refresh(hsm: Hsm, cfg: Config) -> tuple[list[IndexedKey], bool]:
    """The HD keys of the handle, written to the public index; (keys, written)."""
    keys = [IndexedKey.of(i) for i in _ops.hd_keys(hsm)]
    return keys, write_index(_ops.index_path(cfg), KeyIndex.of(cfg, keys))


def _pick(hsm: Hsm, keys: list[IndexedKey], cfg: Config) -> KeyInfo:
    """The exposed key, from the handle's authenticated directory."""
    wanted, source = wanted_key(cfg)
    try:
        entry = select(keys, wanted, source)
    except KeyNotFound:
        if wanted is None:
            raise
        info = hsm.get_key(wanted)  # KeyNotFound when it does not exist at all
        if not info.available:
            raise ProviderUnavailable(
                f"the key {info.label!r} ({source}) is in a store that is not open here "
                f"({info.provider})",
                hint="check the fallback chain: anyhsm health",
            ) from None
        raise UnsupportedOperation(
            info.provider,
            f"Bitcoin Core's external signer with key {info.label!r} ({source}): it is not "
            "an HD key whose provider derives BIP32 children, and Core imports xpubs",
            hint="name a bip32 key (anyhsm key create --type bip32)",
        ) from None
    return hsm.get_key(entry.id)


@contextmanager
def _key(
    request: Request, cfg: Config, *, interactive: bool = False
) -> Iterator[tuple[Hsm, KeyInfo]]:
    """The open handle and the exposed key, checked against ``--fingerprint``."""
    check_chain(request.chain, cfg.network)
    fingerprint = request.require_fingerprint()
    hsm = _ops.open_handle(cfg, interactive=interactive)
    try:
        keys, _ = _refresh(hsm, cfg)
        info = _pick(hsm, keys, cfg)
        mfp = info.master_fingerprint
        assert mfp is not None
        if mfp.hex() != fingerprint:
            raise KeyNotFound(
                f"no key with master fingerprint {fingerprint} here: this anyhsm-signer "
                f"exposes the key {info.label!r} ({mfp.hex()})",
                hint="run 'bitcoin-cli enumeratesigners' to see the signer's fingerprint",
            )
        yield hsm, info
    finally:
        hsm.close()


def enumerate_signers(request: Request, cfg: Config) -> list[dict[str, object]]:
    """``[{"fingerprint": ..., "model": ...}]`` from the public index, without the
    passphrase; when there is no usable index (or it does not name the key asked for),
    from the keystore if it opens without a prompt, writing the index for next time."""
    check_chain(request.chain, cfg.network)
    wanted, source = wanted_key(cfg)
    path = _ops.index_path(cfg)
    index = read_index(path, cfg)
    if index is not None:
        try:
            return [_signer(select(index.keys, wanted, source))]
        except (KeyNotFound, KeyLabelConflict):
            pass  # the index may be older than the key: ask the keystore
    try:
        hsm = _ops.open_handle(cfg)
    except HsmError as e:
        raise SignerError(
            f"{e}; enumerate reads the public key index {path} when there is one, else opens "
            "the keystore: write the index once with 'anyhsm-signer setup'",
            error_code(e),
        ) from None
    try:
        keys, _ = _refresh(hsm, cfg)
        return [_signer(select(keys, wanted, source))]
    finally:
        hsm.close()


def get_descriptors(request: Request, cfg: Config) -> dict[str, object]:
    """``{"receive": [...], "internal": [...]}``: checksummed pkh, sh(wpkh), wpkh and tr
    descriptors ``[fp/purpose'/coin'/account']xpub/0/*`` and ``.../1/*``, only the types
    the key's provider can sign (:func:`anyhsm.ops.bitcoin.wallet_descriptors`)."""
    from anyhsm.ops.bitcoin import wallet_descriptors

    with _key(request, cfg) as (hsm, info):
        made = wallet_descriptors(hsm, info.id, account=request.account)
    receive = [d.receive for d in made.descriptors if d.receive is not None]
    internal = [d.change for d in made.descriptors if d.change is not None]
    return {"receive": receive, "internal": internal}


def display_address(request: Request, cfg: Config) -> dict[str, object]:
    """``{"address": ...}`` of a one-address descriptor of this key (refused when the
    descriptor's fingerprint or key is not this key's). anyhsm has no screen: the
    address is returned, and Core checks it is the one it expects."""
    assert request.desc is not None
    with _key(request, cfg) as (hsm, info):
        return {"address": _ops.descriptor_address(hsm, info, request.desc)}


def sign_tx(request: Request, cfg: Config) -> dict[str, object]:
    """``{"psbt": base64}``: the PSBT signed by :func:`anyhsm.ops.psbt.sign_psbt`, the path,
    policy and audit log of ``anyhsm psbt sign``."""
    from anyhsm.ops.psbt import sign_psbt

    assert request.psbt is not None
    with _key(request, cfg) as (hsm, info):
        result = sign_psbt(hsm, request.psbt, info.id)
    return {"psbt": result.psbt.to_base64()}


def setup(request: Request, cfg: Config) -> dict[str, object]:
    """Operator command (Core never calls it): open the keystore (a passphrase prompt
    on a terminal if needed), write the public key index, and say which key Core will
    see. Run it after creating or deleting HD keys."""
    check_chain(request.chain, cfg.network)
    hsm = _ops.open_handle(cfg, interactive=True)
    try:
        keys, written = _refresh(hsm, cfg)
        path = _ops.index_path(cfg)
        if not written:
            raise ConfigError(
                f"cannot write the signer key index {path}",
                hint="make its directory writable, or set [signer] public_file",
            )
        info = _pick(hsm, keys, cfg)
    finally:
        hsm.close()
    entry = IndexedKey.of(info)
    return {**_signer(entry), "key": info.label, "id": info.id, "index": str(path)}


COMMANDS: dict[str, Callable[[Request, Config], Answer]] = {
    "enumerate": enumerate_signers,
    "getdescriptors": get_descriptors,
    "displayaddress": display_address,
    "signtx": sign_tx,
    "setup": setup,
}
