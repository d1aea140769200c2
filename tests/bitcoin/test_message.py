"""BIP137 and BIP322 signed messages through anyhsm.bitcoin.message: published vectors,
round trips, tampering, one kind of answer for an invalid signature, fuzz. (BIP322's own
vector files, full and proof-of-funds signatures and the script interpreter are in
test_bip322.py.)"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.vectors import data_dir

from anyhsm.bitcoin.address import address_for_pubkey, wif_decode
from anyhsm.bitcoin.bip32 import ExtendedKey
from anyhsm.bitcoin.bip322 import Bip322Format
from anyhsm.bitcoin.message import (
    EcdsaNonce,
    bip322_message_hash,
    bip322_to_sign,
    bip322_to_spend,
    decode_witness,
    encode_witness,
    message_hash,
    recover_bip137,
    sign_message_bip137,
    sign_message_bip322,
    verify_message,
    verify_message_bip137,
    verify_message_bip322,
)
from anyhsm.bitcoin.presets import OutputType
from anyhsm.bitcoin.taproot import taproot_tweak
from anyhsm.crypto import secp256k1 as ec
from anyhsm.errors import HsmError, MessageError, NetworkMismatch
from anyhsm.secret import SecretBytes
from anyhsm.types import Network

BIP322 = json.loads((data_dir() / "bip322_vectors.json").read_text(encoding="utf-8"))
BIP137 = json.loads((data_dir() / "bip137_vectors.json").read_text(encoding="utf-8"))
NETS = {"mainnet": Network.MAINNET, "testnet": Network.TESTNET}


def _key(wif: str) -> tuple[SecretBytes, bytes]:
    secret, _, compressed = wif_decode(wif)
    assert compressed
    return secret, ec.public_key(secret.buffer)


def _ecdsa(secret: SecretBytes, *, low_r: bool = False) -> Callable[[bytes], bytes]:
    return lambda digest: ec.ecdsa_sign(secret.buffer, digest, grind_low_r=low_r)


def _schnorr_bip86(secret: SecretBytes, pub: bytes) -> Callable[[bytes], bytes]:
    tweak = taproot_tweak(pub[1:], None)
    return lambda digest: ec.schnorr_sign(secret.buffer, digest, tweak=tweak)


# --- BIP137 ------------------------------------------------------------------------------------


def test_message_hash_layout() -> None:
    from anyhsm.bitcoin.encoding import sha256d

    msg = b"x" * 300  # compact size needs 3 bytes
    expected = sha256d(b"\x18Bitcoin Signed Message:\n" + b"\xfd\x2c\x01" + msg)
    assert message_hash(msg) == expected
    assert message_hash("héllo") == message_hash("héllo".encode())


@pytest.mark.parametrize("case", BIP137["signing"])
def test_bip137_core_signature_byte_for_byte(case: dict[str, str]) -> None:
    secret, pub = _key(case["wif"])
    net = NETS[case["network"]]
    assert address_for_pubkey(pub, "p2pkh", net) == case["address"]
    sig = sign_message_bip137(_ecdsa(secret), pub, case["message"], OutputType.P2PKH)
    assert sig == case["signature_b64"]
    assert verify_message_bip137(case["address"], case["message"], sig, net)
    assert verify_message(case["address"], case["message"], sig, net)
    assert not verify_message_bip137(case["address"], case["message"] + ".", sig, net)
    secret.wipe()


def _message(case: dict[str, object]) -> str:
    repeat = case.get("message_repeat")
    if isinstance(repeat, list):
        return str(repeat[0]) * int(repeat[1])
    return str(case["message"])


@pytest.mark.parametrize("case", BIP137["verify"])
def test_bip137_published_trezor_signatures(case: dict[str, object]) -> None:
    sig = base64.b64encode(bytes.fromhex(str(case["signature_hex"]))).decode()
    net = NETS[str(case["network"])]
    result = verify_message_bip137(str(case["address"]), _message(case), sig, net)
    assert result is case["valid"]


@pytest.mark.parametrize(
    ("kind", "header_range"),
    [
        (OutputType.P2PKH, range(31, 35)),
        (OutputType.P2SH_P2WPKH, range(35, 39)),
        (OutputType.P2WPKH, range(39, 43)),
    ],
)
def test_bip137_round_trip(kind: OutputType, header_range: range) -> None:
    for _ in range(8):
        key = ExtendedKey.from_seed(os.urandom(32)).derive("m/0h")
        secret = key.secret()
        pub = key.public_key
        message = os.urandom(40)
        sig = sign_message_bip137(_ecdsa(secret), pub, message, kind)
        raw = base64.b64decode(sig)
        assert len(raw) == 65 and raw[0] in header_range
        for net in (Network.MAINNET, Network.TESTNET):
            address = address_for_pubkey(pub, kind.value, net)
            assert verify_message_bip137(address, message, sig, net)
            assert verify_message(address, message, sig, net)
            # tampered message, tampered signature, other key's address: False
            assert not verify_message_bip137(address, message + b"!", sig, net)
            bad = bytes([raw[0]]) + raw[1:33] + bytes([raw[33] ^ 1]) + raw[34:]
            assert not verify_message_bip137(address, message, base64.b64encode(bad).decode(), net)
            other = ExtendedKey.from_seed(os.urandom(32)).public_key
            assert not verify_message_bip137(
                address_for_pubkey(other, kind.value, net), message, sig, net
            )
        recovered, named = recover_bip137(message, sig)
        assert recovered == pub
        assert named is (None if kind is OutputType.P2PKH else kind)
        secret.wipe()


def test_bip137_uncompressed_key() -> None:
    secret = SecretBytes(os.urandom(32))
    pub65 = ec.decompress(ec.public_key(secret.buffer))
    sig = sign_message_bip137(_ecdsa(secret), pub65, "hello", "p2pkh")
    assert 27 <= base64.b64decode(sig)[0] <= 30
    from anyhsm.bitcoin.encoding import b58check_encode, hash160

    address = b58check_encode(b"\x00" + hash160(pub65))
    assert verify_message_bip137(address, "hello", sig, Network.MAINNET)
    with pytest.raises(MessageError, match="compressed"):
        sign_message_bip137(_ecdsa(secret), pub65, "hello", "p2wpkh")


def test_bip137_electrum_style_segwit_accepted() -> None:
    """A P2PKH-header (31-34) signature verifies for the same key's segwit addresses too,
    as Electrum and most verifiers accept (Bitcoin Core does not)."""
    secret, pub = _key(BIP137["signing"][0]["wif"])
    sig = BIP137["signing"][0]["signature_b64"]
    msg = BIP137["signing"][0]["message"]
    for kind in ("p2wpkh", "p2sh-p2wpkh"):
        assert verify_message_bip137(
            address_for_pubkey(pub, kind, Network.TESTNET), msg, sig, Network.TESTNET
        )
    # but a segwit header does not prove the P2PKH address
    seg = sign_message_bip137(_ecdsa(secret), pub, msg, "p2wpkh")
    p2pkh_address = address_for_pubkey(pub, "p2pkh", Network.TESTNET)
    assert not verify_message_bip137(p2pkh_address, msg, seg, Network.TESTNET)
    secret.wipe()


def test_bip137_errors() -> None:
    secret, pub = _key(BIP137["signing"][0]["wif"])
    address = BIP137["signing"][0]["address"]
    with pytest.raises(MessageError, match="BIP322"):
        sign_message_bip137(_ecdsa(secret), pub, "m", OutputType.P2TR)
    with pytest.raises(MessageError, match="unknown address type"):
        sign_message_bip137(_ecdsa(secret), pub, "m", "p2foo")
    other = SecretBytes(os.urandom(32))
    with pytest.raises(MessageError, match="does not belong"):
        sign_message_bip137(_ecdsa(other), pub, "m")
    with pytest.raises(MessageError, match="invalid DER"):
        sign_message_bip137(lambda d: b"\x30\x00", pub, "m")
    with pytest.raises(MessageError, match="base64"):
        verify_message_bip137(address, "m", "not base64!", Network.TESTNET)
    with pytest.raises(MessageError, match="65 bytes"):
        verify_message_bip137(
            address, "m", base64.b64encode(b"\x1f" * 64).decode(), Network.TESTNET
        )
    with pytest.raises(MessageError, match="header"):
        verify_message_bip137(
            address, "m", base64.b64encode(b"\x2b" + b"\1" * 64).decode(), Network.TESTNET
        )
    with pytest.raises(NetworkMismatch):
        verify_message_bip137(address, "m", BIP137["signing"][0]["signature_b64"], Network.MAINNET)
    taproot = address_for_pubkey(pub, "p2tr", Network.TESTNET)
    with pytest.raises(MessageError, match="taproot"):
        verify_message_bip137(taproot, "m", BIP137["signing"][0]["signature_b64"], Network.TESTNET)
    secret.wipe()
    other.wipe()


def test_bip137_high_s_from_signer_is_normalised() -> None:
    secret, pub = _key(BIP137["signing"][0]["wif"])

    def high_s(digest: bytes) -> bytes:
        r, s = ec.der_decode(ec.ecdsa_sign(secret.buffer, digest))
        return ec.der_encode(r, ec.CURVE_ORDER - s)

    sig = sign_message_bip137(high_s, pub, BIP137["signing"][0]["message"])
    assert sig == BIP137["signing"][0]["signature_b64"]
    secret.wipe()


# --- BIP322 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BIP322["message_hashes"])
def test_bip322_message_hash(case: dict[str, str]) -> None:
    assert bip322_message_hash(case["message"]).hex() == case["hash"]


@pytest.mark.parametrize("case", BIP322["tx_hashes"])
def test_bip322_virtual_transactions(case: dict[str, str]) -> None:
    from anyhsm.bitcoin.address import script_from_address

    to_spend = bip322_to_spend(
        case["message"], script_from_address(case["address"], Network.MAINNET)
    )
    assert to_spend.txid_hex() == case["to_spend"]
    assert bip322_to_sign(to_spend).txid_hex() == case["to_sign"]


@pytest.mark.parametrize("case", BIP322["signing"]["signatures"])
def test_bip322_p2wpkh_signatures_byte_for_byte(case: dict[str, str]) -> None:
    secret, pub = _key(BIP322["signing"]["private_key"])
    address = BIP322["signing"]["address"]
    assert address_for_pubkey(pub, "p2wpkh", Network.MAINNET) == address
    low_r = sign_message_bip322(_ecdsa(secret, low_r=True), pub, case["message"], "p2wpkh")
    plain = sign_message_bip322(_ecdsa(secret), pub, case["message"], OutputType.P2WPKH)
    # BIP322 1.0.0 prefixes the format; the vectors predate it
    assert low_r == "smp" + case["low_r"]
    assert plain == "smp" + case["rfc6979"]
    unprefixed = sign_message_bip322(_ecdsa(secret), pub, case["message"], "p2wpkh", prefix=False)
    assert unprefixed == case["rfc6979"]
    for sig in (low_r, plain, unprefixed):
        assert verify_message_bip322(address, case["message"], sig, Network.MAINNET)
        assert verify_message(address, case["message"], sig, Network.MAINNET)
        assert not verify_message_bip322(address, case["message"] + " ", sig, Network.MAINNET)
    secret.wipe()


@pytest.mark.parametrize("case", BIP322["valid"])
def test_bip322_published_valid(case: dict[str, str]) -> None:
    secret, pub = _key(case["private_key"])
    assert address_for_pubkey(pub, case["type"], Network.MAINNET) == case["address"]
    assert verify_message_bip322(
        case["address"], case["message"], case["signature"], Network.MAINNET
    )
    assert verify_message(case["address"], case["message"], case["signature"], Network.MAINNET)
    # and our own signature for the same key and message verifies too
    sign = _ecdsa(secret) if case["type"] == "p2wpkh" else _schnorr_bip86(secret, pub)
    ours = sign_message_bip322(sign, pub, case["message"], case["type"])
    assert verify_message_bip322(case["address"], case["message"], ours, Network.MAINNET)
    secret.wipe()


@pytest.mark.parametrize("case", BIP322["invalid"])
def test_bip322_published_invalid(case: dict[str, str]) -> None:
    assert not verify_message_bip322(
        case["address"], case["message"], case["signature"], Network.MAINNET
    )


@pytest.mark.parametrize("case", BIP322["malformed"])
def test_bip322_published_malformed(case: dict[str, str]) -> None:
    with pytest.raises(MessageError):
        verify_message_bip322(case["address"], case["message"], case["signature"], Network.MAINNET)


def test_bip322_p2tr_round_trip_and_tampering() -> None:
    for _ in range(5):
        key = ExtendedKey.from_seed(os.urandom(32)).derive("m/86h/0h/0h/0/0")
        secret = key.secret()
        pub = key.public_key
        address = address_for_pubkey(pub, "p2tr", Network.REGTEST)
        msg = os.urandom(20)
        sig = sign_message_bip322(_schnorr_bip86(secret, pub), pub, msg, OutputType.P2TR)
        assert sig.startswith("smp")
        stack = decode_witness(base64.b64decode(sig[3:]))
        assert len(stack) == 1 and len(stack[0]) == 64  # SIGHASH_DEFAULT
        assert verify_message_bip322(address, msg, sig, Network.REGTEST)
        assert not verify_message_bip322(address, msg + b"x", sig, Network.REGTEST)
        flipped = bytes([stack[0][0] ^ 1]) + stack[0][1:]
        bad = base64.b64encode(encode_witness([flipped])).decode()
        assert not verify_message_bip322(address, msg, bad, Network.REGTEST)
        # SIGHASH_NONE (0x02) appended: not allowed by BIP322
        none = base64.b64encode(encode_witness([stack[0] + b"\x02"])).decode()
        assert not verify_message_bip322(address, msg, none, Network.REGTEST)
        secret.wipe()


def test_bip322_p2tr_untweaked_signer_is_caught() -> None:
    secret = SecretBytes(os.urandom(32))
    pub = ec.public_key(secret.buffer)
    with pytest.raises(MessageError, match="tweaked"):
        sign_message_bip322(lambda d: ec.schnorr_sign(secret.buffer, d), pub, "m", "p2tr")
    secret.wipe()


def test_bip322_p2wpkh_rules() -> None:
    secret = SecretBytes(os.urandom(32))
    pub = ec.public_key(secret.buffer)
    address = address_for_pubkey(pub, "p2wpkh", Network.MAINNET)
    sig = sign_message_bip322(_ecdsa(secret), pub, "m", "p2wpkh", prefix=False)
    der_all, key = decode_witness(base64.b64decode(sig))
    # SIGHASH_NONE instead of ALL: rejected even if it were a valid signature
    none = base64.b64encode(encode_witness([der_all[:-1] + b"\x02", key])).decode()
    assert not verify_message_bip322(address, "m", none, Network.MAINNET)
    # high-S form of the same signature: rejected (LOW_S rule)
    r, s = ec.der_decode(der_all[:-1])
    high = ec.der_encode(r, ec.CURVE_ORDER - s) + b"\x01"
    high_sig = base64.b64encode(encode_witness([high, key])).decode()
    assert not verify_message_bip322(address, "m", high_sig, Network.MAINNET)
    # a wrong number of witness items
    one = base64.b64encode(encode_witness([der_all])).decode()
    assert not verify_message_bip322(address, "m", one, Network.MAINNET)
    # the signer returning a signature of another key is caught at signing time
    other = SecretBytes(os.urandom(32))
    with pytest.raises(MessageError, match="does not verify"):
        sign_message_bip322(_ecdsa(other), pub, "m", "p2wpkh")
    secret.wipe()
    other.wipe()


def test_bip322_single_key_types_and_formats() -> None:
    secret = SecretBytes(os.urandom(32))
    pub = ec.public_key(secret.buffer)
    net = Network.MAINNET
    for kind, prefix in (("p2pkh", "ful"), ("p2sh-p2wpkh", "ful"), ("p2wpkh", "smp")):
        sig = sign_message_bip322(_ecdsa(secret), pub, "m", kind)
        assert sig.startswith(prefix)
        address = address_for_pubkey(pub, kind, net)
        assert verify_message_bip322(address, "m", sig, net)
        assert verify_message(address, "m", sig, net)
        assert not verify_message(address, "n", sig, net)
    full = sign_message_bip322(_ecdsa(secret), pub, "m", "p2wpkh", fmt=Bip322Format.FULL)
    assert full.startswith("ful")
    assert verify_message(address_for_pubkey(pub, "p2wpkh", net), "m", full, net)
    with pytest.raises(MessageError, match="native segwit"):
        sign_message_bip322(_ecdsa(secret), pub, "m", "p2pkh", fmt=Bip322Format.SIMPLE)
    with pytest.raises(MessageError, match="not p2wsh"):
        sign_message_bip322(_ecdsa(secret), pub, "m", "p2wsh")
    # a simple signature is no proof for a P2PKH address: well formed, not valid
    simple = sign_message_bip322(_ecdsa(secret), pub, "m", "p2wpkh")
    assert not verify_message_bip322(address_for_pubkey(pub, "p2pkh", net), "m", simple, net)
    secret.wipe()


def test_one_kind_of_answer_for_invalid_signatures() -> None:
    """False for every well-formed signature that does not prove the message; MessageError
    only for text that is no signature (or an inconclusive BIP322 verdict)."""
    secret, pub = _key(BIP137["signing"][0]["wif"])
    net = Network.TESTNET
    p2wpkh = address_for_pubkey(pub, "p2wpkh", net)
    bip137 = sign_message_bip137(_ecdsa(secret), pub, "m", "p2wpkh")
    bip322 = sign_message_bip322(_ecdsa(secret), pub, "m", "p2wpkh")
    stranger = SecretBytes(os.urandom(32))
    other = address_for_pubkey(ec.public_key(stranger.buffer), "p2wpkh", net)
    stranger.wipe()
    for sig in (bip137, bip322, bip322[3:]):
        assert verify_message(p2wpkh, "m", sig, net) is True
        assert verify_message(p2wpkh, "x", sig, net) is False  # another message
        assert verify_message(other, "m", sig, net) is False  # another address
    # a valid witness stack of the wrong shape, an empty stack: invalid, not malformed
    empty_stack = "smp" + base64.b64encode(b"\x00").decode()
    assert verify_message(p2wpkh, "m", empty_stack, net) is False
    assert verify_message(p2wpkh, "m", "smp" + base64.b64encode(b"\x01\x00").decode(), net) is (
        False
    )
    for malformed in ("not base64!", "", "smp", "ful" + bip322[3:], "pofAAAA", "smp!!!!"):
        with pytest.raises(MessageError):
            verify_message(p2wpkh, "m", malformed, net)
    secret.wipe()


def test_ecdsa_nonce_choice() -> None:
    assert EcdsaNonce("rfc6979").grind_low_r is False
    assert EcdsaNonce.LOW_R.grind_low_r is True
    secret, pub = _key(BIP322["signing"]["private_key"])
    case = BIP322["signing"]["signatures"][0]
    for nonce, expected in (
        (EcdsaNonce.RFC6979, case["rfc6979"]),
        (EcdsaNonce.LOW_R, case["low_r"]),
    ):
        sign = _ecdsa(secret, low_r=nonce.grind_low_r)
        assert sign_message_bip322(sign, pub, case["message"], "p2wpkh", prefix=False) == expected
    secret.wipe()


def test_witness_encoding() -> None:
    items = [b"", b"\x01" * 300, b"abc"]
    assert decode_witness(encode_witness(items)) == items
    with pytest.raises(MessageError):
        decode_witness(encode_witness(items) + b"\x00")
    with pytest.raises(MessageError):
        decode_witness(b"\x02\x05ab")


# --- fuzz ---------------------------------------------------------------------------------

_ADDRESS = BIP322["signing"]["address"]
_P2TR = BIP322["valid"][0]["address"]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([_ADDRESS, _P2TR, "1JwSSubhmg6iPtRjtyqhUYYH7bZg3Lfy1T"]),
    st.binary(max_size=120).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=100),
)
def test_fuzz_verify_raises_only_hsm_errors(address: str, signature: str) -> None:
    with contextlib.suppress(HsmError):
        assert isinstance(verify_message(address, "m", signature, Network.MAINNET), bool)
