"""PSBT signer: BIP174 workflow vector, every script type, taproot key and script path,
capabilities, real providers (software keystore and simulator).

The helpers at the top (HSM deployments, a PSBT builder) are shared with the other PSBT
test files, which import them from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.vectors import load_json

from anyhsm.bitcoin import (
    ExtendedKey,
    NothingSigned,
    Psbt,
    SigningPolicyError,
    finalize_psbt,
)
from anyhsm.bitcoin.bip32 import HARDENED, KeyOrigin, parse_path
from anyhsm.bitcoin.encoding import hash160, sha256
from anyhsm.bitcoin.psbt import LeafScript, PsbtOutput, TapKeyOrigin
from anyhsm.bitcoin.script import (
    OP_CHECKSIG,
    multisig,
    p2pkh,
    p2sh,
    p2tr,
    p2wpkh,
    p2wsh,
)
from anyhsm.bitcoin.sighash import SighashCache
from anyhsm.bitcoin.taproot import (
    TapLeaf,
    control_block,
    leaf_hash,
    taproot_output_key,
    taproot_tweak,
)
from anyhsm.bitcoin.tx import OutPoint, Transaction, TxIn, TxOut
from anyhsm.config import Config
from anyhsm.crypto import secp256k1 as ec
from anyhsm.deploy import FAST_DEV_KDF, init_deployment
from anyhsm.errors import KeyNotFound, SigningFailed
from anyhsm.hsm import Hsm, open_hsm
from anyhsm.ops.psbt import sign_psbt
from anyhsm.providers.simulator import SimulatorProvider
from anyhsm.secret import SecretBytes
from anyhsm.types import Capabilities, KeyType, Network, SigScheme

# --- helpers shared with the other PSBT tests -------------------------------------------------

PASSPHRASE = "a passphrase long enough for the test keystore"
H = HARDENED


def software_hsm(directory: Path, network: Network = Network.REGTEST, **policy: object) -> Hsm:
    """A real software-keystore deployment in ``directory`` (cheap KDF), with policy overrides."""
    cfg_path = init_deployment(
        directory, SecretBytes(PASSPHRASE.encode()), kdf=FAST_DEV_KDF, network=network
    )
    cfg = Config.load(cfg_path, env={})
    if policy:
        cfg = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, **policy))  # type: ignore[arg-type]
    return open_hsm(cfg, passphrase=PASSPHRASE)


def simulator_hsm(directory: Path, **settings: object) -> Hsm:
    """The in-memory simulator provider (its fault settings may be given)."""
    directory.mkdir(parents=True, exist_ok=True)
    raw: dict[str, object] = {
        "fallback": {"chain": ["simulator"]},
        "audit": {"path": str(directory / "audit.log")},
    }
    if settings:
        raw["providers"] = {"simulator": dict(settings)}
    return open_hsm(Config.from_mapping(raw, config_dir=directory, env={}))


@dataclass
class Wallet:
    """A BIP32 seed imported into an HSM, with public derivation for building PSBTs."""

    label: str
    seed: bytes

    @property
    def root(self) -> ExtendedKey:
        return ExtendedKey.from_seed(self.seed, Network.TESTNET)

    @property
    def fingerprint(self) -> bytes:
        return self.root.fingerprint

    def pub(self, path: str | Sequence[int]) -> bytes:
        return self.root.derive(path).public_key

    def key(self, path: str | Sequence[int]) -> tuple[bytes, KeyOrigin]:
        steps = parse_path(path) if isinstance(path, str) else tuple(path)
        return self.pub(steps), KeyOrigin(self.fingerprint, steps)

    def secret(self, path: str | Sequence[int]) -> bytearray:
        with self.root.derive(path) as k, k.secret() as s:
            return bytearray(s.buffer)


def add_wallet(hsm: Hsm, label: str, seed: bytes | None = None) -> Wallet:
    seed = seed if seed is not None else random.randbytes(32)
    hsm.import_key(label, seed, KeyType.BIP32)
    return Wallet(label, seed)


@dataclass
class Spend:
    """One input to build: its kind, its keys (33-byte pubkeys with origins), amount..."""

    kind: str  # p2pkh p2sh-p2wpkh p2wpkh p2tr p2wsh p2sh-p2wsh p2sh
    keys: list[tuple[bytes, KeyOrigin | None]]
    amount: int = 100_000
    m: int = 1
    sighash: int | None = None
    non_witness: bool | None = None  # default: every input but taproot (segwit v0 needs it)
    witness: bool = True  # segwit inputs: give PSBT_IN_WITNESS_UTXO
    extra: dict[str, object] = field(default_factory=dict)


SEGWIT_KINDS = {"p2sh-p2wpkh", "p2wpkh", "p2tr", "p2wsh", "p2sh-p2wsh"}


def spend_scripts(sp: Spend) -> tuple[bytes, bytes | None, bytes | None]:
    """(scriptPubKey, redeem script, witness script) of a spend."""
    pub = sp.keys[0][0]
    h = hash160(pub)
    if sp.kind == "p2pkh":
        return p2pkh(h), None, None
    if sp.kind == "p2wpkh":
        return p2wpkh(h), None, None
    if sp.kind == "p2sh-p2wpkh":
        rs = p2wpkh(h)
        return p2sh(hash160(rs)), rs, None
    if sp.kind == "p2tr":
        return p2tr(taproot_output_key(pub[1:], None)[0]), None, None
    ms = multisig(sp.m, [k for k, _ in sp.keys], sort=True)
    if sp.kind == "p2wsh":
        return p2wsh(sha256(ms)), None, ms
    if sp.kind == "p2sh-p2wsh":
        rs = p2wsh(sha256(ms))
        return p2sh(hash160(rs)), rs, ms
    if sp.kind == "p2sh":
        return p2sh(hash160(ms)), ms, None
    raise ValueError(sp.kind)


def foreign_spk(rng: random.Random) -> bytes:
    return p2wpkh(rng.randbytes(20))


def build_psbt(
    spends: Sequence[Spend],
    outputs: Sequence[TxOut | PsbtOutput] | None = None,
    *,
    fee: int = 1_000,
    rng: random.Random | None = None,
) -> Psbt:
    """A v0 PSBT spending fake previous transactions; one foreign output by default."""
    rng = rng or random.Random(7)
    prevs: list[Transaction] = []
    for sp in spends:
        spk, _, _ = spend_scripts(sp)
        src = TxIn(OutPoint(rng.randbytes(32), rng.randrange(3)), b"\x51", 0xFFFFFFFF)
        lead = [TxOut(rng.randrange(1000, 9000), foreign_spk(rng)) for _ in range(rng.randrange(2))]
        prevs.append(Transaction(2, [src], [*lead, TxOut(sp.amount, spk)], 0))
    if outputs is None:
        outputs = [TxOut(sum(s.amount for s in spends) - fee, foreign_spk(rng))]
    txins = [TxIn(OutPoint(p.txid(), len(p.outputs) - 1), b"", 0xFFFFFFFD) for p in prevs]
    txouts = [o.txout() if isinstance(o, PsbtOutput) else o for o in outputs]
    psbt = Psbt.from_unsigned_tx(Transaction(2, txins, txouts, 0))
    for n, o in enumerate(outputs):
        if isinstance(o, PsbtOutput):
            psbt.outputs[n] = o
    for inp, sp, prev in zip(psbt.inputs, spends, prevs, strict=True):
        spk, rs, ws = spend_scripts(sp)
        segwit = sp.kind in SEGWIT_KINDS
        if sp.non_witness if sp.non_witness is not None else sp.kind != "p2tr":
            inp.non_witness_utxo = prev
        if segwit and sp.witness:
            inp.witness_utxo = prev.outputs[-1]
        inp.redeem_script = rs
        inp.witness_script = ws
        inp.sighash_type = sp.sighash
        if sp.kind == "p2tr":
            pub, origin = sp.keys[0]
            inp.tap_internal_key = pub[1:]
            if origin is not None:
                inp.tap_bip32_derivations[pub[1:]] = TapKeyOrigin((), origin)
        else:
            for pub, origin in sp.keys:
                if origin is not None:
                    inp.bip32_derivations[pub] = origin
    return psbt


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def det_hsm(tmp_path: Path) -> Iterator[Hsm]:
    """Deterministic BIP340 nonces (zero aux randomness)."""
    h = software_hsm(tmp_path / "det", deterministic_schnorr=True)
    yield h
    h.close()


@pytest.fixture
def bip174_hsm(tmp_path: Path) -> Iterator[Hsm]:
    """The BIP174 workflow's P2SH-P2WSH input carries only PSBT_IN_WITNESS_UTXO, which the
    default policy refuses (rule missing-previous-tx); the vector is signed with that
    rule relaxed, as the policy allows outside production."""
    h = software_hsm(tmp_path / "bip174", require_previous_tx_segwit_v0=False)
    yield h
    h.close()


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Hsm]:
    h = simulator_hsm(tmp_path / "sim")
    yield h
    h.close()


BIP174 = load_json("bip174")


def _import_master(hsm: Hsm, label: str, tprv: str) -> None:
    """Import a master tprv as a BIP32 node (chain code || key), as the CLI does."""
    with ExtendedKey.parse(tprv) as xk, xk.secret() as s, SecretBytes(64) as node:
        node.buffer[:32] = xk.chain_code
        node.buffer[32:] = s.buffer
        hsm.import_key(label, node, KeyType.BIP32_NODE)


# --- BIP174 workflow --------------------------------------------------------------------------


def test_bip174_workflow_signer_matches_vector(bip174_hsm: Hsm) -> None:
    """The BIP174 signer results are plain RFC 6979 (one has a 72-byte, high-R signature), so
    this test asks for grind_low_r=False; the master key signs for both BIP signers."""
    hsm = bip174_hsm
    wf = BIP174["workflow"]
    _import_master(hsm, "bip174", wf["master_tprv"])
    unsigned = Psbt.parse(wf["updater_add_sighash_all"]["result"]["base64"])
    res = sign_psbt(hsm, unsigned, "bip174", grind_low_r=False)
    expected = Psbt.parse(wf["signer_1"]["result"]["hex"]).combine(
        Psbt.parse(wf["signer_2"]["result"]["hex"])
    )
    assert res.psbt == expected
    assert res.psbt.to_base64() == wf["combiner"]["result"]["base64"]
    assert res.signed_inputs == 2 and res.signatures == 4
    assert [r.script_type for r in res.inputs] == ["p2sh", "p2sh-p2wsh"]
    assert res.fee == 10_000
    assert all(o.change and o.owner == "bip174" for o in res.outputs)
    assert any("only PSBT_IN_WITNESS_UTXO" in w for w in res.warnings)
    # the input PSBT is untouched
    assert unsigned.to_base64() == wf["updater_add_sighash_all"]["result"]["base64"]
    final = finalize_psbt(res.psbt)
    assert final.complete and final.tx is not None
    assert final.psbt.to_base64() == wf["finalizer"]["result"]["base64"]
    assert final.tx.serialize().hex() == wf["extractor"]["result_tx_hex"]


def test_bip174_workflow_with_low_r_grinding(bip174_hsm: Hsm) -> None:
    hsm = bip174_hsm
    wf = BIP174["workflow"]
    _import_master(hsm, "bip174", wf["master_tprv"])
    res = sign_psbt(hsm, Psbt.parse(wf["updater_add_sighash_all"]["result"]["base64"]))
    sigs = [s for inp in res.psbt.inputs for s in inp.partial_sigs.values()]
    assert len(sigs) == 4
    assert all(len(s) <= 72 and s[4] < 0x80 for s in sigs)  # R is low: 32 bytes, top bit 0
    vector = Psbt.parse(wf["combiner"]["result"]["base64"])
    assert res.psbt != vector  # one of the vector's signatures has a high R
    final = finalize_psbt(res.psbt)
    assert final.complete and final.tx is not None
    vector_tx = Transaction.parse(wf["extractor"]["result_tx_hex"])
    assert [i.prevout for i in final.tx.inputs] == [i.prevout for i in vector_tx.inputs]
    assert final.tx.outputs == vector_tx.outputs


def test_bip174_workflow_is_refused_by_the_default_policy(hsm: Hsm) -> None:
    """Its P2SH-P2WSH input has no previous transaction: refused by default."""
    wf = BIP174["workflow"]
    _import_master(hsm, "bip174", wf["master_tprv"])
    with pytest.raises(SigningPolicyError) as e:
        sign_psbt(hsm, Psbt.parse(wf["updater_add_sighash_all"]["result"]["base64"]))
    assert [(d["where"], d["rule"]) for d in e.value.details] == [
        ("input 1", "missing-previous-tx")
    ]


# --- every script type ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["p2pkh", "p2sh-p2wpkh", "p2wpkh", "p2tr"])
def test_single_sig_kinds_sign_and_finalize(hsm: Hsm, kind: str) -> None:
    w = add_wallet(hsm, "w")
    purpose = {"p2pkh": 44, "p2sh-p2wpkh": 49, "p2wpkh": 84, "p2tr": 86}[kind]
    spends = [Spend(kind, [w.key(f"m/{purpose}'/1'/0'/0/{i}")]) for i in range(3)]
    psbt = build_psbt(spends)
    res = sign_psbt(hsm, psbt, "w")
    assert res.signed_inputs == 3 and res.unsigned_inputs == 0
    for inp, rep in zip(res.psbt.inputs, res.inputs, strict=True):
        assert rep.status == "signed" and rep.script_type == kind
        if kind == "p2tr":
            assert inp.tap_key_sig is not None and len(inp.tap_key_sig) == 64
            assert rep.signatures[0].kind == "taproot-key"
            assert not inp.partial_sigs
        else:
            ((_pub, sig),) = inp.partial_sigs.items()
            assert sig[-1] == 0x01 and rep.signatures[0].kind == "ecdsa"
    final = finalize_psbt(res.psbt)
    assert final.complete and final.tx is not None
    if kind in ("p2wpkh", "p2tr"):  # native segwit: no scriptSig, the txid is final
        assert final.tx.txid() == psbt.unsigned_tx().txid()


def test_multisig_two_hsm_keys_of_three(hsm: Hsm) -> None:
    a, b = add_wallet(hsm, "a"), add_wallet(hsm, "b")
    rng = random.Random(3)
    other = ec.public_key(bytearray(rng.randbytes(32)))
    keys = [a.key("m/48'/1'/0'/2'/0/0"), b.key("m/48'/1'/0'/2'/0/0"), (other, None)]
    spends = [Spend("p2wsh", keys, m=2), Spend("p2sh-p2wsh", keys, m=2)]
    psbt = build_psbt(spends)
    res = sign_psbt(hsm, psbt)  # every key of the HSM
    assert res.signed_inputs == 2 and res.signatures == 4
    assert {s.key for r in res.inputs for s in r.signatures} == {"a", "b"}
    only_a = sign_psbt(hsm, psbt, "a")
    assert only_a.signatures == 2
    assert not finalize_psbt(only_a.psbt).complete
    final = finalize_psbt(res.psbt)
    assert final.complete and final.tx is not None
    witness = final.tx.inputs[0].witness
    assert witness[0] == b"" and len(witness) == 4  # dummy, 2 signatures, script


def test_signatures_keep_core_order_after_a_cosigner(hsm: Hsm) -> None:
    """Signing after another signer keeps partial signatures in Bitcoin Core's order
    (by hash160 of the key), whichever signed first, so serialisations match Core's."""
    a, b = add_wallet(hsm, "a"), add_wallet(hsm, "b")
    keys = [a.key("m/48'/1'/0'/2'/0/0"), b.key("m/48'/1'/0'/2'/0/0")]
    psbt = build_psbt([Spend("p2wsh", keys, m=2)])
    for first, second in (("a", "b"), ("b", "a")):
        after = sign_psbt(hsm, sign_psbt(hsm, psbt, first).psbt, second).psbt
        order = list(after.inputs[0].partial_sigs)
        assert len(order) == 2 and order == sorted(order, key=hash160)
        assert after.serialize() == sign_psbt(hsm, psbt).psbt.serialize()


