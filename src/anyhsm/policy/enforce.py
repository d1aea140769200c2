"""The spending policy as it is enforced: the active policy of a handle, and its gate.

:func:`spending_gate` is what the one PSBT signing path asks for (``ops.psbt.sign_psbt``
passes it to the signer): None when the deployment has no spending policy (today's
behaviour, unchanged), else a :class:`PolicyGate` over the active policy, after checking
that the policy file is the one ``anyhsm policy set`` bound (and, when the configuration
names one with ``policy.spending_policy``, that this file was not edited since).

:meth:`PolicyGate.authorize` is one transaction of the state store: lock, read, decide,
debit (and mark the approvals used), commit, audit; only then does the signer sign. If
signing fails the grant compensates, in a second transaction, by an audited entry. A
process killed after the commit keeps its debit (never lost; the spend may not have
happened, which errs on the safe side); one killed before it debited nothing and signed
nothing. Every decision is written to the handle's audit log (``policy_decision``, whose
``debits`` member is the debit it made; ``policy_compensate``), with rule names and
amounts.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anyhsm.errors import HsmError, PolicyNotAuthenticated, SpendingPolicyRefused
from anyhsm.policy import events
from anyhsm.policy.anchor import (
    BINDING_RULE,
    AuditStateAnchor,
    Binding,
    ManifestAnchor,
    policy_file,
)
from anyhsm.policy.engine import Decision, apply, compensate, evaluate
from anyhsm.policy.rules import (
    FROZEN_RULE,
    NO_RULE,
    RAW_DIGEST_RULE,
    Action,
    SpendingPolicy,
    parse_policy,
    policy_sha256,
)
from anyhsm.policy.state import Debit, FileStateStore, StateStore

if TYPE_CHECKING:
    from anyhsm.config import Config
    from anyhsm.hsm import Hsm
    from anyhsm.policy.gate import SpendSummary
    from anyhsm.policy.state import Approval
    from anyhsm.types import KeyRef

Clock = Callable[[], float]
_LIMIT = 300  # characters of one audit detail value


def state_dir(cfg: Config) -> Path:
    """Where the active policy, its binding and the counters are kept."""
    from anyhsm.config import keystore_path

    if cfg.policy.spending_state_dir is not None:
        return cfg.policy.spending_state_dir
    ks = keystore_path(cfg)
    return ks.with_name(ks.name + ".policy")


def requester() -> str:
    """Who asks: the audit principal (the service's client), else the local user."""
    from anyhsm.audit import principal

    return principal.get() or f"uid:{os.getuid()}"


@dataclass(frozen=True)
class ActivePolicy:
    policy: SpendingPolicy
    binding: Binding
    directory: Path
    data: bytes  # the policy file's bytes, as bound


_cache_lock = threading.Lock()
_parsed: dict[tuple[str, str], SpendingPolicy] = {}


def _parse_cached(data: bytes, sha: str, cfg: Config) -> SpendingPolicy:
    key = (sha, cfg.network.value)
    with _cache_lock:
        found = _parsed.get(key)
    if found is None:
        found = parse_policy(data, cfg.network, source="the active spending policy")
        with _cache_lock:
            if len(_parsed) > 8:
                _parsed.clear()
            _parsed[key] = found
    return found


@dataclass
class _Known:
    """What a handle last found: the active policy and its store, with the binding and
    the files' stamps it was found from. The binding is read from the keystore manifest
    on every signing (another process's ``policy set`` changes it); a policy file changed
    in place changes its stamp (size, times, inode) and is checked afresh. The store
    keeps the state it last authenticated."""

    config: Config
    binding: Binding | None
    directory: Path
    files: tuple[str, ...]  # the active policy's copy, the configured file (if any)
    stamps: tuple[tuple[int, int, int, int] | None, ...]
    active: ActivePolicy | None = None
    store: FileStateStore | None = None


_handles: weakref.WeakKeyDictionary[Hsm, _Known] = weakref.WeakKeyDictionary()
_handles_lock = threading.Lock()


def _file_stamp(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _known(hsm: Hsm) -> _Known:
    cfg = hsm.config
    binding = ManifestAnchor(hsm).binding()
    with _handles_lock:
        known = _handles.get(hsm)
    if known is not None and known.config is cfg and known.binding == binding:
        stamps = tuple(_file_stamp(f) for f in known.files)
        if stamps == known.stamps:
            return known
    directory = state_dir(cfg)
    files = [] if binding is None else [str(policy_file(directory, binding.sha256))]
    if cfg.policy.spending_policy is not None:
        files.append(str(cfg.policy.spending_policy))
    stamps = tuple(_file_stamp(f) for f in files)
    known = _Known(cfg, binding, directory, tuple(files), stamps)
    known.active = _load_active(hsm, directory, binding)
    with _handles_lock:
        _handles[hsm] = known
    return known


def load_active(hsm: Hsm) -> ActivePolicy | None:
    """The handle's active spending policy, checked against its binding; None when none
    is set and the configuration requires none."""
    return _known(hsm).active


def _load_active(hsm: Hsm, directory: Path, binding: Binding | None) -> ActivePolicy | None:
    cfg = hsm.config
    required = cfg.policy.spending_policy
    if binding is None:
        if required is None:
            return None
        raise _not_set(required)
    path = policy_file(directory, binding.sha256)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PolicyNotAuthenticated(
            f"the active spending policy's copy {path} is missing",
            hint="run 'anyhsm policy set FILE' (audited) to set it again",
            rules=[BINDING_RULE],
        ) from None
    sha = policy_sha256(data)
    if sha != binding.sha256:
        raise PolicyNotAuthenticated(
            f"the active spending policy {path} was changed without 'anyhsm policy set' "
            "(its SHA-256 is not the one the keystore recorded)",
            hint="put the set policy back, or review the file and run 'anyhsm policy set FILE'",
            rules=[BINDING_RULE],
        )
    if required is not None:
        try:
            named = required.read_bytes()
        except OSError:
            named = b""
        if policy_sha256(named) != sha:
            raise PolicyNotAuthenticated(
                f"the spending policy file {required} (policy.spending_policy) differs from "
                "the active policy: it was edited, or never set",
                hint=f"review it, then run 'anyhsm policy set {required}' (the admin step, "
                "audited); until then nothing is signed",
                rules=[BINDING_RULE],
            )
    return ActivePolicy(_parse_cached(data, sha, cfg), binding, directory, data)


def _not_set(required: Path) -> PolicyNotAuthenticated:
    return PolicyNotAuthenticated(
        f"the configuration requires the spending policy {required} (policy.spending_policy), "
        "but no policy has been set",
        hint=f"run 'anyhsm policy set {required}' (the admin step, audited)",
        rules=[BINDING_RULE],
    )


def state_store(hsm: Hsm, directory: Path) -> FileStateStore:
    """The state store of this deployment (the file store, keyed from the keystore)."""
    durable = hsm.config.audit.durability == "fsync"
    key = ManifestAnchor(hsm).state_key()
    # a state older than the newest state_seq the audit chain records is refused
    return FileStateStore(directory, key, durable=durable, anchor=AuditStateAnchor(hsm))


def _handle_store(hsm: Hsm, known: _Known) -> FileStateStore:
    """The store kept with the handle while the policy it was made for stays active (it
    remembers the state it last authenticated)."""
    if known.store is None:
        known.store = state_store(hsm, known.directory)
    return known.store


def spending_gate(hsm: Hsm, *, clock: Clock | None = None) -> PolicyGate | None:
    """The gate the PSBT signer must pass for ``hsm`` (None: no spending policy)."""
    known = _known(hsm)
    if known.active is None:
        return None
    return PolicyGate(hsm, known.active, _handle_store(hsm, known), clock=clock)


def guard_digest(hsm: Hsm, key: KeyRef) -> None:
    """Refuse raw digest signing with ``key`` under an active spending policy that covers
    it, unless every refusing rule naming it sets ``raw_digests = true`` (and the key is
    not frozen): a digest may be any transaction's sighash, which no rule could judge."""
    active = load_active(hsm)
    if active is None:
        return
    info = hsm.get_key(key)
    rules = active.policy.rules_for(info.label, info.id)
    name, reason = RAW_DIGEST_RULE, ""
    blocking = [r.name for r in rules if r.action is Action.REFUSE and not r.raw_digests]
    if not rules:  # as for a PSBT: the policy allows only what it declares
        name = NO_RULE
        reason = (
            f"no rule of the policy names key {info.label} (a rule with keys = "
            f'["{info.label}"] and raw_digests = true allows its raw digests)'
        )
    elif blocking:
        reason = (
            f"rule(s) {', '.join(blocking)} name key {info.label} and do not allow raw digest "
            "signing (raw_digests = true): a digest could be any transaction's sighash"
        )
    else:
        with state_store(hsm, active.directory).transaction() as txn:
            frozen = txn.read().frozen.get(info.id)
        if frozen is not None:
            name, reason = FROZEN_RULE, f"key {info.label} is frozen"
    if not reason:
        return
    detail = {"op": "sign", "decision": "refuse", "refusing": name, "reason": _text(reason)}
    hsm.record_event(
        "policy_decision", "refused", detail, key_id=info.id, error=SpendingPolicyRefused.code
    )
    raise SpendingPolicyRefused(
        f"spending policy: refused by rule {name}: {reason}",
        hint="sign PSBTs instead ('anyhsm psbt sign'), which the policy can judge",
        rules=[name],
    )


def _text(value: object) -> str:
    text = str(value)
    return text if len(text) <= _LIMIT else text[: _LIMIT - 3] + "..."


def decision_detail(decision: Decision, who: str | None) -> dict[str, str]:
    """The audit entry's detail of a decision (values bounded, nothing secret)."""
    detail = {
        "txid": decision.txid,
        "decision": decision.decision,
        "rules": _text(",".join(r.name for r in decision.rules) or "none"),
        "amount": str(decision.amount),
        "fee": str(decision.fee),
        "keys": _text(",".join(decision.keys)),
        "policy": decision.policy,
    }
    if decision.refusing:
        detail["refusing"] = _text(",".join(decision.refusing))
    if decision.warning:
        detail["warning"] = _text(",".join(decision.warning))
    if decision.approved:
        detail["approved"] = _text(",".join(decision.approved))
        detail["approvers"] = _text(",".join(a.pubkey.hex() for a in decision.approvals))
    if who:
        detail["requester"] = _text(who)
    return detail


def _debits_text(debits: tuple[Debit, ...]) -> str:
    return _text(",".join(f"{d.rule}:{d.amount}" for d in debits))


class PolicyGate:
    """:class:`~anyhsm.policy.gate.SpendingGate` over an active policy and its store."""

    def __init__(
        self, hsm: Hsm, active: ActivePolicy, store: StateStore, *, clock: Clock | None = None
    ) -> None:
        self._hsm = hsm
        self.active = active
        self.store = store
        self._clock = clock or time.time

    @property
    def policy(self) -> SpendingPolicy:
        return self.active.policy

    def check(self, spend: SpendSummary) -> Decision:
        """The decision without acting on it (``anyhsm policy check``): nothing is
        debited and no approval is used."""
        with self.store.transaction() as txn:
            state = txn.read()
        return evaluate(self.policy, spend, state, self._clock(), requester())

    def authorize(self, spend: SpendSummary) -> _Grant:
        who = requester()
        with self.store.transaction() as txn:
            state = txn.read()
            now = self._clock()
            decision = evaluate(self.policy, spend, state, now, who)
            if decision.refused:
                self._hsm.record_event(
                    "policy_decision",
                    "refused",
                    decision_detail(decision, who),
                    error=SpendingPolicyRefused.code,
                )
                events.notify(decision)
                raise refusal(decision)
            new, debits = apply(self.policy, spend, decision, state, now)
            committed = txn.commit(new)
            detail = decision_detail(decision, who)
            if debits:  # the debit is part of the decision's entry
                detail["debits"] = _debits_text(debits)
            detail["state_seq"] = str(committed.seq)
            try:
                self._hsm.record_event("policy_decision", "ok", detail)
            except BaseException:
                back, _ = compensate(committed, debits, decision.approvals, now)
                txn.commit(back)
                raise
        events.notify(decision)
        return _Grant(self, decision, debits)

    def _compensate(
        self,
        decision: Decision,
        debits: tuple[Debit, ...],
        approvals: tuple[Approval, ...],
        why: str,
    ) -> None:
        with self.store.transaction() as txn:
            state = txn.read()
            new, taken = compensate(state, debits, approvals, self._clock())
            committed = txn.commit(new)
            detail = {
                "txid": decision.txid,
                "debits": _debits_text(taken) or "none",
                "approvals": str(len(approvals)),
                "reason": _text(why),
                "state_seq": str(committed.seq),
            }
            # under the lock: the log's order of state_seq is the order of the commits
            self._hsm.record_event("policy_compensate", "ok", detail)


class _Grant:
    def __init__(self, gate: PolicyGate, decision: Decision, debits: tuple[Debit, ...]) -> None:
        self._gate = gate
        self.decision = decision
        self._debits = debits
        self._done = False

    def signed(self) -> None:
        self._done = True

    def failed(self, error: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        if not self._debits and not self.decision.approvals:
            return
        why = (
            error.code
            if isinstance(error, HsmError)
            else type(error).__name__
            if error
            else "nothing signed"
        )
        # on failure the debit stays counted (the safe side): the signing error is what
        # the caller must see, and the audit log has the debit entry
        with contextlib.suppress(HsmError):
            self._gate._compensate(self.decision, self._debits, self.decision.approvals, why)


def refusal(decision: Decision) -> SpendingPolicyRefused:
    """The error a refused decision raises: every refusing rule named, with its reason."""
    err = SpendingPolicyRefused(
        f"spending policy: {decision.summary()}",
        hint="nothing was signed or debited; 'anyhsm policy check PSBT --key KEY' shows "
        "every rule's verdict and the budget left",
        rules=decision.refusing,
    )
    err.details = [
        {"rule": r.name, "decision": r.decision, "reason": r.reason}
        for r in decision.rules
        if r.decision == "refuse"
    ]
    return err


__all__ = [
    "ActivePolicy",
    "PolicyGate",
    "guard_digest",
    "load_active",
    "refusal",
    "requester",
    "spending_gate",
    "state_dir",
    "state_store",
]
