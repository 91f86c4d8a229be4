"""The stored-subtree tree math against the RFC 9162 recursive definitions, written literally."""

from __future__ import annotations

import hashlib

import pytest

from medimg_audit import merkle


def mth(leaves: list[bytes]) -> bytes:
    """MTH(D[n]) of RFC 9162 2.1.1, on raw leaf data."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return merkle.leaf_hash(leaves[0])
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return merkle.node_hash(mth(leaves[:k]), mth(leaves[k:]))


def path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 2.1.3.1."""
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) of RFC 9162 2.1.4.1."""
    if m == len(leaves):
        return [] if complete else [mth(leaves)]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if m <= k:
        return [*subproof(m, leaves[:k], complete), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def stored_tree(leaves: list[bytes]) -> dict[merkle.Node, bytes]:
    """The perfect nodes the log would have stored, appended in uneven batches."""
    nodes: dict[merkle.Node, bytes] = {}
    size = 0
    for batch in (leaves[i : i + 3] for i in range(0, len(leaves), 3)):
        frontier = {n: nodes[n] for n in merkle.range_nodes(0, size)}
        nodes |= merkle.parents_of_new_leaves(size, [merkle.leaf_hash(x) for x in batch], frontier)
        size += len(batch)
    return nodes


LEAVES = [f"event {i}".encode() for i in range(70)]
NODES = stored_tree(LEAVES)


@pytest.mark.parametrize("size", range(1, 71))
def test_root_inclusion_and_consistency_match_the_rfc(size: int) -> None:
    leaves = LEAVES[:size]
    assert merkle.fold([(0, size)], NODES) == [mth(leaves)]
    for index in range(size):
        ranges = merkle.inclusion_ranges(index, size)
        assert merkle.fold(ranges, NODES) == path(index, leaves)
    for first in range(1, size + 1):
        ranges = merkle.consistency_ranges(first, size)
        assert merkle.fold(ranges, NODES) == subproof(first, leaves, True)


def test_proofs_need_few_nodes() -> None:
    size = 1_000_000
    assert len(merkle.needed(merkle.inclusion_ranges(123_456, size))) <= 2 * 20
    assert len(merkle.needed(merkle.consistency_ranges(777_777, size))) <= 2 * 20


@pytest.mark.parametrize(("index", "size"), [(-1, 3), (3, 3), (0, 0)])
def test_inclusion_outside_the_tree_is_refused(index: int, size: int) -> None:
    with pytest.raises(ValueError, match="not in a tree"):
        merkle.inclusion_ranges(index, size)


@pytest.mark.parametrize(("first", "second"), [(0, 3), (4, 3)])
def test_consistency_between_bad_sizes_is_refused(first: int, second: int) -> None:
    with pytest.raises(ValueError, match="no consistency proof"):
        merkle.consistency_ranges(first, second)


def test_every_node_is_held_by_the_one_leaf_that_completes_it() -> None:
    held = [node for leaf in range(64) for node in merkle.completed_by(leaf)]
    # A 64-leaf tree has 32 + 16 + 8 + 4 + 2 + 1 nodes above its leaves, each held once.
    assert len(held) == len(set(held)) == 63
    for leaf in range(64):
        assert all(merkle.last_leaf(node) == leaf for node in merkle.completed_by(leaf))