def test_single_key_matched_by_public_key(hsm: Hsm) -> None:
    info = hsm.generate_key("solo")
    pub = info.public_key
    spends = [Spend(k, [(pub, None)]) for k in ("p2pkh", "p2sh-p2wpkh", "p2wpkh", "p2tr")]
    res = sign_psbt(hsm, build_psbt(spends), "solo")
    assert res.signed_inputs == 4
    assert all(s.path is None for r in res.inputs for s in r.signatures)
    assert finalize_psbt(res.psbt).complete


def test_unmatched_inputs_are_left_alone_and_reported(hsm: Hsm) -> None:
    w = add_wallet(hsm, "w")
    stranger = Wallet("x", bytes(range(32)))
    spends = [
        Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")]),
        Spend("p2wpkh", [stranger.key("m/84'/1'/0'/0/0")]),
    ]
    psbt = build_psbt(spends)
    res = sign_psbt(hsm, psbt, "w")
    assert [r.status for r in res.inputs] == ["signed", "not-signed"]
    assert "no key in the HSM matches" in res.inputs[1].reason
    assert res.psbt.inputs[1] == psbt.inputs[1]


def test_derivation_claiming_a_wrong_public_key_is_not_signed(hsm: Hsm) -> None:
    w = add_wallet(hsm, "w")
    pub, _ = w.key("m/84'/1'/0'/0/0")
    _, wrong = w.key("m/84'/1'/0'/0/1")  # our fingerprint, but another path
    psbt = build_psbt([Spend("p2wpkh", [(pub, wrong)])])
    with pytest.raises(NothingSigned) as e:
        sign_psbt(hsm, psbt, "w")
    assert e.value.exit_code == 9
    assert e.value.details[0]["status"] == "not-signed"
    assert "is not the public key" in e.value.details[0]["reason"]


