"""PSBT signer: sign every input that a key of the signing backend can sign.

The signer never sees a private key. It works through a
:class:`~anyhsm.bitcoin.backend.SigningBackend` (the HSM handle is one), as Bitcoin
Core's signer works through a ``SigningProvider``, and takes the signing policy, the
network and the environment as arguments. It matches inputs to keys from public data
(PSBT_IN_BIP32_DERIVATION and PSBT_IN_TAP_BIP32_DERIVATION against the master
fingerprint of each HD key; single keys by their public key in the input's
script), runs the signing policy (:mod:`anyhsm.bitcoin.policy`), computes each
sighash once with a per-transaction cache, and asks the backend for signatures of
32-byte digests.

Every signature is verified, against the key the PSBT names, before it goes into
the PSBT (Bitcoin Core's ``CKey::Sign`` verifies each signature too, and BIP340
advises it against fault attacks). That one check does two jobs: a faulty
provider cannot slip a bad signature in, and a signature made by our key at the
named path verifies under the named key only if that key is ours (a BIP340
signature commits to its key; an ECDSA signature verifies under at most three
other keys, all fixed by the secret nonce, so none can be named in advance). So
a derivation field is not checked by deriving its public key first, which cost
as much as the signature itself. For a taproot key path the named key is the
internal key, which the signature does not commit to: planning checks that the
internal key and merkle root give the output key, and the signature, verified
under the output key, then proves the internal key is ours.

When a signature does not verify, the key is derived to tell two cases apart: a
PSBT naming a key we do not hold at that path leaves the input unsigned with
that reason; a key that is ours means the provider erred, and signing stops with
``SigningFailed``. Discarded signatures are written to the audit log
(``sign_discarded``). An input claimed through our fingerprint alone counts for
the policy; if the policy refuses, such claims are checked by derivation and the
policy asked again, so another wallet's input cannot block ours. Reasons about a
key named under our fingerprint are given only once the key is derived and found
ours. Change outputs are recognised only by deriving their keys.

- ECDSA (legacy, BIP143): RFC 6979 with low-R grinding requested (as Bitcoin Core
  does), the sighash byte appended, into PSBT_IN_PARTIAL_SIG.
- Taproot key path (BIP341): the HSM applies the tweak TapTweak(P || merkle root);
  the signature goes into PSBT_IN_TAP_KEY_SIG (64 bytes for SIGHASH_DEFAULT, 65 with
  the type byte otherwise). Script path: the untweaked key signs the leaf's
  sighash, into PSBT_IN_TAP_SCRIPT_SIG.
- BIP340 aux randomness is fresh by default; ``policy.deterministic_schnorr`` makes
  it 32 zero bytes (reproducible signatures, for tests against other signers).

The PSBT passed in is never modified: the result holds a signed copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from anyhsm.bitcoin import limits
from anyhsm.bitcoin.address import bip86_output_key
from anyhsm.bitcoin.bip32 import HARDENED, KeyOrigin, format_path
from anyhsm.bitcoin.capability import signing_refusal
from anyhsm.bitcoin.encoding import hash160, sha256d
from anyhsm.bitcoin.policy import (
    OutputReport,
    PolicyReport,
    SignedInput,
    SigningFacts,
    check_policy,
    refusal_error,
)
from anyhsm.bitcoin.psbt import Psbt, PsbtInput
from anyhsm.bitcoin.script import p2pkh, p2sh, p2tr, p2wpkh
from anyhsm.bitcoin.script_kind import ScriptKind
from anyhsm.bitcoin.sighash import (
    SIGHASH_ANYONECANPAY,
    SIGHASH_DEFAULT,
    SighashCache,
    sighash_name,
)
from anyhsm.bitcoin.spend import (
    SpendInfo,
    SpendKind,
    default_sighash,
    describe_input,
    key_in_script,
    script_pushes,
)
from anyhsm.bitcoin.taproot import (
    leaf_hash,
    taproot_tweak,
    verify_control_block,
)
from anyhsm.bitcoin.tx import Transaction
from anyhsm.crypto import secp256k1 as ec
from anyhsm.errors import (
    AddressError,
    Bip32Error,
    HsmError,
    NothingSigned,
    PsbtLimitExceeded,
    ScriptError,
    SigningFailed,
    SigningPolicyError,
    UnsupportedOperation,
    UsageError,
)
from anyhsm.types import (
    MAX_PATH_DEPTH,
    Capabilities,
    Environment,
    KeyInfo,
    KeyRef,
    KeyType,
    Network,
    SignParams,
    SigScheme,
)

if TYPE_CHECKING:
    from anyhsm.bitcoin.backend import SigningBackend
    from anyhsm.config import PolicyConfig
    from anyhsm.policy.gate import SpendGrant, SpendingGate, SpendSummary

SIGNING_KEY_TYPES = frozenset({KeyType.SECP256K1, KeyType.BIP32, KeyType.BIP32_NODE})
HD_KEY_TYPES = frozenset({KeyType.BIP32, KeyType.BIP32_NODE})
_ZERO_AUX = bytes(32)


def schnorr_aux(policy: PolicyConfig) -> bytes | None:
    """The BIP340 auxiliary randomness the policy asks for: None (fresh random bytes, the
    default) or 32 zero bytes with ``deterministic_schnorr`` (reproducible signatures)."""
    return _ZERO_AUX if policy.deterministic_schnorr else None


# --- reports -------------------------------------------------------------------------------------


class SignatureKind(enum.StrEnum):
    """What a signature the signer makes is, and where it goes in the PSBT."""

    ECDSA = "ecdsa"  # PSBT_IN_PARTIAL_SIG
    TAPROOT_KEY = "taproot-key"  # PSBT_IN_TAP_KEY_SIG (BIP86 / key path, tweaked key)
    TAPROOT_SCRIPT = "taproot-script"  # PSBT_IN_TAP_SCRIPT_SIG (one leaf)


@dataclass(frozen=True)
class SignatureReport:
    """One signature the signer added."""

    key: str  # label of the key in the HSM
    pubkey: bytes  # 33-byte key (ECDSA) or 32-byte x-only key (taproot)
    path: tuple[int, ...] | None  # BIP32 path below the master; None for a single key
    kind: SignatureKind
    sighash: int
    leaf_hash: bytes | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "key": self.key,
            "pubkey": self.pubkey.hex(),
            "path": None if self.path is None else format_path(self.path),
            "kind": self.kind.value,
            "sighash": sighash_name(self.sighash),
            "leaf_hash": None if self.leaf_hash is None else self.leaf_hash.hex(),
        }


@dataclass(frozen=True)
class InputReport:
    """What happened to one input: ``status`` is "signed", "not-signed" or "finalized"."""

    index: int
    script_type: str
    amount: int | None
    status: str
    reason: str
    signatures: tuple[SignatureReport, ...] = ()

    @property
    def signed(self) -> bool:
        return self.status == "signed"

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "script_type": self.script_type,
            "amount": self.amount,
            "status": self.status,
            "reason": self.reason,
            "signatures": [s.to_dict() for s in self.signatures],
        }


@dataclass
class SignResult:
    """The signed PSBT (a copy) and what the signer did and checked."""

    psbt: Psbt
    inputs: list[InputReport]
    outputs: list[OutputReport]
    fee: int
    vsize: int
    fee_rate: float
    inputs_total: int
    outputs_total: int
    warnings: list[str] = field(default_factory=list)

    @property
    def signed_inputs(self) -> int:
        return sum(1 for r in self.inputs if r.signed)

    @property
    def signatures(self) -> int:
        return sum(len(r.signatures) for r in self.inputs)

    @property
    def unsigned_inputs(self) -> int:
        return sum(1 for r in self.inputs if r.status == "not-signed")

    def to_dict(self) -> dict[str, object]:
        return {
            "psbt": self.psbt.to_base64(),
            "signed_inputs": self.signed_inputs,
            "signatures": self.signatures,
            "unsigned_inputs": self.unsigned_inputs,
            "inputs": [r.to_dict() for r in self.inputs],
            "outputs": [o.to_dict() for o in self.outputs],
            "fee": self.fee,
            "vsize": self.vsize,
            "fee_rate": round(self.fee_rate, 3),
            "inputs_total": self.inputs_total,
            "outputs_total": self.outputs_total,
            "warnings": list(self.warnings),
        }


# --- keys ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    info: KeyInfo
    caps: Capabilities
    hd: bool = field(init=False)  # an HD key whose provider derives: matched by derivations
    fingerprint: bytes = field(init=False)  # master fingerprint

    def __post_init__(self) -> None:
        hd = self.info.key_type in HD_KEY_TYPES and self.caps.can_derive
        object.__setattr__(self, "hd", hd)
        object.__setattr__(self, "fingerprint", hash160(self.info.public_key)[:4])

    @property
    def label(self) -> str:
        return self.info.label

    def where(self, path: tuple[int, ...]) -> str:
        """``key L at m/..`` for reports."""
        return f"key {self.label}" + (f" at {format_path(path)}" if self.hd else "")

    def cannot(self, scheme: SigScheme, tweak: bool = False) -> str | None:
        """Why this key's provider cannot make the signature (None if it can)."""
        return signing_refusal(self.caps, self.info.provider, scheme, tweak)


