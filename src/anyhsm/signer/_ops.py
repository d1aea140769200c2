"""The one place the signer calls the library below the operations layer.

Everything else in this package calls :mod:`anyhsm.ops` (or the protocol helpers). What
is here is the signer's glue to it, and what ops does not offer yet (the descriptor
check), kept small so it can move there:

- loading the config (``--config``/``ANYHSM_CONFIG``/discovery) and opening the handle
  through :func:`anyhsm.ops.session.open_handle` with no prompt (a terminal prompt only
  for the operator's ``setup``);
- the ``[signer]`` table of the config (``key``, ``public_file``) read with its default;
- the HD keys of a handle;
- the address of a one-address descriptor, after checking that its key is this key.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from anyhsm.errors import DescriptorError, NetworkMismatch, UnsupportedOperation

if TYPE_CHECKING:
    from anyhsm.config import Config
    from anyhsm.hsm import Hsm
    from anyhsm.types import KeyInfo


def load_config(explicit: str | None) -> Config:
    """``--config``, else ``ANYHSM_CONFIG``, else the usual discovery (as ``anyhsm``)."""
    from anyhsm.config import Config, find_config

    return Config.load(find_config(explicit))


def configured_key(cfg: Config) -> str | None:
    """``[signer] key``: the label (or id) of the key exposed to Core, if set."""
    key = cfg.signer.key
    return key.strip() or None if key is not None else None


def index_path(cfg: Config) -> Path:
    """``[signer] public_file``, else ``signer-public.json`` beside the config file."""
    from anyhsm.signer.keyindex import DEFAULT_NAME

    return cfg.signer.public_file or cfg.config_dir / DEFAULT_NAME


def open_handle(cfg: Config, *, interactive: bool = False) -> Hsm:
    """The handle, as ``anyhsm`` opens it (:func:`anyhsm.ops.session.open_handle`); a
    passphrase or PIN prompt only when ``interactive`` and on a terminal (bitcoind's
    child has none, and must never hang on one)."""
    from anyhsm.ops.session import open_handle as open_session

    prompt = _terminal_prompt if interactive and _on_terminal() else None
    return open_session(cfg, prompt=prompt)


def _on_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _terminal_prompt(text: str) -> str | None:
    return getpass.getpass(text)


def hd_keys(hsm: Hsm) -> list[KeyInfo]:
    """The keys of the handle Core can use: HD keys, available here, whose provider
    derives BIP32 children (the HD test of :func:`anyhsm.ops.bitcoin.signing_key`, made
    here without importing ops.bitcoin's address and descriptor code into signtx)."""
    from anyhsm.bitcoin.signer import HD_KEY_TYPES
    from anyhsm.ops.keys import list_keys

    return [
        info
        for info in list_keys(hsm).keys
        if info.available
        and info.master_fingerprint is not None
        and info.key_type in HD_KEY_TYPES
        and hsm.capabilities(info.id).can_derive
    ]


def descriptor_address(hsm: Hsm, info: KeyInfo, text: str) -> str:
    """The address of ``text``, a descriptor of one address of key ``info``: pkh,
    sh(wpkh), wpkh or tr of ``[fingerprint/path]KEY`` where KEY is the public key (x-only
    in tr) at that path, or the xpub at that path followed by unhardened steps, without
    ``*`` or ``<a;b>``. Refused (DescriptorError) when the origin's fingerprint is not the
    key's master fingerprint or KEY is not the key's at that path (doc/external-signer.md:
    "MUST fail if it does not match"), and when the signing policy would refuse to sign
    at that path (an address shown must be one the signer will spend), or the key's
    provider cannot sign its output type."""
    from anyhsm.bitcoin.bip32 import format_path
    from anyhsm.bitcoin.capability import require_spendable
    from anyhsm.bitcoin.descriptor import Descriptor, DescriptorKey, parse_descriptor
    from anyhsm.bitcoin.paths import PathRules
    from anyhsm.bitcoin.presets import OutputType
    from anyhsm.crypto.secp256k1 import xonly
    from anyhsm.ops.bitcoin import xpub

    desc = parse_descriptor(text)
    if desc.is_ranged or desc.is_multipath:
        raise DescriptorError(
            "displayaddress takes the descriptor of one address (no /* and no <a;b> step)"
        )
    key = desc.key
    mfp = info.master_fingerprint
    if mfp is None:  # the signer only exposes HD keys; the service may be asked of any
        raise UnsupportedOperation(
            info.provider,
            f"the address of a descriptor for key {info.label!r}, which is not an HD key",
            hint="name a bip32 key",
        )
    if key.origin is None:
        raise DescriptorError(
            "the descriptor has no key origin [fingerprint/path]: it cannot be matched to "
            f"the key {info.label!r}"
        )
    if key.origin.fingerprint != mfp:
        raise DescriptorError(
            f"the descriptor's fingerprint {key.origin.fingerprint.hex()} is not the master "
            f"fingerprint {mfp.hex()} of the key {info.label!r}"
        )
    base = key.origin.path
    if key.xpub is not None:
        theirs = key.xpub
        if hsm.network not in theirs.networks:
            raise NetworkMismatch(
                f"the descriptor's xpub is for {theirs.network.value}, not {hsm.network.value}"
            )
        if xpub(hsm, info.id, base).xpub != str(theirs):
            raise DescriptorError(
                f"the descriptor's xpub is not the key {info.label!r} at {format_path(base)}"
            )
        full = (*base, *key.branch_path())
        pub = hsm.derive_public(info.id, full).public_key
    else:
        assert key.pubkey is not None
        full = base
        pub = hsm.derive_public(info.id, base).public_key
        given = key.pubkey
        same = xonly(pub) == given if len(given) == 32 else pub == given
        if not same:
            raise DescriptorError(
                f"the descriptor's public key is not the key {info.label!r} at {format_path(base)}"
            )
    taproot = desc.output_type is OutputType.P2TR
    require_spendable(hsm.capabilities(info.id), info.provider, info.label, taproot)
    why = PathRules(hsm.network, hsm.config.policy).input_problem(info.label, full)
    if why is not None:
        raise DescriptorError(
            f"the signing policy would never spend from this address: {why}",
            hint="use an address of the wallet's own accounts (getnewaddress)",
        )
    mine_desc = Descriptor(desc.output_type, DescriptorKey.single(pub))
    return mine_desc.address(None, hsm.network)
