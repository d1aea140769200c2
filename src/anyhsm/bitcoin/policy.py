"""The signing policy checked before any signature is made.

Hardware wallets refuse to sign what they cannot account for; so does this layer.
From what each input spends (:mod:`anyhsm.bitcoin.spend`), :func:`check_policy`
applies the rules of :class:`anyhsm.config.PolicyConfig` to the whole transaction:

- every input's previous output must be provided (the fee needs every amount);
- a segwit v0 input's WITNESS_UTXO must equal the output in its NON_WITNESS_UTXO, and
  the NON_WITNESS_UTXO must be there for every segwit v0 input we sign and every
  other input whose amount none of our signatures commits to (the segwit fee attack
  of 2020: ``missing-previous-tx``, ``unverified-amount``; a warning only when
  ``require_previous_tx_segwit_v0`` is false);
- HD keys sign only under their allowed account prefixes, never at ``m``
  (``input-path``, :mod:`anyhsm.bitcoin.paths`);
- the sighash type of every input to be signed must be allowed (ALL and DEFAULT by default);
- the fee (inputs minus outputs) and the fee rate (over a vsize estimated from each
  input's script, :mod:`anyhsm.bitcoin.size`, never from final fields) must stay
  below ``max_fee_sat`` and ``max_fee_rate_sat_vb``; the weight below ``max_tx_weight``;
- every output is shown with its address on the configured network, or as a script
  without address (OP_RETURN, bare scripts; never by itself a refusal); change outputs
  (derived from a signing key, with a script that matches the derived key, no taproot
  script tree, on the change branch of a signed input's account) are marked, and an
  output that pays our key otherwise is shown as outgoing with a warning naming the
  rule (``change-taproot-tree``, ``change-path``);
- global xpubs of another network are refused.

The resource limits (:mod:`anyhsm.bitcoin.limits`) run before all this, in the signer.

Every refusal raises :class:`anyhsm.errors.SigningPolicyError` naming the input or
output and the rule; all refusals found are listed in the error's ``details``.

Five of these checks are also the spending policy's **built-in rules** (docs/policy.md,
"Built-in rules"): ``network``, ``path``, ``sighash``, ``change`` and ``fee``, whose
implicit settings are today's ``[policy]``. With ``defer=True`` (a spending policy is
active) a refusal by one of them alone is not raised here: it is returned as that rule's
:class:`BuiltinVerdict`, for the engine to report like any rule, and the signer still
refuses to sign whatever the gate answers. The other checks (missing or inconsistent
previous outputs, the segwit fee attack, a negative fee, the weight, sighash types ECDSA
cannot use, SIGHASH_SINGLE without its output) say the PSBT is wrong, not that a limit
was met: they always raise, and nothing can relax them from a policy file.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from anyhsm.bitcoin.address import address_from_script
from anyhsm.bitcoin.bip32 import KeyOrigin, format_path
from anyhsm.bitcoin.encoding import hash160
from anyhsm.bitcoin.networks import describe_family, networks_for_bip32_version
from anyhsm.bitcoin.paths import CHANGE_PATH_RULE, INPUT_PATH_RULE, PathRules
from anyhsm.bitcoin.psbt import Psbt, PsbtInput, PsbtOutput
from anyhsm.bitcoin.script import (
    ScriptType,
    classify,
    p2pkh,
    p2sh,
    p2tr,
    p2wpkh,
)
from anyhsm.bitcoin.script_kind import ScriptKind
from anyhsm.bitcoin.sighash import (
    SIGHASH_ANYONECANPAY,
    STANDARD_SIGHASH_TYPES,
    sighash_name,
)
from anyhsm.bitcoin.size import estimate_vsize as _estimate_size
from anyhsm.bitcoin.spend import SpendInfo, SpendKind, script_pushes_in_order
from anyhsm.bitcoin.taproot import depth_first_merkle_root, taproot_output_key
from anyhsm.config import PolicyConfig
from anyhsm.errors import ScriptError, SigningPolicyError
from anyhsm.types import Network

# Names of the rules a refusal or warning can carry (SigningPolicyError.details[*]["rule"])
MISSING_PREVIOUS_TX_RULE = "missing-previous-tx"
UNVERIFIED_AMOUNT_RULE = "unverified-amount"
CHANGE_TAPROOT_TREE_RULE = "change-taproot-tree"
TX_WEIGHT_RULE = "tx-weight"

# The built-in rules of the spending policy (their names in a decision), in their order of
# evaluation, and the checks above that belong to each (the names without a policy)
NETWORK = "network"
PATH = "path"
SIGHASH = "sighash"
CHANGE = "change"
FEE = "fee"
BUILTIN_RULES = (NETWORK, PATH, SIGHASH, CHANGE, FEE)


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
    not_change: str | None = None  # the rule that made a payment to our own key not change
    steps: tuple[int, ...] | None = None  # ``path`` as steps (change only; not in to_dict)

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
            "note": self.note or None,  # no value is null, never ""
            "not_change": self.not_change,
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
    builtin: tuple[BuiltinVerdict, ...] = ()  # with verdicts: the built-in rules' verdicts
    deferred: tuple[dict[str, object], ...] = ()  # with defer: the refusals not raised


@dataclass(frozen=True, slots=True)
class BuiltinVerdict:
    """A built-in rule's verdict under today's ``[policy]`` settings (``decision``: allow,
    warn or refuse); ``checks``: the names of the checks that refused or warned
    (``max-fee``, ``input-path``, ``change-path``, ...), as the signer names them without
    a spending policy."""

    rule: str
    decision: str
    reason: str
    checks: tuple[str, ...] = ()

    @property
    def refused(self) -> bool:
        return self.decision == "refuse"


@dataclass(frozen=True, slots=True)
class SignedInput:
    """One signature the signer would make: input ``index``, by key ``key_id``
    (``label``) at ``path`` (None for a single key), with sighash type ``sighash``."""

    index: int
    key_id: str
    label: str
    path: tuple[int, ...] | None
    sighash: int


@dataclass(frozen=True, slots=True)
class SigningFacts:
    """What the built-in rules of a policy file judge, as the signer found it: the
    signatures it would make, the change outputs with their paths, the fee rate, and the
    verdicts of the built-in rules under ``[policy]`` (which the engine reports as the
    implicit rules ``network``, ``path``, ``sighash``, ``change``, ``fee``)."""

    network: Network
    fee_rate: float
    signing: tuple[SignedInput, ...]
    change: tuple[OutputReport, ...]  # outputs that are change (with ``steps`` for HD keys)
    builtin: tuple[BuiltinVerdict, ...]

    @property
    def refused(self) -> tuple[BuiltinVerdict, ...]:
        return tuple(v for v in self.builtin if v.refused)


@dataclass
class _Findings:
    refusals: list[dict[str, object]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # per built-in rule: (check name, message) of its refusals
    builtin: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    others: int = 0  # refusals that are not a built-in rule's (always raised)

    def refuse(self, where: str, rule: str, message: str, builtin: str | None = None) -> None:
        text = f"{where}: {message}"
        self.refusals.append({"where": where, "rule": rule, "message": text})
        if builtin is None:
            self.others += 1
        else:
            self.builtin.setdefault(builtin, []).append((rule, text))

    def raise_if_any(self, defer: bool = False) -> None:
        """Raise every refusal found; with ``defer``, only when one of them is not a
        built-in rule's (those are then returned as verdicts instead)."""
        if not self.refusals or (defer and not self.others):
            return
        raise refusal_error(self.refusals)


