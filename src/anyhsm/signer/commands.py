"""The signer's commands: each checks the chain, picks the key, and makes one call into
:mod:`anyhsm.ops` (HWI's ``commands.py`` under its ``_cli.py`` is the model), on this
host's keystore or, with ``--addr``/``ANYHSM_ADDR``, through a signing service
(:mod:`anyhsm.signer.sources`).

Every command but ``enumerate`` (and ``setup``) needs ``--fingerprint``, picks the
exposed key from the authenticated key directory (the keystore's, or the service's list
of the client's keys) by the rule of :mod:`anyhsm.signer.keyindex`, and refuses unless
the fingerprint is that key's. ``--chain`` is checked against the deployment's network
first, before any key is looked at: a mismatch is an error, never a signature.
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
    UsageError,
)
from anyhsm.signer import _ops
from anyhsm.signer.keyindex import IndexedKey, read_index, select, wanted_key
from anyhsm.signer.protocol import Request, SignerError, check_chain, error_code
from anyhsm.signer.sources import Context, LocalSource, Source

if TYPE_CHECKING:
    from anyhsm.types import KeyInfo

Answer = dict[str, object] | list[dict[str, object]]


def _signer(key: IndexedKey) -> dict[str, object]:
    """One element of enumerate's array (doc/external-signer.md: at least
    ``fingerprint``; Core shows ``model`` as the signer's name)."""
    return {"fingerprint": key.fingerprint, "model": key.model}


def _pick(src: Source, keys: list[IndexedKey], ctx: Context) -> KeyInfo:
    """The exposed key, from the authenticated directory (the handle's, or the service's)."""
    wanted, source = wanted_key(ctx.optional_config())
    try:
        entry = select(keys, wanted, source)
    except KeyNotFound:
        if wanted is None:
            raise
        info = src.get_key(wanted)  # KeyNotFound when it does not exist at all
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
    return src.get_key(entry.id)


def _check_chain(request: Request, src: Source) -> None:
    if request.chain is not None:  # Core sends none to enumerate: nothing to ask then
        check_chain(request.chain, src.network())


@contextmanager
def _key(request: Request, ctx: Context) -> Iterator[tuple[Source, KeyInfo]]:
    """The source and the exposed key, checked against ``--fingerprint``."""
    with ctx.source() as src:
        _check_chain(request, src)
        fingerprint = request.require_fingerprint()
        info = _pick(src, src.hd_keys(), ctx)
        mfp = info.master_fingerprint
        assert mfp is not None
        if mfp.hex() != fingerprint:
            raise KeyNotFound(
                f"no key with master fingerprint {fingerprint} here: this anyhsm-signer "
                f"exposes the key {info.label!r} ({mfp.hex()})",
                hint="run 'bitcoin-cli enumeratesigners' to see the signer's fingerprint",
            )
        yield src, info


def enumerate_signers(request: Request, ctx: Context) -> list[dict[str, object]]:
    """``[{"fingerprint": ..., "model": ...}]``. Locally from the public index, without
    the passphrase; when there is no usable index (or it does not name the key asked
    for), from the keystore if it opens without a prompt, writing the index for next
    time. Through a service, from the client's keys (no passphrase there either)."""
    if ctx.remote:
        with ctx.source() as src:
            _check_chain(request, src)
            wanted, source = wanted_key(ctx.optional_config())
            return [_signer(select(src.hd_keys(), wanted, source))]
    cfg = ctx.config()
    check_chain(request.chain, cfg.network)
    wanted, source = wanted_key(cfg)
    path = _ops.index_path(cfg)
    index = read_index(path, cfg)
    if index is not None:
        try:
            return [_signer(select(index.keys, wanted, source))]
        except (KeyNotFound, KeyLabelConflict):
            pass  # the index may be older than the key: ask the keystore
    local = LocalSource(cfg)
    try:
        local.open()
    except HsmError as e:
        raise SignerError(
            f"{e}; enumerate reads the public key index {path} when there is one, else opens "
            "the keystore: write the index once with 'anyhsm-signer setup'",
            error_code(e),
        ) from None
    with local:
        return [_signer(select(local.hd_keys(), wanted, source))]


def get_descriptors(request: Request, ctx: Context) -> dict[str, object]:
    """``{"receive": [...], "internal": [...]}``: checksummed pkh, sh(wpkh), wpkh and tr
    descriptors ``[fp/purpose'/coin'/account']xpub/0/*`` and ``.../1/*``, only the types
    the key's provider can sign (:func:`anyhsm.ops.bitcoin.wallet_descriptors`)."""
    with _key(request, ctx) as (src, info):
        made = src.wallet_descriptors(info.id, request.account)
    receive = [d.receive for d in made.descriptors if d.receive is not None]
    internal = [d.change for d in made.descriptors if d.change is not None]
    return {"receive": receive, "internal": internal}


def display_address(request: Request, ctx: Context) -> dict[str, object]:
    """``{"address": ...}`` of a one-address descriptor of this key (refused when the
    descriptor's fingerprint or key is not this key's). anyhsm has no screen: the
    address is returned, and Core checks it is the one it expects."""
    assert request.desc is not None
    with _key(request, ctx) as (src, info):
        return {"address": src.descriptor_address(info, request.desc)}


def sign_tx(request: Request, ctx: Context) -> dict[str, object]:
    """``{"psbt": base64}``: the PSBT signed by :func:`anyhsm.ops.psbt.sign_psbt`, the path,
    policy and audit log of ``anyhsm psbt sign`` (here, or in the service)."""
    assert request.psbt is not None
    with _key(request, ctx) as (src, info):
        return {"psbt": src.sign_psbt(info.id, request.psbt)}


def setup(request: Request, ctx: Context) -> dict[str, object]:
    """Operator command (Core never calls it): open the keystore (a passphrase prompt
    on a terminal if needed), write the public key index, and say which key Core will
    see. Run it after creating or deleting HD keys."""
    if ctx.remote:
        raise UsageError(
            "setup writes the public key index of a local keystore; a signer using a "
            "service (--addr / ANYHSM_ADDR) needs none",
            hint="check what Core will see with: anyhsm-signer --addr URL enumerate",
        )
    cfg = ctx.config()
    check_chain(request.chain, cfg.network)
    with LocalSource(cfg, interactive=True) as local:
        keys = local.hd_keys()
        path = _ops.index_path(cfg)
        if not local.index_written:
            raise ConfigError(
                f"cannot write the signer key index {path}",
                hint="make its directory writable, or set [signer] public_file",
            )
        info = _pick(local, keys, ctx)
    entry = IndexedKey.of(info)
    return {**_signer(entry), "key": info.label, "id": info.id, "index": str(path)}


COMMANDS: dict[str, Callable[[Request, Context], Answer]] = {
    "enumerate": enumerate_signers,
    "getdescriptors": get_descriptors,
    "displayaddress": display_address,
    "signtx": sign_tx,
    "setup": setup,
}