KeySelection = KeyRef | Sequence[KeyRef] | None
"""Which keys sign a PSBT: one key (id or label), several, or None for every key."""


def _key_refs(key: KeySelection) -> tuple[KeyRef, ...] | None:
    if key is None:
        return None
    refs = (key,) if isinstance(key, str) else tuple(key)
    if not refs:
        raise UsageError("no key named to sign with", hint="name a key, or sign with every key")
    return refs


def _signing_keys(backend: SigningBackend, key: tuple[KeyRef, ...] | None) -> list[_Key]:
    if key is None:
        infos = backend.list_keys()
    else:  # each named key once, also when named by its id and by its label
        infos = list({i.id: i for i in (backend.get_key(k) for k in key)}.values())
    out: list[_Key] = []
    for info in infos:
        if not info.available and key is None:
            continue  # known to the key directory, but its store is not open here
        if info.key_type not in SIGNING_KEY_TYPES:
            if key is not None:
                raise UnsupportedOperation(
                    info.provider,
                    f"Bitcoin signing with a {info.key_type.value} key",
                    hint="use a secp256k1 or bip32 key",
                )
            continue
        out.append(_Key(info, backend.capabilities(info.id)))
    return out


class _Derivations:
    """Public keys of HD keys at paths. The parent of a non-hardened step is derived once
    by the HSM and its children computed here (public derivation), so a PSBT with many
    inputs under one account costs one HSM call, not one per input."""

    def __init__(self, backend: SigningBackend) -> None:
        self._backend = backend
        self._nodes: dict[tuple[str, tuple[int, ...]], tuple[bytes, bytes]] = {}
        self._pubs: dict[tuple[str, tuple[int, ...]], bytes | None] = {}

    def _node(self, key: _Key, path: tuple[int, ...]) -> tuple[bytes, bytes]:
        ident = (key.info.id, path)
        node = self._nodes.get(ident)
        if node is None:
            d = self._backend.derive_public(key.info.id, path)
            node = self._nodes[ident] = (d.public_key, d.chain_code)
        return node

    def pubkey(self, key: _Key, path: tuple[int, ...]) -> bytes | None:
        """The 33-byte public key of ``key`` at ``path`` (None if that child is invalid or
        the path is not one BIP32 allows: a PSBT's claim about it is then simply not ours)."""
        ident = (key.info.id, path)
        if ident in self._pubs:
            return self._pubs[ident]
        pub: bytes | None
        if len(path) > MAX_PATH_DEPTH:
            self._pubs[ident] = None
            return None
        try:
            if not path:
                pub = key.info.public_key
            elif path[-1] < HARDENED:
                parent, chain = self._node(key, path[:-1])
                pub, _ = ec.bip32_ckd_pub(parent, chain, path[-1])
            else:
                pub = self._node(key, path)[0]
        except (ec.CurveError, Bip32Error):
            pub = None
        self._pubs[ident] = pub
        return pub

    def holds(self, key: _Key, path: tuple[int, ...], pubkey: bytes) -> bool:
        """Whether ``key`` at ``path`` is ``pubkey`` (33 bytes, or 32 x-only)."""
        derived = self.pubkey(key, path) if key.hd else key.info.public_key
        if derived is None:
            return False
        return derived[1:] == pubkey if len(pubkey) == 32 else derived == pubkey

    def owner(self, keys: Sequence[_Key], pubkey: bytes, origin: KeyOrigin) -> _Key | None:
        """The HD key that derives ``pubkey`` (33 bytes, or 32 x-only) at ``origin``."""
        for k in keys:
            if k.hd and k.fingerprint == origin.fingerprint and self.holds(k, origin.path, pubkey):
                return k
        return None


