"""The shortcuts the signer's hot path takes give the answers of the general code: the
byte-shape tests for P2WPKH and P2TR in describe_input and the size estimate agree with
classify(), key_in_script's key-hash comparison with building the P2PKH script, the
input-path rule's remembered prefixes with the rule itself, and the inlined transaction
serialisation with its parts'."""

from __future__ import annotations

import random

import pytest

from anyhsm.bitcoin.bip32 import HARDENED
from anyhsm.bitcoin.encoding import compact_size, hash160, var_bytes
from anyhsm.bitcoin.paths import PathRules
from anyhsm.bitcoin.psbt import PsbtInput
from anyhsm.bitcoin.script import ScriptType, classify, p2pkh
from anyhsm.bitcoin.size import input_size, witness_len
from anyhsm.bitcoin.spend import SpendKind, describe_input, key_in_script
from anyhsm.bitcoin.tx import OutPoint, Transaction, TxIn, TxOut
from anyhsm.config import PolicyConfig
from anyhsm.crypto import secp256k1 as ec
from anyhsm.types import Network

_KIND = {ScriptType.P2WPKH: SpendKind.P2WPKH, ScriptType.P2TR: SpendKind.P2TR}


def _scripts(rng: random.Random) -> list[bytes]:
    out = []
    for first, size in [(0x00, 20), (0x51, 32), (0x00, 32), (0x52, 32), (0x51, 20), (0x00, 19)]:
        body = rng.randbytes(size)
        out.append(bytes([first, size]) + body)
        out.append(bytes([first, size]) + body + b"\x00")  # one byte too long
        out.append(bytes([first, size + 1]) + body)  # wrong push length
    return out


@pytest.mark.parametrize("seed", range(5))
def test_describe_input_shortcuts_agree_with_classify(seed: int) -> None:
    rng = random.Random(seed)
    for spk in _scripts(rng):
        inp = PsbtInput(bytes(32), 0)
        inp.witness_utxo = TxOut(1000, spk)
        info = describe_input(inp)
        kind = _KIND.get(classify(spk).type)
        if kind is not None:
            assert info.kind is kind, spk.hex()
            if kind is SpendKind.P2WPKH:
                assert info.script_code == p2pkh(spk[2:])
        else:
            assert info.kind not in (SpendKind.P2WPKH, SpendKind.P2TR), spk.hex()
        size = input_size(inp, spk)
        if kind is SpendKind.P2WPKH:
            assert size == (0, witness_len([72, 33]), None)
        elif kind is SpendKind.P2TR:
            assert size == (0, witness_len([64]), None)


def test_key_in_script_compares_key_hashes() -> None:
    rng = random.Random(3)
    pubs = [ec.public_key(bytearray(rng.randbytes(32))) for _ in range(4)]
    for spk_pub in pubs:
        inp = PsbtInput(bytes(32), 0)
        inp.witness_utxo = TxOut(1000, bytes([0, 20]) + hash160(spk_pub))
        info = describe_input(inp)
        for pub in pubs:
            assert key_in_script(pub, info) is (p2pkh(hash160(pub)) == info.script_code)


@pytest.mark.parametrize("seed", range(3))
def test_remembered_allowed_prefixes_give_the_rule_s_answers(seed: int) -> None:
    """PathRules remembers allowed account prefixes; in any order, over paths near the
    patterns' edges, its answers are those of the rule computed afresh."""
    rng = random.Random(seed)
    policy = PolicyConfig(
        allowed_input_paths=("m/84'/1'/*'", "m/86'/1'/0'/0", "m/0'/*"),
        key_input_paths={"narrow": ("m/48'/1'/0'/2'",), "none": ()},
    )
    steps = [0, 1, 2, 0 | HARDENED, 1 | HARDENED, 2 | HARDENED, 48 | HARDENED, 84 | HARDENED]
    steps += [86 | HARDENED]
    paths = [tuple(rng.choice(steps) for _ in range(rng.randrange(0, 7))) for _ in range(400)]
    for network in (Network.REGTEST, Network.MAINNET):
        for configured in (policy, PolicyConfig()):
            rules = PathRules(network, configured)
            for path in paths:
                for label in ("w", "narrow", "none"):
                    fresh = PathRules(network, configured).for_key(label)
                    assert rules.input_problem(label, path) == fresh.input_problem(path, network), (
                        label,
                        path,
                    )


@pytest.mark.parametrize("seed", range(4))
def test_transaction_serialisation_is_its_parts(seed: int) -> None:
    """Transaction.serialize inlines TxIn/TxOut.serialize: the same bytes, with and
    without witnesses, and a parse gives the transaction back."""
    rng = random.Random(seed)
    for _ in range(50):
        inputs = [
            TxIn(
                OutPoint(rng.randbytes(32), rng.randrange(2**32)),
                rng.randbytes(rng.choice([0, 1, 75, 253, 300])),
                rng.randrange(2**32),
                [rng.randbytes(rng.choice([0, 33, 72, 260])) for _ in range(rng.randrange(4))],
            )
            for _ in range(rng.randrange(1, 5))
        ]
        outputs = [
            TxOut(rng.randrange(21_000_000 * 100_000_000), rng.randbytes(rng.randrange(60)))
            for _ in range(rng.randrange(0, 4))
        ]
        tx = Transaction(rng.randrange(-(2**31), 2**31), inputs, outputs, rng.randrange(2**32))
        base = b"".join(
            [
                tx.version.to_bytes(4, "little", signed=True),
                compact_size(len(inputs)),
                *(i.serialize() for i in inputs),
                compact_size(len(outputs)),
                *(o.serialize() for o in outputs),
            ]
        )
        lock = tx.locktime.to_bytes(4, "little")
        assert tx.serialize(include_witness=False) == base + lock
        if tx.has_witness:
            stacks = b"".join(
                compact_size(len(i.witness)) + b"".join(var_bytes(w) for w in i.witness)
                for i in inputs
            )
            full = base[:4] + b"\x00\x01" + base[4:] + stacks + lock
            assert tx.serialize() == full
            assert Transaction.parse(full) == tx