def refusal_error(refusals: Sequence[Mapping[str, object]]) -> SigningPolicyError:
    """The signing policy's error for ``refusals`` (each with where, rule, message)."""
    first = str(refusals[0]["message"])
    more = len(refusals) - 1
    err = SigningPolicyError(
        f"signing refused: {first} [rule {refusals[0]['rule']}]"
        + (f" (and {more} more refusal{'s' if more > 1 else ''})" if more else ""),
        hint="see the policy section of docs/bitcoin.md; nothing was signed",
    )
    err.details = [dict(r) for r in refusals]
    return err


Signing = Mapping[int, Sequence[tuple[str, tuple[int, ...]]]]
"""Per input index, the (key label, path) of every HD key that would sign it."""


def check_policy(
    psbt: Psbt,
    infos: Sequence[SpendInfo],
    to_sign: Mapping[int, int],
    network: Network,
    policy: PolicyConfig,
    owner: Owner,
    single_scripts: Mapping[bytes, str],
    *,
    signing: Signing | None = None,
    script_leaves: Mapping[int, Collection[bytes]] | None = None,
    confirmed: Callable[[str, tuple[int, ...]], bool] | None = None,
    amounts_committed: Callable[[], bool] | None = None,
    defer: bool = False,
    verdicts: bool | None = None,
) -> PolicyReport:
    """Apply the signing policy; raise SigningPolicyError listing every refusal.

    ``to_sign`` maps the index of every input a key of the HSM would sign to the sighash
    type it would use. ``owner`` and ``single_scripts`` identify change outputs;
    ``signing`` gives the paths our HD keys would sign at (rule ``input-path``, and the
    accounts change must be under); ``script_leaves`` the taproot leaves signed by
    script path (for the size estimate). ``confirmed`` says whether key ``label`` at a
    path of ``signing`` really is the key the input names, and ``amounts_committed``
    whether a signature we will make commits to every amount; both are asked only when
    a decision depends on them (the signer verifies its signatures, so a claim under
    our fingerprint is otherwise only checked once signed). Without them every claim
    is taken as ours.

    ``defer``: a spending policy is active. Refusals by the built-in rules alone
    (``network``, ``path``, ``sighash``, ``fee``) are then not raised but returned in
    ``builtin`` (with ``change``, which only warns), one verdict per rule; the caller
    must not sign when one of them refuses (their details are in ``deferred``).
    ``verdicts`` (default: ``defer``) asks for the verdicts without deferring.
    """
    f = _Findings()
    signing = signing or {}
    rules = PathRules(network, policy)
    _check_global_xpubs(psbt, network, f)
    committed = _Lazy(amounts_committed or (lambda: _amounts_committed(infos, to_sign)))
    for i, (inp, info) in enumerate(zip(psbt.inputs, infos, strict=True)):
        where = f"input {i}"
        if info.problem is not None:
            rule = "missing-utxo" if info.spent is None else "inconsistent-input"
            f.refuse(where, rule, info.problem)
            continue
        _check_previous_tx(where, i, inp, info, i in to_sign, committed, policy, f)
        for label, path in signing.get(i, ()):
            why = rules.input_problem(label, path)
            if why is not None:
                f.refuse(where, INPUT_PATH_RULE, f"key {label}: {why}", PATH)
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
    signed_paths: dict[str, list[tuple[int, ...]]] = {}
    for entries in signing.values():
        for label, path in entries:
            signed_paths.setdefault(label, []).append(path)

    def change_rule(label: str, path: tuple[int, ...]) -> str | None:
        return rules.change_problem(label, path, signed_paths, confirmed)

    outputs = tuple(
        describe_output(i, out, network, owner, single_scripts, f, change_rule)
        for i, out in enumerate(psbt.outputs)
    )
    outputs_total = sum(o.amount for o in psbt.outputs)
    if any(info.amount is None for info in infos):
        f.raise_if_any()  # an input without amount was refused above: no fee to judge
    inputs_total = sum(info.amount or 0 for info in infos)
    fee = inputs_total - outputs_total
    vsize, size_notes = estimate_vsize(psbt, infos, script_leaves)
    f.warnings.extend(size_notes)
    fee_rate = fee / vsize if vsize else 0.0
    if vsize * 4 > policy.max_tx_weight:
        f.refuse(
            "transaction",
            TX_WEIGHT_RULE,
            f"the finished transaction would weigh about {vsize * 4} WU, more than "
            f"policy.max_tx_weight = {policy.max_tx_weight} (Bitcoin Core does not relay it)",
        )
    if fee < 0:
        f.refuse(
            "transaction",
            "negative-fee",
            f"the outputs ({outputs_total} sat) exceed the inputs ({inputs_total} sat)",
        )
    else:
        for check, message in fee_problems(
            fee, vsize, fee_rate, policy.max_fee_sat, policy.max_fee_rate_sat_vb, "policy."
        ):
            f.refuse("transaction", check, message, FEE)
    f.raise_if_any(defer)
    want = defer if verdicts is None else verdicts
    builtin = _verdicts(f, psbt, to_sign, signing, outputs, policy, fee, vsize) if want else ()
    return PolicyReport(
        inputs_total,
        outputs_total,
        fee,
        vsize,
        fee_rate,
        outputs,
        tuple(f.warnings),
        builtin,
        tuple(f.refusals),
    )


