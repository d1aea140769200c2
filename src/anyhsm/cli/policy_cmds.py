"""``anyhsm policy set|show|check|request|approve|freeze|unfreeze``: the spending policy.

Thin shells over :mod:`anyhsm.ops.policy` (docs/policy.md). ``set`` is the admin step
that makes a policy file active (audited with its old and new hash); ``check`` judges a
PSBT as signing would, without signing; ``request`` prints the message approvers sign;
``approve`` submits one approval; ``freeze`` / ``unfreeze`` switch a key off and on.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from anyhsm.cli.app import EXIT_NEGATIVE, EXIT_OK, App, Result, SubParsers, served, text_value

if TYPE_CHECKING:
    from anyhsm.ops.policy import PolicyCheck


def _when(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def cmd_set(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.policy import set_policy

    res = set_policy(
        app.hsm(), Path(args.file) if args.file else None, reset_state=args.reset_state
    )
    lines = [
        f"active spending policy: {res.file} ({res.rules} rules), version {res.version}",
        f"sha256: {res.sha256}",
        f"replaced: {text_value(res.previous)}",
        "velocity counters kept: " + (", ".join(res.counters_kept) or "none"),
    ]
    if res.state_reset:
        lines.append("the policy state was reset (counters, approvals and freezes start afresh)")
    return Result(res.to_dict(), lines)


@served
def cmd_show(args: argparse.Namespace, app: App) -> Result:
    res = app.backend().show_policy()
    if not res.active:
        return Result(
            res.to_dict(), ["no spending policy is set (only the signing policy applies)"]
        )
    lines = [f"spending policy {res.sha256} (version {res.version})"]
    if res.description:
        lines.append(res.description)
    for rule in res.builtin_rules:
        rest = ", ".join(f"{k}={text_value(v)}" for k, v in rule.items() if k != "name")
        lines.append(f"  built-in rule {rule['name']} ([policy]): {rest}")
    for rule in res.rules:
        rest = ", ".join(f"{k}={text_value(v)}" for k, v in rule.items() if k != "name")
        lines.append(f"  rule {rule['name']}: {rest}")
    for b in res.budgets:
        lines.append(
            f"  budget {b.rule}: {b.used} of {b.limit} sat used in {b.period}, {b.left} left"
        )
    for f in res.frozen:
        lines.append(
            f"  frozen: {f.label} since {_when(f.since)}" + (f" ({f.reason})" if f.reason else "")
        )
    for a in res.pending_approvals:
        lines.append(
            f"  approval waiting: {a.pubkey.hex()[:16]}... for {a.txid} until {_when(a.expires)}"
        )
    return Result(res.to_dict(), lines)


def check_text(res: PolicyCheck) -> list[str]:
    lines = [f"decision: {res.decision.upper()} ({res.txid})"]
    if res.amount is not None:
        lines.append(f"leaving: {res.amount} sat (fee {res.fee} sat)")
    for r in res.rules:
        lines.append(f"  {r.decision:7} {r.name}: {r.reason}")
    for b in res.budgets:
        lines.append(f"  budget {b['rule']}: {b['left']} sat left of {b['limit']} in {b['period']}")
    for w in res.warnings:
        lines.append(f"  warning: {w}")
    return lines


@served
def cmd_check(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.cli.bitcoin_cmds import _read_psbt

    cfg = app.config() if app.addr() is None else app.loaded_config()
    psbt = _read_psbt(args.file, cfg.policy.max_psbt_bytes if cfg is not None else None)
    res = app.backend().check_policy(args.key, psbt)
    status = EXIT_NEGATIVE if res.decision == "refuse" else EXIT_OK
    return Result(res.to_dict(), check_text(res), status)


@served
def cmd_request(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.cli.bitcoin_cmds import _read_psbt
    from anyhsm.policy.rules import parse_duration

    seconds = parse_duration(args.expires)
    if seconds is None:
        from anyhsm.errors import UsageError

        raise UsageError(f"--expires {args.expires!r}: write a duration such as 30m, 1h, 24h")
    cfg = app.config() if app.addr() is None else app.loaded_config()
    psbt = _read_psbt(args.file, cfg.policy.max_psbt_bytes if cfg is not None else None)
    res = app.backend().approval_request(args.key, psbt, seconds)
    lines = [
        f"txid: {res.txid}",
        f"policy: {res.policy}",
        f"expires: {res.expires} ({_when(res.expires)})",
    ]
    for r in res.rules:
        lines.append(f"rule {r['rule']} needs {r['m']} of {text_value(r['approvers'])}")
    lines += ["", "approvers sign exactly this message (BIP137 or BIP322 simple):", res.message]
    return Result(res.to_dict(), lines)


@served
def cmd_approve(args: argparse.Namespace, app: App) -> Result:
    txid = args.txid
    if args.psbt:
        from anyhsm.cli.bitcoin_cmds import _read_psbt

        txid = _read_psbt(args.psbt).unique_id()[::-1].hex()
    if not txid:
        from anyhsm.errors import UsageError

        raise UsageError("give the transaction: --txid TXID or --psbt FILE")
    res = app.backend().submit_approval(
        txid, args.pubkey, args.signature, args.expires, args.policy
    )
    return Result(
        res.to_dict(),
        [
            f"approval {res.id} by {res.pubkey.hex()} accepted for {res.txid}",
            f"valid until {_when(res.expires)} for rule(s) {', '.join(res.rules)}; used once",
        ],
    )


def cmd_freeze(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.policy import freeze_key

    res = freeze_key(app.hsm(), args.key, reason=args.reason or "")
    what = "frozen" if res.changed else "was already frozen"
    return Result(
        res.to_dict(), [f"key {res.label} {what}: the spending policy refuses its signing"]
    )


def cmd_unfreeze(args: argparse.Namespace, app: App) -> Result:
    from anyhsm.ops.policy import unfreeze_key

    res = unfreeze_key(app.hsm(), args.key)
    return Result(
        res.to_dict(), [f"key {res.label} " + ("unfrozen" if res.changed else "was not frozen")]
    )


def register(sub: SubParsers) -> None:
    p = sub.add_parser("policy", help="spending policy: set, show, check, request, approve, freeze")
    ps = p.add_subparsers(dest="policy_cmd", required=True)
    s = ps.add_parser("set", help="make a policy file the active spending policy (audited)")
    s.add_argument("file", nargs="?", help="the policy file (default: policy.spending_policy)")
    s.add_argument(
        "--reset-state",
        action="store_true",
        help="start counters, approvals and freezes afresh (when the state is lost or damaged)",
    )
    s.set_defaults(func=cmd_set)
    ps.add_parser(
        "show", help="the active policy, budgets, frozen keys, waiting approvals"
    ).set_defaults(func=cmd_show)
    c = ps.add_parser("check", help="judge a PSBT as signing would, without signing")
    c.add_argument("file", help="PSBT file (base64, hex or binary), or - for stdin")
    c.add_argument("--key", help="the key that would sign (default: any key of the HSM)")
    c.set_defaults(func=cmd_check)
    r = ps.add_parser("request", help="print the message approvers sign for a PSBT")
    r.add_argument("file", help="PSBT file (base64, hex or binary), or - for stdin")
    r.add_argument("--key", help="the key that would sign (default: any key of the HSM)")
    r.add_argument("--expires", default="1h", help="how long the approvals may be used")
    r.set_defaults(func=cmd_request)
    a = ps.add_parser("approve", help="submit an approver's signature (used once, expires)")
    a.add_argument("--txid", help="the unsigned transaction id approved")
    a.add_argument("--psbt", help="or the PSBT file it is of")
    a.add_argument("--pubkey", required=True, help="the approver's public key (hex, 33 bytes)")
    a.add_argument("--signature", required=True, help="BIP137 or BIP322 signature (base64)")
    a.add_argument("--expires", required=True, type=int, help="the expiry signed (Unix time)")
    a.add_argument("--policy", help="the policy SHA-256 signed (checked against the active one)")
    a.set_defaults(func=cmd_approve)
    f = ps.add_parser("freeze", help="refuse everything a key would sign until unfrozen")
    f.add_argument("key", help="key id or label")
    f.add_argument("--reason", help="why (kept in the state and the audit log)")
    f.set_defaults(func=cmd_freeze)
    u = ps.add_parser("unfreeze", help="let a frozen key sign again under the policy")
    u.add_argument("key", help="key id or label")
    u.set_defaults(func=cmd_unfreeze)