@pytest.mark.parametrize("kind", ["p2wpkh", "p2tr-key", "p2tr-script"])
def test_wrong_key_under_our_fingerprint_leaves_only_that_input_unsigned(
    det_hsm: Hsm, kind: str
) -> None:
    """A derivation with our fingerprint is trusted only once the signature verifies
    under the key it names: a lying one is explained, the PSBT's other inputs signed."""
    w = add_wallet(det_hsm, "w")
    stranger = Wallet("x", bytes(range(32)))
    good = Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])
    if kind == "p2wpkh":
        pub, _ = stranger.key("m/84'/1'/0'/0/0")
        _, ours = w.key("m/84'/1'/0'/0/0")
        psbt = build_psbt([good, Spend("p2wpkh", [(pub, ours)])])
    elif kind == "p2tr-key":
        pub, _ = stranger.key("m/86'/1'/0'/0/0")
        _, ours = w.key("m/86'/1'/0'/0/0")
        # its previous transaction too: our ECDSA signature does not commit to its amount
        psbt = build_psbt([good, Spend("p2tr", [(pub, ours)], non_witness=True)])
    else:  # a leaf of the stranger's tree, its key claimed at our fingerprint
        tree_psbt, leaf_x, leaf = _tap_tree_psbt(stranger, internal_ours=False)
        _, ours = w.key("m/86'/1'/0'/0/7")
        tree_psbt.inputs[0].tap_bip32_derivations[leaf_x] = TapKeyOrigin((leaf.hash,), ours)
        spent = tree_psbt.inputs[0].witness_utxo
        assert spent is not None  # the previous transaction _tap_tree_psbt made:
        prev = Transaction(2, [TxIn(OutPoint(bytes(32), 0))], [spent], 0)
        tree_psbt.inputs[0].non_witness_utxo = prev
        psbt = _append_input(build_psbt([good]), tree_psbt)
    before = psbt.serialize()
    res = sign_psbt(det_hsm, psbt, "w")
    assert [r.status for r in res.inputs] == ["signed", "not-signed"]
    assert "is not the public key" in res.inputs[1].reason
    assert res.psbt.inputs[1] == psbt.inputs[1] and psbt.serialize() == before