# --- planning ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Job:  # internal and short-lived: slots, not frozen, as it is made per input
    key: _Key
    path: tuple[int, ...]
    pubkey: bytes  # the PSBT field's key: 33 bytes (ECDSA) or x-only (taproot)
    kind: SignatureKind
    verify_key: bytes  # what the signature must verify against
    tweak: bytes | None = None
    leaf_hash: bytes | None = None


@dataclass(slots=True)
class _Plan:
    jobs: list[_Job] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    claimed: bool = False  # a key of the HSM belongs to this input (signable or not)
    unconfirmed: bool = False  # claimed through a fingerprint whose key is not yet checked

    def add(self, job: _Job) -> None:
        if self.jobs:
            ident = (job.key.info.id, job.kind, job.pubkey, job.leaf_hash)
            if any((j.key.info.id, j.kind, j.pubkey, j.leaf_hash) == ident for j in self.jobs):
                return
        self.jobs.append(job)


@dataclass(frozen=True)
class _KeySet:
    """The HSM's signing keys, split once per PSBT."""

    hd: tuple[_Key, ...]  # matched through derivation fields
    single: tuple[_Key, ...]  # matched by their public key

    @classmethod
    def of(cls, keys: Sequence[_Key]) -> _KeySet:
        return cls(tuple(k for k in keys if k.hd), tuple(k for k in keys if not k.hd))


_Candidate = tuple[_Key, tuple[int, ...], bytes]


def _candidates(
    inp: PsbtInput, keys: _KeySet, deriv: _Derivations, plan: _Plan, confirm: bool
) -> tuple[list[_Candidate], list[_Candidate]]:
    """(ECDSA candidates, taproot candidates) as (key, path, public key) from the
    derivation fields whose fingerprint is one of our HD keys; x-only keys for taproot.

    Without ``confirm``, whether the key at the path is the one named is left to the
    verification of the signature (see the module doc) and the plan is marked
    ``unconfirmed``; with it, the key is derived and compared first."""
    ecdsa: list[_Candidate] = []
    tap: list[_Candidate] = []
    fields = [(pub, o, ecdsa, 33) for pub, o in inp.bip32_derivations.items()]
    fields += [(x, t.origin, tap, 32) for x, t in inp.tap_bip32_derivations.items()]
    for pub, origin, out, size in fields:
        for k in keys.hd:
            if k.fingerprint != origin.fingerprint:
                continue
            if len(origin.path) > MAX_PATH_DEPTH:
                plan.notes.append(
                    f"key {k.label}: a path of {len(origin.path)} steps is deeper than "
                    f"BIP32's {MAX_PATH_DEPTH} levels"
                )
                continue
            if len(pub) != size:
                if len(pub) == 65 and size == 33:  # derived only to say why it is not signed
                    derived = deriv.pubkey(k, origin.path)
                    if derived is not None and ec.compress(pub) == derived:
                        plan.claimed = True
                        plan.notes.append(
                            f"{k.where(origin.path)} is used uncompressed, which anyhsm does "
                            "not sign for"
                        )
                continue
            if confirm and not deriv.holds(k, origin.path, pub):
                continue
            plan.unconfirmed = plan.unconfirmed or not confirm
            out.append((k, origin.path, pub))
    return ecdsa, tap


def _plan_input(
    inp: PsbtInput,
    info: SpendInfo,
    keys: _KeySet,
    deriv: _Derivations,
    *,
    confirm: bool = False,
) -> _Plan:
    plan = _Plan()
    if inp.is_finalized:
        plan.notes.append("already finalized")
        return plan
    ecdsa, tap = _candidates(inp, keys, deriv, plan, confirm) if keys.hd else ([], [])
    if ecdsa or tap:
        plan.claimed = True
    if info.problem is not None or info.unsignable is not None:
        plan.claimed = plan.claimed or any(
            k.info.public_key in inp.bip32_derivations for k in keys.single
        )
        plan.notes.append(info.problem or info.unsignable or "")
        return plan
    if info.kind is SpendKind.P2TR:
        _plan_taproot(inp, info, tap, keys.single, deriv, plan)
        return plan
    if info.kind is SpendKind.UNKNOWN:
        plan.notes.append("the input's script type cannot be signed")
        return plan
    ecdsa += [(k, (), k.info.public_key) for k in keys.single]
    for k, path, pub in ecdsa:
        if not key_in_script(pub, info):
            if k.hd:  # a derivation names our key, but the script does not use it
                _note(plan, deriv, k, path, pub, "is not in the input's script")
            continue
        plan.claimed = True
        why = k.cannot(SigScheme.ECDSA)
        if why is not None:
            _note(plan, deriv, k, path, pub, why)
            continue
        plan.add(_Job(k, path, pub, SignatureKind.ECDSA, pub))
    return plan


