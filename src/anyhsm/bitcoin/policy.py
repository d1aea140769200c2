"""What a PSBT input spends, and the signing policy checked before any signature is made.

Hardware wallets refuse to sign what they cannot account for; so does this layer.
:func:`describe_input` works out, from public data only, what an input spends and
which script its signatures are checked against (and whether the PSBT's scripts
are consistent: the BIP174 signer checks). :func:`check_policy` then applies the
rules of :class:`anyhsm.config.PolicyConfig` to the whole transaction:

- every input's previous output must be provided (the fee needs every amount);
- a segwit v0 input's WITNESS_UTXO must equal the output in its NON_WITNESS_UTXO;
  with only the witness UTXO the fee attack of 2020 is possible, which is a warning;
- the sighash type of every input to be signed must be allowed (ALL and DEFAULT by default);
- the fee (inputs minus outputs) and the fee rate (over an estimated vsize) must stay
  below ``max_fee_sat`` and ``max_fee_rate_sat_vb``;
- every output is shown with its address on the configured network, or as a script
  without address (OP_RETURN, bare scripts; never by itself a refusal); change outputs
  (derived from a signing key, with a script that matches the derived key) are marked;
  global xpubs of another network are refused.

Every refusal raises :class:`anyhsm.errors.SigningPolicyError` naming the input or
output and the rule; all refusals found are listed in the error's ``details``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from anyhsm.bitcoin.address import address_from_script
from anyhsm.bitcoin.bip32 import HARDENED, KeyOrigin, format_path
from anyhsm.bitcoin.encoding import compact_size, hash160, sha256
from anyhsm.bitcoin.networks import describe_family, networks_for_bip32_version, params
from anyhsm.bitcoin.psbt import Psbt, PsbtInput, PsbtOutput
from anyhsm.bitcoin.psbt_fields import TapLeaf as PsbtTapLeaf
from anyhsm.bitcoin.script import (
    ScriptType,
    classify,
    iter_ops,
    p2pkh,
    p2sh,
    p2tr,
    p2wpkh,
    push_data,
)
from anyhsm.bitcoin.sighash import SIGHASH_DEFAULT, STANDARD_SIGHASH_TYPES, sighash_name
from anyhsm.bitcoin.taproot import branch_hash, leaf_hash, taproot_output_key
from anyhsm.bitcoin.tx import TxOut
from anyhsm.config import PolicyConfig
from anyhsm.errors import ScriptError, SigningPolicyError
from anyhsm.types import Network

# Sizes used to estimate the final transaction (Bitcoin Core's estimates: a DER signature
# with its sighash byte is counted as 72 bytes, a Schnorr signature as 64 or 65).
ECDSA_SIG_SIZE = 72
PUBKEY_SIZE = 33


class SpendKind(enum.Enum):
    """How an input is spent, as far as signing and finalizing care."""

    P2PKH = "p2pkh"
    P2PK = "p2pk"
    P2SH = "p2sh"  # legacy P2SH: the redeem script runs without segwit
    P2SH_P2WPKH = "p2sh-p2wpkh"
    P2WPKH = "p2wpkh"
    P2WSH = "p2wsh"
    P2SH_P2WSH = "p2sh-p2wsh"
    P2TR = "p2tr"
    BARE = "bare"  # bare multisig or another legacy script
    UNKNOWN = "unknown"  # no previous output, a future witness version, or non-standard

    @property
    def segwit_v0(self) -> bool:
        return self in _SEGWIT_V0

    @property
    def legacy(self) -> bool:
        return self in _LEGACY


_SEGWIT_V0 = frozenset(
    {SpendKind.P2WPKH, SpendKind.P2SH_P2WPKH, SpendKind.P2WSH, SpendKind.P2SH_P2WSH}
)
_LEGACY = frozenset({SpendKind.P2PKH, SpendKind.P2PK, SpendKind.P2SH, SpendKind.BARE})


@dataclass(frozen=True)
class SpendInfo:
    """What one input spends.

    ``script_code`` is the script whose signature check the sighash commits to
    (without length prefix): the scriptPubKey (P2PKH, P2PK, bare), the redeem script
    (legacy P2SH), the witness script (P2WSH) or the P2PKH script of the key hash
    (P2WPKH, BIP143). ``problem`` is an inconsistency that makes the input unsafe to
    sign (a BIP174 signer check failed); ``unsignable`` says why the input cannot be
    signed although nothing is wrong with it (a redeem script not given yet...).
    """

    kind: SpendKind
    spent: TxOut | None
    script_code: bytes | None = None
    redeem_script: bytes | None = None
    witness_script: bytes | None = None
    problem: str | None = None
    unsignable: str | None = None

    @property
    def amount(self) -> int | None:
        return None if self.spent is None else self.spent.value


def describe_input(inp: PsbtInput) -> SpendInfo:
    """Classify an input from its UTXO fields and scripts; run BIP174's signer checks."""
    nwu = inp.non_witness_utxo
    if nwu is not None:
        if nwu.txid() != inp.previous_txid:
            return SpendInfo(
                SpendKind.UNKNOWN,
                None,
                problem="PSBT_IN_NON_WITNESS_UTXO is not the transaction the input spends "
                "(its txid differs)",
            )
        if inp.output_index >= len(nwu.outputs):
            return SpendInfo(
                SpendKind.UNKNOWN,
                None,
                problem=f"PSBT_IN_NON_WITNESS_UTXO has no output {inp.output_index}",
            )
        spent: TxOut | None = nwu.outputs[inp.output_index]
        if inp.witness_utxo is not None and inp.witness_utxo != spent:
            return SpendInfo(
                SpendKind.UNKNOWN,
                spent,
                problem="PSBT_IN_WITNESS_UTXO does not match the spent output in "
                "PSBT_IN_NON_WITNESS_UTXO (amount or script differ)",
            )
    else:
        spent = inp.witness_utxo
    if spent is None:
        return SpendInfo(
            SpendKind.UNKNOWN,
            None,
            problem="previous output not provided (no PSBT_IN_NON_WITNESS_UTXO or "
            "PSBT_IN_WITNESS_UTXO)",
        )
    info = _classify_spend(inp, spent)
    if info.problem is None and info.unsignable is None and info.kind.legacy and nwu is None:
        return SpendInfo(
            info.kind,
            spent,
            info.script_code,
            info.redeem_script,
            problem="a PSBT_IN_WITNESS_UTXO is given for a non-segwit input; its amount "
            "cannot be verified without PSBT_IN_NON_WITNESS_UTXO",
        )
    return info


