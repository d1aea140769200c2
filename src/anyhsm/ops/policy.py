"""Spending policy operations: set, show, check, approvals, freeze (docs/policy.md).

``set_policy`` is the admin step that makes a policy file active: it is parsed (every
problem reported at once), copied beside the keystore, its SHA-256 bound in authenticated
state (:mod:`anyhsm.policy.anchor`) and the step audited with the old and new hash. The
velocity counters of rules that keep their name, period and buckets are carried over.

``check_psbt`` judges a PSBT as signing would (the signer's own checks first, then every
rule) without signing, debiting or using an approval. ``submit_approval`` verifies an
approver's signature (:mod:`anyhsm.policy.approvals`) and keeps it until it is used or
expires. ``freeze_key`` / ``unfreeze_key`` switch a key off and on. Every step is audited.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anyhsm.errors import (
    ApprovalRejected,
    ConfigError,
    HsmError,
    PolicyNotAuthenticated,
    SigningPolicyError,
    UsageError,
)
from anyhsm.ops.data import Data

if TYPE_CHECKING:
    from anyhsm.bitcoin.psbt import Psbt
    from anyhsm.config import PolicyConfig
    from anyhsm.hsm import Hsm
    from anyhsm.policy.enforce import ActivePolicy
    from anyhsm.policy.engine import Decision
    from anyhsm.types import KeyRef

SIGNING_POLICY_RULE = "signing-policy"
"""The name under which ``check`` reports the signer's own checks when they pass and no
spending policy is active (under one, each built-in rule is reported by its name)."""


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySet(Data):
    """``policy set``: the policy made active and the one it replaced."""

    sha256: str
    previous: str | None
    version: int
    file: Path
    rules: int
    counters_kept: tuple[str, ...]
    state_reset: bool


@dataclass(frozen=True)
class BudgetNow(Data):
    rule: str
    period: str
    limit: int
    used: int
    left: int


@dataclass(frozen=True)
class FrozenKey(Data):
    key: str  # id
    label: str
    reason: str
    since: int
    by: str | None


@dataclass(frozen=True)
class PendingApproval(Data):
    id: str
    txid: str
    pubkey: bytes
    expires: int
    submitted_by: str | None


@dataclass(frozen=True)
class PolicyShow(Data):
    """``policy show``: the active policy (``active`` false: none is set), its rules, the
    budgets as of now, frozen keys and approvals waiting to be used."""

    active: bool
    sha256: str | None
    version: int | None
    required_file: Path | None
    description: str
    rules: tuple[dict[str, object], ...]
    principals: dict[str, list[str]]
    budgets: tuple[BudgetNow, ...]
    frozen: tuple[FrozenKey, ...]
    pending_approvals: tuple[PendingApproval, ...]
    # the built-in rules, implicit from [policy] (evaluated first, for every key)
    builtin_rules: tuple[dict[str, object], ...] = ()


@dataclass(frozen=True)
class RuleVerdict(Data):
    name: str
    decision: str  # allow | warn | refuse
    reason: str
    approved_by: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class PolicyCheck(Data):
    """``policy check``: the decision signing would reach, every rule's verdict (under a
    spending policy the built-in rules ``network``, ``path``, ``sighash``, ``change``,
    ``fee`` first; without one the signer's checks as rule ``signing-policy``, or the
    checks that refused), the velocity budgets and what the spend adds to them."""

    decision: str
    txid: str
    policy: str | None
    keys: tuple[str, ...]
    amount: int | None
    fee: int | None
    rules: tuple[RuleVerdict, ...]
    budgets: tuple[dict[str, object], ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class ApprovalRequest(Data):
    """What approvers must sign for this PSBT under the active policy (the exact
    ``message``), and which rules would ask for approvals."""

    txid: str
    policy: str
    expires: int
    message: str
    rules: tuple[dict[str, object], ...]


@dataclass(frozen=True)
class ApprovalAccepted(Data):
    id: str
    txid: str
    policy: str
    pubkey: bytes
    expires: int
    rules: tuple[str, ...]  # the rules this approver approves for


@dataclass(frozen=True)
class FreezeResult(Data):
    key: str
    label: str
    frozen: bool
    changed: bool


# --- helpers ---------------------------------------------------------------------------------


def _require_active(hsm: Hsm) -> ActivePolicy:
    from anyhsm.policy.enforce import load_active

    active = load_active(hsm)
    if active is None:
        raise PolicyNotAuthenticated(
            "no spending policy is set", hint="run 'anyhsm policy set FILE' first"
        )
    return active


def _now(now: float | None) -> float:
    return time.time() if now is None else now


# --- set -------------------------------------------------------------------------------------


def set_policy(hsm: Hsm, path: Path | str | None = None, *, reset_state: bool = False) -> PolicySet:
    """Make the policy file ``path`` (default: ``policy.spending_policy``) the active one.

    ``reset_state``: start the velocity counters, approvals and freezes afresh; needed
    when the state cannot be read (missing or damaged). The binding moves in the keystore
    manifest, audited by the handle as ``policy_set`` ("started" with the old and new
    SHA-256 before it changes, then "ok" or the error); the file's copy is written
    before, under its hash's name, so no signer sees the binding without it, and the
    state carried over after (counters of rules that keep name, period and buckets)."""
    from anyhsm.fsutil import atomic_write, make_private_dir
    from anyhsm.policy.anchor import ManifestAnchor, policy_file
    from anyhsm.policy.enforce import state_dir, state_store
    from anyhsm.policy.engine import keep_counters
    from anyhsm.policy.rules import looser_than, parse_policy
    from anyhsm.policy.state import PolicyState

    cfg = hsm.config
    file = Path(path) if path is not None else cfg.policy.spending_policy
    if file is None:
        raise UsageError(
            "name the policy file (anyhsm policy set FILE), or set policy.spending_policy"
        )
    try:
        data = file.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read the policy file {file}: {e.strerror}") from None
    policy = parse_policy(data, cfg.network, source=f"policy file {file}")
    looser = looser_than(policy, cfg.policy)
    if looser:
        raise ConfigError(
            f"policy file {file} has {len(looser)} problem(s): " + "; ".join(looser[:5]),
            hint="a policy file can only tighten the [policy] settings of the configuration; "
            "to loosen one, change [policy] itself (then 'anyhsm config check')",
            problems=looser,
        )
    directory = state_dir(cfg)
    anchor = ManifestAnchor(hsm)
    store = state_store(hsm, directory)
    with store.transaction() as txn:
        previous = anchor.binding()
        try:
            # once a policy was set, a missing state is a loss to be reset explicitly
            state = txn.read() if previous is not None else txn.read_or_new()
        except PolicyNotAuthenticated:
            if not reset_state:
                raise
            state = PolicyState()
        if reset_state:
            state = PolicyState(seq=state.seq)
        detail = {
            "file": str(file)[:300],
            "old": previous.sha256 if previous is not None else "none",
            "new": policy.sha256,
            "rules": str(len(policy.rules)),
            "reset_state": str(reset_state).lower(),
        }
        kept = keep_counters(policy, state)
        make_private_dir(directory)
        copy = policy_file(directory, policy.sha256)
        atomic_write(copy, data)  # named by no binding yet: nothing reads it
        binding = anchor.bind(policy.sha256, detail)
        committed = txn.commit(kept)
        # the binding's policy_set entries precede the commit: this one carries its
        # state_seq, under the lock (the rollback check reads the newest from the log)
        hsm.record_event(
            "policy_state",
            "ok",
            {
                "state_seq": str(committed.seq),
                "reason": "policy_set",
                "reset_state": str(reset_state).lower(),
            },
        )
    for old in directory.glob("policy-*.toml"):
        if old != copy:
            old.unlink(missing_ok=True)
    return PolicySet(
        sha256=policy.sha256,
        previous=previous.sha256 if previous is not None else None,
        version=binding.version,
        file=file,
        rules=len(policy.rules),
        counters_kept=tuple(sorted(kept.counters)),
        state_reset=reset_state,
    )


# --- show ------------------------------------------------------------------------------------


def show_policy(hsm: Hsm, *, now: float | None = None) -> PolicyShow:
    """The active policy and its state; ``active`` false when none is set (and none is
    required). A policy that cannot be trusted raises, as signing would."""
    from anyhsm.policy.enforce import load_active, state_store

    cfg = hsm.config
    active = load_active(hsm)
    if active is None:
        return PolicyShow(False, None, None, cfg.policy.spending_policy, "", (), {}, (), (), ())
    with state_store(hsm, active.directory).transaction() as txn:
        state = txn.read()
    t = _now(now)
    policy = active.policy
    budgets = []
    for rule in policy.rules:
        if rule.max_per_period_sat is None or rule.period_s is None:
            continue
        c = state.counters.get(rule.name)
        used = c.used(t) if c is not None and c.fits(rule.period_s, rule.bucket_width_s) else 0
        from anyhsm.policy.rules import format_duration

        budgets.append(
            BudgetNow(
                rule.name,
                format_duration(rule.period_s),
                rule.max_per_period_sat,
                used,
                max(0, rule.max_per_period_sat - used),
            )
        )
    return PolicyShow(
        active=True,
        sha256=policy.sha256,
        version=active.binding.version,
        required_file=cfg.policy.spending_policy,
        description=policy.description,
        rules=tuple(r.describe() for r in policy.rules),
        principals={k: sorted(p.hex() for p in v) for k, v in policy.principals.items()},
        budgets=tuple(budgets),
        frozen=tuple(
            FrozenKey(k, f.label, f.reason, f.since, f.by) for k, f in sorted(state.frozen.items())
        ),
        pending_approvals=tuple(
            PendingApproval(a.id, a.txid, a.pubkey, a.expires, a.submitted_by)
            for a in state.pending
            if a.expires > t and a.policy == policy.sha256
        ),
        builtin_rules=builtin_rules(cfg.policy),
    )


def builtin_rules(floor: PolicyConfig) -> tuple[dict[str, object], ...]:
    """The built-in rules as ``[policy]`` sets them, in their order of evaluation."""
    from anyhsm.bitcoin.sighash import sighash_name

    paths: dict[str, object] = {"allowed_input_paths": list(floor.allowed_input_paths) or None}
    if floor.key_input_paths:
        paths["key_input_paths"] = {k: list(v) for k, v in floor.key_input_paths.items()}
    return (
        {"name": "network", "action": "refuse", "global_xpubs": "of the configured network"},
        {"name": "path", "action": "refuse", **paths},
        {
            "name": "sighash",
            "action": "refuse",
            "allowed_sighash_types": [sighash_name(t) for t in floor.allowed_sighash_types],
        },
        {"name": "change", "action": "warn", "max_change_index": floor.max_change_index},
        {
            "name": "fee",
            "action": "refuse",
            "max_fee_sat": floor.max_fee_sat or None,
            "max_fee_rate_sat_vb": floor.max_fee_rate_sat_vb or None,
        },
    )


# --- check -----------------------------------------------------------------------------------


def _verdicts(decision: Decision) -> tuple[RuleVerdict, ...]:
    return tuple(RuleVerdict(r.name, r.decision, r.reason, r.approved_by) for r in decision.rules)


def check_psbt(
    hsm: Hsm, psbt: Psbt | bytes | str, key: KeyRef | None = None, *, now: float | None = None
) -> PolicyCheck:
    """The decision signing ``psbt`` with ``key`` (None: any key) would reach, without
    signing, debiting or using an approval; audited (``policy_check``)."""
    from anyhsm.bitcoin.signer import analyse_psbt
    from anyhsm.ops.psbt import parse_psbt
    from anyhsm.policy.enforce import (
        PolicyGate,
        decision_detail,
        load_active,
        requester,
        state_store,
    )

    cfg = hsm.config
    if isinstance(psbt, bytes | str):
        psbt = parse_psbt(psbt, max_bytes=cfg.policy.max_psbt_bytes)
    active = load_active(hsm)
    txid = psbt.unique_id()[::-1].hex()
    try:
        spend = analyse_psbt(
            hsm,
            psbt,
            key,
            policy=cfg.policy,
            network=hsm.network,
            environment=cfg.environment,
            builtin_rules=active is not None,
        )
    except SigningPolicyError as e:
        verdicts = tuple(
            RuleVerdict(str(d.get("rule") or "signing-policy"), "refuse", str(d.get("message", "")))
            for d in e.details
        ) or (RuleVerdict(SIGNING_POLICY_RULE, "refuse", e.message),)
        res = PolicyCheck(
            "refuse",
            txid,
            None if active is None else active.policy.sha256,
            (),
            None,
            None,
            verdicts,
            (),
            (),
        )
        _audit_check(hsm, res)
        return res
    if active is None:
        builtin = RuleVerdict(
            SIGNING_POLICY_RULE,
            "allow",
            f"fee {spend.fee} sat ({spend.fee / spend.vsize if spend.vsize else 0:.2f} sat/vB "
            f"over ~{spend.vsize} vB) within policy.max_fee_sat / max_fee_rate_sat_vb; sighash "
            "types, input paths, previous transactions, change and network checked",
        )
        res = PolicyCheck(
            "warn" if spend.warnings else "allow",
            spend.txid,
            None,
            tuple(k.label for k in spend.keys),
            spend.leaving,
            spend.fee,
            (builtin,),
            (),
            spend.warnings,
        )
        _audit_check(hsm, res)
        return res
    gate = PolicyGate(hsm, active, state_store(hsm, active.directory), clock=lambda: _now(now))
    decision = gate.check(spend)
    res = PolicyCheck(
        decision.decision,
        decision.txid,
        decision.policy,
        decision.keys,
        decision.amount,
        decision.fee,
        _verdicts(decision),  # the built-in rules first, each by its name
        tuple(b.to_dict() for b in decision.budgets),
        decision.warnings,
    )
    hsm.record_event("policy_check", "ok", decision_detail(decision, requester()))
    return res


def _audit_check(hsm: Hsm, res: PolicyCheck) -> None:
    detail = {
        "txid": res.txid,
        "decision": res.decision,
        "rules": ",".join(r.name for r in res.rules)[:300],
    }
    hsm.record_event("policy_check", "ok", detail)


# --- approvals -------------------------------------------------------------------------------


def approval_request(
    hsm: Hsm,
    psbt: Psbt | bytes | str,
    key: KeyRef | None = None,
    *,
    expires_in: int = 3600,
    now: float | None = None,
) -> ApprovalRequest:
    """The message approvers sign for ``psbt`` under the active policy, valid for
    ``expires_in`` seconds, and the rules that would need their approvals."""
    from anyhsm.policy.approvals import approval_message

    active = _require_active(hsm)
    check = check_psbt(hsm, psbt, key, now=now)
    expires = int(_now(now)) + expires_in
    needs: list[dict[str, object]] = []
    for rule in active.policy.rules:
        verdict = next((v for v in check.rules if v.name == rule.name), None)
        if rule.approvals is not None and verdict is not None and verdict.decision == "refuse":
            needs.append(
                {
                    "rule": rule.name,
                    "m": rule.approvals.m,
                    "approvers": [a.hex() for a in rule.approvals.approvers],
                    "reason": verdict.reason,
                }
            )
    return ApprovalRequest(
        check.txid,
        active.policy.sha256,
        expires,
        approval_message(check.txid, active.policy.sha256, expires),
        tuple(needs),
    )


def submit_approval(
    hsm: Hsm,
    txid: str,
    pubkey: str | bytes,
    signature: str,
    expires: int,
    *,
    policy: str | None = None,
    now: float | None = None,
) -> ApprovalAccepted:
    """Verify an approval and keep it for the signing of ``txid``; ApprovalRejected (and
    an audit entry "refused") when the key is not an approver of the active policy, the
    policy named is not the active one, it expired or lives longer than allowed, it was
    used already, or the signature is not the key's over the approval message."""
    from anyhsm.policy.approvals import (
        APPROVAL_RULE,
        approval_id,
        approval_message,
        verify_approval,
    )
    from anyhsm.policy.enforce import requester, state_store
    from anyhsm.policy.state import MAX_APPROVALS, MAX_USED, Approval

    detail = {"txid": txid.strip().lower()[:64], "expires": str(expires)}
    try:  # every submission is audited, also one no policy could take
        active = _require_active(hsm)
        pub = pubkey if isinstance(pubkey, bytes) else _hex_key(pubkey)
    except HsmError as e:
        reason = {"reason": e.message[:300]}
        hsm.record_event("policy_approval", "refused", detail | reason, error=e.code)
        raise
    pol = active.policy
    txid = txid.strip().lower()
    t = _now(now)
    detail["pubkey"] = pub.hex()

    def reject(message: str, hint: str | None = None) -> ApprovalRejected:
        hsm.record_event(
            "policy_approval",
            "refused",
            detail | {"reason": message[:300]},
            error=ApprovalRejected.code,
        )
        return ApprovalRejected(message, hint=hint, rules=[APPROVAL_RULE])

    if policy is not None and policy.strip().lower() != pol.sha256:
        raise reject(
            f"the approval is for policy {policy.strip()[:64]}, not the active policy {pol.sha256}",
            "ask the approver to sign the message 'anyhsm policy request' prints now",
        )
    rules = tuple(
        r.name for r in pol.rules if r.approvals is not None and pub in r.approvals.approvers
    )
    if not rules:
        raise reject(f"{pub.hex()} is not an approver of any rule of the active policy")
    message = approval_message(txid, pol.sha256, expires)
    if expires <= t:
        raise reject("the approval has expired")
    if expires - t > pol.approval_max_age(pub):
        raise reject(
            f"the approval expires in {int(expires - t)} s, later than its rules allow "
            f"({pol.approval_max_age(pub)} s)"
        )
    if not verify_approval(message, pub, signature, hsm.network):
        raise reject(
            "the signature is not this approver's over the approval message (wrong key, "
            "another transaction or policy version, or damaged)",
            "sign exactly the message 'anyhsm policy request PSBT' prints, with the key declared "
            "in the policy (BIP137 or BIP322 simple for its P2WPKH address)",
        )
    ident = approval_id(message, pub)
    with state_store(hsm, active.directory).transaction() as txn:
        state = txn.read().pruned(t)
        if ident in state.used:
            raise reject("this approval was used already (approvals are single-use)")
        if all(a.id != ident for a in state.pending):
            if len(state.pending) >= MAX_APPROVALS or len(state.used) >= MAX_USED:
                raise reject("too many approvals are waiting; try again when some have expired")
            from dataclasses import replace

            new = Approval(ident, txid, pol.sha256, pub, expires, requester())
            state = replace(state, pending=(*state.pending, new))
        committed = txn.commit(state)
        ok = {"id": ident, "rules": ",".join(rules)[:300], "state_seq": str(committed.seq)}
        hsm.record_event("policy_approval", "ok", detail | ok)  # under the lock
    return ApprovalAccepted(ident, txid, pol.sha256, pub, expires, rules)