def _append_input(psbt: Psbt, donor: Psbt) -> Psbt:
    """``psbt`` plus ``donor``'s first input (its amount added to the first output)."""
    tx = psbt.unsigned_tx()
    extra = donor.inputs[0]
    assert extra.witness_utxo is not None
    tx.inputs.append(donor.unsigned_tx().inputs[0])
    first = tx.outputs[0]
    tx.outputs[0] = TxOut(first.value + extra.witness_utxo.value, first.script_pubkey)
    out = Psbt.from_unsigned_tx(tx)
    out.inputs[:] = [*psbt.inputs, extra]
    return out


def test_taproot_key_path_for_an_internal_key_not_ours_is_refused(hsm: Hsm) -> None:
    """An output key made from our key but tweaked by a foreign internal key X (named at
    our fingerprint) is spendable by our key; the PSBT still lies about X, so nothing is
    signed (the internal key and merkle root must give the output key)."""
    w = add_wallet(hsm, "w")
    path = parse_path("m/86'/1'/0'/0/5")
    ours = w.pub(path)
    x = Wallet("x", bytes(range(32))).pub("m/0")[1:]
    root = bytes([0xAB] * 32)
    q, _ = ec.xonly_tweak_add(ours[1:], taproot_tweak(x, root))
    psbt = build_psbt([Spend("p2tr", [(ours, KeyOrigin(w.fingerprint, path))])])
    inp = psbt.inputs[0]
    assert inp.witness_utxo is not None
    inp.witness_utxo = TxOut(inp.witness_utxo.value, p2tr(q))
    inp.tap_internal_key, inp.tap_merkle_root = x, root
    inp.tap_bip32_derivations = {x: TapKeyOrigin((), KeyOrigin(w.fingerprint, path))}
    with pytest.raises(NothingSigned) as e:
        sign_psbt(hsm, Psbt.parse(psbt.serialize()), "w")
    assert "no key in the HSM matches" in e.value.details[0]["reason"]


def test_foreign_input_under_our_fingerprint_does_not_block_the_policy(hsm: Hsm) -> None:
    """A co-signer's key labelled with our fingerprint, with a sighash type the policy
    refuses: its claim is checked by derivation before the policy refuses anything."""
    w = add_wallet(hsm, "w")
    path = parse_path("m/84'/1'/0'/0/0")
    foreign = Wallet("x", bytes(range(32))).pub(path)
    spends = [
        Spend("p2wpkh", [w.key(path)]),
        Spend("p2wpkh", [(foreign, KeyOrigin(w.fingerprint, path))], sighash=0x82),
    ]
    res = sign_psbt(hsm, build_psbt(spends), "w")
    assert [r.status for r in res.inputs] == ["signed", "not-signed"]
    assert "no key in the HSM matches" in res.inputs[1].reason
    # Our own input with that sighash type is still refused.
    mine = [Spend("p2wpkh", [w.key(path)], sighash=0x82)]
    with pytest.raises(SigningPolicyError):
        sign_psbt(hsm, build_psbt(mine), "w")


def test_keys_sharing_a_fingerprint_each_sign_their_own(hsm: Hsm) -> None:
    """One private key imported twice as BIP32 nodes with different chain codes: the same
    master fingerprint, different children. Each input is signed by the key that holds it."""
    for label, chain in (("a", bytes([1] * 32)), ("b", bytes([2] * 32))):
        hsm.import_key(label, chain + bytes([5] * 32), KeyType.BIP32_NODE)
    fp = hash160(hsm.get_key("a").public_key)[:4]
    assert fp == hash160(hsm.get_key("b").public_key)[:4]
    path = parse_path("m/0/1")
    spends = [
        Spend("p2wpkh", [(hsm.derive_public(lbl, path).public_key, KeyOrigin(fp, path))])
        for lbl in ("a", "b")
    ]
    res = sign_psbt(hsm, build_psbt(spends))
    assert [r.signatures[0].key for r in res.inputs] == ["a", "b"]


