"""The spending policy: declared rules, velocity state, approvals (docs/policy.md).

- :mod:`~anyhsm.policy.rules`: the policy file (``[[rules]]``) parsed into values;
- :mod:`~anyhsm.policy.engine`: the decision, pure (rules, spend, state, time);
- :mod:`~anyhsm.policy.velocity`: counters in fixed time buckets;
- :mod:`~anyhsm.policy.state`: the state behind a small transactional store;
- :mod:`~anyhsm.policy.approvals`: the approval message and its signatures;
- :mod:`~anyhsm.policy.anchor`: the binding that authenticates the active policy;
- :mod:`~anyhsm.policy.enforce`: the gate the PSBT signer passes;
- :mod:`~anyhsm.policy.gate`: the signer's side of that hook (plain data, Protocols).

This module imports nothing at import time; its two functions load the engine when
called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anyhsm.hsm import Hsm
    from anyhsm.policy.enforce import PolicyGate
    from anyhsm.types import KeyRef


def spending_gate(hsm: Hsm) -> PolicyGate | None:
    """The spending gate for the PSBT signer (None: no spending policy); raises
    :class:`~anyhsm.errors.PolicyNotAuthenticated` when the policy cannot be trusted."""
    from anyhsm.policy.enforce import spending_gate as gate

    return gate(hsm)


def guard_digest(hsm: Hsm, key: KeyRef) -> None:
    """Refuse raw digest signing with ``key`` under an active spending policy (a digest
    may be any sighash: signing it would bypass every rule), unless a rule names the key
    and every refusing rule that names it allows it with ``raw_digests = true``."""
    from anyhsm.policy.enforce import guard_digest as guard

    guard(hsm, key)


__all__ = ["guard_digest", "spending_gate"]
