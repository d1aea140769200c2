"""PSBTs and approvals built by an independent library (embit), for the policy tests.

embit only BUILDS here: keys, addresses, transactions, PSBT fields, and the BIP137
approval signatures (its libsecp256k1 bindings, with the message hash computed here from
the BIP137 definition). anyhsm's sighash is never trusted to it, nor the reverse.

A :class:`EmbitWallet` is a BIP32 seed (imported into the anyhsm handle under a label);
:func:`spend_psbt` pays the given outputs from P2WPKH inputs of the wallet's account
m/84'/1'/0' (PSBT_IN_NON_WITNESS_UTXO and WITNESS_UTXO given, as the signing policy
wants), with a change output on the change branch.
"""

from __future__ import annotations

import base64
import hashlib
import random
from dataclasses import dataclass

from embit import script as escript
from embit.bip32 import HDKey
from embit.ec import PrivateKey
from embit.networks import NETWORKS
from embit.psbt import PSBT, DerivationPath
from embit.transaction import Transaction, TransactionInput, TransactionOutput
from embit.util import secp256k1 as esecp

REGTEST = NETWORKS["regtest"]
H = 0x80000000


@dataclass
class EmbitWallet:
    label: str
    seed: bytes

    @property
    def root(self) -> HDKey:
        return HDKey.from_seed(self.seed, version=REGTEST["xprv"])

    @property
    def fingerprint(self) -> bytes:
        return self.root.my_fingerprint

    def path(self, branch: int, index: int) -> list[int]:
        return [84 + H, 1 + H, 0 + H, branch, index]

    def pub(self, branch: int, index: int) -> bytes:
        return self.root.derive(self.path(branch, index)).key.get_public_key().sec()

    def address(self, branch: int, index: int) -> str:
        return escript.p2wpkh(_Pub(self.pub(branch, index))).address(REGTEST)


class _Pub:
    """What embit's script constructors take (an object with .sec())."""

    def __init__(self, sec: bytes) -> None:
        self._sec = sec

    def sec(self) -> bytes:
        return self._sec


def foreign_address(rng: random.Random, kind: str = "p2wpkh") -> str:
    """An address of a key nobody here holds."""
    key = PrivateKey(rng.randbytes(32))
    pub = key.get_public_key()
    if kind == "p2wpkh":
        return escript.p2wpkh(pub).address(REGTEST)
    if kind == "p2pkh":
        return escript.p2pkh(pub).address(REGTEST)
    if kind == "p2tr":
        return escript.p2tr(pub).address(REGTEST)
    if kind == "p2sh":
        return escript.p2sh(escript.p2wpkh(pub)).address(REGTEST)
    raise ValueError(kind)


def spend_psbt(
    wallet: EmbitWallet,
    outputs: list[tuple[str, int]],
    *,
    inputs: int = 1,
    fee: int = 1_000,
    change: bool = True,
    op_return: bytes | None = None,
    rng: random.Random | None = None,
) -> str:
    """A base64 PSBT spending ``inputs`` P2WPKH coins of ``wallet`` to ``outputs``
    (address, satoshis), the rest (minus ``fee``) to a change output when ``change``."""
    rng = rng or random.Random(1)
    total_out = sum(a for _, a in outputs)
    per_input = (total_out + fee) // inputs + 20_000 * change + 1
    vin: list[TransactionInput] = []
    prevs: list[Transaction] = []
    paths: list[list[int]] = []
    for n in range(inputs):
        index = rng.randrange(1000)
        pub = wallet.pub(0, index)
        prev = Transaction(
            vin=[TransactionInput(rng.randbytes(32), rng.randrange(4))],
            vout=[TransactionOutput(per_input, escript.p2wpkh(_Pub(pub)))],
        )
        prevs.append(prev)
        paths.append(wallet.path(0, index))
        vin.append(TransactionInput(prev.txid(), 0, sequence=0xFFFFFFFD))
    vout = [TransactionOutput(a, escript.address_to_scriptpubkey(addr)) for addr, a in outputs]
    change_index: int | None = None
    if change:
        rest = per_input * inputs - total_out - fee
        change_index = rng.randrange(1000)
        vout.append(TransactionOutput(rest, escript.p2wpkh(_Pub(wallet.pub(1, change_index)))))
    else:
        # no change: whatever is left over is fee too
        fee = per_input * inputs - total_out
    if op_return is not None:
        vout.append(
            TransactionOutput(0, escript.Script(b"\x6a" + bytes([len(op_return)]) + op_return))
        )
    tx = Transaction(vin=vin, vout=vout)
    psbt = PSBT(tx)
    fp = wallet.fingerprint
    for n, (prev, path) in enumerate(zip(prevs, paths, strict=True)):
        inp = psbt.inputs[n]
        inp.non_witness_utxo = prev
        inp.witness_utxo = prev.vout[0]
        pub = wallet.root.derive(path).key.get_public_key()
        inp.bip32_derivations[pub] = DerivationPath(fp, path)
    if change_index is not None:
        path = wallet.path(1, change_index)
        pub = wallet.root.derive(path).key.get_public_key()
        psbt.outputs[len(outputs)].bip32_derivations[pub] = DerivationPath(fp, path)
    return psbt.to_string()


def txid_of(psbt_b64: str) -> str:
    return PSBT.from_string(psbt_b64).tx.txid().hex()


# --- approvals (BIP137, signed with embit's libsecp256k1) -----------------------------------


class Approver:
    """An approver key; ``sign`` makes a BIP137 signature (compressed key, P2PKH header)."""

    def __init__(self, secret: bytes) -> None:
        self._key = PrivateKey(secret)

    @property
    def pubkey(self) -> bytes:
        return self._key.get_public_key().sec()

    @property
    def hex(self) -> str:
        return self.pubkey.hex()

    def sign(self, message: str) -> str:
        digest = _bip137_hash(message.encode())
        sig = esecp.ecdsa_sign_recoverable(digest, self._key.secret)
        compact, recid = esecp.ecdsa_recoverable_signature_serialize_compact(sig)
        return base64.b64encode(bytes([31 + recid]) + compact).decode()


def _varint(n: int) -> bytes:
    assert n < 0xFD
    return bytes([n])


def _bip137_hash(message: bytes) -> bytes:
    magic = b"Bitcoin Signed Message:\n"
    data = _varint(len(magic)) + magic + _varint(len(message)) + message
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def approval_text(txid: str, policy: str, expires: int) -> str:
    """The approval message as docs/policy.md specifies it (written out here, not taken
    from the library)."""
    return f"anyhsm spending approval v1\ntxid: {txid}\npolicy: {policy}\nexpires: {expires}"