def test_same_key_under_two_labels_signs_once(hsm: Hsm) -> None:
    seed = random.randbytes(32)
    add_wallet(hsm, "a", seed)
    w = add_wallet(hsm, "b", seed)
    res = sign_psbt(hsm, build_psbt([Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])]))
    assert res.signatures == 1 and len(res.psbt.inputs[0].partial_sigs) == 1


@pytest.mark.parametrize("steps", [256, 3000])
def test_derivation_deeper_than_bip32_allows_is_explained(tmp_path: Path, steps: int) -> None:
    """With the depth limit raised (policy.max_path_depth, 12 by default, refuses such a
    PSBT outright: see test_policy_hardening), a path BIP32 cannot derive is explained."""
    with software_hsm(tmp_path / "deep", max_path_depth=4000) as hsm:
        w = add_wallet(hsm, "w")
        foreign = Wallet("x", bytes(range(32))).pub("m/0")
        spends = [
            Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")]),
            Spend("p2wpkh", [(foreign, KeyOrigin(w.fingerprint, (1,) * steps))]),
        ]
        res = sign_psbt(hsm, build_psbt(spends), "w")
        assert res.inputs[0].signed and f"path of {steps} steps" in res.inputs[1].reason


def test_a_caller_built_psbt_is_never_modified(hsm: Hsm) -> None:
    """Containers of types the parser never makes (OrderedDict, bytearray) are copied in
    full, so signing cannot write into the caller's PSBT."""
    w = add_wallet(hsm, "w")
    psbt = build_psbt([Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])])
    psbt.inputs[0].partial_sigs = OrderedDict()
    before = psbt.serialize()
    res = sign_psbt(hsm, psbt, "w")
    assert psbt.serialize() == before and not psbt.inputs[0].partial_sigs
    assert len(res.psbt.inputs[0].partial_sigs) == 1


def test_discarded_signatures_are_audited(tmp_path: Path) -> None:
    """Signatures made but not used are in the audit log, under the provider that holds the
    key (here the software keystore, while the simulator is the active provider)."""
    with software_hsm(tmp_path / "dep") as h:
        w = add_wallet(h, "w")
        add_wallet(h, "w-again", w.seed)
        config = h.config.source
    assert config is not None
    text = config.read_text().replace('chain = ["software"]', 'chain = ["simulator", "software"]')
    config.write_text(text)
    path = parse_path("m/84'/1'/0'/0/0")
    foreign = Wallet("x", bytes(range(32))).pub(path)
    spends = [
        Spend("p2wpkh", [w.key(path)]),
        Spend("p2wpkh", [(foreign, KeyOrigin(w.fingerprint, path))]),
    ]
    with open_hsm(Config.load(config, env={}), passphrase=PASSPHRASE) as hsm:
        assert hsm.active_provider == "simulator"
        res = sign_psbt(hsm, build_psbt(spends))
        entries = [json.loads(line) for line in hsm.audit_path.read_text().splitlines()]
    assert [r.status for r in res.inputs] == ["signed", "not-signed"]
    made = [e for e in entries if e["op"] == "sign"][-2:]
    dropped = [e for e in entries if e["op"] == "sign_discarded"][-2:]
    assert [e["detail"]["signatures"] for e in made] == ["2", "2"]
    assert {e["provider"] for e in made + dropped} == {"software"}
    details = sorted((e["detail"]["wrong_key"], e["detail"]["same_key"]) for e in dropped)
    assert details == [("1", "0"), ("1", "1")]  # each key: the foreign input; one twin
    assert all(e["outcome"] == "ok" for e in dropped)


def test_output_with_a_path_too_deep_is_simply_not_change(tmp_path: Path) -> None:
    """An output naming our fingerprint with a path BIP32 cannot derive must not stop the
    signing (once the depth limit is raised): it is not recognised as change, that is all."""
    with software_hsm(tmp_path / "deep", max_path_depth=4000) as hsm:
        w = add_wallet(hsm, "w")
        spend = Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])
        pub = Wallet("x", bytes(range(32))).pub("m/0")
        for path in [(1,) * 256, (1,) * 255 + (HARDENED,), (1,) * 3000]:
            out = PsbtOutput(99_000, p2wpkh(hash160(pub)))
            out.bip32_derivations[pub] = KeyOrigin(w.fingerprint, path)
            res = sign_psbt(hsm, build_psbt([spend], [out]), "w")
            assert res.signed_inputs == 1 and not res.outputs[0].change


def test_keys_of_the_wrong_size_are_never_candidates(hsm: Hsm) -> None:
    """A caller-built PSBT with our x-only key in an ECDSA derivation field (and in the
    witness script) is not signed; the parser refuses such keys, and the signer must not
    blame the provider for them."""
    w = add_wallet(hsm, "w")
    path = parse_path("m/84'/1'/0'/0/0")
    x = w.pub(path)[1:]
    script = bytes([32]) + x + bytes([OP_CHECKSIG])
    psbt = build_psbt([Spend("p2wpkh", [w.key(path)])])
    inp = psbt.inputs[0]
    assert inp.witness_utxo is not None
    inp.witness_utxo = TxOut(inp.witness_utxo.value, p2wsh(sha256(script)))
    inp.witness_script = script
    inp.bip32_derivations = {x: KeyOrigin(w.fingerprint, path)}
    with pytest.raises(NothingSigned):
        sign_psbt(hsm, psbt, "w")


def test_taproot_internal_key_ours_but_wrong_merkle_root_is_explained(det_hsm: Hsm) -> None:
    w = add_wallet(det_hsm, "w")
    psbt, _, _ = _tap_tree_psbt(w, internal_ours=True)
    inp = psbt.inputs[0]
    inp.tap_merkle_root = bytes(32)  # not the tree the output commits to
    inp.tap_leaf_scripts.clear()
    inp.tap_bip32_derivations = {
        x: t for x, t in inp.tap_bip32_derivations.items() if not t.leaf_hashes
    }
    with pytest.raises(NothingSigned) as e:
        sign_psbt(det_hsm, psbt, "w")
    assert "merkle root do not give the output key" in e.value.details[0]["reason"]


