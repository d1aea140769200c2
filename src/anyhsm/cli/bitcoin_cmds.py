"""Bitcoin commands: xpub, address, descriptor, psbt inspect|sign|finalize, message sign|verify.

Thin shells over :mod:`anyhsm.ops.bitcoin` and :mod:`anyhsm.ops.psbt`: each handler reads
its input, calls one operation and renders its result. PSBTs are read from a file or
``-`` (stdin) as base64, hex or binary, and written as base64 (stdout, or ``--out FILE``;
``--binary`` writes raw bytes). In text mode the PSBT or transaction goes to stdout and
the human report to stderr, so ``anyhsm psbt sign KEY in.psbt > out.psbt`` works.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from anyhsm.cli.app import EXIT_NEGATIVE, EXIT_OK, App, Result, SubParsers, served
from anyhsm.errors import PsbtError
from anyhsm.types import Network

if TYPE_CHECKING:
    from anyhsm.bitcoin.psbt import Psbt
    from anyhsm.ops.psbt import PsbtInspection

ADDRESS_KINDS = ("p2pkh", "p2sh-p2wpkh", "p2wpkh", "p2tr")  # AddressKind's values
DESCRIPTOR_TYPES = ("pkh", "sh-wpkh", "wpkh", "tr")  # DescriptorType's values
SLIP132 = ("ypub", "zpub", "Ypub", "Zpub", "upub", "vpub", "Upub", "Vpub")
NETWORKS = tuple(n.value for n in Network)


# --- xpub / address / descriptor --------------------------------------------------------------


@served
def cmd_xpub(args: argparse.Namespace, app: App) -> Result:
    res = app.backend().xpub(args.key, args.path, args.slip132)
    return Result(res.to_dict(), [res.xpub])


@served
def cmd_address(args: argparse.Namespace, app: App) -> Result:
    res = app.backend().address(args.key, args.path, args.type)
    return Result(res.to_dict(), [res.address])


@served
def cmd_descriptor(args: argparse.Namespace, app: App) -> Result:
    res = app.backend().descriptor(args.key, args.type, args.account)
    if res.receive is None:
        return Result(res.to_dict(), [res.descriptor])
    return Result(
        res.to_dict(),
        [f"receive: {res.receive}", f"change:  {res.change}", f"both:    {res.descriptor}"],
    )


# --- PSBT -------------------------------------------------------------------------------------


def _read_psbt(source: str, max_bytes: int | None = None) -> Psbt:
    """Read and parse a PSBT from a file or ``-`` (stdin); ``max_bytes`` (the policy's
    ``max_psbt_bytes``) refuses an oversized one before any decoding work."""
    from anyhsm.ops.psbt import parse_psbt

    if source == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise PsbtError(f"cannot read PSBT file {source}: {e.strerror or e}") from None
    return parse_psbt(data, max_bytes=max_bytes, source="stdin" if source == "-" else source)


def _write_psbt(psbt: Psbt, out: str, binary: bool) -> None:
    from anyhsm.fsutil import atomic_write

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


def inspect_text(res: PsbtInspection) -> list[str]:
    lines = [f"PSBT version {res.version}, unsigned txid {res.unsigned_txid}"]
    for i in res.inputs:
        state = "final" if i.finalized else f"{len(i.partial_sigs)} sig(s)"
        if i.tap_key_sig:
            state += ", key-path sig"
        amount = "?" if i.amount is None else f"{i.amount} sat"
        lines.append(f"  in  {i.index}: {i.prevout} {i.script_type} {amount} [{state}]")
        if i.problem:
            lines.append(f"         problem: {i.problem}")
    for o in res.outputs:
        lines.append(f"  out {o.index}: {o.amount} sat -> {o.address or o.note}")
    if res.fee is None:
        lines.append("fee unknown: some inputs have no previous output")
    else:
        lines.append(f"fee {res.fee} sat, ~{res.vsize} vB, ~{res.fee / res.vsize:.2f} sat/vB")
    return lines


def cmd_psbt_inspect(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.psbt import inspect_psbt

    cfg = app.loaded_config()
    psbt = _read_psbt(args.file, cfg.policy.max_psbt_bytes if cfg else None)
    res = inspect_psbt(psbt, _network_hint(app) or Network.MAINNET)
    return Result(res.to_dict(), inspect_text(res))


def sign_text(report: Mapping[str, object], fee_rate: float) -> list[str]:
    """The human report of ``psbt sign`` from its JSON object (either side's)."""
    inputs = _items(report.get("inputs"))
    lines = [
        f"signed {report.get('signed_inputs')} of {len(inputs)} input(s), "
        f"{report.get('signatures')} sig(s)"
    ]
    for r in inputs:
        lines.append(f"  in  {r.get('index')}: {r.get('status')}: {r.get('reason')}")
    for o in _items(report.get("outputs")):
        tag = f" (change, {o.get('owner')} {o.get('path')})" if o.get("change") else ""
        where = o.get("address") or o.get("note") or ""
        lines.append(f"  out {o.get('index')}: {o.get('amount')} sat -> {where}{tag}")
    lines.append(f"fee {report.get('fee')} sat, ~{report.get('vsize')} vB, ~{fee_rate:.2f} sat/vB")
    warnings = report.get("warnings")
    lines += [f"warning: {w}" for w in warnings] if isinstance(warnings, list) else []
    return lines


def _items(value: object) -> list[Mapping[str, object]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _psbt_signing_keys(args: argparse.Namespace) -> list[str] | None:
    """KEY and every --key, or None (every key of the handle) with --all-keys."""
    from anyhsm.errors import UsageError

    named = ([args.key] if args.key is not None else []) + list(args.keys or [])
    if args.all_keys:
        if named:
            raise UsageError("--all-keys signs with every key: name no key with it")
        return None
    if not named:
        raise UsageError(
            "name the key to sign with (KEY, --key), or give --all-keys",
            hint="anyhsm psbt sign KEY FILE",
        )
    return named


@served
def cmd_psbt_sign(args: argparse.Namespace, app: App) -> Result:
    keys = _psbt_signing_keys(args)
    cfg = app.config() if app.addr() is None else app.loaded_config()
    psbt = _read_psbt(args.file, cfg.policy.max_psbt_bytes if cfg is not None else None)
    res = app.backend().sign_psbt(psbt, keys)
    if args.out:
        _write_psbt(res.psbt, args.out, args.binary)
    data = dict(res.report)
    if args.out:
        data["out"] = args.out
    _stderr(app, sign_text(res.report, res.fee_rate))
    return Result(data, [f"wrote {args.out}"] if args.out else [res.psbt.to_base64()])


def _write_or_print(app: App, psbt: Psbt, args: argparse.Namespace) -> list[str]:
    if args.out:
        _write_psbt(psbt, args.out, args.binary)
        return [f"wrote {args.out}"]
    return [psbt.to_base64()]


def cmd_psbt_create(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.psbt import create_psbt

    res = create_psbt(
        args.input or [],
        args.output or [],
        _network_hint(app) or Network.MAINNET,
        locktime=args.locktime,
        replaceable=args.replaceable,
        tx_version=args.tx_version,
        psbt_version=args.psbt_version,
    )
    return Result(_with_out(res.to_dict(), args), _write_or_print(app, res.psbt, args))


def cmd_psbt_combine(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.psbt import combine_psbts

    if [f for f in args.files if f == "-"][1:]:
        raise PsbtError("standard input (-) can give only one of the PSBTs")
    cfg = app.loaded_config()
    limit = cfg.policy.max_psbt_bytes if cfg else None
    res = combine_psbts([_read_psbt(f, limit) for f in args.files])
    return Result(_with_out(res.to_dict(), args), _write_or_print(app, res.psbt, args))


def _with_out(data: dict[str, object], args: argparse.Namespace) -> dict[str, object]:
    return {**data, "out": args.out} if args.out else data


def cmd_psbt_finalize(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.psbt import finalize_psbt

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
    return Result(
        data, [f"wrote {args.out}"] if args.out else [res.psbt.to_base64()], EXIT_NEGATIVE
    )


# --- messages ---------------------------------------------------------------------------------


def cmd_message_sign(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.bitcoin import sign_message

    res = sign_message(
        app.hsm(),
        args.key,
        args.message,
        args.path,
        kind=args.type,
        bip322=args.bip322,
        bip322_format=args.bip322_format,
        prefix=not args.no_prefix,
        nonce=args.nonce,
        proof_of_funds=args.proof_of_funds or (),
    )
    return Result(res.to_dict(), [res.signature])


def cmd_message_verify(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.bitcoin import verify_message

    res = verify_message(args.address, args.message, args.signature, _network_hint(app))
    if res.error is not None:  # inconclusive: neither valid nor invalid
        print(f"anyhsm: error: {res.error}", file=sys.stderr)
        return Result(res.to_dict(), [f"INCONCLUSIVE: {res.reason}"], res.error.exit_code)
    code = EXIT_OK if res.valid else EXIT_NEGATIVE
    return Result(res.to_dict(), ["valid" if res.valid else "INVALID"], code)


# --- registration -----------------------------------------------------------------------------


def register(sub: SubParsers) -> None:
    x = sub.add_parser("xpub", help="extended public key of an HD key at a path")
    x.add_argument("key", help="key id or label")
    x.add_argument("path", nargs="?", default=None, help="e.g. m/84'/0'/0' (default: m)")
    x.add_argument(
        "--slip132", choices=SLIP132, help="write the key in a SLIP-132 form (default: xpub/tpub)"
    )
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
    a.add_argument(
        "--type", default="p2wpkh", choices=ADDRESS_KINDS, help="address type (default: p2wpkh)"
    )
    a.set_defaults(func=cmd_address)

    d = sub.add_parser("descriptor", help="output descriptor for watch-only wallets")
    d.add_argument("key", help="key id or label")
    d.add_argument(
        "--type", default="wpkh", choices=DESCRIPTOR_TYPES, help="descriptor type (default: wpkh)"
    )
    d.add_argument(
        "--account", type=int, default=0, help="BIP44 account number, HD keys (default: 0)"
    )
    d.set_defaults(func=cmd_descriptor)

    p = sub.add_parser("psbt", help="inspect, sign, finalize, create and combine PSBTs")
    ps = p.add_subparsers(dest="psbt_cmd", required=True)
    i = ps.add_parser("inspect", help="show a PSBT's inputs, outputs and fee (no keys needed)")
    i.add_argument("file", help="PSBT file (base64, hex or binary), or - for stdin")
    i.add_argument(
        "--network",
        choices=NETWORKS,
        help="for addresses (default: the configured network with --config/ANYHSM_CONFIG, "
        "else mainnet)",
    )
    i.set_defaults(func=cmd_psbt_inspect)
    s = ps.add_parser("sign", help="sign every input the key can sign, after the policy checks")
    s.add_argument("key", nargs="?", help="key id or label")
    s.add_argument("file", help="PSBT file (base64, hex or binary), or - for stdin")
    s.add_argument(
        "--key",
        dest="keys",
        action="append",
        metavar="KEY",
        help="another key to sign with (repeat it; one policy decision for them all)",
    )
    s.add_argument(
        "--all-keys",
        action="store_true",
        help="sign with every key of the handle that the PSBT names, instead of KEY",
    )
    s.add_argument("--out", help="write the signed PSBT to this file (default: stdout, base64)")
    s.add_argument("--binary", action="store_true", help="with --out: raw bytes, not base64")
    s.set_defaults(func=cmd_psbt_sign)
    f = ps.add_parser("finalize", help="finalize and extract the transaction when complete")
    f.add_argument("file", help="PSBT file (base64, hex or binary), or - for stdin")
    f.add_argument(
        "--out", help="write the finalized PSBT to this file (default: stdout: the tx or PSBT)"
    )
    f.add_argument("--binary", action="store_true", help="with --out: raw bytes, not base64")
    f.set_defaults(func=cmd_psbt_finalize)
    cr = ps.add_parser(
        "create", help="create an unsigned PSBT, as Bitcoin Core's createpsbt (no keys needed)"
    )
    cr.add_argument(
        "--input",
        action="append",
        metavar="TXID:VOUT[:SEQ]",
        help="a previous output to spend; repeat for each input",
    )
    cr.add_argument(
        "--output",
        action="append",
        metavar="ADDR=AMOUNT|data=HEX",
        help="an output: amount in BTC (up to 8 decimals) or 'N sat'; repeat for each",
    )
    cr.add_argument("--locktime", type=int, default=0, help="nLockTime")
    rbf = cr.add_mutually_exclusive_group()
    rbf.add_argument(
        "--replaceable",
        action="store_true",
        default=None,
        help="signal BIP125 replacement on every input (default: Core's: signal unless a "
        "sequence is given)",
    )
    rbf.add_argument(
        "--no-replaceable",
        dest="replaceable",
        action="store_false",
        default=None,
        help="final sequences (0xfffffffe with a lock time)",
    )
    cr.add_argument("--tx-version", type=int, default=2, help="the transaction's version")
    cr.add_argument(
        "--psbt-version", type=int, choices=(0, 2), default=0, help="BIP174 (0) or BIP370 (2)"
    )
    cr.add_argument(
        "--network",
        choices=NETWORKS,
        help="for addresses (default: the configured network with --config/ANYHSM_CONFIG, "
        "else mainnet)",
    )
    cr.add_argument("--out", help="write the PSBT to this file (default: stdout, base64)")
    cr.add_argument("--binary", action="store_true", help="with --out: raw bytes, not base64")
    cr.set_defaults(func=cmd_psbt_create)
    cb = ps.add_parser("combine", help="combine PSBTs of one transaction (Core's combinepsbt)")
    cb.add_argument("files", nargs="+", metavar="FILE", help="PSBT files, or - for stdin (once)")
    cb.add_argument("--out", help="write the combined PSBT to this file (default: stdout, base64)")
    cb.add_argument("--binary", action="store_true", help="with --out: raw bytes, not base64")
    cb.set_defaults(func=cmd_psbt_combine)

    m = sub.add_parser("message", help="sign and verify messages (BIP137, BIP322)")
    ms = m.add_subparsers(dest="message_cmd", required=True)
    sg = ms.add_parser("sign", help="sign a message with a key")
    sg.add_argument("key", help="key id or label")
    sg.add_argument("path", help="derivation path of an HD key, or - for the key as is")
    sg.add_argument("message")
    sg.add_argument(
        "--type",
        choices=ADDRESS_KINDS,
        default=None,
        help="address type signed for (default: p2pkh, or p2wpkh with --bip322)",
    )
    sg.add_argument(
        "--bip322",
        action="store_true",
        help="a BIP322 signature (simple for p2wpkh/p2tr, full for p2pkh/p2sh-p2wpkh)",
    )
    sg.add_argument(
        "--format",
        dest="bip322_format",
        choices=("simple", "full"),
        help="with --bip322: the BIP322 format (default: by the address type, as above)",
    )
    sg.add_argument(
        "--no-prefix",
        action="store_true",
        help="with --bip322: leave out the smp/ful prefix (the older unprefixed form)",
    )
    sg.add_argument(
        "--proof-of-funds",
        action="append",
        metavar="TXID:VOUT:SATS",
        help="with --bip322: an output paying the same address that the signature also "
        "proves control of (repeat it; a proof-of-funds signature)",
    )
    sg.add_argument(
        "--nonce",
        choices=("low-r", "rfc6979"),
        default="low-r",
        help="ECDSA nonce: RFC 6979 ground to a low R as Bitcoin Core does, or plain RFC 6979",
    )
    sg.set_defaults(func=cmd_message_sign)
    v = ms.add_parser("verify", help="verify a BIP137 or BIP322 signature")
    v.add_argument("address")
    v.add_argument("message")
    v.add_argument("signature")
    v.add_argument(
        "--network",
        choices=NETWORKS,
        help="(default: the configured network with --config/ANYHSM_CONFIG, else the "
        "address's own)",
    )
    v.set_defaults(func=cmd_message_verify)