def _classify_spend(inp: PsbtInput, spent: TxOut) -> SpendInfo:
    spk = spent.script_pubkey
    info = classify(spk)
    t = info.type
    if t is ScriptType.P2PKH:
        return SpendInfo(SpendKind.P2PKH, spent, spk)
    if t is ScriptType.P2PK:
        return SpendInfo(SpendKind.P2PK, spent, spk)
    if t is ScriptType.MULTISIG:
        return SpendInfo(SpendKind.BARE, spent, spk)
    if t is ScriptType.P2WPKH:
        return SpendInfo(SpendKind.P2WPKH, spent, p2pkh(info.data))
    if t is ScriptType.P2WSH:
        return _witness_script(inp, spent, SpendKind.P2WSH, info.data, None)
    if t is ScriptType.P2TR:
        return SpendInfo(SpendKind.P2TR, spent)
    if t is ScriptType.P2SH:
        rs = inp.redeem_script
        if rs is None:
            return SpendInfo(
                SpendKind.P2SH, spent, unsignable="the P2SH redeem script is not given"
            )
        if hash160(rs) != info.data:
            return SpendInfo(
                SpendKind.P2SH,
                spent,
                problem="PSBT_IN_REDEEM_SCRIPT does not hash to the P2SH scriptPubKey",
            )
        inner = classify(rs)
        if inner.type is ScriptType.P2WPKH:
            return SpendInfo(SpendKind.P2SH_P2WPKH, spent, p2pkh(inner.data), rs)
        if inner.type is ScriptType.P2WSH:
            return _witness_script(inp, spent, SpendKind.P2SH_P2WSH, inner.data, rs)
        if inner.witness_version is not None:
            return SpendInfo(
                SpendKind.UNKNOWN,
                spent,
                redeem_script=rs,
                unsignable=f"P2SH-wrapped witness version {inner.witness_version} cannot be signed",
            )
        return SpendInfo(SpendKind.P2SH, spent, rs, rs)
    if t is ScriptType.WITNESS_UNKNOWN:
        return SpendInfo(
            SpendKind.UNKNOWN,
            spent,
            unsignable=f"witness version {info.witness_version} cannot be signed",
        )
    if t is ScriptType.OP_RETURN:
        return SpendInfo(SpendKind.UNKNOWN, spent, unsignable="spends an OP_RETURN output")
    return SpendInfo(SpendKind.BARE, spent, spk)