def test_nothing_signed_is_an_error_with_per_input_reasons(hsm: Hsm) -> None:
    add_wallet(hsm, "w")
    stranger = Wallet("x", bytes(range(32)))
    psbt = build_psbt([Spend("p2wpkh", [stranger.key("m/84'/1'/0'/0/0")])] * 2)
    with pytest.raises(NothingSigned) as e:
        sign_psbt(hsm, psbt, "w")
    assert "input 0" in e.value.message and "fingerprint" in str(e.value)
    assert [d["index"] for d in e.value.details] == [0, 1]


def test_already_finalized_input_is_kept(hsm: Hsm) -> None:
    w = add_wallet(hsm, "w")
    spends = [Spend("p2wpkh", [w.key(f"m/84'/1'/0'/0/{i}")]) for i in range(2)]
    first = finalize_psbt(sign_psbt(hsm, build_psbt(spends)).psbt).psbt
    with pytest.raises(NothingSigned):
        sign_psbt(hsm, first)
    half = build_psbt(spends)
    half.inputs[0] = first.inputs[0]
    res = sign_psbt(hsm, half)
    assert [r.status for r in res.inputs] == ["finalized", "signed"]
    assert res.psbt.inputs[0] == first.inputs[0]


# --- taproot ----------------------------------------------------------------------------------


def _tap_tree_psbt(w: Wallet, internal_ours: bool) -> tuple[Psbt, bytes, TapLeaf]:
    """One input whose output commits to a leaf ``<our key> OP_CHECKSIG`` (and another)."""
    leaf_pub, leaf_origin = w.key("m/86'/1'/0'/0/7")
    leaf = TapLeaf(bytes([32]) + leaf_pub[1:] + bytes([OP_CHECKSIG]))
    other = TapLeaf(bytes([32]) + bytes.fromhex("50" * 32) + bytes([OP_CHECKSIG]))
    tree = (leaf, other)
    if internal_ours:
        internal, internal_origin = w.key("m/86'/1'/0'/0/8")
        internal_x = internal[1:]
    else:  # BIP341's unspendable NUMS point: no key path
        internal_x = bytes.fromhex(
            "50929b74c1a04954b78b4b6035e97a5e078a5a0f28ec96d547bfee9ace803ac0"
        )
    from anyhsm.bitcoin.taproot import merkle_root

    root = merkle_root(tree)
    assert root is not None
    q, _ = taproot_output_key(internal_x, root)
    prev = Transaction(2, [TxIn(OutPoint(bytes(32), 0))], [TxOut(50_000, p2tr(q))], 0)
    psbt = Psbt.from_unsigned_tx(
        Transaction(
            2,
            [TxIn(OutPoint(prev.txid(), 0), b"", 0xFFFFFFFD)],
            [TxOut(49_000, p2wpkh(bytes(20)))],
            0,
        )
    )
    inp = psbt.inputs[0]
    inp.witness_utxo = prev.outputs[0]
    inp.tap_internal_key = internal_x
    inp.tap_merkle_root = root
    inp.tap_leaf_scripts[control_block(internal_x, tree, leaf)] = LeafScript(leaf.script, 0xC0)
    inp.tap_leaf_scripts[control_block(internal_x, tree, other)] = LeafScript(other.script, 0xC0)
    inp.tap_bip32_derivations[leaf_pub[1:]] = TapKeyOrigin((leaf.hash,), leaf_origin)
    if internal_ours:
        inp.tap_bip32_derivations[internal_x] = TapKeyOrigin((), internal_origin)
    return psbt, leaf_pub[1:], leaf


def test_taproot_script_path(det_hsm: Hsm) -> None:
    w = add_wallet(det_hsm, "w")
    psbt, leaf_x, leaf = _tap_tree_psbt(w, internal_ours=False)
    res = sign_psbt(det_hsm, psbt, "w")
    inp = res.psbt.inputs[0]
    assert inp.tap_key_sig is None
    (((x, lh), sig),) = inp.tap_script_sigs.items()
    assert x == leaf_x and lh == leaf.hash == leaf_hash(leaf.script) and len(sig) == 64
    assert res.inputs[0].signatures[0].kind == "taproot-script"
    # deterministic: the untweaked child key signs the leaf's sighash with zero aux
    cache = SighashCache(psbt.unsigned_tx(), [inp.witness_utxo])
    digest = cache.bip341(0, 0, leaf_hash=leaf.hash)
    assert sig == ec.schnorr_sign(w.secret("m/86'/1'/0'/0/7"), digest, bytes(32))
    final = finalize_psbt(res.psbt)
    assert final.complete and final.tx is not None
    wit = final.tx.inputs[0].witness
    assert wit[0] == sig and wit[1] == leaf.script and len(wit) == 3


def test_taproot_key_path_with_script_tree(det_hsm: Hsm) -> None:
    w = add_wallet(det_hsm, "w")
    psbt, _, _ = _tap_tree_psbt(w, internal_ours=True)
    res = sign_psbt(det_hsm, psbt, "w")
    inp = res.psbt.inputs[0]
    assert inp.tap_key_sig is not None and len(inp.tap_script_sigs) == 1
    assert {s.kind for s in res.inputs[0].signatures} == {"taproot-key", "taproot-script"}
    final = finalize_psbt(res.psbt)
    assert final.complete and final.tx is not None
    assert final.tx.inputs[0].witness == [inp.tap_key_sig]  # the key path is preferred


def test_taproot_sighash_all_makes_65_byte_signature(hsm: Hsm) -> None:
    w = add_wallet(hsm, "w")
    psbt = build_psbt([Spend("p2tr", [w.key("m/86'/1'/0'/0/0")], sighash=0x01)])
    res = sign_psbt(hsm, psbt)
    sig = res.psbt.inputs[0].tap_key_sig
    assert sig is not None and len(sig) == 65 and sig[64] == 0x01
    assert finalize_psbt(res.psbt).complete


