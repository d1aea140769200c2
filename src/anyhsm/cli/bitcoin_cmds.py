"""Bitcoin commands: xpub, address, descriptor, psbt inspect|sign|finalize, message sign|verify.

Thin wrappers over :mod:`anyhsm.bitcoin`. PSBTs are read from a file or ``-`` (stdin)
as base64, hex or binary, and written as base64 (stdout, or ``--out FILE``;
``--binary`` writes raw bytes). In text mode the PSBT or transaction goes to stdout
and the human report to stderr, so ``anyhsm psbt sign KEY in.psbt > out.psbt`` works.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from anyhsm.bitcoin.address import (
    AddressKind,
    address_for_pubkey,
    parse_address,
    script_for_pubkey,
)
from anyhsm.bitcoin.bip32 import ExtendedKey, KeyOrigin, format_path, parse_path
from anyhsm.bitcoin.capability import require_spendable
from anyhsm.bitcoin.descriptor import Descriptor, DescriptorKey
from anyhsm.bitcoin.finalizer import finalize_psbt
from anyhsm.bitcoin.policy import describe_output, estimate_vsize
from anyhsm.bitcoin.presets import OutputType, Purpose, account_path, address_path, purpose_for
from anyhsm.bitcoin.psbt import Psbt
from anyhsm.bitcoin.sighash import sighash_name
from anyhsm.bitcoin.signer import HD_KEY_TYPES, SIGNING_KEY_TYPES, SignResult, sign_psbt
from anyhsm.bitcoin.spend import describe_input
from anyhsm.cli.app import App, Result, SubParsers
from anyhsm.errors import HsmError, MessageError, PsbtError, UnsupportedOperation
from anyhsm.fsutil import atomic_write
from anyhsm.hsm import Hsm
from anyhsm.types import KeyInfo, Network, SignParams, SigScheme

_DESCRIPTOR_TYPES = {
    "pkh": OutputType.P2PKH,
    "sh-wpkh": OutputType.P2SH_P2WPKH,
    "wpkh": OutputType.P2WPKH,
    "tr": OutputType.P2TR,
}
_SLIP132 = ("ypub", "zpub", "Ypub", "Zpub", "upub", "vpub", "Upub", "Vpub")


# --- keys and paths ---------------------------------------------------------------------------


def _signing_key(hsm: Hsm, label: str) -> tuple[KeyInfo, bool]:
    """(key, is HD) for a key that can sign Bitcoin transactions."""
    info = hsm.get_key(label)
    if info.key_type not in SIGNING_KEY_TYPES:
        raise UnsupportedOperation(
            info.provider,
            f"Bitcoin keys of type {info.key_type.value}",
            hint="use a secp256k1 or bip32 key",
        )
    hd = info.key_type in HD_KEY_TYPES and hsm.capabilities(info.id).can_derive
    return info, hd


def _path(text: str | None) -> tuple[int, ...] | None:
    """None when no path was given (omitted or ``-``)."""
    if text is None or text.strip() == "-":
        return None
    return parse_path(text)


def _single_key_path(info: KeyInfo, hsm: Hsm, path: tuple[int, ...] | None) -> None:
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
        _single_key_path(info, hsm, path)
        return info.public_key
    return hsm.derive_public(info.id, path or ()).public_key


def _extended(hsm: Hsm, info: KeyInfo, path: tuple[int, ...]) -> tuple[ExtendedKey, bytes]:
    """The xpub of an HD key at ``path`` on the configured network, and the master fingerprint."""
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


# --- xpub / address / descriptor --------------------------------------------------------------


def cmd_xpub(args: argparse.Namespace, app: App) -> Result:
    hsm = app.hsm()
    info, hd = _signing_key(hsm, args.key)
    path = _path(args.path) or ()
    if not hd:
        raise UnsupportedOperation(
            info.provider,
            f"extended public keys of the single key {info.label!r} (it has no chain code)",
            hint="use 'anyhsm address' or 'anyhsm key show' for its public key",
        )
    xpub, mfp = _extended(hsm, info, path)
    text = xpub.to_string(args.slip132) if args.slip132 else str(xpub)
    origin = KeyOrigin(mfp, path)
    return Result(
        {
            "xpub": text,
            "key": info.label,
            "path": format_path(path),
            "master_fingerprint": mfp.hex(),
            "origin": origin.to_string(),
            "network": hsm.network.value,
        },
        [text],
    )


def cmd_address(args: argparse.Namespace, app: App) -> Result:
    hsm = app.hsm()
    kind = AddressKind.parse(args.type)
    info, hd = _signing_key(hsm, args.key)
    require_spendable(
        hsm.capabilities(info.id), info.provider, info.label, kind is AddressKind.P2TR
    )
    path = _path(args.path)
    if hd and path is None:
        purpose = purpose_for(OutputType(kind.value))
        path = address_path(purpose, hsm.network)
    pub = _pubkey(hsm, info, hd, path)
    address = address_for_pubkey(pub, kind, hsm.network)
    return Result(
        {
            "address": address,
            "type": kind.value,
            "key": info.label,
            "path": format_path(path) if hd and path is not None else None,
            "public_key": pub.hex(),
            "script_pubkey": script_for_pubkey(pub, kind).hex(),
            "network": hsm.network.value,
        },
        [address],
    )


def cmd_descriptor(args: argparse.Namespace, app: App) -> Result:
    hsm = app.hsm()
    otype = _DESCRIPTOR_TYPES.get(args.type.strip().lower())
    if otype is None:
        raise HsmError(
            f"unknown descriptor type {args.type!r}", hint="use pkh, sh-wpkh, wpkh or tr"
        )
    info, hd = _signing_key(hsm, args.key)
    require_spendable(
        hsm.capabilities(info.id), info.provider, info.label, otype is OutputType.P2TR
    )
    if hd:
        apath = account_path(Purpose(purpose_for(otype)), hsm.network, args.account)
        xpub, mfp = _extended(hsm, info, apath)
        desc = Descriptor.from_account_key(otype, xpub, KeyOrigin(mfp, apath))
        receive, change = desc.branches()
        data: dict[str, object] = {
            "descriptor": str(desc),
            "receive": str(receive),
            "change": str(change),
            "type": args.type,
            "key": info.label,
            "account": args.account,
            "origin": KeyOrigin(mfp, apath).to_string(),
        }
        return Result(data, [f"receive: {receive}", f"change:  {change}", f"both:    {desc}"])
    if args.account:
        _single_key_path(info, hsm, (0,))
    single = Descriptor(otype, DescriptorKey.single(info.public_key))
    return Result(
        {"descriptor": str(single), "type": args.type, "key": info.label, "account": None},
        [str(single)],
    )


# --- PSBT -------------------------------------------------------------------------------------


def _read_psbt(source: str, max_bytes: int | None = None) -> Psbt:
    """Read and parse a PSBT; ``max_bytes`` (the policy's ``max_psbt_bytes``) refuses an
    oversized one before any decoding work."""
    if source == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise PsbtError(f"cannot read PSBT file {source}: {e.strerror or e}") from None
    if not data.strip():
        raise PsbtError(f"{'stdin' if source == '-' else source} is empty; no PSBT to read")
    return Psbt.parse(data, max_bytes=max_bytes)


def _write_psbt(psbt: Psbt, out: str, binary: bool) -> None:
    data = psbt.serialize() if binary else (psbt.to_base64() + "\n").encode("ascii")
    try:
        atomic_write(Path(out), data, mode=0o644)
    except OSError as e:
        raise PsbtError(f"cannot write {out}: {e.strerror or e}") from None


def _stderr(app: App, lines: list[str]) -> None:
    if not app.json:
        for line in lines:
            print(line, file=sys.stderr)


def _network_hint(app: App) -> Network | None:
    """--network, else the configured network when a config is given, else None."""
    given = getattr(app.args, "network", None)
    if given:
        return Network(given)
    if getattr(app.args, "config", None) or os.environ.get("ANYHSM_CONFIG"):
        return app.config().network
    return None


def cmd_psbt_inspect(args: argparse.Namespace, app: App) -> Result:
    cfg = app.loaded_config()
    psbt = _read_psbt(args.file, cfg.policy.max_psbt_bytes if cfg else None)
    network = _network_hint(app) or Network.MAINNET
    infos = [describe_input(i) for i in psbt.inputs]
    inputs: list[dict[str, object]] = []
    lines = [f"PSBT version {psbt.version}, unsigned txid {psbt.unique_id()[::-1].hex()}"]
    for n, (inp, info) in enumerate(zip(psbt.inputs, infos, strict=True)):
        spk = info.spent.script_pubkey if info.spent is not None else None
        row: dict[str, object] = {
            "index": n,
            "prevout": str(inp.prevout),
            "sequence": inp.sequence,
            "script_type": info.kind.value,
            "amount": info.amount,
            "script_pubkey": None if spk is None else spk.hex(),
            "sighash": None if inp.sighash_type is None else sighash_name(inp.sighash_type),
            "has_non_witness_utxo": inp.non_witness_utxo is not None,
            "derivations": [
                {"pubkey": k.hex(), "origin": o.to_string()}
                for k, o in inp.bip32_derivations.items()
            ]
            + [
                {"pubkey": k.hex(), "origin": t.origin.to_string(), "leaves": len(t.leaf_hashes)}
                for k, t in inp.tap_bip32_derivations.items()
            ],
            "partial_sigs": [k.hex() for k in inp.partial_sigs],
            "tap_key_sig": inp.tap_key_sig is not None,
            "tap_script_sigs": len(inp.tap_script_sigs),
            "finalized": inp.is_finalized,
            "problem": info.problem,
        }
        inputs.append(row)
        state = "final" if inp.is_finalized else f"{len(inp.partial_sigs)} sig(s)"
        if inp.tap_key_sig is not None:
            state += ", key-path sig"
        amount = "?" if info.amount is None else f"{info.amount} sat"
        lines.append(f"  in  {n}: {inp.prevout} {info.kind.value} {amount} [{state}]")
        if info.problem:
            lines.append(f"         problem: {info.problem}")
    outputs = [
        describe_output(n, out, network, lambda _p, _o: None, {})
        for n, out in enumerate(psbt.outputs)
    ]
    for o in outputs:
        lines.append(f"  out {o.index}: {o.amount} sat -> {o.address or o.note}")
    fee: int | None = None
    vsize, notes = estimate_vsize(psbt, infos)
    if all(i.amount is not None for i in infos):
        fee = sum(i.amount or 0 for i in infos) - sum(o.amount for o in psbt.outputs)
        lines.append(f"fee {fee} sat, ~{vsize} vB, ~{fee / vsize:.2f} sat/vB")
    else:
        lines.append("fee unknown: some inputs have no previous output")
    complete = bool(psbt.inputs) and psbt.is_finalized()
    data: dict[str, object] = {
        "version": psbt.version,
        "unsigned_txid": psbt.unique_id()[::-1].hex(),
        "locktime": psbt.locktime(),
        "network": network.value,
        "inputs": inputs,
        "outputs": [
            {
                **o.to_dict(),
                "derivations": [
                    {"pubkey": k.hex(), "origin": v.to_string()}
                    for k, v in psbt.outputs[o.index].bip32_derivations.items()
                ]
                + [
                    {"pubkey": k.hex(), "origin": t.origin.to_string()}
                    for k, t in psbt.outputs[o.index].tap_bip32_derivations.items()
                ],
            }
            for o in outputs
        ],
        "fee": fee,
        "vsize": vsize,
        "fee_rate": None if fee is None else round(fee / vsize, 3),
        "finalized": complete,
        "notes": notes,
    }
    return Result(data, lines)


def _sign_report(res: SignResult) -> list[str]:
    lines = [f"signed {res.signed_inputs} of {len(res.inputs)} input(s), {res.signatures} sig(s)"]
    for r in res.inputs:
        lines.append(f"  in  {r.index}: {r.status}: {r.reason}")
    for o in res.outputs:
        tag = f" (change, {o.owner} {o.path})" if o.change else ""
        lines.append(f"  out {o.index}: {o.amount} sat -> {o.address or o.note}{tag}")
    lines.append(f"fee {res.fee} sat, ~{res.vsize} vB, ~{res.fee_rate:.2f} sat/vB")
    lines += [f"warning: {w}" for w in res.warnings]
    return lines


def cmd_psbt_sign(args: argparse.Namespace, app: App) -> Result:
    psbt = _read_psbt(args.file, app.config().policy.max_psbt_bytes)
    res = sign_psbt(app.hsm(), psbt, args.key)
    if args.out:
        _write_psbt(res.psbt, args.out, args.binary)
    data = res.to_dict()
    if args.out:
        data["out"] = args.out
    _stderr(app, _sign_report(res))
    return Result(data, [f"wrote {args.out}"] if args.out else [res.psbt.to_base64()])


def cmd_psbt_finalize(args: argparse.Namespace, app: App) -> Result:
    cfg = app.loaded_config()
    psbt = _read_psbt(args.file, cfg.policy.max_psbt_bytes if cfg else None)
    res = finalize_psbt(psbt)
    if args.out:
        _write_psbt(res.psbt, args.out, args.binary)
    data = res.to_dict()
    lines = [f"  in  {r.index}: {r.status} {r.reason}".rstrip() for r in res.inputs]
    if res.tx is not None:
        _stderr(app, [*lines, f"complete: txid {res.tx.txid_hex()}"])
        return Result(data, [res.tx.serialize().hex()])
    _stderr(app, [*lines, "incomplete: not every input could be finalized"])
    return Result(data, [f"wrote {args.out}"] if args.out else [res.psbt.to_base64()], 1)


# --- messages ---------------------------------------------------------------------------------


def cmd_message_sign(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.bitcoin.message import sign_message_bip137, sign_message_bip322
    from anyhsm.bitcoin.taproot import taproot_tweak
    from anyhsm.crypto.secp256k1 import xonly

    hsm = app.hsm()
    kind = AddressKind.parse(args.type or ("p2wpkh" if args.bip322 else "p2pkh"))
    info, hd = _signing_key(hsm, args.key)
    path = _path(args.path)
    pub = _pubkey(hsm, info, hd, path)
    sign_path = (path or ()) if hd else ()
    otype = OutputType(kind.value)

    def ecdsa(digest: bytes) -> bytes:
        params = SignParams(path=sign_path, grind_low_r=True)
        return hsm.sign(info.id, digest, SigScheme.ECDSA, params=params)

    if kind is AddressKind.P2TR and not args.bip322:
        raise MessageError(
            "BIP137 cannot sign for taproot addresses", hint="add --bip322 for a BIP322 signature"
        )
    if args.bip322:
        if kind is AddressKind.P2TR:
            tweak = taproot_tweak(xonly(pub), None)
            aux = bytes(32) if hsm.config.policy.deterministic_schnorr else None

            def schnorr(digest: bytes) -> bytes:
                params = SignParams(path=sign_path, tweak=tweak, aux_rand=aux)
                return hsm.sign(info.id, digest, SigScheme.SCHNORR, params=params)

            sig = sign_message_bip322(schnorr, pub, args.message, otype)
        else:
            sig = sign_message_bip322(ecdsa, pub, args.message, otype)
        fmt = "bip322"
    else:
        sig = sign_message_bip137(ecdsa, pub, args.message, otype)
        fmt = "bip137"
    address = address_for_pubkey(pub, kind, hsm.network)
    return Result(
        {
            "signature": sig,
            "address": address,
            "type": kind.value,
            "format": fmt,
            "key": info.label,
            "path": format_path(path) if hd and path is not None else None,
        },
        [sig],
    )


def cmd_message_verify(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.bitcoin.message import verify_message

    network = _network_hint(app)
    if network is None:  # no config: the address's own network family decides
        network = sorted(parse_address(args.address).networks, key=lambda n: n.value)[0]
    ok = verify_message(args.address, args.message, args.signature, network)
    return Result(
        {"valid": ok, "address": args.address, "network": network.value},
        ["valid" if ok else "INVALID"],
        0 if ok else 1,
    )


# --- registration -----------------------------------------------------------------------------


def register(sub: SubParsers) -> None:
    x = sub.add_parser("xpub", help="extended public key of an HD key at a path")
    x.add_argument("key", help="key id or label")
    x.add_argument("path", nargs="?", default=None, help="e.g. m/84'/0'/0' (default m)")
    x.add_argument("--slip132", choices=_SLIP132, help="write the key in a SLIP-132 form")
    x.set_defaults(func=cmd_xpub)

    a = sub.add_parser("address", help="address of a key (HD keys: at a path)")
    a.add_argument("key", help="key id or label")
    a.add_argument(
        "path",
        nargs="?",
        default=None,
        help="HD keys: derivation path (default: the BIP44/49/84/86 path of the type, "
        "account 0, index 0); single keys: omit or m",
    )
    a.add_argument("--type", default="p2wpkh", choices=[k.value for k in AddressKind])
    a.set_defaults(func=cmd_address)

    d = sub.add_parser("descriptor", help="output descriptor for watch-only wallets")
    d.add_argument("key", help="key id or label")
    d.add_argument("--type", default="wpkh", choices=["pkh", "sh-wpkh", "wpkh", "tr"])
    d.add_argument("--account", type=int, default=0, help="BIP44 account number (HD keys)")
    d.set_defaults(func=cmd_descriptor)

    p = sub.add_parser("psbt", help="inspect, sign and finalize PSBTs")
    ps = p.add_subparsers(dest="psbt_cmd", required=True)
    i = ps.add_parser("inspect", help="show a PSBT's inputs, outputs and fee (no keys needed)")
    i.add_argument("file", help="PSBT file (base64, hex or binary), or - for stdin")
    i.add_argument("--network", choices=[n.value for n in Network], help="for addresses")
    i.set_defaults(func=cmd_psbt_inspect)
    s = ps.add_parser("sign", help="sign every input the key can sign, after the policy checks")
    s.add_argument("key", help="key id or label")
    s.add_argument("file", help="PSBT file (base64, hex or binary), or - for stdin")
    s.add_argument("--out", help="write the signed PSBT to this file")
    s.add_argument("--binary", action="store_true", help="with --out: raw bytes, not base64")
    s.set_defaults(func=cmd_psbt_sign)
    f = ps.add_parser("finalize", help="finalize and extract the transaction when complete")
    f.add_argument("file", help="PSBT file (base64, hex or binary), or - for stdin")
    f.add_argument("--out", help="write the finalized PSBT to this file")
    f.add_argument("--binary", action="store_true", help="with --out: raw bytes, not base64")
    f.set_defaults(func=cmd_psbt_finalize)

    m = sub.add_parser("message", help="sign and verify messages (BIP137, BIP322)")
    ms = m.add_subparsers(dest="message_cmd", required=True)
    sg = ms.add_parser("sign", help="sign a message with a key")
    sg.add_argument("key", help="key id or label")
    sg.add_argument("path", help="derivation path of an HD key, or - for the key as is")
    sg.add_argument("message")
    sg.add_argument("--type", choices=[k.value for k in AddressKind], default=None)
    sg.add_argument("--bip322", action="store_true", help="BIP322 simple signature")
    sg.set_defaults(func=cmd_message_sign)
    v = ms.add_parser("verify", help="verify a BIP137 or BIP322 signature")
    v.add_argument("address")
    v.add_argument("message")
    v.add_argument("signature")
    v.add_argument("--network", choices=[n.value for n in Network])
    v.set_defaults(func=cmd_message_verify)
