"""Bitcoin Core's own script interpreter as the tests' consensus oracle.

``lnurlcash-kernel`` (a dev dependency) ships Core v31's ``libbitcoinkernel``; its
``verify_input`` asks Core whether one input of a serialised transaction spends its
previous output, under every consensus flag (P2SH, DERSIG, NULLDUMMY, CLTV, CSV,
WITNESS, TAPROOT). A finalized transaction that passes here is valid under consensus
as far as scripts go: what the chain adds (a timelock's height or time having come,
the coins existing) is not a script question.
"""

from __future__ import annotations

from collections.abc import Sequence

from lnurlcashkernel import _native  # type: ignore[import-untyped]

from anyhsm.bitcoin.finalizer import FinalizeResult
from anyhsm.bitcoin.spend import describe_input
from anyhsm.bitcoin.tx import Transaction, TxOut


def spends(tx: Transaction, spent: Sequence[TxOut], index: int) -> bool:
    """Core's verdict on input ``index`` of ``tx`` (``spent``: one output per input)."""
    assert len(spent) == len(tx.inputs)
    out = spent[index]
    return bool(
        _native.verify_input(
            script_pubkey=out.script_pubkey,
            amount=out.value,
            tx=tx.serialize(),
            spent_outputs=[(o.script_pubkey, o.value) for o in spent],
            input_index=index,
            flags=_native.FLAGS_ALL,
        )
    )


def assert_spends(tx: Transaction, spent: Sequence[TxOut]) -> None:
    """Every input of ``tx`` spends its previous output, says Bitcoin Core."""
    bad = [i for i in range(len(tx.inputs)) if not spends(tx, spent, i)]
    assert not bad, f"Bitcoin Core's interpreter rejects input(s) {bad}"


def spent_outputs(final: FinalizeResult) -> list[TxOut]:
    """The output each input of a finalized PSBT spends (its UTXO fields stay)."""
    out = []
    for inp in final.psbt.inputs:
        spent = describe_input(inp).spent
        assert spent is not None, "a finalized input without its previous output"
        out.append(spent)
    return out


def assert_final_spends(final: FinalizeResult) -> Transaction:
    """The finalizer extracted a transaction, and Bitcoin Core's interpreter accepts
    every input of it; returns the transaction."""
    assert final.complete and final.tx is not None, [r.reason for r in final.inputs]
    assert_spends(final.tx, spent_outputs(final))
    return final.tx


__all__ = ["assert_final_spends", "assert_spends", "spends", "spent_outputs"]
