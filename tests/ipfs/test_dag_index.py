"""Navigation in a UnixFS file's DAG (`peerstar.ipfs.unixfs.NodeIndex`): which child of a
node holds which bytes, on nodes built in kubo's layout and on a node with inline data
(as other writers make them). Pure: blocks in, offsets out."""

from __future__ import annotations

import pytest

from peerstar.ipfs.cid import DAG_PB, RAW, block_cid, cid_text, is_raw_cid
from peerstar.ipfs.errors import CIDError
from peerstar.ipfs.unixfs import (
    RAW_INDEX,
    DagBuilder,
    Link,
    NodeIndex,
    chunk_bytes,
    encode_pbnode,
    encode_unixfs_data,
)

CHUNK = 1000


def _dag(size: int, max_links: int = 4) -> tuple[str, dict[str, bytes]]:
    """(root CID, blocks by CID) of `size` bytes in 1000-byte chunks, 4 links a node."""
    b = DagBuilder(max_links)
    for chunk in chunk_bytes(bytes(i % 251 for i in range(size)), CHUNK):
        b.add_chunk(chunk)
    root = b.finish()
    return str(root), {str(blk.cid): blk.data for blk in b.blocks}


def test_index_of_a_balanced_node() -> None:
    root, blocks = _dag(3 * CHUNK + 100)  # 4 leaves under the root
    index = NodeIndex.of_node(blocks[root])
    assert len(index) == 4
    assert list(index.bounds) == [0, 1000, 2000, 3000, 3100]
    for i in range(4):
        child = index.child(i)
        assert is_raw_cid(child) and cid_text(child) in blocks
        assert len(blocks[cid_text(child)]) == index.bounds[i + 1] - index.bounds[i]
    # a range inside one child, at its edges, across two, past the end
    assert index.child_holding(0, 1000) == 0
    assert index.child_holding(1000, 1) == 1
    assert index.child_holding(2999, 1) == 2
    assert index.child_holding(3000, 100) == 3
    assert index.child_holding(999, 2) is None
    assert index.child_holding(3000, 101) is None
    assert index.child_holding(3100, 1) is None
    assert index.children_over(0, 1) == range(0, 1)
    assert index.children_over(999, 1001) == range(0, 2)
    assert index.children_over(-5, 10_000) == range(0, 4)
    assert index.children_over(2500, 3050) == range(2, 4)
    assert index.children_over(3100, 3200) == range(4, 4)  # nothing past the end


def test_index_of_an_interior_level() -> None:
    root, blocks = _dag(9 * CHUNK)  # 9 leaves: three nodes of 4, 4, 1 under the root
    index = NodeIndex.of_node(blocks[root])
    assert list(index.bounds) == [0, 4000, 8000, 9000]
    assert not any(is_raw_cid(index.child(i)) for i in range(3))
    below = NodeIndex.of_node(blocks[cid_text(index.child(1))])
    assert list(below.bounds) == [0, 1000, 2000, 3000, 4000]
    assert index.child_holding(4500, 3000) == 1
    assert below.child_holding(4500 - 4000, 500) == 0


def test_a_node_with_inline_data_is_read_whole_from_its_data() -> None:
    leaf = b"x" * 50
    leaf_cid = block_cid(RAW, leaf)
    raw = encode_pbnode([Link(leaf_cid, len(leaf))],
                        encode_unixfs_data(60, [50], data=b"0123456789"))
    index = NodeIndex.of_node(raw)
    assert list(index.bounds) == [10, 60] and len(index) == 1
    assert index.child_holding(0, 5) is None  # in the inline data
    assert index.child_holding(10, 50) == 0
    assert index.children_over(5, 20) is None  # the node must be read as a whole
    assert index.children_over(10, 20) == range(0, 1)


def test_a_raw_block_has_no_children_and_other_blocks_are_refused() -> None:
    assert len(RAW_INDEX) == 0 and RAW_INDEX.children_over(0, 1) is None
    assert RAW_INDEX.child_holding(0, 1) is None
    directory = encode_pbnode([], encode_unixfs_data(0, [], type_=1))
    assert block_cid(DAG_PB, directory)  # a well-formed block, of the wrong kind
    with pytest.raises(CIDError, match="directory"):
        NodeIndex.of_node(directory)
    with pytest.raises(CIDError):
        NodeIndex.of_node(b"\xff\xff\xff")
