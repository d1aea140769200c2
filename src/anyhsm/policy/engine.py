"""The spending policy engine: a decision from the rules, the spend and the state.

Pure functions over values (no files, no clock, no handle): :func:`evaluate` judges a
:class:`~anyhsm.policy.gate.SpendSummary` under a :class:`~anyhsm.policy.rules.SpendingPolicy`
and a :class:`~anyhsm.policy.state.PolicyState` at a time ``now``; :func:`apply` gives the
state after an allowed spend (its debits and the approvals it used); :func:`compensate`
takes them back.

Order of evaluation (docs/policy.md, "Order"), after the signer's integrity checks
(resource limits, previous transactions and amounts, negative fee, weight, sighash types
ECDSA cannot use), which refuse on their own:

0. The built-in rules, implicit from ``[policy]``, as the signer judged them (its
   :class:`~anyhsm.bitcoin.policy.SigningFacts`): ``network``, ``path``, ``sighash``,
   ``change`` (warns only), ``fee``; for every key, never approved, never downgraded.
1. ``frozen``: a signing key frozen by ``anyhsm policy freeze`` refuses.
2. ``no-rule-matched``: a signing key that no rule names (by label or id, or a rule
   without ``keys``) refuses: the policy allows only what it declares.
3. Every rule that names a signing key, in file order. Within a rule its conditions in
   this order: time window, output shape (``max_inputs``, ``max_outputs``,
   ``script_types``, ``op_return``, ``own_outputs``), the built-in conditions
   (``coin_type``, ``input_paths``, ``sighash_types``, ``max_change_index``,
   ``max_fee_sat``, ``max_fee_rate_sat_vb``: they tighten the implicit rules for the
   rule's keys), ``destinations``, ``max_per_tx_sat``, ``max_per_period_sat``. A rule
   whose conditions all hold allows; a broken rule refuses (``action = "refuse"``, the
   default) unless it declares ``approvals`` and M valid ones
   are there (then it allows, "approved"), or only warns (``action = "warn"``).

The transaction is refused if any result refuses (every refusing rule is named), else it
warns if any warns, else it is allowed. An allowed (or warned) spend is debited from every
velocity counter of the rules that applied.

The amount a rule judges is what leaves the wallet: every output that is not change, plus
the fee. One transaction (by unsigned txid) is debited at most once per rule: signing the
same PSBT again, or with a second key of a multisig, spends the same coins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from anyhsm.bitcoin.bip32 import HARDENED, format_path
from anyhsm.bitcoin.policy import (
    SigningFacts,
    fee_problems,
    fee_text,
    sighash_problem,
)
from anyhsm.policy.gate import SpendSummary
from anyhsm.policy.rules import (
    FROZEN_RULE,
    NO_RULE,
    Action,
    Rule,
    SpendingPolicy,
)
from anyhsm.policy.state import MAX_DEBITS, Approval, Debit, PolicyState
from anyhsm.policy.velocity import Counter

ALLOW = "allow"
WARN = "warn"
REFUSE = "refuse"


def sat(amount: int) -> str:
    """``12000000 sat (0.12 BTC)``."""
    whole, frac = divmod(abs(amount), 100_000_000)  # exact, and cheaper than a float's text
    sign = "-" if amount < 0 else ""
    btc = f"{sign}{whole}.{frac:08d}".rstrip("0") if frac else f"{sign}{whole}"
    return f"{amount} sat ({btc} BTC)"


@dataclass(frozen=True)
class Budget:
    """A velocity counter as the decision saw it: ``used`` before this spend."""

    rule: str
    period: str
    limit: int
    used: int
    amount: int  # what this spend adds (0 when already counted for this transaction)

    @property
    def left(self) -> int:
        return max(0, self.limit - self.used)

    def to_dict(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "period": self.period,
            "limit": self.limit,
            "used": self.used,
            "left": self.left,
            "amount": self.amount,
        }


class RuleResult:
    """One rule's verdict on a spend (``decision``: allow, warn or refuse).

    The reason of a rule that allowed is written only when somebody reads it (``policy
    check``, the CLI's report): signing needs the verdicts and the names, and building
    the text of every rule that held was most of an evaluation's cost. ``explain`` makes
    it (a pure function of values that do not change)."""

    __slots__ = ("_explain", "_reason", "approved_by", "budget", "decision", "name")

    def __init__(
        self,
        name: str,
        decision: str,
        reason: str = "",
        approved_by: tuple[bytes, ...] = (),
        budget: Budget | None = None,
        *,
        explain: Callable[[], str] | None = None,
    ) -> None:
        self.name = name
        self.decision = decision
        self._reason = reason
        self._explain = explain
        self.approved_by = approved_by
        self.budget = budget

    @property
    def reason(self) -> str:
        if self._explain is not None:
            self._reason, self._explain = self._explain(), None
        return self._reason

    def _fields(self) -> tuple[object, ...]:
        return (self.name, self.decision, self.reason, self.approved_by, self.budget)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RuleResult):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return f"RuleResult(name={self.name!r}, decision={self.decision!r}, reason={self.reason!r})"

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "name": self.name,
            "decision": self.decision,
            "reason": self.reason,
        }
        out["approved_by"] = [p.hex() for p in self.approved_by]
        return out


@dataclass(frozen=True)
class Decision:
    """The engine's answer for one spend."""

    decision: str
    rules: tuple[RuleResult, ...]
    txid: str
    policy: str  # the policy's SHA-256
    keys: tuple[str, ...]  # labels of the signing keys
    amount: int  # leaving the wallet: outputs that are not change, plus the fee
    fee: int
    budgets: tuple[Budget, ...]
    approvals: tuple[Approval, ...] = ()  # the approvals this spend uses
    warnings: tuple[str, ...] = ()

    @property
    def refused(self) -> bool:
        return self.decision == REFUSE

    @property
    def refusing(self) -> list[str]:
        return [r.name for r in self.rules if r.decision == REFUSE]

    @property
    def warning(self) -> list[str]:
        return [r.name for r in self.rules if r.decision == WARN]

    @property
    def approved(self) -> list[str]:
        return [r.name for r in self.rules if r.approved_by]

    def summary(self) -> str:
        """One line: what was decided and by which rules."""
        if self.refused:
            first = next(r for r in self.rules if r.decision == REFUSE)
            more = len(self.refusing) - 1
            return f"refused by rule {first.name}: {first.reason}" + (
                f" (and {more} more rule{'s' if more > 1 else ''}: "
                + ", ".join(self.refusing[1:])
                + ")"
                if more
                else ""
            )
        if self.warning:
            return f"allowed with warnings from {', '.join(self.warning)}"
        return "allowed by " + (", ".join(r.name for r in self.rules) or "no rule")

    def to_dict(self) -> dict[str, object]:
        return {
            "decision": self.decision,
            "txid": self.txid,
            "policy": self.policy,
            "keys": list(self.keys),
            "amount": self.amount,
            "fee": self.fee,
            "rules": [r.to_dict() for r in self.rules],
            "budgets": [b.to_dict() for b in self.budgets],
            "approvals": [a.id for a in self.approvals],
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class _Facts:
    """What the rules look at, computed once per spend."""

    leaving: int
    paid: tuple[tuple[bytes, int], ...]  # (scriptPubKey, amount) of outputs that are not change
    kinds: frozenset[str]  # script types of outputs that are not change
    op_return: bool
    own_not_change: tuple[int, ...]  # indexes of outputs paying our key outside the change rules
    inputs: int
    outputs: int

    @classmethod
    def of(cls, spend: SpendSummary) -> _Facts:
        paid: list[tuple[bytes, int]] = []
        kinds: set[str] = set()
        own: list[int] = []
        op_return = False
        leaving = max(spend.fee, 0)
        for o in spend.outputs:  # one pass: this runs for every PSBT signed
            kind = o.script_type
            if kind == "op-return":
                op_return = True
            if o.change:
                continue
            leaving += o.amount
            kinds.add(kind)
            if not (kind == "op-return" and o.amount == 0):
                paid.append((o.script_pubkey, o.amount))
            if o.not_change is not None:
                own.append(o.index)
        return cls(
            leaving=leaving,
            paid=tuple(paid),
            kinds=frozenset(kinds),
            op_return=op_return,
            own_not_change=tuple(own),
            inputs=spend.inputs,
            outputs=len(spend.outputs),
        )


_applicable: dict[tuple[str, str, tuple[tuple[str, str], ...]], tuple[Rule, ...]] = {}


def applicable(policy: SpendingPolicy, spend: SpendSummary) -> tuple[Rule, ...]:
    """The rules that name any signing key, in file order (names are unique)."""
    keys = tuple((k.label, k.id) for k in spend.keys)
    ident = (policy.sha256, policy.network.value, keys)
    found = _applicable.get(ident)
    if found is None:
        found = tuple(r for r in policy.rules if any(r.applies_to(lb, i) for lb, i in keys))
        if len(_applicable) > 256:
            _applicable.clear()
        _applicable[ident] = found
    return found


def evaluate(
    policy: SpendingPolicy,
    spend: SpendSummary,
    state: PolicyState,
    now: float,
    requester: str | None = None,
) -> Decision:
    """The decision for ``spend`` at ``now`` (see the module doc for the order)."""
    facts = _Facts.of(spend)
    signed = spend.facts
    results: list[RuleResult] = []
    if signed is not None:  # the implicit built-in rules, as judged under [policy]
        results.extend(RuleResult(v.rule, v.decision, v.reason) for v in signed.builtin)
    for k in spend.keys:
        frozen = state.frozen.get(k.id)
        if frozen is not None:
            since = datetime.fromtimestamp(frozen.since, UTC).strftime("%Y-%m-%d %H:%M UTC")
            why = f": {frozen.reason}" if frozen.reason else ""
            results.append(
                RuleResult(FROZEN_RULE, REFUSE, f"key {k.label} is frozen since {since}{why}")
            )
    for k in spend.keys:
        if not any(r.applies_to(k.label, k.id) for r in policy.rules):  # rules_for, lazily
            results.append(
                RuleResult(
                    NO_RULE,
                    REFUSE,
                    f"no rule of the policy names key {k.label} (add a rule with keys = "
                    f'["{k.label}"], or one without keys)',
                )
            )
    own = policy.principals.get(requester or "", frozenset())
    used_now: list[Approval] = []
    budgets: list[Budget] = []
    when = datetime.fromtimestamp(now, UTC)
    debited = state.debited(spend.txid)
    for rule in applicable(policy, spend):
        result = _judge(
            rule, facts, spend, signed, policy, state, now, when, own, used_now, debited, False
        )
        results.append(result)
        if result.budget is not None:
            budgets.append(result.budget)
    refused = any(r.decision == REFUSE for r in results)
    warned = any(r.decision == WARN for r in results)
    return Decision(
        decision=REFUSE if refused else WARN if warned else ALLOW,
        rules=tuple(results),
        txid=spend.txid,
        policy=policy.sha256,
        keys=tuple(k.label for k in spend.keys),
        amount=facts.leaving,
        fee=spend.fee,
        budgets=tuple(budgets),
        approvals=() if refused else tuple(used_now),
        warnings=spend.warnings,
    )


def _judge(
    rule: Rule,
    facts: _Facts,
    spend: SpendSummary,
    signed: SigningFacts | None,
    policy: SpendingPolicy,
    state: PolicyState,
    now: float,
    when: datetime,
    own: frozenset[bytes],
    used_now: list[Approval],
    debited: frozenset[str],
    text: bool,
) -> RuleResult:
    """``rule``'s verdict. Without ``text`` the reasons of conditions that held are not
    written: an allowing verdict then makes them when its reason is read, by judging
    again with ``text`` (from the same immutable values)."""
    broken: list[str] = []
    held: list[str] | None = [] if text else None
    if rule.window is not None and not rule.window.contains(when):
        broken.append(f"outside its time window ({rule.window.text})")
    if rule.max_inputs is not None and facts.inputs > rule.max_inputs:
        broken.append(f"{facts.inputs} inputs, more than max_inputs = {rule.max_inputs}")
    if rule.max_outputs is not None and facts.outputs > rule.max_outputs:
        broken.append(f"{facts.outputs} outputs, more than max_outputs = {rule.max_outputs}")
    if rule.script_types is not None:
        other = sorted(facts.kinds - rule.script_types)
        if other:
            broken.append(
                f"pays {', '.join(other)} outputs (script_types allows "
                + (", ".join(sorted(rule.script_types)) or "none")
                + ")"
            )
    if not rule.op_return and facts.op_return:
        broken.append("has an OP_RETURN output (op_return = false)")
    if not rule.own_outputs and facts.own_not_change:
        shown = ", ".join(str(i) for i in facts.own_not_change)
        broken.append(
            f"output(s) {shown} pay our own key outside the change rules (own_outputs = false)"
        )
    if rule.signing_checks:
        _builtin_conditions(rule, spend, signed, broken, held if held is not None else [])
    if rule.destinations is not None:
        outside = [(spk, amount) for spk, amount in facts.paid if spk not in rule.destinations]
        total = sum(a for _, a in outside)
        if outside and total > rule.max_outside_sat:
            limit = (
                f", above max_outside_sat = {sat(rule.max_outside_sat)}"
                if rule.max_outside_sat
                else ""
            )
            broken.append(
                f"{len(outside)} output(s) paying {sat(total)} go to destinations outside its "
                f"list of {rule.destination_count}{limit}"
            )
        elif held is not None:
            held.append("every destination listed")
    if rule.max_per_tx_sat is not None:
        if facts.leaving > rule.max_per_tx_sat:
            broken.append(
                f"{sat(facts.leaving)} leaves (outputs that are not change, plus the fee), more "
                f"than max_per_tx_sat = {sat(rule.max_per_tx_sat)}"
            )
        elif held is not None:
            held.append(f"{sat(facts.leaving)} of max {sat(rule.max_per_tx_sat)} per transaction")
    budget: Budget | None = None
    if rule.max_per_period_sat is not None and rule.period_s is not None:
        counter = state.counters.get(rule.name)
        used = 0
        if counter is not None and counter.fits(rule.period_s, rule.bucket_width_s):
            used = counter.used(now)
        counted = rule.name in debited
        amount = 0 if counted else facts.leaving
        period = rule.period_text
        budget = Budget(rule.name, period, rule.max_per_period_sat, used, amount)
        if used + amount > rule.max_per_period_sat:
            broken.append(
                f"{sat(amount)} would make {sat(used + amount)} in {period}, more than "
                f"max_per_period_sat = {sat(rule.max_per_period_sat)} ({sat(budget.left)} left)"
            )
        elif held is not None:
            note = " (this transaction is already counted)" if counted else ""
            held.append(f"{sat(used + amount)} of {sat(rule.max_per_period_sat)} in {period}{note}")
    if not broken:
        if held is not None:
            return RuleResult(rule.name, ALLOW, "; ".join(held) or "no condition", budget=budget)
        return RuleResult(
            rule.name,
            ALLOW,
            budget=budget,
            explain=lambda: (
                _judge(
                    rule, facts, spend, signed, policy, state, now, when, own, [], debited, True
                ).reason
            ),
        )
    reason = "; ".join(broken)
    if rule.action is Action.WARN:
        return RuleResult(rule.name, WARN, reason, budget=budget)
    if rule.approvals is None:
        return RuleResult(rule.name, REFUSE, reason, budget=budget)
    valid, refused_own = _approvals_for(rule, spend, policy, state, now, own)
    need = rule.approvals.m
    if len(valid) >= need:
        chosen = list(valid.values())[:need]
        used_now.extend(a for a in chosen if all(a.id != u.id for u in used_now))
        by = tuple(a.pubkey for a in chosen)
        return RuleResult(
            rule.name,
            ALLOW,
            f"approved by {need} of {len(rule.approvals.approvers)} approvers: {reason}",
            approved_by=by,
            budget=budget,
        )
    own_note = (
        f"; {refused_own} approval(s) by the requester's own key not counted" if refused_own else ""
    )
    return RuleResult(
        rule.name,
        REFUSE,
        f"{reason}; needs {need} of {len(rule.approvals.approvers)} approvals, has "
        f"{len(valid)}{own_note}",
        budget=budget,
    )


_ACCOUNT_PURPOSES = frozenset(p | HARDENED for p in (44, 49, 84, 86, 48))
_SHOWN = 3  # findings of one condition shown in a reason before "(and N more)"


def _listed(found: list[str]) -> str:
    more = len(found) - _SHOWN
    return "; ".join(found[:_SHOWN]) + (f" (and {more} more)" if more > 0 else "")


def _builtin_conditions(
    rule: Rule,
    spend: SpendSummary,
    signed: SigningFacts | None,
    broken: list[str],
    held: list[str],
) -> None:
    """The built-in conditions of a file rule, judged for the signatures of the rule's
    keys (they tighten the implicit rules; the signer has applied ``[policy]``)."""
    where = f"rules.{rule.name}."
    needs_facts = (
        rule.coin_type
        or rule.input_paths is not None
        or rule.sighash_types is not None
        or rule.max_change_index is not None
    )
    if needs_facts and signed is None:  # fail closed: nothing to judge them by
        broken.append(
            "the signer gave no facts to judge its coin_type / input_paths / sighash_types / "
            "max_change_index by"
        )
    elif signed is not None:
        mine = [s for s in signed.signing if rule.applies_to(s.label, s.key_id)]
        ids = {k.label: k.id for k in spend.keys}
        change = [
            o
            for o in signed.change
            if o.owner is not None and rule.applies_to(o.owner, ids.get(o.owner, ""))
        ]
        if rule.coin_type:
            coin = 0 if signed.network.value == "mainnet" else 1
            bad = [
                f"input {s.index}: key {s.label} at {format_path(s.path)}"
                for s in mine
                if s.path is not None and _other_coin(s.path, coin)
            ] + [
                f"change output {o.index} at {format_path(o.steps)}"
                for o in change
                if o.steps is not None and _other_coin(o.steps, coin)
            ]
            if bad:
                broken.append(
                    f"{_listed(bad)}: a coin type other than {signed.network.value}'s ({coin}) "
                    "(coin_type = true)"
                )
            else:
                held.append(f"every path has {signed.network.value}'s coin type")
        if rule.input_paths is not None:
            kp = rule.input_paths
            bad = []
            for s in mine:
                if s.path is None:
                    continue
                why = kp.input_problem(s.path, signed.network)
                if why is not None:
                    bad.append(f"input {s.index}: key {s.label}: {why}")
            if bad:
                broken.append(_listed(list(dict.fromkeys(bad))))
            else:
                held.append("every input path under input_paths")
        if rule.sighash_types is not None:
            setting = where + "sighash_types"
            bad = []
            for s in mine:
                why = sighash_problem(s.sighash, rule.sighash_types, setting)
                if why is not None:
                    bad.append(f"input {s.index}: {why}")
            if bad:
                broken.append(_listed(bad))
            else:
                held.append("every sighash type allowed")
        if rule.max_change_index is not None:
            limit = rule.max_change_index
            bad = [
                f"change output {o.index} at {format_path(o.steps)}"
                for o in change
                if o.steps and o.steps[-1] & ~HARDENED >= limit
            ]
            if bad:
                broken.append(f"{_listed(bad)}: index not below {where}max_change_index = {limit}")
            else:
                held.append(f"change below index {limit}")
    if rule.max_fee_sat is not None or rule.max_fee_rate_sat_vb is not None:
        rate = spend.fee / spend.vsize if spend.vsize else 0.0
        fee = fee_problems(
            spend.fee, spend.vsize, rate, rule.max_fee_sat, rule.max_fee_rate_sat_vb, where
        )
        if fee:
            broken.append("; ".join(m for _, m in fee))
        else:
            held.append(fee_text(spend.fee, spend.vsize, rate) + " within its fee limits")


def _other_coin(path: tuple[int, ...], coin: int) -> bool:
    """A BIP44/49/84/86/48 path whose coin type is not ``coin``."""
    return len(path) >= 2 and path[0] in _ACCOUNT_PURPOSES and path[1] != coin | HARDENED


def _approvals_for(
    rule: Rule,
    spend: SpendSummary,
    policy: SpendingPolicy,
    state: PolicyState,
    now: float,
    own: frozenset[bytes],
) -> tuple[dict[bytes, Approval], int]:
    """The valid approvals of ``rule``'s approvers for this spend, one per approver, and
    how many were not counted because the key is the requester's own."""
    assert rule.approvals is not None
    approvers = set(rule.approvals.approvers)
    valid: dict[bytes, Approval] = {}
    refused_own = 0
    for a in state.pending:
        if (
            a.txid != spend.txid
            or a.policy != policy.sha256
            or a.expires <= now
            or a.pubkey not in approvers
            or a.id in state.used
        ):
            continue
        if a.pubkey in own:
            refused_own += 1
            continue
        valid.setdefault(a.pubkey, a)
    return valid, refused_own


def apply(
    policy: SpendingPolicy, spend: SpendSummary, decision: Decision, state: PolicyState, now: float
) -> tuple[PolicyState, tuple[Debit, ...]]:
    """The state after ``decision`` (allowed or warned) is carried out: the amount debited
    from every velocity counter of the rules that applied (once per transaction), the
    approvals it used recorded as used."""
    assert not decision.refused
    counters = dict(state.counters)
    debits: list[Debit] = []
    debited = state.debited(spend.txid)
    for rule in applicable(policy, spend):
        if rule.max_per_period_sat is None or rule.period_s is None or rule.name in debited:
            continue
        width = rule.bucket_width_s
        counter = counters.get(rule.name)
        if counter is None or not counter.fits(rule.period_s, width):
            counter = Counter.empty(rule.period_s, width, now)
        counters[rule.name], bucket = counter.debit(decision.amount, now)
        debits.append(Debit(spend.txid, rule.name, decision.amount, bucket))
    pending, used = state.pending, state.used
    if decision.approvals:  # else the same values: the encoder keeps their text
        used = dict(used)
        for a in decision.approvals:
            used[a.id] = a.expires
        spent = {a.id for a in decision.approvals}
        pending = tuple(a for a in pending if a.id not in spent)
    new = PolicyState(
        seq=state.seq,
        counters=counters,
        debits=(state.debits + tuple(debits))[-MAX_DEBITS:],
        pending=pending,
        used=used,
        frozen=state.frozen,
    )
    return new.pruned(now), tuple(debits)


def compensate(
    state: PolicyState, debits: Sequence[Debit], approvals: Sequence[Approval], now: float
) -> tuple[PolicyState, tuple[Debit, ...]]:
    """Take back ``debits`` still recorded (each at most once, ever) and give back
    ``approvals`` (unused again, if not expired). Returns the new state and the debits
    actually taken back."""
    counters = dict(state.counters)
    remaining = list(state.debits)
    taken: list[Debit] = []
    for d in debits:
        if d not in remaining:
            continue  # already compensated, or dropped from the bounded list: keep counted
        remaining.remove(d)
        counter = counters.get(d.rule)
        if counter is not None:
            counters[d.rule] = counter.compensate(d.amount, d.bucket, now)
        taken.append(d)
    ids = {a.id for a in approvals}
    pending = state.pending + tuple(a for a in approvals if a.expires > now and a.id in state.used)
    used = {k: v for k, v in state.used.items() if k not in ids}
    new = replace(state, counters=counters, debits=tuple(remaining), pending=pending, used=used)
    return new.pruned(now), tuple(taken)


def keep_counters(policy: SpendingPolicy, state: PolicyState) -> PolicyState:
    """The state carried over to ``policy`` (``policy set``): a counter stays when its
    rule keeps its name, period and bucket width; approvals of other policies are dropped
    (they name another policy version)."""
    counters = {}
    for rule in policy.rules:
        c = state.counters.get(rule.name)
        if (
            c is not None
            and rule.period_s is not None
            and c.fits(rule.period_s, rule.bucket_width_s)
        ):
            counters[rule.name] = c
    pending = tuple(a for a in state.pending if a.policy == policy.sha256)
    return replace(state, counters=counters, pending=pending)


__all__ = [
    "ALLOW",
    "REFUSE",
    "WARN",
    "Budget",
    "Decision",
    "RuleResult",
    "applicable",
    "apply",
    "compensate",
    "evaluate",
    "keep_counters",
]
