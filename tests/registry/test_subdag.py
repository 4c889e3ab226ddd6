"""The registry reads a range from the deepest UnixFS node that holds all of it
(`peerstar.registry.subdag`): the locator over DAGs built in memory (byte-exact reads of
the node it names, the deepest such node, never waiting, fetching each node once,
failures and the cache bound), then a 45 MiB blob (root -> an interior node of 174
leaves + a small one -> leaves) served through the registry from both real backends,
byte-exact, with the metrics showing interior and leaf reads; then the leaves covering a
range (exact, loaded a level at a time), the skeleton later lookups use, and shared
loads."""

from __future__ import annotations

import asyncio
import functools
import random
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerstar.ipfs.cid import parse_cid
from peerstar.ipfs.unixfs import DagBuilder, chunk_bytes, decode_file_node, read_range
from peerstar.registry.subdag import INTERIOR, LEAF, LOAD_SPAN, ROOT, SubDagLocator
from tests.registry.conftest import open_backend
from tests.registry.harness import ThreadedRegistry
from tests.registry.helpers import parse_multipart, upstream_reads
from tests.support.ipfsimage import store_blob_image


@functools.cache
def _build(data: bytes, chunk: int, links: int) -> tuple[str, dict[str, bytes]]:
    builder = DagBuilder(max_links=links)
    for piece in chunk_bytes(data, chunk):
        builder.add_chunk(piece)
    root = str(builder.finish())
    return root, {str(b.cid): b.data for b in builder.blocks}


class _Dag:
    """A UnixFS file laid out with a small chunk size and fan-out, and a block source
    that counts what it is asked for."""

    def __init__(self, data: bytes, chunk: int, links: int) -> None:
        self.data = data
        self.root, self.blocks = _build(data, chunk, links)
        self.asked: list[str] = []
        self.fail = False

    async def get_block(self, cid: str) -> bytes:
        self.asked.append(cid)
        await asyncio.sleep(0)
        if self.fail:
            raise OSError("daemon unreachable")
        return self.blocks[cid]

    async def read(self, cid: str, offset: int, length: int) -> bytes:
        async def get(c):
            return self.blocks[str(c)]
        return b"".join([p async for p in read_range(get, parse_cid(cid), offset, length)])


_DATA = random.Random(7).randbytes(5000)


async def _settled(loc: SubDagLocator, cid: str, offset: int, length: int
                   ) -> tuple[str, int, str]:
    """locate() once every node it leads to has been fetched."""
    while True:
        found = loc.locate(cid, offset, length)
        if not loc._loading:
            return found
        await loc.settle()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_DATA) - 1), st.integers(1, 400))
def test_located_node_gives_the_same_bytes_and_is_the_deepest(offset: int, length: int
                                                              ) -> None:
    length = min(length, len(_DATA) - offset)
    dag = _Dag(_DATA, 16, 4)  # 313 leaves, five levels
    loc = SubDagLocator(dag.get_block, load_span=0)

    async def go() -> None:
        cid, rel, kind = await _settled(loc, dag.root, offset, length)
        assert await dag.read(cid, rel, length) == _DATA[offset:offset + length]
        assert kind == (ROOT if cid == dag.root else
                        LEAF if parse_cid(cid).codec.name == "raw" else INTERIOR)
        if kind != LEAF:  # no child of the node holds the whole range
            node = decode_file_node(dag.blocks[cid])
            for start, size in zip(node.child_starts(), node.blocksizes, strict=True):
                assert not (start <= rel and rel + length <= start + size)
        if length == 1:
            assert kind == LEAF

    asyncio.run(go())


def test_first_lookup_does_not_wait_and_each_node_is_fetched_once() -> None:
    dag = _Dag(_DATA, 16, 4)
    loc = SubDagLocator(dag.get_block, load_span=0)

    async def go() -> None:
        # nothing known: read from the blob's own CID, fetch its root in the background
        assert loc.locate(dag.root, 100, 10) == (dag.root, 100, ROOT)
        assert dag.asked == []
        await loc.settle()
        assert dag.asked == [dag.root]
        cid, rel, kind = loc.locate(dag.root, 100, 10)
        assert kind == INTERIOR and cid != dag.root
        cid, rel, kind = await _settled(loc, dag.root, 100, 10)
        assert kind == LEAF and rel == 100 % 16
        # 313 leaves at fan-out 4: the root and four levels of interior nodes above a leaf
        assert len(dag.asked) == len(set(dag.asked)) == 5
        for _ in range(5):  # known now: no more fetches
            assert loc.locate(dag.root, 100, 10) == (cid, rel, kind)
        assert len(dag.asked) == 5

    asyncio.run(go())