def _note(
    plan: _Plan, deriv: _Derivations, k: _Key, path: tuple[int, ...], pub: bytes, what: str
) -> None:
    """Say why ``k`` at ``path`` does not sign, if that key really is ``pub``: a key of
    another wallet named under our fingerprint is not ours to explain."""
    if deriv.holds(k, path, pub):
        sep = " " if what.startswith("is ") else ": "
        plan.notes.append(f"{k.where(path)}{sep}{what}")


def _plan_taproot(
    inp: PsbtInput,
    info: SpendInfo,
    tap: Sequence[_Candidate],
    singles: Sequence[_Key],
    deriv: _Derivations,
    plan: _Plan,
) -> None:
    assert info.spent is not None
    spk = info.spent.script_pubkey
    q = spk[2:]
    leaves: dict[bytes, bytes] = {}
    for cb, ls in inp.tap_leaf_scripts.items():
        try:
            ok = verify_control_block(q, ls.script, cb)
        except ScriptError:
            ok = False
        if ok:
            leaves[leaf_hash(ls.script, ls.leaf_version)] = ls.script
    cands: list[tuple[_Key, tuple[int, ...], bytes, tuple[bytes, ...] | None]] = []
    for k, path, xonly in tap:
        tko = inp.tap_bip32_derivations[xonly]
        cands.append((k, path, xonly, tko.leaf_hashes))
    cands += [(k, (), k.info.public_key[1:], None) for k in singles]
    for k, path, xonly, leaf_hashes in cands:
        key_path_only = leaf_hashes is not None and not leaf_hashes
        _plan_key_path(inp, q, k, path, xonly, deriv, plan, key_path_only)
        wanted = (
            list(leaf_hashes)
            if leaf_hashes is not None
            else [h for h, s in leaves.items() if xonly in script_pushes(s)]
        )
        for lh in wanted:
            plan.claimed = True
            script = leaves.get(lh)
            if script is None:
                what = f"leaf {lh.hex()[:16]}... has no valid PSBT_IN_TAP_LEAF_SCRIPT"
                _note(plan, deriv, k, path, xonly, what)
                continue
            if xonly not in script_pushes(script):
                _note(plan, deriv, k, path, xonly, f"is not in leaf {lh.hex()[:16]}...")
                continue
            why = k.cannot(SigScheme.SCHNORR)
            if why is not None:
                _note(plan, deriv, k, path, xonly, why)
                continue
            plan.add(_Job(k, path, xonly, SignatureKind.TAPROOT_SCRIPT, xonly, leaf_hash=lh))


def _plan_key_path(
    inp: PsbtInput,
    q: bytes,
    k: _Key,
    path: tuple[int, ...],
    xonly: bytes,
    deriv: _Derivations,
    plan: _Plan,
    key_path_only: bool,
) -> None:
    """Plan a key-path signature if ``xonly`` is the internal key of the output ``q``.
    ``key_path_only``: a derivation names this key with no leaves, so it must be.

    The internal key and merkle root must give ``q``: then a signature by our key at
    ``path``, tweaked by them, verifies under ``q`` only if ``xonly`` is our key."""
    internal = inp.tap_internal_key
    if internal is not None and internal != xonly:
        if key_path_only:
            _note(plan, deriv, k, path, xonly, "is neither the internal key nor in a leaf")
        return
    root = inp.tap_merkle_root if internal is not None else None
    try:
        tweak = taproot_tweak(xonly, root)
        out_key, _ = ec.xonly_tweak_add(xonly, tweak)
    except (ScriptError, ec.CurveError):
        return
    if out_key != q:
        if internal is not None:
            plan.claimed = True
            what = "the internal key and merkle root do not give the output key"
            _note(plan, deriv, k, path, xonly, what)
        elif key_path_only:
            what = (
                "the output key is not this key's BIP86 output key "
                "(PSBT_IN_TAP_INTERNAL_KEY or PSBT_IN_TAP_MERKLE_ROOT missing?)"
            )
            _note(plan, deriv, k, path, xonly, what)
        return
    plan.claimed = True
    why = k.cannot(SigScheme.SCHNORR, tweak=True)
    if why is not None:
        _note(plan, deriv, k, path, xonly, why)
        return
    plan.add(_Job(k, path, xonly, SignatureKind.TAPROOT_KEY, q, tweak=tweak))


# --- signing -------------------------------------------------------------------------------------


def _ours(job: _Job, deriv: _Derivations) -> bool:
    """Whether the key the job signs with is the key the PSBT names (derived for an HD
    key; a single key was matched by its public key)."""
    return not job.key.hd or deriv.holds(job.key, job.path, job.pubkey)


def _single_scripts(keys: Sequence[_Key]) -> dict[bytes, str]:
    """The four single-key scripts of every non-HD key (to recognise change to them)."""
    out: dict[bytes, str] = {}
    for k in keys:
        if k.hd:
            continue
        pub = k.info.public_key
        h = hash160(pub)
        for spk in (p2pkh(h), p2wpkh(h), p2sh(hash160(p2wpkh(h)))):
            out.setdefault(spk, k.label)
        with contextlib.suppress(AddressError):
            out.setdefault(p2tr(bip86_output_key(pub)), k.label)
    return out