def _witness_script(
    inp: PsbtInput, spent: TxOut, kind: SpendKind, program: bytes, rs: bytes | None
) -> SpendInfo:
    ws = inp.witness_script
    if ws is None:
        return SpendInfo(kind, spent, None, rs, unsignable="the witness script is not given")
    if sha256(ws) != program:
        return SpendInfo(
            kind,
            spent,
            None,
            rs,
            problem="PSBT_IN_WITNESS_SCRIPT does not hash to the P2WSH program"
            + (" in the redeem script" if rs is not None else ""),
        )
    return SpendInfo(kind, spent, ws, rs, ws)


def script_pushes(script: bytes) -> set[bytes]:
    """Every data push of ``script`` (empty when it does not parse)."""
    try:
        return {op.data for op in iter_ops(script) if op.data}
    except ScriptError:
        return set()


def script_pushes_in_order(script: bytes) -> list[bytes]:
    """The data pushes of ``script`` in order (empty when it does not parse)."""
    try:
        return [op.data for op in iter_ops(script) if op.data]
    except ScriptError:
        return []


def key_in_script(pubkey: bytes, info: SpendInfo) -> bool:
    """Whether a signature by ``pubkey`` (33 or 65 bytes) can help spend this input."""
    if info.script_code is None:
        return False
    kind = info.kind
    if kind in (SpendKind.P2PKH, SpendKind.P2WPKH, SpendKind.P2SH_P2WPKH):
        return p2pkh(hash160(pubkey)) == info.script_code
    pushes = script_pushes(info.script_code)
    return pubkey in pushes or hash160(pubkey) in pushes


def default_sighash(inp: PsbtInput, kind: SpendKind) -> int:
    """PSBT_IN_SIGHASH_TYPE, else DEFAULT for taproot and ALL for everything else."""
    if inp.sighash_type is not None:
        return inp.sighash_type
    return SIGHASH_DEFAULT if kind is SpendKind.P2TR else 0x01


# --- taproot trees of outputs ------------------------------------------------------------------


def tap_tree_root(leaves: Sequence[PsbtTapLeaf]) -> bytes:
    """Merkle root of a PSBT_OUT_TAP_TREE (leaves in depth-first order with their depths)."""
    stack: list[tuple[int, bytes]] = []
    for leaf in leaves:
        node = (leaf.depth, leaf_hash(leaf.script, leaf.leaf_version))
        while stack and stack[-1][0] == node[0] and node[0] > 0:
            depth, left = stack.pop()
            node = (depth - 1, branch_hash(left, node[1]))
        stack.append(node)
    if len(stack) != 1 or stack[0][0] != 0:
        raise ScriptError("taproot tree is incomplete")
    return stack[0][1]


# --- reports -------------------------------------------------------------------------------------

Owner = Callable[[bytes, KeyOrigin], str | None]
"""Given a public key (33-byte, or 32-byte x-only) and a key origin, the label of the key in
the HSM that derives exactly that public key at that path, or None."""


@dataclass(frozen=True)
class OutputReport:
    """One output as the operator should see it before signing."""

    index: int
    amount: int
    script_type: str
    address: str | None
    script_pubkey: bytes = b""
    change: bool = False
    owner: str | None = None
    path: str | None = None
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "amount": self.amount,
            "script_type": self.script_type,
            "address": self.address,
            "script_pubkey": self.script_pubkey.hex(),
            "change": self.change,
            "owner": self.owner,
            "path": self.path,
            "note": self.note,
        }