def test_schnorr_aux_is_random_by_default_and_zero_when_deterministic(
    hsm: Hsm, det_hsm: Hsm
) -> None:
    seed = bytes(range(1, 33))
    for h in (hsm, det_hsm):
        add_wallet(h, "w", seed)
    w = Wallet("w", seed)
    psbt = build_psbt([Spend("p2tr", [w.key("m/86'/1'/0'/0/0")])])
    random_sigs = {sign_psbt(hsm, psbt).psbt.inputs[0].tap_key_sig for _ in range(2)}
    det_sigs = {sign_psbt(det_hsm, psbt).psbt.inputs[0].tap_key_sig for _ in range(2)}
    assert len(random_sigs) == 2 and len(det_sigs) == 1
    # deterministic = BIP340 with 32 zero bytes of aux randomness, key tweaked per BIP86
    key = w.secret("m/86'/1'/0'/0/0")
    tweak = taproot_tweak_of(w.pub("m/86'/1'/0'/0/0"))
    inp = psbt.inputs[0]
    assert inp.witness_utxo is not None
    digest = SighashCache(psbt.unsigned_tx(), [inp.witness_utxo]).bip341(0, 0)
    assert det_sigs == {ec.schnorr_sign(key, digest, bytes(32), tweak)}


def taproot_tweak_of(pub: bytes) -> bytes:
    from anyhsm.bitcoin.taproot import taproot_tweak

    return taproot_tweak(pub[1:], None)


# --- capabilities and providers ---------------------------------------------------------------


def test_simulator_provider_signs_every_kind(sim: Hsm) -> None:
    w = add_wallet(sim, "w")
    rng = random.Random(11)
    other = ec.public_key(bytearray(rng.randbytes(32)))
    spends = [
        Spend("p2pkh", [w.key("m/44'/1'/0'/0/0")]),
        Spend("p2sh-p2wpkh", [w.key("m/49'/1'/0'/0/0")]),
        Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")]),
        Spend("p2tr", [w.key("m/86'/1'/0'/0/0")]),
        Spend("p2wsh", [w.key("m/48'/1'/0'/2'/0/0"), (other, None)], m=1),
    ]
    res = sign_psbt(sim, build_psbt(spends), "w")
    assert res.signed_inputs == 5
    assert finalize_psbt(res.psbt).complete


def _without(caps: Capabilities, **changes: object) -> Capabilities:
    return dataclasses.replace(caps, **changes)  # type: ignore[arg-type]


def test_provider_without_schnorr_reports_taproot_inputs(
    sim: Hsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = SimulatorProvider.capabilities

    def no_schnorr(self: SimulatorProvider) -> Capabilities:
        caps = real(self)
        return _without(caps, schemes=frozenset({SigScheme.ECDSA}), can_tweak=False)

    monkeypatch.setattr(SimulatorProvider, "capabilities", no_schnorr)
    w = add_wallet(sim, "w")
    spends = [
        Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")]),
        # not signed here, so its amount needs its previous transaction (unverified-amount)
        Spend("p2tr", [w.key("m/86'/1'/0'/0/0")], non_witness=True),
    ]
    res = sign_psbt(sim, build_psbt(spends), "w")
    assert [r.status for r in res.inputs] == ["signed", "not-signed"]
    assert "provider simulator cannot make BIP340 (Schnorr) signatures" in res.inputs[1].reason
    with pytest.raises(NothingSigned, match="cannot make BIP340"):
        sign_psbt(sim, build_psbt(spends[1:]), "w")


def test_provider_without_derivation_uses_single_keys_only(
    sim: Hsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = SimulatorProvider.capabilities
    monkeypatch.setattr(
        SimulatorProvider, "capabilities", lambda self: _without(real(self), can_derive=False)
    )
    w = add_wallet(sim, "w")
    with pytest.raises(NothingSigned):
        sign_psbt(sim, build_psbt([Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])]), "w")
    master = w.root.public_key
    res = sign_psbt(sim, build_psbt([Spend("p2wpkh", [(master, None)])]), "w")
    assert res.signed_inputs == 1 and res.inputs[0].signatures[0].path is None