def _digest(cache: SighashCache, index: int, info: SpendInfo, job: _Job, hash_type: int) -> bytes:
    if job.kind is SignatureKind.ECDSA:
        assert info.script_code is not None and info.spent is not None
        if info.kind.segwit_v0:
            return cache.bip143(index, info.script_code, info.spent.value, hash_type)
        return cache.legacy(index, info.script_code, hash_type)
    return cache.bip341(index, hash_type, leaf_hash=job.leaf_hash)


def sign_psbt(
    backend: SigningBackend,
    psbt: Psbt,
    key: KeySelection = None,
    *,
    policy: PolicyConfig,
    network: Network,
    environment: Environment = Environment.PRODUCTION,
    grind_low_r: bool = True,
    spending: SpendingGate | None = None,
) -> SignResult:
    """Sign every input of ``psbt`` that ``key`` (one key, a sequence of keys, or any key
    of ``backend`` when None) can sign, under the signing ``policy`` for ``network``: one
    policy decision and one audit entry for the whole PSBT whatever the number of keys.

    ``backend`` is anything with the :class:`~anyhsm.bitcoin.backend.SigningBackend`
    methods, such as :class:`anyhsm.hsm.Hsm` (whose caller passes ``hsm.config.policy``,
    ``hsm.network`` and ``hsm.config.environment``; ``anyhsm.ops`` does). ``environment``
    only decides whether ``require_previous_tx_segwit_v0 = false``, a relaxation for
    test set-ups, is honoured: never in production, which is the default.

    Raises :class:`PsbtLimitExceeded` when the PSBT is beyond the resource limits and
    :class:`SigningPolicyError` when the policy refuses (nothing is signed then either),
    and :class:`NothingSigned` when no input could be signed (its ``details`` hold the
    per-input reasons). ``grind_low_r=False`` asks for plain RFC 6979 ECDSA nonces, only
    to reproduce signatures of signers that do not grind (such as the BIP174 vectors).

    ``spending`` (the spending policy, :class:`anyhsm.policy.gate.SpendingGate`) is
    asked after every check above and before any signature; it may refuse (a
    ``SigningPolicyError`` naming its rules) and is told whether signing then failed.
    With a gate, a refusal by a built-in rule alone (``network``, ``path``, ``sighash``,
    ``fee`` under ``[policy]``) is handed to the gate to decide and report with its
    other rules (it refuses, naming them); whatever the gate answers, nothing is signed
    then: the signer raises the signing policy's own error after telling the grant.

    Every outcome is an event ``psbt_sign`` of the backend (the handle's audit log):
    "ok" with the unsigned txid, the inputs signed and the fee; "refused" with the rules
    that refused; "error" when nothing was signed or signing failed.
    """
    policy = _effective(policy, environment)
    unsigned, txid = _unsigned(psbt)
    refs = _key_refs(key)
    key_id: str | None = None
    named: dict[str, str] = {}
    try:
        keys = _signing_keys(backend, refs)
        if refs is not None and len(keys) == 1:
            key_id = keys[0].info.id
        elif refs is not None:
            named = {"keys": _bounded(",".join(k.info.id for k in keys), 300)}
        result = _sign(
            backend,
            psbt,
            unsigned,
            keys,
            refs,
            policy,
            network,
            grind_low_r,
            txid,
            spending,
            defer=spending is not None,
        )
    except (SigningPolicyError, PsbtLimitExceeded) as e:
        detail = {"txid": txid, "rules": _rules(e), "message": _bounded(e.message, 300)}
        detail.update(named)
        if isinstance(e, PsbtLimitExceeded) and e.field:
            detail["setting"] = e.field
        backend.record_event("psbt_sign", "refused", detail, key_id=key_id, error=e.code)
        raise
    except HsmError as e:
        detail = {"txid": txid, "message": _bounded(e.message, 300), **named}
        if isinstance(e, NothingSigned):
            detail["rules"] = "nothing-signed"
        backend.record_event("psbt_sign", "error", detail, key_id=key_id, error=e.code)
        raise
    signed = [r.index for r in result.inputs if r.signed]
    detail = {
        "txid": txid,
        "inputs": _index_list(signed),
        "signatures": str(result.signatures),
        "fee": str(result.fee),
        **named,
    }
    backend.record_event("psbt_sign", "ok", detail, key_id=key_id)
    return result


def analyse_psbt(
    backend: SigningBackend,
    psbt: Psbt,
    key: KeySelection = None,
    *,
    policy: PolicyConfig,
    network: Network,
    environment: Environment = Environment.PRODUCTION,
    builtin_rules: bool = False,
) -> SpendSummary:
    """What :func:`sign_psbt` would hand its spending gate, without signing anything and
    without an audit entry (``anyhsm policy check``): the same checks, the same
    refusals (``PsbtLimitExceeded``, ``SigningPolicyError``, ``NothingSigned``).
    ``builtin_rules`` (a spending policy is active): as :func:`sign_psbt` with a gate,
    the built-in rules' refusals are not raised but carried in the summary's facts."""
    policy = _effective(policy, environment)
    unsigned, txid = _unsigned(psbt)
    refs = _key_refs(key)
    keys = _signing_keys(backend, refs)
    try:
        _sign(
            backend,
            psbt,
            unsigned,
            keys,
            refs,
            policy,
            network,
            True,
            txid,
            _Collect(),
            defer=builtin_rules,
        )
    except _Analysed as done:
        return done.summary
    raise AssertionError("the signer signed without asking its spending gate")  # pragma: no cover


def _effective(policy: PolicyConfig, environment: Environment) -> PolicyConfig:
    if environment is Environment.PRODUCTION and not policy.require_previous_tx_segwit_v0:
        # the relaxation is for test set-ups only: 'config check' reports it as an error,
        # and production signs as if it were not there
        return dataclasses.replace(policy, require_previous_tx_segwit_v0=True)
    return policy