@dataclass(frozen=True)
class PolicyReport:
    """The outcome of :func:`check_policy` when nothing was refused."""

    inputs_total: int
    outputs_total: int
    fee: int
    vsize: int
    fee_rate: float
    outputs: tuple[OutputReport, ...]
    warnings: tuple[str, ...] = ()


@dataclass
class _Findings:
    refusals: list[dict[str, object]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def refuse(self, where: str, rule: str, message: str) -> None:
        self.refusals.append({"where": where, "rule": rule, "message": f"{where}: {message}"})

    def raise_if_any(self) -> None:
        if not self.refusals:
            return
        first = str(self.refusals[0]["message"])
        more = len(self.refusals) - 1
        err = SigningPolicyError(
            f"signing refused: {first} [rule {self.refusals[0]['rule']}]"
            + (f" (and {more} more refusal{'s' if more > 1 else ''})" if more else ""),
            hint="see the policy section of docs/bitcoin.md; nothing was signed",
        )
        err.details = list(self.refusals)
        raise err


def check_policy(
    psbt: Psbt,
    infos: Sequence[SpendInfo],
    to_sign: Mapping[int, int],
    network: Network,
    policy: PolicyConfig,
    owner: Owner,
    single_scripts: Mapping[bytes, str],
) -> PolicyReport:
    """Apply the signing policy; raise SigningPolicyError listing every refusal.

    ``to_sign`` maps the index of every input a key of the HSM would sign to the sighash
    type it would use. ``owner`` and ``single_scripts`` identify change outputs.
    """
    f = _Findings()
    _check_global_xpubs(psbt, network, f)
    for i, (inp, info) in enumerate(zip(psbt.inputs, infos, strict=True)):
        where = f"input {i}"
        if info.problem is not None:
            rule = "missing-utxo" if info.spent is None else "inconsistent-input"
            f.refuse(where, rule, info.problem)
            continue
        if info.kind.segwit_v0 and inp.non_witness_utxo is None and not inp.is_finalized:
            f.warnings.append(
                f"{where}: only PSBT_IN_WITNESS_UTXO is given; the amount cannot be checked "
                "against the previous transaction (add PSBT_IN_NON_WITNESS_UTXO to rule out "
                "the segwit fee attack)"
            )
        if i in to_sign:
            _check_sighash(where, info.kind, to_sign[i], policy, f)
            if to_sign[i] & 0x1F == 0x03 and i >= len(psbt.outputs):
                f.refuse(
                    where,
                    "sighash",
                    "SIGHASH_SINGLE without an output of the same index would sign a digest "
                    "that commits to no output (for legacy inputs, the constant 'one' hash "
                    "that any transaction can reuse)",
                )
    outputs = tuple(
        describe_output(i, out, network, owner, single_scripts, f)
        for i, out in enumerate(psbt.outputs)
    )
    outputs_total = sum(o.amount for o in psbt.outputs)
    if any(info.amount is None for info in infos):
        f.raise_if_any()  # an input without amount was refused above: no fee to judge
    inputs_total = sum(info.amount or 0 for info in infos)
    fee = inputs_total - outputs_total
    vsize, size_notes = estimate_vsize(psbt, infos)
    f.warnings.extend(size_notes)
    fee_rate = fee / vsize if vsize else 0.0
    if fee < 0:
        f.refuse(
            "transaction",
            "negative-fee",
            f"the outputs ({outputs_total} sat) exceed the inputs ({inputs_total} sat)",
        )
    else:
        if policy.max_fee_sat > 0 and fee > policy.max_fee_sat:
            f.refuse(
                "transaction",
                "max-fee",
                f"fee {fee} sat is above the limit policy.max_fee_sat = {policy.max_fee_sat}",
            )
        if policy.max_fee_rate_sat_vb > 0 and fee_rate > policy.max_fee_rate_sat_vb:
            f.refuse(
                "transaction",
                "max-fee-rate",
                f"fee rate {fee_rate:.2f} sat/vB (fee {fee} sat over ~{vsize} vB) is above the "
                f"limit policy.max_fee_rate_sat_vb = {policy.max_fee_rate_sat_vb:g}",
            )
    f.raise_if_any()
    return PolicyReport(
        inputs_total, outputs_total, fee, vsize, fee_rate, outputs, tuple(f.warnings)
    )


def _check_sighash(
    where: str, kind: SpendKind, hash_type: int, policy: PolicyConfig, f: _Findings
) -> None:
    name = sighash_name(hash_type)
    if kind is not SpendKind.P2TR and hash_type not in STANDARD_SIGHASH_TYPES:
        f.refuse(
            where,
            "sighash",
            f"sighash type {name} ({hash_type:#x}) is not valid for an ECDSA signature",
        )
    elif hash_type not in policy.allowed_sighash_types:
        allowed = ", ".join(sighash_name(t) for t in policy.allowed_sighash_types) or "none"
        f.refuse(
            where,
            "sighash",
            f"sighash type {name} is not allowed (policy.allowed_sighash_types: {allowed})",
        )


def _check_global_xpubs(psbt: Psbt, network: Network, f: _Findings) -> None:
    for n, xpub in enumerate(psbt.global_map.xpubs):
        fam = networks_for_bip32_version(xpub[:4])
        if fam and network not in fam:
            f.refuse(
                f"global xpub {n}",
                "network",
                f"the extended key is for {describe_family(fam)}, not the configured "
                f"{network.value}",
            )


def describe_output(
    index: int,
    out: PsbtOutput,
    network: Network,
    owner: Owner,
    single_scripts: Mapping[bytes, str],
    findings: _Findings | None = None,
) -> OutputReport:
    """Address (on ``network``) or kind of script, and whether the output is our change."""
    spk = out.script
    info = classify(spk)
    address = address_from_script(spk, network)
    note = ""
    if info.type is ScriptType.OP_RETURN:
        data = b"".join(script_pushes_in_order(info.data))
        note = f"OP_RETURN data ({len(data)} bytes): {data[:80].hex()}"
    elif address is None:
        note = f"{info.type.value} script without an address: {spk[:80].hex()}"
    elif info.type is ScriptType.WITNESS_UNKNOWN:
        note = f"witness version {info.witness_version}: not spendable by current rules"
        if findings is not None:
            findings.warnings.append(
                f"output {index}: pays to a future witness version ({address}); such outputs "
                "are anyone-can-spend today"
            )
    label, path = _change_owner(out, spk, owner, single_scripts)
    if label is not None and path is not None and findings is not None:
        _check_coin_type(index, path, network, findings)
    return OutputReport(
        index,
        out.amount,
        info.type.value,
        address,
        spk,
        change=label is not None,
        owner=label,
        path=None if path is None else format_path(path),
        note=note,
    )


def _check_coin_type(index: int, path: tuple[int, ...], network: Network, f: _Findings) -> None:
    if len(path) >= 2 and path[0] in {h | HARDENED for h in (44, 49, 84, 86)}:
        coin = path[1] & ~HARDENED
        if path[1] >= HARDENED and coin in (0, 1) and coin != params(network).coin_type:
            f.warnings.append(
                f"output {index}: the change path {format_path(path)} uses coin type {coin}, "
                f"which is not the one of {network.value}"
            )


def _change_owner(
    out: PsbtOutput, spk: bytes, owner: Owner, single_scripts: Mapping[bytes, str]
) -> tuple[str | None, tuple[int, ...] | None]:
    """(key label, path) when the output pays a single-key script of a key in the HSM."""
    for pub, origin in out.bip32_derivations.items():
        if len(pub) != 33:
            continue
        h = hash160(pub)
        scripts = {p2wpkh(h), p2pkh(h)}
        if out.redeem_script in (None, p2wpkh(h)):
            scripts.add(p2sh(hash160(p2wpkh(h))))
        if spk in scripts:
            label = owner(pub, origin)
            if label is not None:
                return label, origin.path
    for xonly, tko in out.tap_bip32_derivations.items():
        if out.tap_internal_key not in (None, xonly):
            continue
        try:
            root = None if out.tap_tree is None else tap_tree_root(out.tap_tree)
            q, _ = taproot_output_key(xonly, root)
        except ScriptError:
            continue
        if spk == p2tr(q):
            label = owner(xonly, tko.origin)
            if label is not None:
                return label, tko.origin.path
    label = single_scripts.get(spk)
    return (label, ()) if label is not None else (None, None)


# --- size estimate -------------------------------------------------------------------------------


def estimate_vsize(psbt: Psbt, infos: Sequence[SpendInfo]) -> tuple[int, list[str]]:
    """Estimated virtual size of the finished transaction, and notes on inputs it had to guess."""
    notes: list[str] = []
    base = 4 + 4 + len(compact_size(len(psbt.inputs))) + len(compact_size(len(psbt.outputs)))
    base += sum(len(o.txout().serialize()) for o in psbt.outputs)
    witness_bytes = 0
    any_witness = False
    for i, (inp, info) in enumerate(zip(psbt.inputs, infos, strict=True)):
        script_sig, witness = _input_size(inp, info)
        if script_sig is None:
            notes.append(f"input {i}: its final size is unknown; the fee rate is an estimate")
            script_sig = 0
        base += 36 + len(compact_size(script_sig)) + script_sig + 4
        if witness:
            any_witness = True
            witness_bytes += witness
        else:
            witness_bytes += 1  # an empty witness is still one count byte once any exists
    weight = base * 4 + ((witness_bytes + 2) if any_witness else 0)
    return math.ceil(weight / 4), notes


def _push_len(n: int) -> int:
    return len(push_data(b"\xff" * n))


def _multisig_m(script: bytes | None) -> int | None:
    if script is None:
        return None
    info = classify(script)
    return info.required if info.type is ScriptType.MULTISIG else None


def _witness_len(items: Sequence[int]) -> int:
    return len(compact_size(len(items))) + sum(len(compact_size(n)) + n for n in items)


def _script_witness_items(ws: bytes) -> list[int]:
    m = _multisig_m(ws)
    t = classify(ws).type
    if m is not None:
        items = [0, *([ECDSA_SIG_SIZE] * m)]
    elif t is ScriptType.P2PKH:
        items = [ECDSA_SIG_SIZE, PUBKEY_SIZE]
    else:
        items = [ECDSA_SIG_SIZE]
    return [*items, len(ws)]


def _input_size(inp: PsbtInput, info: SpendInfo) -> tuple[int | None, int]:
    """(scriptSig length or None if unknown, witness bytes) of the finished input."""
    if inp.is_finalized:
        ss = len(inp.final_scriptsig or b"")
        wit = inp.final_scriptwitness
        return ss, _witness_len([len(w) for w in wit]) if wit else 0
    k = info.kind
    if k is SpendKind.P2PKH:
        return 1 + ECDSA_SIG_SIZE + 1 + PUBKEY_SIZE, 0
    if k is SpendKind.P2PK:
        return 1 + ECDSA_SIG_SIZE, 0
    if k is SpendKind.P2WPKH:
        return 0, _witness_len([ECDSA_SIG_SIZE, PUBKEY_SIZE])
    if k is SpendKind.P2SH_P2WPKH:
        return 23, _witness_len([ECDSA_SIG_SIZE, PUBKEY_SIZE])
    if k in (SpendKind.P2WSH, SpendKind.P2SH_P2WSH):
        ss = 35 if k is SpendKind.P2SH_P2WSH else 0
        if info.witness_script is None:
            return None, 0
        return ss, _witness_len(_script_witness_items(info.witness_script))
    if k is SpendKind.P2TR:
        sig = 64 if inp.sighash_type in (None, SIGHASH_DEFAULT) else 65
        return 0, _witness_len([sig])
    if k is SpendKind.P2SH and info.redeem_script is not None:
        m = _multisig_m(info.redeem_script)
        sigs = 1 + m * (1 + ECDSA_SIG_SIZE) if m is not None else 1 + ECDSA_SIG_SIZE
        return sigs + _push_len(len(info.redeem_script)), 0
    if k is SpendKind.BARE:
        m = _multisig_m(info.script_code)
        return (1 + m * (1 + ECDSA_SIG_SIZE)) if m is not None else 1 + ECDSA_SIG_SIZE, 0
    return None, 0


__all__ = [
    "OutputReport",
    "Owner",
    "PolicyReport",
    "SpendInfo",
    "SpendKind",
    "check_policy",
    "default_sighash",
    "describe_input",
    "describe_output",
    "estimate_vsize",
    "key_in_script",
    "script_pushes",
    "tap_tree_root",
]
