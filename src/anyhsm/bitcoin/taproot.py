"""BIP341 taproot helpers: leaf and branch hashes, script trees, tweaks, control blocks.

A script tree is either a :class:`TapLeaf` or a sequence of exactly two
sub-trees, the nested-list shape of the BIP341 wallet test vectors
(:func:`tree_from_json` converts that JSON directly). All curve work is done by
libsecp256k1 through :mod:`anyhsm.crypto.secp256k1`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from anyhsm.bitcoin.encoding import tagged_hash, var_bytes
from anyhsm.crypto import secp256k1
from anyhsm.errors import ScriptError

TAPROOT_LEAF_TAPSCRIPT = 0xC0
TAPROOT_LEAF_MASK = 0xFE
TAPROOT_CONTROL_BASE_SIZE = 33
TAPROOT_CONTROL_NODE_SIZE = 32
TAPROOT_CONTROL_MAX_NODE_COUNT = 128


@dataclass(frozen=True)
class TapLeaf:
    """One script leaf; ``leaf_version`` is even, 0xc0 for tapscript (BIP342)."""

    script: bytes
    leaf_version: int = TAPROOT_LEAF_TAPSCRIPT

    def __post_init__(self) -> None:
        if not 0 <= self.leaf_version <= 0xFE or self.leaf_version & 1:
            raise ScriptError(f"taproot leaf version {self.leaf_version:#x} is not an even byte")

    @property
    def hash(self) -> bytes:
        return leaf_hash(self.script, self.leaf_version)


TapTree: TypeAlias = "TapLeaf | Sequence[TapTree]"
"""A leaf, or a pair ``[left, right]`` of sub-trees (lists or tuples)."""


def leaf_hash(script: bytes, leaf_version: int = TAPROOT_LEAF_TAPSCRIPT) -> bytes:
    """TapLeaf tagged hash of ``leaf_version || compact_size(len) || script``."""
    if not 0 <= leaf_version <= 0xFE or leaf_version & 1:
        raise ScriptError(f"taproot leaf version {leaf_version:#x} is not an even byte")
    return tagged_hash("TapLeaf", bytes([leaf_version]) + var_bytes(script))


def branch_hash(a: bytes, b: bytes) -> bytes:
    """TapBranch tagged hash of the two child hashes in lexicographic order."""
    if len(a) != 32 or len(b) != 32:
        raise ScriptError("taproot branch children must be 32-byte hashes")
    return tagged_hash("TapBranch", a + b if a < b else b + a)


def _children(tree: Sequence[TapTree]) -> tuple[TapTree, TapTree]:
    if not isinstance(tree, list | tuple) or len(tree) != 2:
        raise ScriptError("a taproot tree branch must be a list or tuple of exactly 2 sub-trees")
    for child in tree:
        if not isinstance(child, TapLeaf | list | tuple):
            raise ScriptError("a taproot sub-tree must be a TapLeaf or a pair of sub-trees")
    return tree[0], tree[1]


def _check_depth(depth: int) -> None:
    if depth > TAPROOT_CONTROL_MAX_NODE_COUNT:
        raise ScriptError(f"taproot tree deeper than {TAPROOT_CONTROL_MAX_NODE_COUNT} levels")


def _node_hash(tree: TapTree, depth: int) -> bytes:
    _check_depth(depth)
    if isinstance(tree, TapLeaf):
        return tree.hash
    left, right = _children(tree)
    return branch_hash(_node_hash(left, depth + 1), _node_hash(right, depth + 1))


def merkle_root(tree: TapTree | None) -> bytes | None:
    """The Merkle root of ``tree``; None for no tree (key-path-only output)."""
    if tree is None:
        return None
    return _node_hash(tree, 0)


class DepthFirstLeaf(Protocol):
    """A leaf with its depth, as PSBT_OUT_TAP_TREE and descriptors list a tree."""

    @property
    def depth(self) -> int: ...

    @property
    def leaf_version(self) -> int: ...

    @property
    def script(self) -> bytes: ...


def depth_first_merkle_root(leaves: Sequence[DepthFirstLeaf]) -> bytes:
    """The Merkle root of a tree given as its leaves in depth-first order with their
    depths (PSBT_OUT_TAP_TREE); ScriptError when they do not form a complete tree."""
    stack: list[tuple[int, bytes]] = []
    for leaf in leaves:
        _check_depth(leaf.depth)
        node = (leaf.depth, leaf_hash(leaf.script, leaf.leaf_version))
        while stack and stack[-1][0] == node[0] and node[0] > 0:
            depth, left = stack.pop()
            node = (depth - 1, branch_hash(left, node[1]))
        stack.append(node)
    if len(stack) != 1 or stack[0][0] != 0:
        raise ScriptError("taproot tree is incomplete")
    return stack[0][1]


def leaves(tree: TapTree | None) -> list[TapLeaf]:
    """All leaves, left to right (depth-first), the order of BIP341's vectors."""
    out: list[TapLeaf] = []

    def walk(node: TapTree, depth: int) -> None:
        _check_depth(depth)
        if isinstance(node, TapLeaf):
            out.append(node)
            return
        left, right = _children(node)
        walk(left, depth + 1)
        walk(right, depth + 1)

    if tree is not None:
        walk(tree, 0)
    return out