def _unsigned(psbt: Psbt) -> tuple[tuple[Transaction, int] | None, str]:
    """The unsigned transaction and its serialised size, and its txid ("unknown" when no
    v0 transaction can be made: a v2 PSBT without a lock time)."""
    try:
        tx = psbt.unsigned_tx()  # built and serialised once: txid, weight limit, sighashes
        raw = tx.serialize(include_witness=False)
        return (tx, len(raw)), sha256d(raw)[::-1].hex()
    except HsmError:
        return None, "unknown"


_MAX_LISTED = 64  # input indexes listed in an audit entry before it says "... (+N)"


def _index_list(indexes: Sequence[int]) -> str:
    shown = ",".join(str(i) for i in indexes[:_MAX_LISTED])
    more = len(indexes) - _MAX_LISTED
    return shown + (f",...(+{more})" if more > 0 else "")


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rules(e: HsmError) -> str:
    """The comma-separated rule names of a refusal (from its details)."""
    names = dict.fromkeys(str(d.get("rule", "")) for d in e.details if d.get("rule"))
    return _bounded(",".join(names) or "policy", 300)


def _sign(
    backend: SigningBackend,
    psbt: Psbt,
    unsigned: tuple[Transaction, int] | None,
    keys: list[_Key],
    key: tuple[KeyRef, ...] | None,
    rules: PolicyConfig,
    network: Network,
    grind_low_r: bool,
    txid: str,
    spending: SpendingGate | None = None,
    *,
    defer: bool = False,
) -> SignResult:
    size = None if unsigned is None else unsigned[1]
    limits.check_structure(psbt, rules, unsigned_size=size)  # before any copy or signature
    limits.check_derivation_work(psbt, {k.fingerprint for k in keys if k.hd}, rules)
    keyset = _KeySet.of(keys)
    work = psbt.copy()
    deriv = _Derivations(backend)
    infos = [describe_input(inp) for inp in work.inputs]
    plans = [
        _plan_input(inp, info, keyset, deriv) for inp, info in zip(work.inputs, infos, strict=True)
    ]
    legacy = sum(1 for p, info in zip(plans, infos, strict=True) if p.jobs and info.kind.legacy)
    limits.check_legacy_work(work, legacy, rules)

    def owner(pubkey: bytes, origin: KeyOrigin) -> str | None:
        k = deriv.owner(keys, pubkey, origin)
        return None if k is None else k.label

    def policy(deferring: bool) -> tuple[PolicyReport, dict[int, int]]:
        if not any(p.claimed for p in plans):
            raise _nothing_signed(key, keys, work, infos, plans)
        to_sign = {
            i: default_sighash(inp, info.kind)
            for i, (inp, info, plan) in enumerate(zip(work.inputs, infos, plans, strict=True))
            if plan.claimed
        }
        signing = {
            i: [(j.key.label, j.path) for j in plan.jobs if j.key.hd]
            for i, plan in enumerate(plans)
            if plan.jobs
        }
        # the size of a script-path spend counts only for leaves our key really signs:
        # a claim under our fingerprint on a foreign input's large leaf must not lower
        # the fee rate (derived here; script-path jobs are rare)
        leaves = {
            i: {j.leaf_hash for j in plan.jobs if j.leaf_hash is not None and _ours(j, deriv)}
            for i, plan in enumerate(plans)
            if plan.jobs
            and plan.jobs[0].kind is SignatureKind.TAPROOT_SCRIPT  # (most jobs are not)
            and all(j.kind is SignatureKind.TAPROOT_SCRIPT for j in plan.jobs)
        }

        def confirmed(label: str, path: tuple[int, ...]) -> bool:
            return any(
                _ours(j, deriv)
                for plan in plans
                for j in plan.jobs
                if j.key.label == label and j.path == path
            )

        def committed() -> bool:
            """Whether a taproot signature we will make commits to every amount (a
            claim under our fingerprint is derived first: a key not ours signs nothing).
            With nothing to sign no signature of ours is at stake (NothingSigned follows)."""
            if not any(plan.jobs for plan in plans):
                return True
            return any(
                _ours(j, deriv)
                for i, plan in enumerate(plans)
                if plan.jobs
                and infos[i].kind is SpendKind.P2TR
                and not to_sign[i] & SIGHASH_ANYONECANPAY
                for j in plan.jobs
            )

        report = check_policy(
            work,
            infos,
            to_sign,
            network,
            rules,
            owner,
            _single_scripts(keys),
            signing=signing,
            script_leaves=leaves,
            confirmed=confirmed,
            amounts_committed=committed,
            defer=deferring,
            verdicts=defer,
        )
        return report, to_sign

    try:
        # an unconfirmed claim may be another wallet's input: its refusal is raised (and
        # the claims confirmed below) before any refusal is handed to the gate
        first = defer and not any(p.unconfirmed for p in plans)
        passed: tuple[PolicyReport, dict[int, int]] | None = policy(first)
    except SigningPolicyError:
        # An input claimed only through our fingerprint may be another wallet's: check
        # those claims by derivation and ask again, so that it cannot block the others.
        unconfirmed = [i for i, p in enumerate(plans) if p.unconfirmed]
        if not unconfirmed:
            raise
        for i in unconfirmed:
            plans[i] = _plan_input(work.inputs[i], infos[i], keyset, deriv, confirm=True)
        passed = None
    report, to_sign = passed if passed is not None else policy(defer)
    if not any(p.jobs for p in plans):
        raise _nothing_signed(key, keys, work, infos, plans)
    # the spending policy decides (and debits its budgets) after every check above and
    # before any signature; a failure from here on compensates its debit
    grant: SpendGrant | None = None
    if spending is not None:
        facts = _facts(report, plans, to_sign, network) if defer else None
        grant = spending.authorize(_spend_summary(txid, plans, work, report, facts))
    if report.deferred:
        # a built-in rule refused under [policy]: the gate refuses it (naming the rule);
        # if a gate did not, the signer still signs nothing
        err = refusal_error(report.deferred)
        if grant is not None:
            grant.failed(err)
        raise err
    try:
        aux = schnorr_aux(rules)
        # the copy's transaction is the original's (nothing that builds it has changed)
        tx = unsigned[0] if unsigned is not None else work.unsigned_tx()
        cache = SighashCache(tx, [i.spent for i in infos])
        placed = _sign_all(
            backend, cache, work, infos, plans, to_sign, aux, grind_low_r, deriv, txid
        )
        if not any(placed):
            raise _nothing_signed(key, keys, work, infos, plans)
    except BaseException as e:
        if grant is not None:
            grant.failed(e)
        raise
    if grant is not None:
        grant.signed()
    reports: list[InputReport] = []
    for index, (inp, info, plan) in enumerate(zip(work.inputs, infos, plans, strict=True)):
        hash_type = to_sign.get(index, 0)
        sigs = [
            SignatureReport(
                job.key.label,
                job.pubkey,
                job.path if job.key.hd else None,
                job.kind,
                hash_type,
                job.leaf_hash,
            )
            for job in placed[index]
        ]
        if sigs:
            _core_order(inp)
        reports.append(_input_report(index, inp, info, plan, sigs))
    return SignResult(
        work,
        reports,
        list(report.outputs),
        report.fee,
        report.vsize,
        report.fee_rate,
        report.inputs_total,
        report.outputs_total,
        list(report.warnings),
    )


