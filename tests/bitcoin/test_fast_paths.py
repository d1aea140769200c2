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


def _walk(key: bytearray, chain: bytes, path: tuple[int, ...]) -> tuple[bytes, bytes, bytes]:
    """(child key, chain code, parent public key) one step at a time, each step given its
    parent's public key computed afresh: the plain reading of BIP32's CKDpriv."""
    cur, parent_pub = bytearray(key), b""
    for index in path:
        parent_pub = ec.public_key(cur)
        cur, chain = ec.bip32_ckd_priv(cur, chain, index, parent_pub)
    return bytes(cur), chain, parent_pub


@pytest.mark.parametrize("seed", range(4))
def test_derive_priv_computes_public_keys_only_where_used(seed: int) -> None:
    # bip32_derive_priv skips the public keys a hardened step does not use: the same
    # child, chain code, parent and own public key as the step-by-step walk
    rng = random.Random(seed)
    key, chain = ec.bip32_master(bytearray(rng.randbytes(32)))
    for _ in range(12):
        path = tuple(
            rng.randrange(4) | (HARDENED if rng.random() < 0.5 else 0)
            for _ in range(rng.randrange(6))
        )
        child, child_chain, parent_pub, pub = ec.bip32_derive_priv(key, chain, path)
        want_key, want_chain, want_parent = _walk(key, chain, path)
        assert (bytes(child), child_chain, parent_pub) == (want_key, want_chain, want_parent)
        assert pub == ec.public_key(child)
        alone = ec.bip32_derive_secret(key, chain, path)  # the signing path's derivation
        assert bytes(alone) == want_key


def _general(data: bytes, allow_witness: bool) -> Transaction | None:
    """The general (stream) reader's answer: the transaction, or None when it refuses."""
    from anyhsm.bitcoin.encoding import as_stream
    from anyhsm.errors import TransactionError

    stream = as_stream(data)
    try:
        tx = Transaction.read_from(stream, allow_witness=allow_witness)
    except TransactionError:
        return None
    return None if stream.read(1) else tx


def _random_tx(rng: random.Random) -> Transaction:
    def script() -> bytes:
        return rng.randbytes(rng.choice([0, 1, 22, 25, 34, 252, 253, 300, 70_000]))

    inputs = [
        TxIn(OutPoint(rng.randbytes(32), rng.randrange(2**32)), script(), rng.randrange(2**32))
        for _ in range(
            rng.choice([1, 2, 5, 252, 253]) if rng.random() < 0.1 else 1 + rng.randrange(4)
        )
    ]
    if rng.random() < 0.5:
        for i in inputs:
            i.witness = [script() for _ in range(rng.randrange(4))]
    outputs = [
        TxOut(rng.choice([0, 1, 546, 21_000_000 * 100_000_000]), script())
        for _ in range(rng.randrange(4))
    ]
    return Transaction(rng.randrange(-(2**31), 2**31), inputs, outputs, rng.randrange(2**32))


def _damaged(rng: random.Random, data: bytes) -> bytes:
    what = rng.randrange(5)
    at = rng.randrange(len(data))
    if what == 0:
        return data[:at]
    if what == 1:
        return data + rng.randbytes(rng.randrange(1, 3))
    if what == 2:
        return (
            data[:at] + bytes([rng.choice([0x00, 0x01, 0xFC, 0xFD, 0xFE, 0xFF])]) + data[at + 1 :]
        )
    if what == 3:
        return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]
    return data[:at] + data[at + 1 :]


@pytest.mark.parametrize("seed", range(6))
def test_fast_transaction_reader_agrees_with_the_general_one(seed: int) -> None:
    # Transaction.parse reads well-formed data by offsets: on every input (valid or
    # damaged) it gives the general reader's transaction, or leaves the data to it
    from anyhsm.bitcoin.tx import _parse_fast

    rng = random.Random(seed)
    fast_taken = 0
    for _ in range(150):
        tx = _random_tx(rng)
        for raw in (tx.serialize(), tx.serialize(include_witness=False)):
            samples = [raw] + [_damaged(rng, raw) for _ in range(8)]
            for data in samples:
                for allow_witness in (True, False):
                    fast = _parse_fast(data, allow_witness)
                    general = _general(data, allow_witness)
                    if fast is not None:
                        fast_taken += 1
                        assert fast == general
                        assert fast.serialize() == data or fast.serialize(False) == data
            assert Transaction.parse(raw) == _general(raw, True)
    assert fast_taken > 300  # the fast reader took most valid transactions


def _general_map(raw: bytes, pos: int) -> tuple[list[tuple[bytes, bytes]], int] | None:
    from io import BytesIO

    from anyhsm.bitcoin.psbt import _read_map
    from anyhsm.errors import PsbtError

    stream = BytesIO(raw)
    stream.seek(pos)
    try:
        records = _read_map(stream, len(raw), "map")
    except PsbtError:
        return None
    return records, stream.tell()


@pytest.mark.parametrize("seed", range(6))
def test_fast_map_reader_agrees_with_the_general_one(seed: int) -> None:
    # a PSBT's maps are read by offsets: the general reader's records and end offset,
    # or left to it (which then reads them or refuses with its error)
    from anyhsm.bitcoin.psbt import _read_map_fast

    rng = random.Random(seed)
    taken = 0
    for _ in range(200):
        pairs = [
            (
                rng.randbytes(rng.choice([1, 2, 34, 253])),
                rng.randbytes(rng.choice([0, 1, 72, 252, 253, 70_000])),
            )
            for _ in range(rng.randrange(5))
        ]
        raw = b"".join(var_bytes(k) + var_bytes(v) for k, v in pairs) + b"\x00"
        raw = rng.randbytes(rng.randrange(3)) + raw  # the map need not start at 0
        for data in [raw] + [_damaged(rng, raw) for _ in range(8)]:
            for pos in {0, 1, 2} & set(range(len(data) + 1)):
                fast = _read_map_fast(data, pos)
                if fast is not None:
                    taken += 1
                    assert fast == _general_map(data, pos)
    assert taken > 200


def test_bech32_checksum_table_is_bip173_s_loop() -> None:
    # _polymod XORs a table entry per character: BIP173's reference loop's checksums
    from anyhsm.bitcoin.encoding import _polymod

    gen = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)

    def reference(values: list[int]) -> int:
        chk = 1
        for v in values:
            top = chk >> 25
            chk = (chk & 0x1FFFFFF) << 5 ^ v
            for i in range(5):
                chk ^= gen[i] if ((top >> i) & 1) else 0
        return chk

    rng = random.Random(3)
    for _ in range(3000):
        values = [rng.randrange(32) for _ in range(rng.randrange(100))]
        assert _polymod(values) == reference(values)