def merkle_path(tree: TapTree, leaf: TapLeaf) -> list[bytes]:
    """Sibling hashes from ``leaf`` up to the root (the control block's path).

    When a leaf occurs more than once, the left-most occurrence is used.
    """

    def find(node: TapTree, depth: int) -> list[bytes] | None:
        _check_depth(depth)
        if isinstance(node, TapLeaf):
            return [] if node == leaf else None
        left, right = _children(node)
        path = find(left, depth + 1)
        if path is not None:
            return [*path, _node_hash(right, depth + 1)]
        path = find(right, depth + 1)
        if path is not None:
            return [*path, _node_hash(left, depth + 1)]
        return None

    found = find(tree, 0)
    if found is None:
        raise ScriptError("the leaf is not part of this taproot script tree")
    return found


def tree_from_json(obj: object) -> TapTree:
    """Convert the BIP341 wallet-vector shape: ``{"script": hex, "leafVersion": int}``
    leaves (other keys such as ``id`` ignored) and two-element lists for branches."""
    if isinstance(obj, Mapping):
        script = obj.get("script")
        version = obj.get("leafVersion", TAPROOT_LEAF_TAPSCRIPT)
        if not isinstance(script, str) or not isinstance(version, int):
            raise ScriptError("a taproot leaf needs a hex 'script' and an int 'leafVersion'")
        try:
            raw = bytes.fromhex(script)
        except ValueError:
            raise ScriptError("taproot leaf script is not valid hex") from None
        return TapLeaf(raw, version)
    if isinstance(obj, list | tuple):
        if len(obj) != 2:
            raise ScriptError("a taproot tree branch must be a list of exactly 2 children")
        return (tree_from_json(obj[0]), tree_from_json(obj[1]))
    raise ScriptError("a taproot tree must be a leaf object or a list of two sub-trees")


def _xonly(key: bytes) -> bytes:
    if len(key) != 32:
        raise ScriptError(f"x-only public keys are 32 bytes, got {len(key)}")
    return bytes(key)


def taproot_tweak(internal_xonly: bytes, merkle_root: bytes | None) -> bytes:
    """The 32-byte tweak t = TapTweak(P || root), or TapTweak(P) without a tree (BIP86)."""
    p = _xonly(internal_xonly)
    if merkle_root is not None and len(merkle_root) != 32:
        raise ScriptError("a taproot Merkle root is 32 bytes")
    t = tagged_hash("TapTweak", p if merkle_root is None else p + merkle_root)
    if int.from_bytes(t, "big") >= secp256k1.CURVE_ORDER:
        raise ScriptError("taproot tweak is not below the curve order; use another key")
    return t


def taproot_output_key(internal_xonly: bytes, merkle_root: bytes | None) -> tuple[bytes, int]:
    """(x-only output key Q, parity of Q's y) for internal key P and the script tree root."""
    t = taproot_tweak(internal_xonly, merkle_root)
    try:
        return secp256k1.xonly_tweak_add(_xonly(internal_xonly), t)
    except secp256k1.CurveError as e:
        raise ScriptError(f"cannot tweak taproot internal key: {e}") from None


def control_block(internal_xonly: bytes, tree: TapTree, leaf: TapLeaf) -> bytes:
    """BIP341 control block to spend ``leaf``: (version | parity) || P || Merkle path."""
    root = merkle_root(tree)
    _, parity = taproot_output_key(internal_xonly, root)
    path = merkle_path(tree, leaf)
    return bytes([leaf.leaf_version | parity]) + _xonly(internal_xonly) + b"".join(path)


@dataclass(frozen=True)
class ControlBlock:
    """A parsed control block."""

    leaf_version: int
    output_parity: int
    internal_key: bytes
    path: tuple[bytes, ...]


def parse_control_block(data: bytes) -> ControlBlock:
    """Split a control block into its fields (length rules of BIP341)."""
    n = len(data)
    extra = n - TAPROOT_CONTROL_BASE_SIZE
    if (
        n < TAPROOT_CONTROL_BASE_SIZE
        or extra % TAPROOT_CONTROL_NODE_SIZE
        or extra // TAPROOT_CONTROL_NODE_SIZE > TAPROOT_CONTROL_MAX_NODE_COUNT
    ):
        raise ScriptError(f"taproot control block has an invalid length of {n} bytes")
    path = tuple(data[i : i + 32] for i in range(33, n, 32))
    return ControlBlock(data[0] & TAPROOT_LEAF_MASK, data[0] & 1, bytes(data[1:33]), path)


def verify_control_block(output_xonly: bytes, script: bytes, data: bytes) -> bool:
    """True if ``data`` proves that ``script`` is committed to by output key ``output_xonly``."""
    cb = parse_control_block(data)
    node = leaf_hash(script, cb.leaf_version)
    for sibling in cb.path:
        node = branch_hash(node, sibling)
    try:
        q, parity = taproot_output_key(cb.internal_key, node)
    except ScriptError:
        return False
    return q == _xonly(output_xonly) and parity == cb.output_parity
