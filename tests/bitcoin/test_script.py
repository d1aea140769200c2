"""Script building, parsing and classification (Bitcoin Core's Solver rules), BIP67 sorting,
and a hypothesis fuzz of the parsers: only anyhsm errors may escape."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anyhsm.bitcoin.address import address_from_script
from anyhsm.bitcoin.encoding import hash160, sha256
from anyhsm.bitcoin.script import (
    OP_0,
    OP_1,
    OP_1NEGATE,
    OP_16,
    OP_CHECKMULTISIG,
    OP_CHECKSIG,
    OP_PUSHDATA1,
    OP_PUSHDATA2,
    OP_PUSHDATA4,
    OP_RETURN,
    ScriptInfo,
    ScriptOp,
    ScriptType,
    classify,
    decode_op_n,
    decode_script_num,
    encode_op,
    is_minimal_push,
    is_push_only,
    iter_ops,
    multisig,
    op_n,
    op_return,
    opcode_name,
    p2pk,
    p2pkh,
    p2sh,
    p2tr,
    p2wpkh,
    p2wsh,
    parse_multisig,
    parse_ops,
    push_bytes,
    push_data,
    push_int,
    script_num,
    script_type,
    to_asm,
    witness_program,
    witness_script_pubkey,
)
from anyhsm.crypto import secp256k1
from anyhsm.errors import HsmError, ScriptError
from anyhsm.types import Network

G = bytes.fromhex("0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")
G_UNCOMPRESSED = secp256k1.decompress(G)


# --- pushes and numbers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "encoded"),
    [
        (b"", "00"),
        (b"\x00", "0100"),
        (b"\x01", "51"),
        (b"\x10", "60"),
        (b"\x11", "0111"),
        (b"\x81", "4f"),
        (b"\x80", "0180"),
        (b"\xaa" * 75, "4b" + "aa" * 75),
        (b"\xaa" * 76, "4c4c" + "aa" * 76),
        (b"\xaa" * 255, "4cff" + "aa" * 255),
        (b"\xaa" * 256, "4d0001" + "aa" * 256),
        (b"\xaa" * 65535, "4dffff" + "aa" * 65535),
        (b"\xaa" * 65536, "4e00000100" + "aa" * 65536),
    ],
    ids=lambda v: str(len(v)) if isinstance(v, bytes) else v[:6],
)
def test_push_data_is_minimal(data: bytes, encoded: str) -> None:
    got = push_data(data)
    assert got.hex() == encoded
    (op,) = parse_ops(got)
    assert is_minimal_push(op)
    assert encode_op(op) == got
    if op.data is not None:
        assert op.data == data


def test_non_minimal_pushes_are_detected() -> None:
    for script in ("0101", "4c0102", "4d0200aabb", "4e01000000aa", "4c00", "0181"):
        (op,) = parse_ops(bytes.fromhex(script))
        assert not is_minimal_push(op), script
        assert encode_op(op).hex() == script
    assert is_minimal_push(ScriptOp(OP_CHECKSIG, None, 0, 1))


def test_push_bytes_never_uses_small_int_opcodes() -> None:
    assert push_bytes(b"\x05").hex() == "0105"
    assert push_bytes(b"").hex() == "00"
    assert op_return(b"\x05").hex() == "6a0105"
    assert op_return(b"hello").hex() == "6a0568656c6c6f"
    assert op_return(b"\x00" * 80)[:3].hex() == "6a4c50"


@pytest.mark.parametrize(
    ("n", "encoded"),
    [
        (0, ""),
        (1, "01"),
        (-1, "81"),
        (127, "7f"),
        (128, "8000"),
        (-128, "8080"),
        (255, "ff00"),
        (256, "0001"),
        (-255, "ff80"),
        (0x7FFFFFFF, "ffffff7f"),
        (-0x7FFFFFFF, "ffffffff"),
        (500000, "20a107"),
    ],
)
def test_script_num(n: int, encoded: str) -> None:
    assert script_num(n).hex() == encoded
    assert decode_script_num(bytes.fromhex(encoded)) == n


def test_script_num_rejects_non_minimal_and_long() -> None:
    for bad in ("00", "80", "0100", "ff0000", "ff0080", "7f0080"):
        with pytest.raises(ScriptError):
            decode_script_num(bytes.fromhex(bad))
    with pytest.raises(ScriptError):
        decode_script_num(bytes(5))
    # A sign byte is minimal only when the next byte's top bit is taken.
    assert decode_script_num(bytes.fromhex("8080")) == -128
    assert decode_script_num(bytes.fromhex("ff00")) == 255


def test_push_int_and_small_ints() -> None:
    assert push_int(0) == bytes([OP_0])
    assert push_int(-1) == bytes([OP_1NEGATE])
    assert push_int(1) == bytes([OP_1])
    assert push_int(16) == bytes([OP_16])
    assert push_int(17).hex() == "0111"
    assert push_int(1000).hex() == "02e803"
    assert [op_n(i) for i in (0, 1, 16)] == [OP_0, OP_1, OP_16]
    assert [decode_op_n(op_n(i)) for i in range(17)] == list(range(17))
    with pytest.raises(ScriptError):
        op_n(17)
    with pytest.raises(ScriptError):
        decode_op_n(OP_CHECKSIG)


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("hex_script", ["01", "05aabb", "4c", "4c05aa", "4d01", "4d0100", "4e"])
def test_truncated_pushes_raise_script_error(hex_script: str) -> None:
    with pytest.raises(ScriptError):
        list(iter_ops(bytes.fromhex(hex_script)))
    assert not is_push_only(bytes.fromhex(hex_script))
    assert to_asm(bytes.fromhex(hex_script)).endswith("[error]")


def test_iter_ops_offsets_and_forms() -> None:
    script = bytes.fromhex("005102aabb4c01cc4d0100dd4e01000000eeac")
    ops = parse_ops(script)
    assert [op.opcode for op in ops] == [
        0,
        OP_1,
        2,
        OP_PUSHDATA1,
        OP_PUSHDATA2,
        OP_PUSHDATA4,
        OP_CHECKSIG,
    ]
    assert [op.data for op in ops] == [b"", None, b"\xaa\xbb", b"\xcc", b"\xdd", b"\xee", None]
    assert ops[0].start == 0 and ops[-1].end == len(script)
    for a, b in itertools.pairwise(ops):
        assert a.end == b.start
    assert b"".join(encode_op(op) for op in ops) == script


def test_to_asm_and_names() -> None:
    assert to_asm(p2pkh(bytes(20))) == (
        "OP_DUP OP_HASH160 " + "00" * 20 + " OP_EQUALVERIFY OP_CHECKSIG"
    )
    assert to_asm(bytes.fromhex("0051604f")) == "OP_0 OP_1 OP_16 OP_1NEGATE"
    assert opcode_name(0xBA) == "OP_CHECKSIGADD"
    assert opcode_name(0xB2) == "OP_CHECKSEQUENCEVERIFY"
    assert opcode_name(0xAB) == "OP_CODESEPARATOR"
    assert opcode_name(0x6A) == "OP_RETURN"
    assert opcode_name(0xBB) == "OP_UNKNOWN"
    assert opcode_name(0xFF) == "OP_INVALIDOPCODE"
    assert opcode_name(0x14) == "OP_PUSHBYTES_20"


# --- templates -----------------------------------------------------------------------------------


def test_templates_known_scripts() -> None:
    h = bytes.fromhex("751e76e8199196d454941c45d1b3a323f1433bd6")  # HASH160 of G
    assert hash160(G) == h
    assert p2pkh(h).hex() == "76a914" + h.hex() + "88ac"
    assert p2sh(h).hex() == "a914" + h.hex() + "87"
    assert p2wpkh(h).hex() == "0014" + h.hex()
    assert p2wsh(bytes(32)).hex() == "0020" + "00" * 32
    assert p2tr(bytes(32)).hex() == "5120" + "00" * 32
    assert p2pk(G).hex() == "21" + G.hex() + "ac"
    assert p2pk(G_UNCOMPRESSED).hex() == "41" + G_UNCOMPRESSED.hex() + "ac"
    assert witness_script_pubkey(16, b"\x00\x01").hex() == "60020001"


@pytest.mark.parametrize(
    ("fn", "arg"),
    [
        (p2pkh, bytes(19)),
        (p2sh, bytes(21)),
        (p2wpkh, bytes(32)),
        (p2wsh, bytes(20)),
        (p2tr, bytes(33)),
        (p2pk, bytes(33)),
        (p2pk, b"\x04" + bytes(32)),
    ],
)
def test_template_length_errors(fn: object, arg: bytes) -> None:
    with pytest.raises(ScriptError):
        fn(arg)  # type: ignore[operator]


def test_witness_script_pubkey_errors() -> None:
    for version, program in ((17, bytes(20)), (-1, bytes(20)), (1, b"\x00"), (1, bytes(41))):
        with pytest.raises(ScriptError):
            witness_script_pubkey(version, program)
    with pytest.raises(ScriptError):
        witness_script_pubkey(0, bytes(21))


# BIP67 test vectors (bitcoin/bips bip-0067.mediawiki, section "Test vectors", commit
# 01e427ad97bd6050a015cdcca3a409eaef58eed5): unsorted list, script, P2SH address; all 2-of-n.
BIP67 = [
    (
        [
            "02ff12471208c14bd580709cb2358d98975247d8765f92bc25eab3b2763ed605f8",
            "02fe6f0a5a297eb38c391581c4413e084773ea23954d93f7753db7dc0adc188b2f",
        ],
        "522102fe6f0a5a297eb38c391581c4413e084773ea23954d93f7753db7dc0adc188b2f2102ff12471208c1"
        "4bd580709cb2358d98975247d8765f92bc25eab3b2763ed605f852ae",
        "39bgKC7RFbpoCRbtD5KEdkYKtNyhpsNa3Z",
    ),
    (
        [
            "02632b12f4ac5b1d1b72b2a3b508c19172de44f6f46bcee50ba33f3f9291e47ed0",
            "027735a29bae7780a9755fae7a1c4374c656ac6a69ea9f3697fda61bb99a4f3e77",
            "02e2cc6bd5f45edd43bebe7cb9b675f0ce9ed3efe613b177588290ad188d11b404",
        ],
        "522102632b12f4ac5b1d1b72b2a3b508c19172de44f6f46bcee50ba33f3f9291e47ed021027735a29bae77"
        "80a9755fae7a1c4374c656ac6a69ea9f3697fda61bb99a4f3e772102e2cc6bd5f45edd43bebe7cb9b675f0"
        "ce9ed3efe613b177588290ad188d11b40453ae",
        "3CKHTjBKxCARLzwABMu9yD85kvtm7WnMfH",
    ),
    (
        [
            "030000000000000000000000000000000000004141414141414141414141414141",
            "020000000000000000000000000000000000004141414141414141414141414141",
            "020000000000000000000000000000000000004141414141414141414141414140",
            "030000000000000000000000000000000000004141414141414141414141414140",
        ],
        "522102000000000000000000000000000000000000414141414141414141414141414021020000000000000"
        "000000000000000000000004141414141414141414141414141210300000000000000000000000000000000"
        "000041414141414141414141414141402103000000000000000000000000000000000000414141414141414"
        "141414141414154ae",
        "32V85igBri9zcfBRVupVvwK18NFtS37FuD",
    ),
    (
        [
            "022df8750480ad5b26950b25c7ba79d3e37d75f640f8e5d9bcd5b150a0f85014da",
            "03e3818b65bcc73a7d64064106a859cc1a5a728c4345ff0b641209fba0d90de6e9",
            "021f2f6e1e50cb6a953935c3601284925decd3fd21bc445712576873fb8c6ebc18",
        ],
        "5221021f2f6e1e50cb6a953935c3601284925decd3fd21bc445712576873fb8c6ebc1821022df8750480ad"
        "5b26950b25c7ba79d3e37d75f640f8e5d9bcd5b150a0f85014da2103e3818b65bcc73a7d64064106a859cc"
        "1a5a728c4345ff0b641209fba0d90de6e953ae",
        "3Q4sF6tv9wsdqu2NtARzNCpQgwifm2rAba",
    ),
]


@pytest.mark.parametrize(("keys", "script", "address"), BIP67)
def test_bip67_sorted_multisig(keys: list[str], script: str, address: str) -> None:
    built = multisig(2, [bytes.fromhex(k) for k in keys])
    assert built.hex() == script
    assert address_from_script(p2sh(hash160(built)), Network.MAINNET) == address
    m, parsed = parse_multisig(built)
    assert m == 2
    assert [k.hex() for k in parsed] == sorted(keys)
    info = classify(built)
    assert info.type is ScriptType.MULTISIG
    assert info.required == 2 and [k.hex() for k in info.pubkeys] == sorted(keys)


def test_multisig_unsorted_and_large() -> None:
    keys = [secp256k1.public_key(bytearray(i.to_bytes(32, "big"))) for i in range(1, 21)]
    unsorted = multisig(1, keys[:3][::-1], sort=False)
    assert parse_multisig(unsorted) == (1, keys[:3][::-1])
    big = multisig(15, keys)  # 20 keys: counts above 16 are minimal pushes
    assert big[:2].hex() == "5f21"  # OP_15
    assert big[-3:].hex() == "0114ae"
    m, parsed = parse_multisig(big)
    assert m == 15 and parsed == sorted(keys)
    # Bitcoin Core's Solver only knows bare multisig with OP_1..OP_16 counts.
    assert classify(big).type is ScriptType.NONSTANDARD
    mixed = multisig(1, [keys[0], G_UNCOMPRESSED], sort=False)
    assert parse_multisig(mixed)[1] == [keys[0], G_UNCOMPRESSED]


@pytest.mark.parametrize(
    ("m", "n"),
    [(0, 1), (2, 1), (1, 0), (1, 21)],
)
def test_multisig_bounds(m: int, n: int) -> None:
    with pytest.raises(ScriptError):
        multisig(m, [G] * n)


def test_multisig_key_checks() -> None:
    with pytest.raises(ScriptError):
        multisig(1, [G_UNCOMPRESSED])  # BIP67 sorting requires compressed keys
    with pytest.raises(ScriptError):
        multisig(1, [b"\x05" + G[1:]], sort=False)


@pytest.mark.parametrize(
    "hex_script",
    [
        "51" + "21" + G.hex() + "52ae",  # declares 2 keys, holds 1
        "52" + "21" + G.hex() + "51ae",  # m > n
        "00" + "21" + G.hex() + "51ae",  # m = 0
        "51" + "20" + G.hex()[2:] + "51ae",  # 32-byte key
        "51" + "21" + G.hex() + "51ac",  # CHECKSIG, not CHECKMULTISIG
        "51" + "4c21" + G.hex() + "51ae",  # non-direct key push
        "51" + "0111" + "51ae",  # count push where a key belongs
        "5121" + G.hex()[:10],  # truncated
        "ae",
        "",
    ],
)
def test_parse_multisig_rejects(hex_script: str) -> None:
    with pytest.raises(ScriptError):
        parse_multisig(bytes.fromhex(hex_script))
    assert classify(bytes.fromhex(hex_script)).type is not ScriptType.MULTISIG


# --- classification -------------------------------------------------------------------------------


def test_classify_standard_outputs() -> None:
    h20, h32 = bytes(range(20)), bytes(range(32))
    cases: list[tuple[bytes, ScriptInfo]] = [
        (p2pkh(h20), ScriptInfo(ScriptType.P2PKH, h20)),
        (p2sh(h20), ScriptInfo(ScriptType.P2SH, h20)),
        (p2wpkh(h20), ScriptInfo(ScriptType.P2WPKH, h20, 0)),
        (p2wsh(h32), ScriptInfo(ScriptType.P2WSH, h32, 0)),
        (p2tr(h32), ScriptInfo(ScriptType.P2TR, h32, 1)),
        (p2pk(G), ScriptInfo(ScriptType.P2PK, G, pubkeys=(G,))),
        (
            p2pk(G_UNCOMPRESSED),
            ScriptInfo(ScriptType.P2PK, G_UNCOMPRESSED, pubkeys=(G_UNCOMPRESSED,)),
        ),
        (op_return(b"hi"), ScriptInfo(ScriptType.OP_RETURN, bytes.fromhex("026869"))),
        (bytes([OP_RETURN]), ScriptInfo(ScriptType.OP_RETURN, b"")),
        (bytes.fromhex("6a51604f50"), ScriptInfo(ScriptType.OP_RETURN, bytes.fromhex("51604f50"))),
        (bytes.fromhex("51024e73"), ScriptInfo(ScriptType.WITNESS_UNKNOWN, b"\x4e\x73", 1)),
        (witness_script_pubkey(2, bytes(40)), ScriptInfo(ScriptType.WITNESS_UNKNOWN, bytes(40), 2)),
        (witness_script_pubkey(1, h20), ScriptInfo(ScriptType.WITNESS_UNKNOWN, h20, 1)),
    ]
    for script, expected in cases:
        assert classify(script) == expected, script.hex()
        assert script_type(script) is expected.type


@pytest.mark.parametrize(
    "hex_script",
    [
        "",
        "0015" + "00" * 21,  # v0 program of 21 bytes
        "0001" + "00",  # v0 program of 1 byte: not a witness program (size < 4)
        "6a" + "ac",  # OP_RETURN followed by a non-push
        "6a" + "05aa",  # OP_RETURN with a truncated push
        "21" + "05" + "00" * 32 + "ac",  # P2PK with an invalid header byte
        "41" + "02" + "00" * 64 + "ac",  # 65-byte key with a compressed header
        "76a914" + "00" * 20 + "88ad",  # P2PKH-like with CHECKSIGVERIFY
        "a914" + "00" * 20 + "88",  # P2SH-like with EQUALVERIFY
        "5128" + "00" * 41,  # witness program of 41 bytes
        "61" + "02" + "0000",  # OP_NOP is not a version opcode
    ],
)
def test_classify_nonstandard(hex_script: str) -> None:
    assert classify(bytes.fromhex(hex_script)).type is ScriptType.NONSTANDARD


def test_witness_program_detection() -> None:
    assert witness_program(p2wpkh(bytes(20))) == (0, bytes(20))
    assert witness_program(p2tr(bytes(32))) == (1, bytes(32))
    assert witness_program(bytes.fromhex("60020001")) == (16, b"\x00\x01")
    assert witness_program(bytes.fromhex("0001ff")) is None  # too short
    assert witness_program(bytes.fromhex("5129") + bytes(41)) is None  # too long
    assert witness_program(bytes.fromhex("4f020000")) is None  # OP_1NEGATE
    assert witness_program(bytes.fromhex("0003aabb")) is None  # length byte mismatch
    assert witness_program(bytes.fromhex("00024c01")) == (0, b"\x4c\x01")
    assert ScriptType.P2TR.is_segwit and not ScriptType.P2SH.is_segwit


def test_p2wsh_of_multisig_roundtrip() -> None:
    ws = multisig(2, [G, secp256k1.public_key(bytearray((2).to_bytes(32, "big")))])
    spk = p2wsh(sha256(ws))
    assert classify(spk).data == sha256(ws)
    assert classify(ws).type is ScriptType.MULTISIG
    assert ws[-1] == OP_CHECKMULTISIG
    assert OP_PUSHDATA1 < OP_PUSHDATA2 < OP_PUSHDATA4


# --- fuzz ----------------------------------------------------------------------------------------


def _structured_scripts() -> st.SearchStrategy[bytes]:
    """Scripts built from plausible pieces (opcodes, pushes, truncations) plus raw bytes."""
    piece = st.one_of(
        st.integers(min_value=0, max_value=255).map(lambda b: bytes([b])),
        st.binary(max_size=80).map(push_data),
        st.sampled_from([b"\x4c", b"\x4d\xff", b"\x4e\xff\xff\xff\xff", b"\x21", b"\xae"]),
        st.just(G).map(push_bytes),
    )
    return st.one_of(st.binary(max_size=120), st.lists(piece, max_size=12).map(b"".join))


@settings(max_examples=400, deadline=None)
@given(script=_structured_scripts())
def test_fuzz_script_parsers_raise_only_anyhsm_errors(script: bytes) -> None:
    try:
        ops = parse_ops(script)
    except ScriptError:
        ops = None
    if ops is not None:
        assert b"".join(encode_op(op) for op in ops) == script
        for op in ops:
            is_minimal_push(op)
    info = classify(script)  # never raises
    assert isinstance(info.type, ScriptType)
    assert isinstance(to_asm(script), str)
    is_push_only(script)
    witness_program(script)
    try:
        m, keys = parse_multisig(script)
    except ScriptError:
        pass
    else:
        assert 1 <= m <= len(keys) <= 20
    for network in Network:
        try:
            address_from_script(script, network)
        except HsmError as e:  # pragma: no cover - should not happen at all
            pytest.fail(f"address_from_script raised {e!r}")