MAX_FEE_RULE = "max-fee"
MAX_FEE_RATE_RULE = "max-fee-rate"


def fee_problems(
    fee: int, vsize: int, fee_rate: float, max_fee: int | None, max_rate: float | None, prefix: str
) -> list[tuple[str, str]]:
    """(check, message) for a fee above ``max_fee`` sat or a fee rate above ``max_rate``
    sat/vB (None or 0: no limit); ``prefix`` names where the settings are (``policy.``,
    ``rules.NAME.``). One wording for the ``[policy]`` limits and a policy file's."""
    out: list[tuple[str, str]] = []
    if max_fee is not None and max_fee > 0 and fee > max_fee:
        out.append(
            (MAX_FEE_RULE, f"fee {fee} sat is above the limit {prefix}max_fee_sat = {max_fee}")
        )
    if max_rate is not None and max_rate > 0 and fee_rate > max_rate:
        out.append(
            (
                MAX_FEE_RATE_RULE,
                f"fee rate {fee_rate:.2f} sat/vB (fee {fee} sat over ~{vsize} vB) is above the "
                f"limit {prefix}max_fee_rate_sat_vb = {max_rate:g}",
            )
        )
    return out


def fee_text(fee: int, vsize: int, fee_rate: float) -> str:
    return f"fee {fee} sat ({fee_rate:.2f} sat/vB over ~{vsize} vB)"