def test_small_children_are_read_without_fetching_them() -> None:
    dag = _Dag(_DATA, 16, 4)  # every child spans far less than LOAD_SPAN
    loc = SubDagLocator(dag.get_block)
    assert loc.load_span == LOAD_SPAN

    async def go() -> None:
        cid, rel, kind = await _settled(loc, dag.root, 3000, 20)
        assert kind == INTERIOR
        assert await dag.read(cid, rel, 20) == _DATA[3000:3020]
        assert dag.asked == [dag.root]

    asyncio.run(go())


def test_a_range_over_a_child_boundary_is_read_from_the_parent() -> None:
    dag = _Dag(_DATA, 16, 4)
    loc = SubDagLocator(dag.get_block, load_span=0)
    root = decode_file_node(dag.blocks[dag.root])
    boundary = root.child_starts()[1]

    async def go() -> None:
        assert await _settled(loc, dag.root, boundary - 1, 2) == (dag.root, boundary - 1,
                                                                   ROOT)
        assert await _settled(loc, dag.root, 0, len(_DATA)) == (dag.root, 0, ROOT)

    asyncio.run(go())


def test_unreachable_node_leaves_reads_on_the_parent_and_is_not_asked_again(
        caplog: pytest.LogCaptureFixture) -> None:
    dag = _Dag(_DATA, 16, 4)
    dag.fail = True
    loc = SubDagLocator(dag.get_block, load_span=0)

    async def go() -> None:
        for _ in range(5):
            assert await _settled(loc, dag.root, 10, 5) == (dag.root, 10, ROOT)
        assert dag.asked == [dag.root]

    with caplog.at_level("INFO", logger="peerstar.registry.subdag"):
        asyncio.run(go())
    assert f"cannot map the DAG of {dag.root}" in caplog.text
    assert "daemon unreachable" in caplog.text


def test_cache_is_bounded_and_a_raw_blob_is_its_own_leaf() -> None:
    dag = _Dag(_DATA, 16, 4)
    loc = SubDagLocator(dag.get_block, load_span=0, max_nodes=2)
    single = _Dag(b"x" * 10, 16, 4)  # one chunk: the raw leaf is the root

    async def go() -> None:
        for offset in range(0, len(_DATA), 97):
            for _ in range(3):  # two nodes of a five-level path: it never settles
                cid, rel, _ = loc.locate(dag.root, offset, 1)
                assert await dag.read(cid, rel, 1) == _DATA[offset:offset + 1]
                await loc.settle()
                assert len(loc) <= 2
        raw = SubDagLocator(single.get_block)
        assert await _settled(raw, single.root, 2, 3) == (single.root, 2, ROOT)
        assert single.asked == []  # a raw CID needs no fetch to know it has no links

    asyncio.run(go())


# -- through the registry, both real backends -------------------------------------------

_BIG = 45 << 20  # 180 chunks of 256 KiB: a root over 174 leaves and over 6 leaves
_SPAN = 174 << 18