def _hex_key(text: str) -> bytes:
    try:
        pub = bytes.fromhex(text.strip())
    except ValueError:
        pub = b""
    if len(pub) != 33:
        raise ApprovalRejected(
            "an approver key is 33 bytes of hex (a compressed public key)",
            rules=["approval"],
        )
    return pub


# --- freeze ----------------------------------------------------------------------------------


def freeze_key(
    hsm: Hsm, key: KeyRef, *, reason: str = "", now: float | None = None
) -> FreezeResult:
    """Freeze ``key``: the spending policy refuses everything it would sign (rule
    ``frozen``) until :func:`unfreeze_key`. Audited (``policy_freeze``)."""
    return _set_frozen(hsm, key, True, reason, now)


def unfreeze_key(hsm: Hsm, key: KeyRef, *, now: float | None = None) -> FreezeResult:
    return _set_frozen(hsm, key, False, "", now)


def _set_frozen(
    hsm: Hsm, key: KeyRef, frozen: bool, reason: str, now: float | None
) -> FreezeResult:
    from dataclasses import replace

    from anyhsm.policy.enforce import requester, state_store
    from anyhsm.policy.state import Frozen

    active = _require_active(hsm)
    info = hsm.get_key(key)
    op = "policy_freeze" if frozen else "policy_unfreeze"
    detail = {"label": info.label}
    if reason:
        detail["reason"] = reason[:200]
    with state_store(hsm, active.directory).transaction() as txn:
        state = txn.read()
        was = info.id in state.frozen
        detail["changed"] = str(frozen != was).lower()
        if frozen != was:
            table = dict(state.frozen)
            if frozen:
                table[info.id] = Frozen(info.label, reason[:200], int(_now(now)), requester())
            else:
                del table[info.id]
            committed = txn.commit(replace(state, frozen=table))
            detail["state_seq"] = str(committed.seq)
            hsm.record_event(op, "ok", detail, key_id=info.id)  # under the lock
    if frozen == was:
        hsm.record_event(op, "noop", detail, key_id=info.id)
    return FreezeResult(info.id, info.label, frozen, frozen != was)


__all__ = [
    "ApprovalAccepted",
    "ApprovalRequest",
    "FreezeResult",
    "PolicyCheck",
    "PolicySet",
    "PolicyShow",
    "approval_request",
    "builtin_rules",
    "check_psbt",
    "freeze_key",
    "set_policy",
    "show_policy",
    "submit_approval",
    "unfreeze_key",
]
