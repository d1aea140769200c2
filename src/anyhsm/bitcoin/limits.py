"""Resource limits on a PSBT to sign, checked before any key is derived or any signature made.

Without them a 1.1 MB PSBT of 1,000 inputs, each naming our master fingerprint with
a 255-level path, cost 10-14 s of CPU and 363 MB (every path derived, twice), and
5,000 legacy inputs cost 6-12 s (each legacy sighash hashes the whole transaction,
so the work grows with the square of the inputs). Each limit is a ``policy.*``
setting; a PSBT beyond one raises :class:`anyhsm.errors.PsbtLimitExceeded` naming it.
The defaults follow from Bitcoin Core's standardness rules, so that every PSBT of a
transaction the network would relay fits, except where noted:

``max_psbt_bytes`` 4,000,000
    A standard transaction weighs at most 400,000 WU (at most 100 kB without its
    witness); a PSBT carries it plus the previous transaction of each input (now
    required for segwit v0 inputs too). 4 MB leaves room for ~1,000 inputs with 4 kB
    previous transactions, or ten 400 kB ones. Checked on the size the PSBT was
    parsed from (``Psbt.parsed_size``; a PSBT built in code is serialised to measure
    it); callers that hold the bytes should also pass it to ``Psbt.parse(data,
    max_bytes=...)``, which refuses before decoding.
``max_inputs`` / ``max_outputs`` 2,500
    The smallest input is 41 bytes (164 WU) and the smallest output 9 bytes, so the
    weight limit allows ~2,400 inputs; payouts of more outputs than that split.
``max_derivations_per_map`` 20
    BIP32 and taproot derivation fields in one input or output map: 20 is the most
    keys OP_CHECKMULTISIG takes.
``max_path_depth`` 12
    Every standard layout (BIP44/49/84/86: 5 steps, BIP48: 6) fits twice over; BIP32
    itself allows 255, which is what made the attack expensive.
``max_tx_weight`` 400,000
    Bitcoin Core's MAX_STANDARD_TX_WEIGHT, checked against the unsigned transaction
    (a lower bound of the final weight) here, and against the estimated final weight
    by the policy (rule ``tx-weight``).
``max_key_derivations`` 5,000
    Distinct (key, path prefix) nodes that derivation fields naming one of our master
    fingerprints ask to derive (inputs and outputs, every prefix of each path). A
    1,000-input PSBT under one account needs ~1,010; the attack above needed 255,000.
``max_legacy_sighash_bytes`` 20,000,000
    Bytes hashed by the legacy (pre-segwit) sighashes of the inputs we would sign
    (their number times the size of the transaction): an all-P2PKH transaction of the
    maximum standard weight (675 inputs) hashes ~19 MB.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from anyhsm.bitcoin.bip32 import KeyOrigin
from anyhsm.bitcoin.psbt import Psbt, PsbtInput, PsbtOutput
from anyhsm.config import PolicyConfig
from anyhsm.errors import PsbtLimitExceeded

_HINT = "split the transaction, or raise the limit in the [policy] section if this one is expected"


def _refuse(setting: str, message: str) -> PsbtLimitExceeded:
    err = PsbtLimitExceeded(
        f"PSBT refused before signing: {message} (policy.{setting})",
        field=f"policy.{setting}",
        hint=_HINT,
    )
    err.details = [{"rule": "limit", "setting": f"policy.{setting}", "message": message}]
    return err


def _origins(m: PsbtInput | PsbtOutput) -> list[KeyOrigin]:
    return [*m.bip32_derivations.values(), *(t.origin for t in m.tap_bip32_derivations.values())]


def check_structure(psbt: Psbt, policy: PolicyConfig, *, unsigned_size: int | None = None) -> None:
    """Counts, derivations, path depth, size and unsigned weight; linear in the PSBT.
    ``unsigned_size``: the unsigned transaction's serialised size, when the caller has it
    (the signer serialises it once, for its txid too)."""
    n_in, n_out = len(psbt.inputs), len(psbt.outputs)
    if n_in > policy.max_inputs:
        raise _refuse("max_inputs", f"{n_in} inputs, more than {policy.max_inputs}")
    if n_out > policy.max_outputs:
        raise _refuse("max_outputs", f"{n_out} outputs, more than {policy.max_outputs}")
    maps: list[PsbtInput | PsbtOutput] = [*psbt.inputs, *psbt.outputs]
    max_maps, max_depth = policy.max_derivations_per_map, policy.max_path_depth
    for n, m in enumerate(maps):
        origins = _origins(m)
        if len(origins) > max_maps:
            raise _refuse(
                "max_derivations_per_map",
                f"{_where(n, n_in)} has {len(origins)} key derivations, more than {max_maps}",
            )
        for o in origins:
            if len(o.path) > max_depth:
                raise _refuse(
                    "max_path_depth",
                    f"{_where(n, n_in)} names a key at a path of {len(o.path)} steps, deeper "
                    f"than {max_depth}",
                )
    if unsigned_size is None:
        unsigned_size = len(psbt.unsigned_tx().serialize(include_witness=False))
    weight = 4 * unsigned_size
    if weight > policy.max_tx_weight:
        raise _refuse(
            "max_tx_weight",
            f"the unsigned transaction alone weighs {weight} WU, more than {policy.max_tx_weight}",
        )
    size = psbt.parsed_size if psbt.parsed_size is not None else len(psbt.serialize())
    if size > policy.max_psbt_bytes:
        raise _refuse(
            "max_psbt_bytes", f"the PSBT is {size} bytes, more than {policy.max_psbt_bytes}"
        )


def _where(n: int, n_in: int) -> str:
    return f"input {n}" if n < n_in else f"output {n - n_in}"


def check_derivation_work(psbt: Psbt, fingerprints: Iterable[bytes], policy: PolicyConfig) -> int:
    """Refuse a PSBT whose derivation fields under our fingerprints would need more
    distinct derivations than allowed; returns their number."""
    ours = set(fingerprints)
    # a trie of the paths, as (parent node, step) -> node; node 0.. are the roots
    roots: dict[bytes, int] = {}
    nodes: dict[tuple[int, int], int] = {}
    maps: Sequence[PsbtInput | PsbtOutput] = [*psbt.inputs, *psbt.outputs]
    for m in maps:
        for o in _origins(m):
            if o.fingerprint not in ours:
                continue
            node = roots.setdefault(o.fingerprint, -1 - len(roots))
            for step in o.path:
                node = nodes.setdefault((node, step), len(nodes))
        count = len(nodes)
        if count > policy.max_key_derivations:
            raise _refuse(
                "max_key_derivations",
                f"the derivation fields naming our keys ask for more than "
                f"{policy.max_key_derivations} key derivations",
            )
    return len(nodes)


def check_legacy_work(psbt: Psbt, legacy_inputs: int, policy: PolicyConfig) -> None:
    """Refuse when the legacy sighashes of ``legacy_inputs`` inputs would hash more than
    allowed (each hashes about the whole unsigned transaction)."""
    if not legacy_inputs:
        return
    per = len(psbt.unsigned_tx().serialize())
    total = legacy_inputs * per
    if total > policy.max_legacy_sighash_bytes:
        raise _refuse(
            "max_legacy_sighash_bytes",
            f"{legacy_inputs} legacy inputs to sign would hash {total} bytes ({per} each), "
            f"more than {policy.max_legacy_sighash_bytes}",
        )


__all__ = ["check_derivation_work", "check_legacy_work", "check_structure"]
