"""The shortcuts the signer's hot path takes give the answers of the general code: the
byte-shape tests for P2WPKH and P2TR in describe_input and the size estimate agree with
classify(), and key_in_script's key-hash comparison with building the P2PKH script."""

from __future__ import annotations

import random

import pytest

from anyhsm.bitcoin.encoding import hash160
from anyhsm.bitcoin.psbt import PsbtInput
from anyhsm.bitcoin.script import ScriptType, classify, p2pkh
from anyhsm.bitcoin.size import input_size, witness_len
from anyhsm.bitcoin.spend import SpendKind, describe_input, key_in_script
from anyhsm.bitcoin.tx import TxOut
from anyhsm.crypto import secp256k1 as ec

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