# what would have to change for each built-in rule's [policy] refusal to pass
_REMEDY = {
    NETWORK: "use a PSBT made for this network (nothing can allow another network's)",
    PATH: "sign under an allowed account, or allow the account in the configuration "
    "(policy.allowed_input_paths, policy.key_input_paths.<label>)",
    SIGHASH: "sign with an allowed sighash type, or add it to policy.allowed_sighash_types "
    "in the configuration",
    FEE: "lower the fee, or raise policy.max_fee_sat / policy.max_fee_rate_sat_vb in the "
    "configuration",
}


def _verdicts(
    f: _Findings,
    psbt: Psbt,
    to_sign: Mapping[int, int],
    signing: Signing,
    outputs: Sequence[OutputReport],
    policy: PolicyConfig,
    fee: int,
    vsize: int,
) -> tuple[BuiltinVerdict, ...]:
    """The built-in rules' verdicts under ``[policy]``, in their order of evaluation."""
    rate = fee / vsize if vsize else 0.0
    allowed = ", ".join(sighash_name(t) for t in policy.allowed_sighash_types) or "none"
    hd = sum(1 for entries in signing.values() if entries)
    change = [o for o in outputs if o.change]
    passing = {
        NETWORK: f"{len(psbt.global_map.xpubs)} global xpub(s), none of another network",
        PATH: f"{hd} input(s) signed by HD keys, all under an allowed account"
        + (" (policy.allowed_input_paths)" if policy.allowed_input_paths else ""),
        SIGHASH: f"{len(to_sign)} input(s) signed with allowed sighash types "
        f"(policy.allowed_sighash_types: {allowed})",
        FEE: f"{fee_text(fee, vsize, rate)} within policy.max_fee_sat = "
        f"{policy.max_fee_sat or 'no limit'} and policy.max_fee_rate_sat_vb = "
        f"{f'{policy.max_fee_rate_sat_vb:g}' if policy.max_fee_rate_sat_vb else 'no limit'}",
    }
    out: list[BuiltinVerdict] = []
    for rule in BUILTIN_RULES:
        if rule == CHANGE:
            out.append(_change_verdict(outputs, change, policy))
            continue
        found = f.builtin.get(rule)
        if not found:
            out.append(BuiltinVerdict(rule, "allow", passing[rule]))
            continue
        reason = "; ".join(f"{m} [{c}]" for c, m in found[:5])
        if len(found) > 5:
            reason += f" (and {len(found) - 5} more)"
        checks = tuple(dict.fromkeys(c for c, _ in found))
        out.append(BuiltinVerdict(rule, "refuse", f"{reason}; {_REMEDY[rule]}", checks))
    return tuple(out)


def _change_verdict(
    outputs: Sequence[OutputReport], change: Sequence[OutputReport], policy: PolicyConfig
) -> BuiltinVerdict:
    """``change`` warns, as without a policy, when an output pays our key but is not
    change (it is counted as leaving); it refuses nothing under ``[policy]``."""
    not_change = [o for o in outputs if o.not_change is not None]
    if not not_change:
        shown = ", ".join(str(o.index) for o in change[:10]) or "none"
        return BuiltinVerdict(
            CHANGE,
            "allow",
            f"change output(s): {shown} (on a signed account's change branch, below "
            f"policy.max_change_index = {policy.max_change_index})",
        )
    shown = ", ".join(f"{o.index} [{o.not_change}]" for o in not_change[:10])
    return BuiltinVerdict(
        CHANGE,
        "warn",
        f"output(s) {shown} pay our key but are not change: counted as leaving the wallet "
        "(see the signer's warnings; a rule with own_outputs = false refuses them)",
        tuple(dict.fromkeys(str(o.not_change) for o in not_change)),
    )


