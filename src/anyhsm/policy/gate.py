"""The one hook between the PSBT signer and the spending policy.

The signer (:func:`anyhsm.bitcoin.signer.sign_psbt`) analyses a PSBT (what each input
spends, which keys would sign, the signing policy's checks of fee, sighash, change, paths
and network) and then, *before any signature*, hands what it found to a
:class:`SpendingGate` as a :class:`SpendSummary`. The gate decides (allow, warn or
refuse, naming its rules), debits the velocity budgets durably and returns a
:class:`SpendGrant`. The signer then signs and tells the grant how it went: ``signed()``,
or ``failed(error)`` (the gate compensates the debit by an audited entry).

This module holds only the interface and plain data: it imports nothing of the policy
engine, so the Bitcoin layer depends on the shape, not on the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from anyhsm.bitcoin.policy import OutputReport, SigningFacts
    from anyhsm.types import KeyInfo


@dataclass(frozen=True)
class SpendSummary:
    """What a PSBT would spend, as the signer found it after its own checks passed.

    ``txid``: the unsigned transaction id (display order hex), "unknown" when no v0
    transaction can be made. ``keys``: every key that would make a signature (at least
    one). ``outputs``: each output with its address and whether it is our change.
    ``fee``, ``inputs_total``, ``outputs_total`` in satoshis; ``vsize`` estimated;
    ``facts``: what the built-in rules judge (the signer's findings under ``[policy]``)."""

    txid: str
    keys: tuple[KeyInfo, ...]
    inputs: int
    outputs: tuple[OutputReport, ...]
    fee: int
    inputs_total: int
    outputs_total: int
    vsize: int
    warnings: tuple[str, ...] = ()
    # what the built-in rules judge, as the signer found it; None for a summary made
    # elsewhere (a rule that needs them then refuses: fail closed)
    facts: SigningFacts | None = None

    @property
    def leaving(self) -> int:
        """Satoshis leaving the wallet: every output that is not change, plus the fee."""
        return sum(o.amount for o in self.outputs if not o.change) + max(self.fee, 0)


class SpendGrant(Protocol):
    """A spend the gate allowed and debited; told once how signing went."""

    def signed(self) -> None:
        """At least one signature was placed: the debit stands."""
        ...

    def failed(self, error: BaseException | None) -> None:
        """Nothing was signed (an error, or no signature placed): compensate the debit."""
        ...


class SpendingGate(Protocol):
    """Decides a spend before any signature; raises
    :class:`~anyhsm.errors.SpendingPolicyRefused` (a ``PolicyViolation``, exit 7, naming
    the refusing rules in ``rules``) to refuse."""

    def authorize(self, spend: SpendSummary) -> SpendGrant: ...


__all__ = ["SpendGrant", "SpendSummary", "SpendingGate"]