def _get(url: str, range_header: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Range": range_header})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, dict(resp.headers), resp.read()


@pytest.mark.parametrize("kind", ["jsipfs", "embedded"])
def test_registry_reads_ranges_from_interior_nodes_and_leaves(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    daemon = request.getfixturevalue("jsipfs_daemon") if kind == "jsipfs" else None
    data = random.Random(11).randbytes(_BIG)
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    with ThreadedRegistry(open_backend(kind, daemon, tmp_path / "store"),
                          metrics=True) as reg:
        image = reg.run(store_blob_image(reg.store, blob))
        url = f"{reg.url}/v2/ipfs/{image.root_cid}/blobs/{image.layer_digests[0]}"
        rnd = random.Random(5)
        cases = [(_SPAN - 10, _SPAN + 9), (0, _BIG - 1), (_BIG - 5, _BIG - 1)]
        for _ in range(40):
            length = rnd.choice([1, 4096, 65536, 1 << 20])
            start = rnd.randrange(0, _BIG - length)
            cases.append((start, start + length - 1))
        # twice: the first reads come from the blob's root while its nodes are fetched
        for a, b in cases + cases:
            status, _, body = _get(url, f"bytes={a}-{b}")
            assert status == 206
            assert body == data[a:b + 1], (a, b)
        status, headers, body = _get(url, f"bytes=5-10,{_SPAN - 3}-{_SPAN + 3},9000000-9065535")
        assert status == 206
        parts = parse_multipart(headers["Content-Type"], body)
        assert [p[2] for p in parts] == [data[5:11], data[_SPAN - 3:_SPAN + 4],
                                         data[9000000:9065536]]
        reads = upstream_reads(reg.metrics_url)
        assert reads.get("leaf", 0) > 0 and reads.get("interior", 0) > 0, reads
        assert reads.get("root", 0) >= 2, reads  # at least the two spanning reads


def test_a_mapped_node_of_174_links_takes_little_memory() -> None:
    """The bound on the cache is in nodes; each 174-link node is kept packed (~10 KiB),
    so the default 1024 nodes stay near 10 MiB."""
    import gc
    import tracemalloc

    dag = _Dag(random.Random(2).randbytes(3 * 174 * 64), 64, 174)
    loc = SubDagLocator(dag.get_block, load_span=0)
    root = decode_file_node(dag.blocks[dag.root])
    assert len(root.links) == 3

    async def go() -> None:
        await loc.load(dag.root)
        children = [str(link.cid) for link in root.links]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for cid in children:
                await loc.load(cid)
            gc.collect()
            per_node = (tracemalloc.get_traced_memory()[0] - before) / len(children)
        finally:
            tracemalloc.stop()
        assert len(loc) == 4
        assert per_node < 16 << 10, per_node

    asyncio.run(go())


# -- leaves of a range and the skeleton (the warm-up's and the fan-out's view) ------------


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(_DATA) - 1), st.integers(1, 600))
def test_leaves_cover_exactly_the_range(offset: int, length: int) -> None:
    length = min(length, len(_DATA) - offset)
    dag = _Dag(_DATA, 16, 4)
    loc = SubDagLocator(dag.get_block)

    async def go() -> None:
        assert loc.known_leaves(dag.root, offset, length, len(_DATA)) is None  # nothing known
        leaves = await loc.leaves(dag.root, offset, length, len(_DATA))
        assert leaves[0].start <= offset < leaves[0].start + leaves[0].size
        end = offset + length
        assert leaves[-1].start < end <= leaves[-1].start + leaves[-1].size
        got = b""
        for prev, leaf in zip(leaves, leaves[1:], strict=False):
            assert prev.start + prev.size == leaf.start  # contiguous, in order
        for leaf in leaves:
            assert parse_cid(leaf.cid).codec.name == "raw"
            assert dag.blocks[leaf.cid] == _DATA[leaf.start:leaf.start + leaf.size]
            got += dag.blocks[leaf.cid]
        assert got[offset - leaves[0].start:][:length] == _DATA[offset:end]
        asked = len(dag.asked)
        assert loc.known_leaves(dag.root, offset, length, len(_DATA)) == leaves
        assert len(dag.asked) == asked  # known now: no fetch

    asyncio.run(go())


def test_leaves_load_one_level_at_a_time_all_its_nodes_at_once() -> None:
    dag = _Dag(_DATA, 16, 4)  # 313 leaves under four levels of nodes
    loc = SubDagLocator(dag.get_block)
    in_flight = [0, 0]

    async def get_block(cid: str) -> bytes:
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        await asyncio.sleep(0.01)
        in_flight[0] -= 1
        return await dag.get_block(cid)

    async def go() -> None:
        leaves = await loc.leaves(dag.root, 0, len(_DATA), len(_DATA), get_block=get_block)
        assert len(leaves) == len(list(chunk_bytes(_DATA, 16)))
        assert in_flight[1] >= 4  # a level's nodes were fetched together
        assert len(dag.asked) == len(set(dag.asked))  # each once

    asyncio.run(go())


def test_skeleton_is_what_later_lookups_use() -> None:
    dag = _Dag(_DATA, 16, 4)
    loc = SubDagLocator(dag.get_block)  # default load_span: lookups alone stop high up
    inner = {c for c in dag.blocks if parse_cid(c).codec.name != "raw"}

    async def go() -> None:
        assert await loc.load_skeleton(dag.root) == len(inner)
        assert set(dag.asked) == inner and len(dag.asked) == len(inner)
        for offset in range(0, len(_DATA), 61):
            cid, rel, kind = loc.locate(dag.root, offset, 1)
            assert kind == LEAF and dag.blocks[cid][rel] == _DATA[offset]
        assert len(dag.asked) == len(inner)  # no fetch: everything was known

    asyncio.run(go())


def test_concurrent_ensures_share_one_fetch_and_its_failure() -> None:
    dag = _Dag(_DATA, 16, 4)
    loc = SubDagLocator(dag.get_block)

    async def go() -> None:
        await asyncio.gather(*(loc.ensure(dag.root) for _ in range(5)))
        assert dag.asked == [dag.root]
        dag.fail = True
        child = str(decode_file_node(dag.blocks[dag.root]).links[0].cid)
        results = await asyncio.gather(*(loc.ensure(child) for _ in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, OSError) for r in results)
        assert dag.asked.count(child) == 1

    asyncio.run(go())