def _amounts_committed(infos: Sequence[SpendInfo], to_sign: Mapping[int, int]) -> bool:
    """Whether one of our signatures commits to the amount of every input: a BIP341
    signature without ANYONECANPAY does (sha_amounts); legacy and BIP143 ones commit to
    their own input's amount at most."""
    return any(
        infos[i].kind is SpendKind.P2TR and not hash_type & SIGHASH_ANYONECANPAY
        for i, hash_type in to_sign.items()
    )


class _Lazy:
    """A boolean computed once, when first asked."""

    def __init__(self, fn: Callable[[], bool]) -> None:
        self._fn = fn
        self._value: bool | None = None

    def __bool__(self) -> bool:
        if self._value is None:
            self._value = self._fn()
        return self._value


def _check_previous_tx(
    where: str,
    index: int,
    inp: PsbtInput,
    info: SpendInfo,
    ours: bool,
    committed: _Lazy,
    policy: PolicyConfig,
    f: _Findings,
) -> None:
    """The segwit fee attack (2020): with only PSBT_IN_WITNESS_UTXO an amount is whatever
    the submitter says. Our BIP143 signature commits to our input's amount only, so two
    rounds, each lying about the other input, each show a small fee while the combined
    signatures pay a large one. So every segwit v0 input we sign needs its previous
    transaction, and so does every other input (a foreign one, or a taproot one we
    would sign) unless a taproot signature we really make commits to every amount."""
    if inp.non_witness_utxo is not None or info.kind.legacy:
        return  # legacy inputs without it are refused as inconsistent by describe_input
    if ours and info.kind.segwit_v0:
        rule, what = MISSING_PREVIOUS_TX_RULE, "a segwit v0 input we sign"
    elif not committed:  # also a taproot input merely claimed under our fingerprint
        rule = UNVERIFIED_AMOUNT_RULE
        what = "an input whose amount counts in the fee while none of our signatures commits to it"
    else:
        return
    if policy.require_previous_tx_segwit_v0:
        f.refuse(
            where,
            rule,
            f"{what} has only PSBT_IN_WITNESS_UTXO, so its amount cannot be checked: add "
            "PSBT_IN_NON_WITNESS_UTXO (the previous transaction) to rule out the segwit fee "
            "attack",
        )
    else:
        f.warnings.append(
            f"{where}: only PSBT_IN_WITNESS_UTXO is given; the amount cannot be checked "
            "against the previous transaction (policy.require_previous_tx_segwit_v0 = false; "
            f"rule {rule} not enforced)"
        )


def _check_sighash(
    where: str, kind: SpendKind, hash_type: int, policy: PolicyConfig, f: _Findings
) -> None:
    if kind is not SpendKind.P2TR and hash_type not in STANDARD_SIGHASH_TYPES:
        f.refuse(
            where,
            "sighash",
            f"sighash type {sighash_name(hash_type)} ({hash_type:#x}) is not valid for an "
            "ECDSA signature",
        )
    else:
        allowed = policy.allowed_sighash_types
        why = sighash_problem(hash_type, allowed, "policy.allowed_sighash_types")
        if why is not None:
            f.refuse(where, "sighash", why, SIGHASH)


def sighash_problem(hash_type: int, allowed: Collection[int], setting: str) -> str | None:
    """Why ``hash_type`` is not allowed by ``setting`` (None when it is)."""
    if hash_type in allowed:
        return None
    shown = ", ".join(sighash_name(t) for t in allowed) or "none"
    return f"sighash type {sighash_name(hash_type)} is not allowed ({setting}: {shown})"


def _check_global_xpubs(psbt: Psbt, network: Network, f: _Findings) -> None:
    for n, xpub in enumerate(psbt.global_map.xpubs):
        fam = networks_for_bip32_version(xpub[:4])
        if fam and network not in fam:
            f.refuse(
                f"global xpub {n}",
                "network",
                f"the extended key is for {describe_family(fam)}, not the configured "
                f"{network.value}",
                NETWORK,
            )


ChangeRule = Callable[[str, tuple[int, ...]], str | None]
"""Given the label and path of our key an output pays, why it is not change (or None)."""


