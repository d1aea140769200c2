"""BIP341 taproot helpers against the official wallet vectors, plus tree properties."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.vectors import load_json

from anyhsm.bitcoin.address import address_from_script
from anyhsm.bitcoin.encoding import tagged_hash
from anyhsm.bitcoin.script import p2tr
from anyhsm.bitcoin.taproot import (
    TapLeaf,
    TapTree,
    branch_hash,
    control_block,
    leaf_hash,
    leaves,
    merkle_path,
    merkle_root,
    parse_control_block,
    taproot_output_key,
    taproot_tweak,
    tree_from_json,
    verify_control_block,
)
from anyhsm.crypto import secp256k1
from anyhsm.errors import ScriptError
from anyhsm.types import Network

BIP341: Any = load_json("bip341_wallet")
SPK_CASES: list[Any] = BIP341["scriptPubKey"]


def _h(x: str) -> bytes:
    return bytes.fromhex(x)


def test_vector_count() -> None:
    assert len(SPK_CASES) == 7


@pytest.mark.parametrize("case", SPK_CASES, ids=[str(i) for i in range(len(SPK_CASES))])
def test_bip341_script_pubkey_vectors(case: dict[str, Any]) -> None:
    given_, inter, expected = case["given"], case["intermediary"], case["expected"]
    internal = _h(given_["internalPubkey"])
    tree = None if given_["scriptTree"] is None else tree_from_json(given_["scriptTree"])

    root = merkle_root(tree)
    assert (root.hex() if root else None) == inter["merkleRoot"]
    tweak = taproot_tweak(internal, root)
    assert tweak.hex() == inter["tweak"]
    output, parity = taproot_output_key(internal, root)
    assert output.hex() == inter["tweakedPubkey"]
    spk = p2tr(output)
    assert spk.hex() == expected["scriptPubKey"]
    assert address_from_script(spk, Network.MAINNET) == expected["bip350Address"]

    if tree is None:
        assert "leafHashes" not in inter
        return
    # Leaves in depth-first order are the vectors' order (by id).
    ordered = leaves(tree)
    assert [leaf.hash.hex() for leaf in ordered] == inter["leafHashes"]
    blocks = [control_block(internal, tree, leaf) for leaf in ordered]
    assert [b.hex() for b in blocks] == expected["scriptPathControlBlocks"]
    for leaf, block in zip(ordered, blocks, strict=True):
        assert block[0] & 1 == parity
        assert block[0] & 0xFE == leaf.leaf_version
        assert verify_control_block(output, leaf.script, block)
        parsed = parse_control_block(block)
        assert parsed.internal_key == internal
        assert list(parsed.path) == merkle_path(tree, leaf)
        assert not verify_control_block(output, leaf.script + b"\x51", block)


def test_tagged_hash_definitions() -> None:
    script = bytes.fromhex("51")
    assert leaf_hash(script) == tagged_hash("TapLeaf", b"\xc0\x01\x51")
    a, b = bytes(range(32)), bytes(range(1, 33))
    assert branch_hash(a, b) == branch_hash(b, a) == tagged_hash("TapBranch", a + b)
    key = bytes.fromhex("d6889cb081036e0faefa3a35157ad71086b123b2b144b649798b494c300a961d")
    assert taproot_tweak(key, None) == tagged_hash("TapTweak", key)
    assert taproot_tweak(key, a) == tagged_hash("TapTweak", key + a)


def test_tree_shape_validation() -> None:
    leaf = TapLeaf(b"\x51")
    with pytest.raises(ScriptError):
        merkle_root([leaf])  # one child
    with pytest.raises(ScriptError):
        merkle_root([leaf, leaf, leaf])
    with pytest.raises(ScriptError):
        merkle_root([leaf, "x"])  # type: ignore[list-item]
    with pytest.raises(ScriptError):
        TapLeaf(b"", 0xC1)  # odd leaf version
    with pytest.raises(ScriptError):
        leaf_hash(b"", 0x100)
    with pytest.raises(ScriptError):
        tree_from_json({"script": "zz", "leafVersion": 192})
    with pytest.raises(ScriptError):
        tree_from_json([{"script": "51", "leafVersion": 192}])
    with pytest.raises(ScriptError):
        tree_from_json(42)
    with pytest.raises(ScriptError):
        merkle_path([leaf, TapLeaf(b"\x52")], TapLeaf(b"\x53"))
    assert merkle_root(None) is None
    assert leaves(None) == []


def test_tree_depth_limit() -> None:
    tree: TapTree = TapLeaf(b"\x51")
    for n in range(128):
        tree = [tree, TapLeaf(bytes([n]))]
    assert len(merkle_path(tree, TapLeaf(b"\x51"))) == 128
    deeper: TapTree = [tree, TapLeaf(b"\x52")]
    with pytest.raises(ScriptError):
        merkle_root(deeper)


def test_key_and_length_errors() -> None:
    with pytest.raises(ScriptError):
        taproot_tweak(bytes(31), None)
    with pytest.raises(ScriptError):
        taproot_tweak(bytes(32), bytes(31))
    with pytest.raises(ScriptError):
        taproot_output_key(b"\xff" * 32, None)  # not an x coordinate on the curve
    for bad in (bytes(32), bytes(33 + 31), bytes(33 + 32 * 129)):
        with pytest.raises(ScriptError):
            parse_control_block(bad)


leaf_strategy = st.builds(
    TapLeaf,
    st.binary(min_size=0, max_size=40),
    st.sampled_from([0xC0, 0xC2, 0xFA]),
)
tree_strategy: st.SearchStrategy[TapTree] = st.recursive(
    leaf_strategy, lambda children: st.tuples(children, children), max_leaves=12
)


@settings(max_examples=60, deadline=None)
@given(tree=tree_strategy, seed=st.integers(min_value=1, max_value=2**64))
def test_every_leaf_of_random_trees_has_a_valid_control_block(tree: TapTree, seed: int) -> None:
    secret = bytearray(seed.to_bytes(32, "big"))
    internal = secp256k1.xonly(secp256k1.public_key(secret))
    root = merkle_root(tree)
    assert root is not None
    output, _ = taproot_output_key(internal, root)
    for leaf in leaves(tree):
        block = control_block(internal, tree, leaf)
        assert verify_control_block(output, leaf.script, block)
        # Recomputing the root from the path gives the tree's root.
        node = leaf.hash
        for sibling in parse_control_block(block).path:
            node = branch_hash(node, sibling)
        assert node == root


def test_depth_first_root_equals_the_nested_tree_root() -> None:
    """One Merkle root: a tree given as nested pairs and as PSBT_OUT_TAP_TREE's depth-first
    leaves hashes the same (taproot.merkle_root vs taproot.depth_first_merkle_root)."""
    from anyhsm.bitcoin.psbt_fields import TapTreeLeaf
    from anyhsm.bitcoin.taproot import depth_first_merkle_root

    a, b, c = TapLeaf(b"\x51"), TapLeaf(b"\x52"), TapLeaf(b"\x53", 0xC2)
    nested: TapTree = [a, [b, c]]
    flat = [TapTreeLeaf(1, a.leaf_version, a.script), TapTreeLeaf(2, b.leaf_version, b.script),
            TapTreeLeaf(2, c.leaf_version, c.script)]  # fmt: skip
    assert depth_first_merkle_root(flat) == merkle_root(nested)
    with pytest.raises(ScriptError):
        depth_first_merkle_root(flat[:2])  # incomplete