def test_corrupt_signature_from_provider_is_refused(
    sim: Hsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: after a healthy open, the provider's signatures get one bit flipped."""
    real = SimulatorProvider.sign_digest

    def flipped(self: SimulatorProvider, *args: object, **kwargs: object) -> bytes:
        sig = bytearray(real(self, *args, **kwargs))  # type: ignore[arg-type]
        sig[-1] ^= 1
        return bytes(sig)

    real_batch = SimulatorProvider.sign_batch

    def flipped_batch(self: SimulatorProvider, *args: object, **kwargs: object) -> list[bytes]:
        sigs = real_batch(self, *args, **kwargs)  # type: ignore[arg-type]
        return [sig[:-1] + bytes([sig[-1] ^ 1]) for sig in sigs]

    w = add_wallet(sim, "w")
    monkeypatch.setattr(SimulatorProvider, "sign_digest", flipped)
    monkeypatch.setattr(SimulatorProvider, "sign_batch", flipped_batch)
    for kind, path in (("p2wpkh", "m/84'/1'/0'/0/0"), ("p2tr", "m/86'/1'/0'/0/0")):
        psbt = build_psbt([Spend(kind, [w.key(path)])])
        before = psbt.to_base64()
        with pytest.raises(SigningFailed, match="does not verify"):
            sign_psbt(sim, psbt, "w")
        assert psbt.to_base64() == before
        *_, last, outcome = map(json.loads, sim.audit_path.read_text().splitlines())
        assert last["op"] == "sign_discarded" and last["outcome"] == "error"
        assert last["error"] == "signing_failed"
        assert last["detail"] == {"signatures": "1", "invalid": "1"}
        assert outcome["op"] == "psbt_sign" and outcome["outcome"] == "error"
        assert outcome["error"] == "signing_failed"


def test_unknown_key_is_refused(hsm: Hsm) -> None:
    add_wallet(hsm, "w")
    psbt = build_psbt([Spend("p2wpkh", [(ec.public_key(bytearray(b"\x01" * 32)), None)])])
    with pytest.raises(KeyNotFound):
        sign_psbt(hsm, psbt, "nope")


# --- linear cost ------------------------------------------------------------------------------


def test_signing_is_linear_in_the_number_of_inputs(
    hsm: Hsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing work per input is constant (the sighash cache), counted in SHA-256 calls."""
    import anyhsm.bitcoin.sighash as sighash_mod

    w = add_wallet(hsm, "w")
    real: Callable[[bytes], bytes] = sighash_mod.__dict__["sha256"]
    counts: list[int] = []
    for n in (8, 32):
        calls = [0]

        def counting(data: bytes, calls: list[int] = calls) -> bytes:
            calls[0] += 1
            return real(data)

        monkeypatch.setattr(sighash_mod, "sha256", counting)
        spends = [Spend("p2tr", [w.key(f"m/86'/1'/0'/0/{i}")]) for i in range(n)]
        sign_psbt(hsm, build_psbt(spends))
        monkeypatch.setattr(sighash_mod, "sha256", real)
        counts.append(calls[0])
    assert counts[0] <= 10  # the five BIP341 per-transaction hashes, once
    assert counts[1] == counts[0]


def test_policy_refusal_signs_nothing(tmp_path: Path) -> None:
    with software_hsm(tmp_path / "p", max_fee_sat=500) as h:
        w = add_wallet(h, "w")
        psbt = build_psbt([Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])], fee=501)
        with pytest.raises(SigningPolicyError):
            sign_psbt(h, psbt, "w")
        ok = build_psbt([Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])], fee=500)
        assert sign_psbt(h, ok, "w").signed_inputs == 1


def test_result_to_dict_is_json(hsm: Hsm) -> None:
    w = add_wallet(hsm, "w")
    res = sign_psbt(hsm, build_psbt([Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")])]))
    data = json.loads(json.dumps(res.to_dict()))
    assert Psbt.parse(data["psbt"]) == res.psbt
    assert data["inputs"][0]["signatures"][0]["path"] == "m/84'/1'/0'/0/0"
    assert data["fee"] == 1000 and data["signed_inputs"] == 1


def test_taproot_key_without_internal_key_field_is_explained(hsm: Hsm) -> None:
    w = add_wallet(hsm, "w")
    psbt, _, _ = _tap_tree_psbt(w, internal_ours=True)
    inp = psbt.inputs[0]
    inp.tap_internal_key = None  # the output has a script tree: BIP86 cannot match
    inp.tap_merkle_root = None
    inp.tap_leaf_scripts.clear()
    inp.tap_bip32_derivations = {
        x: t for x, t in inp.tap_bip32_derivations.items() if not t.leaf_hashes
    }
    with pytest.raises(NothingSigned, match="not this key's BIP86 output key"):
        sign_psbt(hsm, psbt, "w")


# --- robustness: only HsmError escapes ------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hsm, Wallet]]:
    h = software_hsm(tmp_path_factory.mktemp("fuzz") / "dep")
    w = add_wallet(h, "w", bytes(range(32)))
    h.generate_key("solo")
    yield h, w
    h.close()


_KINDS = ["p2pkh", "p2sh-p2wpkh", "p2wpkh", "p2tr", "p2wsh", "p2sh-p2wsh", "p2sh"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_signer_and_finalizer_raise_only_hsm_errors(
    fuzz_hsm: tuple[Hsm, Wallet], data: st.DataObject
) -> None:
    """Random PSBTs with tampered fields: signing and finalizing either work or raise an
    HsmError (policy, nothing signed...), never anything else."""
    from anyhsm.errors import HsmError

    hsm, w = fuzz_hsm
    kinds = data.draw(st.lists(st.sampled_from(_KINDS), min_size=1, max_size=3))
    spends = []
    for n, kind in enumerate(kinds):
        keys = [w.key(f"m/84'/1'/0'/0/{n}"), w.key(f"m/84'/1'/0'/1/{n}")]
        spends.append(
            Spend(
                kind,
                keys[: 1 if kind in ("p2pkh", "p2sh-p2wpkh", "p2wpkh", "p2tr") else 2],
                m=data.draw(st.integers(1, 2)),
                sighash=data.draw(st.sampled_from([None, 0, 1, 2, 3, 0x81, 0x83, 0x100])),
                non_witness=data.draw(st.sampled_from([None, True, False])),
                witness=data.draw(st.booleans()),
            )
        )
    psbt = build_psbt(spends, fee=data.draw(st.integers(-5_000, 50_000)))
    for inp in psbt.inputs:
        tamper = data.draw(st.sampled_from(["none", "redeem", "witness", "internal", "drop"]))
        junk = data.draw(st.binary(max_size=40))
        if tamper == "redeem":
            inp.redeem_script = junk
        elif tamper == "witness":
            inp.witness_script = junk
        elif tamper == "internal":
            inp.tap_internal_key = ec.public_key(bytearray(b"\x03" * 32))[1:]
        elif tamper == "drop":
            inp.bip32_derivations.clear()
            inp.tap_bip32_derivations.clear()
    for key in ("w", "solo", None):
        try:
            signed = sign_psbt(hsm, psbt, key).psbt
        except HsmError:
            signed = psbt
        with contextlib.suppress(HsmError):
            finalize_psbt(signed)


def test_signed_copy_shares_nothing_mutable_with_the_input(hsm: Hsm) -> None:
    w = add_wallet(hsm, "w")
    spends = [
        Spend("p2pkh", [w.key("m/44'/1'/0'/0/0")]),
        Spend("p2wpkh", [w.key("m/84'/1'/0'/0/0")], non_witness=True),
        Spend("p2tr", [w.key("m/86'/1'/0'/0/0")]),
    ]
    psbt = build_psbt(spends)
    before = psbt.serialize()
    res = sign_psbt(hsm, psbt, "w")
    assert res.psbt != psbt and psbt.serialize() == before
    for a, b in zip(res.psbt.inputs, psbt.inputs, strict=True):
        assert a.non_witness_utxo is None or a.non_witness_utxo is not b.non_witness_utxo
        assert a.witness_utxo is None or a.witness_utxo is not b.witness_utxo
        a.bip32_derivations.clear()
        a.tap_bip32_derivations.clear()
        if a.non_witness_utxo is not None:
            a.non_witness_utxo.outputs.clear()
    res.psbt.outputs[0].amount = 1
    assert res.psbt.global_map is not psbt.global_map
    assert psbt.serialize() == before
