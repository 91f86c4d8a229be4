"""RFC 9162 Merkle tree math over stored perfect subtrees: roots and proofs in O(log n).

The log stores the hash of every *perfect* subtree: node (level, index) covers the leaves
[index * 2**level, (index + 1) * 2**level). Every range the RFC's recursive definitions
ask for (MTH(D[a:b]) in sections 2.1.1, 2.1.3.1 and 2.1.4.1) starts at a multiple of
its largest power-of-two part, so it is the right fold of at most log2(n) perfect nodes.
A proof is therefore planned as a list of ranges, the few nodes they need are read in
one query, and the hashes are folded here. Nothing in this module does I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

Node = tuple[int, int]  # (level, index)
Range = tuple[int, int]  # [start, end) of leaf indexes


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def range_nodes(start: int, end: int) -> list[Node]:
    """The perfect subtrees that make up [start, end), left to right (largest first)."""
    nodes = []
    while start < end:
        level = (end - start).bit_length() - 1
        size = 1 << level
        assert start % size == 0, f"range [{start}, {end}) is not one the RFC recursion forms"
        nodes.append((level, start >> level))
        start += size
    return nodes


def fold(ranges: Sequence[Range], nodes: Mapping[Node, bytes]) -> list[bytes]:
    """MTH of each range, from the perfect-subtree hashes in `nodes`."""
    hashes = []
    for start, end in ranges:
        parts = [nodes[node] for node in range_nodes(start, end)]
        value = parts[-1]
        for part in reversed(parts[:-1]):
            value = node_hash(part, value)
        hashes.append(value)
    return hashes


def last_leaf(node: Node) -> int:
    """The leaf whose append completes the perfect subtree `node`."""
    level, index = node
    return ((index + 1) << level) - 1


def completed_by(leaf: int) -> list[Node]:
    """The perfect subtrees of two or more leaves that `leaf` completes, smallest first."""
    levels = ((leaf + 1) & -(leaf + 1)).bit_length() - 1  # trailing one bits of leaf
    return [(level, leaf >> level) for level in range(1, levels + 1)]


def needed(ranges: Sequence[Range]) -> set[Node]:
    return {node for start, end in ranges for node in range_nodes(start, end)}


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """The ranges whose MTH form PATH(index, D[0:size]), leaf's sibling first (RFC 9162 2.1.3.1)."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    path: list[Range] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            path.append((start + k, end))
            end = start + k
        else:
            path.append((start, start + k))
            start += k
    return path[::-1]


def consistency_ranges(first: int, second: int) -> list[Range]:
    """The ranges whose MTH form PROOF(first, D[0:second]) (RFC 9162 2.1.4.1)."""
    if not 0 < first <= second:
        raise ValueError(f"no consistency proof from size {first} to size {second}")
    proof: list[Range] = []
    start, end, m, complete = 0, second, first, True
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            proof.append((start + k, end))
            end = start + k
        else:
            proof.append((start, start + k))
            start += k
            m -= k
            complete = False
    if not complete:
        proof.append((start, end))
    return proof[::-1]


def parents_of_new_leaves(
    size: int, leaves: Sequence[bytes], frontier: Mapping[Node, bytes]
) -> dict[Node, bytes]:
    """Every perfect node that appending `leaves` to a tree of `size` completes, leaves included.

    `frontier` holds the perfect nodes of [0, size) (range_nodes(0, size)): the only
    existing nodes a new leaf can need as a left sibling.
    """
    known = dict(frontier)
    new: dict[Node, bytes] = {}
    for offset, leaf in enumerate(leaves):
        index, level, value = size + offset, 0, leaf
        known[(0, index)] = new[(0, index)] = value
        while index % 2 == 1:
            value = node_hash(known[(level, index - 1)], value)
            level, index = level + 1, index // 2
            known[(level, index)] = new[(level, index)] = value
    return new