def _facts(
    report: PolicyReport, plans: list[_Plan], to_sign: dict[int, int], network: Network
) -> SigningFacts:
    """What the built-in rules of a policy file judge (see SigningFacts)."""
    signing = tuple(
        SignedInput(i, j.key.info.id, j.key.label, j.path if j.key.hd else None, to_sign[i])
        for i, plan in enumerate(plans)
        for j in plan.jobs
    )
    change = tuple(o for o in report.outputs if o.change)
    return SigningFacts(network, report.fee_rate, signing, change, report.builtin)


def _spend_summary(
    txid: str,
    plans: list[_Plan],
    work: Psbt,
    report: PolicyReport,
    facts: SigningFacts | None = None,
) -> SpendSummary:
    """What the spending policy judges: the keys that would sign, the outputs (change
    marked), the fee, and the facts of the built-in rules."""
    from anyhsm.policy.gate import SpendSummary as Summary  # plain data, no engine

    keys = {j.key.info.id: j.key.info for p in plans for j in p.jobs}
    return Summary(
        facts=facts,
        txid=txid,
        keys=tuple(keys.values()),
        inputs=len(work.inputs),
        outputs=report.outputs,
        fee=report.fee,
        inputs_total=report.inputs_total,
        outputs_total=report.outputs_total,
        vsize=report.vsize,
        warnings=report.warnings,
    )


class _Analysed(Exception):
    """Raised by analyse_psbt's gate to stop before any signature (never escapes)."""

    def __init__(self, summary: SpendSummary) -> None:
        super().__init__("analysed")
        self.summary = summary


class _Collect:
    def authorize(self, spend: SpendSummary) -> SpendGrant:
        raise _Analysed(spend)


def _sign_all(
    backend: SigningBackend,
    cache: SighashCache,
    work: Psbt,
    infos: list[SpendInfo],
    plans: list[_Plan],
    to_sign: dict[int, int],
    aux: bytes | None,
    grind_low_r: bool,
    deriv: _Derivations,
    txid: str,
) -> list[list[_Job]]:
    """Compute every digest, sign them grouped per key through ``backend.sign_many`` (so a
    provider derives shared BIP32 parents once), verify each signature against the key
    the PSBT names, then place it. Returns the jobs placed, per input, in plan order.

    A signature that does not verify leaves a note in its plan, or raises when the
    provider erred (see :func:`_explain`). Signatures made but not used are written to
    the audit log (``sign_discarded``), per key: for keys the PSBT named wrongly, for a
    key held under two labels, or, on a provider fault, all of them."""
    placed: list[list[_Job]] = [[] for _ in plans]
    batches: dict[str, list[tuple[int, _Job, bytes, int]]] = {}
    for index, (info, plan) in enumerate(zip(infos, plans, strict=True)):
        for job in plan.jobs:
            hash_type = to_sign[index]
            digest = _digest(cache, index, info, job, hash_type)
            batches.setdefault(job.key.info.id, []).append((index, job, digest, hash_type))
    made = 0
    for key_id, items in batches.items():
        requests: list[tuple[bytes, SigScheme, SignParams | None]] = []
        for _, job, digest, _ in items:
            path = job.path if job.key.hd else ()
            if job.kind is SignatureKind.ECDSA:
                params = SignParams(path=path, grind_low_r=grind_low_r)
                requests.append((digest, SigScheme.ECDSA, params))
            else:
                params = SignParams(path=path, tweak=job.tweak, aux_rand=aux)
                requests.append((digest, SigScheme.SCHNORR, params))
        context = {"txid": txid, "inputs": _index_list(sorted({it[0] for it in items}))}
        sigs = backend.sign_many(key_id, requests, context=context)
        made += len(sigs)
        provider = items[0][1].key.info.provider
        wrong_key = same_key = 0
        for (index, job, digest, hash_type), sig in zip(items, sigs, strict=True):
            if not _verifies(job, digest, sig):
                try:
                    plans[index].notes.append(_explain(job, index, deriv))
                except SigningFailed as e:
                    detail = {"signatures": str(made), "invalid": "1"}
                    backend.record_event(
                        "sign_discarded",
                        "error",
                        detail,
                        key_id=key_id,
                        provider=provider,
                        error=e.code,
                    )
                    raise
                wrong_key += 1
            elif placed[index] and any(_same_slot(job, j) for j in placed[index]):
                same_key += 1  # the same key under two labels: one signature is enough
            else:
                _place(work.inputs[index], job, hash_type, sig)
                placed[index].append(job)
        if wrong_key or same_key:
            detail = {
                "signatures": str(wrong_key + same_key),
                "wrong_key": str(wrong_key),
                "same_key": str(same_key),
            }
            backend.record_event("sign_discarded", "ok", detail, key_id=key_id, provider=provider)
    return [
        done if len(done) < 2 else [j for j in plan.jobs if any(j is d for d in done)]
        for plan, done in zip(plans, placed, strict=True)
    ]