def describe_output(
    index: int,
    out: PsbtOutput,
    network: Network,
    owner: Owner,
    single_scripts: Mapping[bytes, str],
    findings: _Findings | None = None,
    change_rule: ChangeRule | None = None,
) -> OutputReport:
    """Address (on ``network``) or kind of script, and whether the output is our change.

    An output is change only if it pays a key of ours alone, at a path the change rule
    accepts (``change_rule``; a single key has no path); one that pays our key otherwise
    is shown as outgoing, with a warning naming the rule."""
    spk = out.script
    info = classify(spk)
    address = address_from_script(spk, network)
    note = ""
    if info.type is ScriptType.OP_RETURN:
        data = b"".join(script_pushes_in_order(info.data))
        note = f"OP_RETURN data ({len(data)} bytes): {data[:80].hex()}"
    elif address is None:
        note = f"{ScriptKind.of_script(info.type)} script without an address: {spk[:80].hex()}"
    elif info.type is ScriptType.WITNESS_UNKNOWN:
        note = f"witness version {info.witness_version}: not spendable by current rules"
        if findings is not None:
            findings.warnings.append(
                f"output {index}: pays to a future witness version ({address}); such outputs "
                "are anyone-can-spend today"
            )
    label, path, refused = _change_owner(out, spk, owner, single_scripts)
    if label is not None and path is not None and change_rule is not None:
        why = change_rule(label, path)
        if why is not None:
            refused = (CHANGE_PATH_RULE, why)
            label = None
    if refused is not None:
        rule, why = refused
        note = (note + "; " if note else "") + f"pays our key but is not change ({rule})"
        if findings is not None:
            findings.warnings.append(
                f"output {index}: NOT CHANGE [rule {rule}]: {why}; it is shown as an "
                "outgoing payment"
            )
        label, path = None, None
    return OutputReport(
        index,
        out.amount,
        ScriptKind.of_script(info.type).value,
        address,
        spk,
        change=label is not None,
        owner=label,
        path=None if path is None else format_path(path),
        note=note,
        not_change=None if refused is None else refused[0],
        steps=path,
    )


def _change_owner(
    out: PsbtOutput, spk: bytes, owner: Owner, single_scripts: Mapping[bytes, str]
) -> tuple[str | None, tuple[int, ...] | None, tuple[str, str] | None]:
    """(key label, path, None) when the output pays a single-key script of a key in the
    HSM (path None for a single, non-HD key); (None, None, (rule, why)) when it pays our
    key in a way that is not change."""
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
                return label, origin.path, None
    refused: tuple[str, str] | None = None
    for xonly, tko in out.tap_bip32_derivations.items():
        if out.tap_internal_key not in (None, xonly):
            continue
        try:
            root = None if out.tap_tree is None else depth_first_merkle_root(out.tap_tree)
            q, _ = taproot_output_key(xonly, root)
        except ScriptError:
            continue
        if spk != p2tr(q):
            continue
        label = owner(xonly, tko.origin)
        if label is None:
            continue
        if root is not None:
            # Change must be spendable by our keys alone: a script tree beside our internal
            # key may hold anyone's leaf (an attacker's "<key> OP_CHECKSIG"), which would
            # spend the output without us. Only BIP86 outputs (no tree) are change.
            n = len(out.tap_tree or ())
            refused = (
                CHANGE_TAPROOT_TREE_RULE,
                f"the internal key is key {label} at {format_path(tko.origin.path)}, but the "
                f"output also commits to a script tree of {n} leaf/leaves "
                "(PSBT_OUT_TAP_TREE) that anyone else may be able to spend; only a BIP86 "
                "output (no script tree) is change",
            )
            continue
        return label, tko.origin.path, None
    label = single_scripts.get(spk)
    if label is not None:
        return label, None, None  # a single key: no path, no path rule
    return None, None, refused


# --- size estimate -------------------------------------------------------------------------------


def estimate_vsize(
    psbt: Psbt,
    infos: Sequence[SpendInfo],
    script_leaves: Mapping[int, Collection[bytes]] | None = None,
) -> tuple[int, list[str]]:
    """Estimated virtual size of the finished transaction from each input's script
    (:func:`anyhsm.bitcoin.size.estimate_vsize`), and notes on inputs it had to guess."""
    spks = [None if info.spent is None else info.spent.script_pubkey for info in infos]
    return _estimate_size(psbt, spks, script_leaves)


__all__ = [
    "BUILTIN_RULES",
    "BuiltinVerdict",
    "OutputReport",
    "Owner",
    "PolicyReport",
    "SignedInput",
    "SigningFacts",
    "check_policy",
    "describe_output",
    "estimate_vsize",
    "fee_problems",
    "refusal_error",
    "sighash_problem",
]
