"""The one vocabulary for script types in what anyhsm reports (issue 10, item 9).

Inputs and outputs, ``psbt inspect`` and ``psbt sign``, the CLI's JSON and the service
all name a script type by a :class:`ScriptKind` value: the short, descriptor-style names
(``p2pkh``, ``p2sh-p2wpkh``, ``p2wpkh``, ``p2wsh``, ``p2tr``...), hyphenated, lower case.

Two classifications sit underneath and keep their own names, because they answer other
questions: :class:`anyhsm.bitcoin.script.ScriptType` classifies a scriptPubKey alone (as
Bitcoin Core's Solver does, so it cannot tell a P2SH-wrapped witness program from any
other P2SH), and :class:`anyhsm.bitcoin.spend.SpendKind` says how an input is spent (it
can, from the redeem script). :meth:`ScriptKind.of_script` and
:meth:`ScriptKind.of_spend` translate them; neither's ``.value`` is ever shown.
"""

from __future__ import annotations

import enum

from anyhsm.bitcoin.script import ScriptType
from anyhsm.bitcoin.spend import SpendKind


class ScriptKind(enum.StrEnum):
    """A script type as reported to people and programs."""

    P2PKH = "p2pkh"
    P2PK = "p2pk"
    P2SH = "p2sh"  # a P2SH output, or an input spent through a non-segwit redeem script
    P2SH_P2WPKH = "p2sh-p2wpkh"
    P2SH_P2WSH = "p2sh-p2wsh"
    P2WPKH = "p2wpkh"
    P2WSH = "p2wsh"
    P2TR = "p2tr"
    MULTISIG = "multisig"  # a bare multisig output
    BARE = "bare"  # an input spending a bare (non-P2SH) legacy script: multisig or other
    OP_RETURN = "op-return"  # a data carrier output (Core: "nulldata")
    WITNESS_UNKNOWN = "witness-unknown"  # a future witness version
    NONSTANDARD = "nonstandard"
    UNKNOWN = "unknown"  # an input whose previous output is not known

    @classmethod
    def of_script(cls, script_type: ScriptType) -> ScriptKind:
        """The kind of a scriptPubKey classified alone (an output's script)."""
        return _OF_SCRIPT[script_type]

    @classmethod
    def of_spend(cls, spend_kind: SpendKind) -> ScriptKind:
        """The kind of an input, from how it is spent."""
        return _OF_SPEND[spend_kind]


_OF_SCRIPT: dict[ScriptType, ScriptKind] = {
    ScriptType.P2PKH: ScriptKind.P2PKH,
    ScriptType.P2SH: ScriptKind.P2SH,
    ScriptType.P2WPKH: ScriptKind.P2WPKH,
    ScriptType.P2WSH: ScriptKind.P2WSH,
    ScriptType.P2TR: ScriptKind.P2TR,
    ScriptType.P2PK: ScriptKind.P2PK,
    ScriptType.MULTISIG: ScriptKind.MULTISIG,
    ScriptType.OP_RETURN: ScriptKind.OP_RETURN,
    ScriptType.WITNESS_UNKNOWN: ScriptKind.WITNESS_UNKNOWN,
    ScriptType.NONSTANDARD: ScriptKind.NONSTANDARD,
}

_OF_SPEND: dict[SpendKind, ScriptKind] = {
    SpendKind.P2PKH: ScriptKind.P2PKH,
    SpendKind.P2PK: ScriptKind.P2PK,
    SpendKind.P2SH: ScriptKind.P2SH,
    SpendKind.P2SH_P2WPKH: ScriptKind.P2SH_P2WPKH,
    SpendKind.P2WPKH: ScriptKind.P2WPKH,
    SpendKind.P2WSH: ScriptKind.P2WSH,
    SpendKind.P2SH_P2WSH: ScriptKind.P2SH_P2WSH,
    SpendKind.P2TR: ScriptKind.P2TR,
    SpendKind.BARE: ScriptKind.BARE,
    SpendKind.UNKNOWN: ScriptKind.UNKNOWN,
}