def _same_slot(a: _Job, b: _Job) -> bool:
    """Whether two jobs would write the same PSBT field (same kind, key and leaf)."""
    return a.kind == b.kind and a.pubkey == b.pubkey and a.leaf_hash == b.leaf_hash


def _verifies(job: _Job, digest: bytes, sig: bytes) -> bool:
    """Whether ``sig`` verifies under the key the PSBT names (strict DER, low S)."""
    if job.kind is SignatureKind.ECDSA:
        return ec.ecdsa_verify(job.verify_key, digest, sig)
    return len(sig) == 64 and ec.schnorr_verify(job.verify_key, digest, sig)


def _place(inp: PsbtInput, job: _Job, hash_type: int, sig: bytes) -> None:
    """Add a verified signature to the input. Set directly rather than through the
    PsbtInput.add_* mutators: verification has parsed the key and strictly decoded the
    signature, which is all they check."""
    if job.kind is SignatureKind.ECDSA:
        inp.partial_sigs[job.pubkey] = sig + bytes((hash_type,))
        return
    full = sig if hash_type == SIGHASH_DEFAULT else sig + bytes((hash_type,))
    if job.kind is SignatureKind.TAPROOT_KEY:
        inp.tap_key_sig = full
    else:
        assert job.leaf_hash is not None
        inp.tap_script_sigs[(job.pubkey, job.leaf_hash)] = full


def _explain(job: _Job, index: int, deriv: _Derivations) -> str:
    """Why a signature did not verify against the key the PSBT names: the PSBT names a
    key we do not hold there (returned as the input's reason), or, when the key is ours,
    the provider erred (raised: nothing of this signing reaches the caller). Planning
    checked that a key-path job's internal key and merkle root give the output key."""
    if not deriv.holds(job.key, job.path, job.pubkey):
        return (
            f"{job.key.where(job.path)} is not the public key {job.pubkey.hex()[:16]}... "
            "that the PSBT names for it (another wallet with the same master fingerprint?)"
        )
    raise _bad_signature(job, index)


def _core_order(inp: PsbtInput) -> None:
    """Keep signatures in Bitcoin Core's order (partial signatures by hash160 of the key,
    script-path signatures by key and leaf hash), so serialised PSBTs match Core's."""
    if len(inp.partial_sigs) > 1:
        inp.partial_sigs = dict(sorted(inp.partial_sigs.items(), key=lambda kv: hash160(kv[0])))
    if len(inp.tap_script_sigs) > 1:
        inp.tap_script_sigs = dict(sorted(inp.tap_script_sigs.items()))


def _bad_signature(job: _Job, index: int) -> SigningFailed:
    return SigningFailed(
        f"provider {job.key.info.provider} returned a signature for input {index} (key "
        f"{job.key.label}) that does not verify; nothing was added to the PSBT",
        hint="check the provider's health ('anyhsm health'); the PSBT was not changed",
    )


def _input_report(
    index: int, inp: PsbtInput, info: SpendInfo, plan: _Plan, sigs: list[SignatureReport]
) -> InputReport:
    kind = ScriptKind.of_spend(info.kind).value
    if sigs:
        what = ", ".join(
            f"{s.kind} by {s.key}" + (f" at {format_path(s.path)}" if s.path is not None else "")
            for s in sigs
        )
        return InputReport(index, kind, info.amount, "signed", what, tuple(sigs))
    if inp.is_finalized:
        return InputReport(index, kind, info.amount, "finalized", "already finalized")
    return InputReport(index, kind, info.amount, "not-signed", _why_not(plan))


def _why_not(plan: _Plan) -> str:
    if plan.notes:
        return "; ".join(dict.fromkeys(plan.notes))
    return "no key in the HSM matches this input (no matching BIP32 derivation or public key)"


def _nothing_signed(
    key: tuple[KeyRef, ...] | None,
    keys: Sequence[_Key],
    psbt: Psbt,
    infos: Sequence[SpendInfo],
    plans: Sequence[_Plan],
) -> HsmError:
    reports = [
        _input_report(i, inp, info, plan, [])
        for i, (inp, info, plan) in enumerate(zip(psbt.inputs, infos, plans, strict=True))
    ]
    if key is None:
        who = f"any of the {len(keys)} key(s) in the HSM"
    else:
        who = ("key " if len(key) == 1 else "keys ") + ", ".join(repr(k) for k in key)
    fps = sorted({k.fingerprint.hex() for k in keys if k.hd})
    shown = "; ".join(f"input {r.index}: {r.reason}" for r in reports[:3])
    more = f" (and {len(reports) - 3} more inputs)" if len(reports) > 3 else ""
    err = NothingSigned(
        f"no input of the PSBT could be signed with {who}: {shown}{more}",
        hint="check that the PSBT carries BIP32 derivations for this key"
        + (f" (master fingerprint {', '.join(fps)})" if fps else "")
        + " and its previous outputs",
    )
    err.details = [r.to_dict() for r in reports]
    return err


__all__ = [
    "InputReport",
    "OutputReport",
    "SignResult",
    "SignatureReport",
    "analyse_psbt",
    "schnorr_aux",
    "sign_psbt",
]
