"""The embedded store's own guarantees: on-disk layout, atomic writes, verification on
read, reading only the needed blocks, pins and gc."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from multiformats import CID

from peerstar.ipfs import (
    CHUNK_SIZE,
    BlockNotFoundError,
    CorruptBlockError,
    EmbeddedStore,
    IPFSError,
    compute_cid,
)
from tests.ipfs.conftest import run

DATA = random.Random(1).randbytes(400 * CHUNK_SIZE + 3)  # two-level tree


def _block_files(root: Path) -> list[Path]:
    return [p for p in (root / "blocks").rglob("*") if p.is_file()]


def test_layout_and_no_temp_files_left(tmp_path: Path) -> None:
    s = EmbeddedStore(tmp_path)
    cid = run(s.add(DATA))
    files = _block_files(tmp_path)
    # 401 leaves + 3 internal nodes (174, 174, 53 links) + the root
    assert len(files) == 401 + 3 + 1
    assert not [p for p in files if p.name.startswith(".")]  # temp files are dot-named
    for p in files:
        assert p.parent.name == p.name[-3:-1]
        assert CID.decode(p.name).version == 1
    assert (tmp_path / "pins" / cid).exists()


def test_cat_reads_only_the_blocks_it_needs(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    s = EmbeddedStore(tmp_path)
    cid = run(s.add(DATA))
    read: list[str] = []
    orig = s._read_block

    def counting(c: CID) -> bytes:
        read.append(str(c))
        return orig(c)

    monkeypatch.setattr(s, "_read_block", counting)
    off = 200 * CHUNK_SIZE + 5  # inside the second internal node's subtree
    got = run(s.cat_bytes(cid, off, 10))
    assert got == DATA[off : off + 10]
    assert len(read) == 3  # root, one internal node, one leaf
    read.clear()
    run(s.cat_bytes(cid, 174 * CHUNK_SIZE - 5, 10))  # spans two subtrees
    assert len(read) == 5  # root, 2 internal, 2 leaves
    read.clear()
    assert run(s.stat_size(cid)) == len(DATA)
    assert len(read) == 1


def test_corrupt_block_detected_removed_and_repaired(tmp_path: Path) -> None:
    s = EmbeddedStore(tmp_path)
    data = DATA[: 3 * CHUNK_SIZE]
    cid = run(s.add(data))
    leaf = compute_cid(data[CHUNK_SIZE : 2 * CHUNK_SIZE])
    path = tmp_path / "blocks" / leaf[-3:-1] / leaf
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert run(s.cat_bytes(cid, 0, 10)) == data[:10]  # other blocks still fine
    with pytest.raises(CorruptBlockError, match="corrupt"):
        run(s.cat_bytes(cid))
    assert not path.exists()
    with pytest.raises(BlockNotFoundError):
        run(s.cat_bytes(cid))
    assert run(s.add(data)) == cid
    assert run(s.cat_bytes(cid)) == data


def test_unknown_cid_message(tmp_path: Path) -> None:
    s = EmbeddedStore(tmp_path)
    cid = compute_cid(b"never added")
    with pytest.raises(BlockNotFoundError) as info:
        run(s.cat_bytes(cid))
    assert str(info.value) == (
        f"{cid} is not in the embedded store at {tmp_path} (add it first, or pass "
        f"--ipfs-address to read it from an IPFS daemon)"
    )


def test_pin_requires_the_whole_dag(tmp_path: Path) -> None:
    s = EmbeddedStore(tmp_path)
    data = DATA[: 2 * CHUNK_SIZE + 1]
    cid = run(s.add(data, pin=False))
    assert s.pins() == []
    leaf = compute_cid(data[-1:])
    (tmp_path / "blocks" / leaf[-3:-1] / leaf).unlink()
    with pytest.raises(BlockNotFoundError):
        run(s.pin(cid))
    assert s.pins() == []
    run(s.add(data, pin=False))
    run(s.pin(cid))
    assert s.pins() == [cid]


def test_gc_removes_only_unpinned_blocks(tmp_path: Path) -> None:
    s = EmbeddedStore(tmp_path)
    kept_data = DATA[: 2 * CHUNK_SIZE + 7]
    gone_data = random.Random(2).randbytes(CHUNK_SIZE + 9)
    kept = run(s.add(kept_data))
    gone = run(s.add(gone_data, pin=False))
    (tmp_path / "blocks" / "zz").mkdir()
    (tmp_path / "blocks" / "zz" / ".tmp-1-dead").write_bytes(b"half a block")
    res = run(s.gc())
    assert res.removed_blocks == 3 + 1  # 2 leaves + root of `gone`, and the temp file
    assert res.removed_bytes == len(gone_data) + len(s_root_of(gone_data)) + 12
    assert res.kept_blocks == 4
    assert run(s.cat_bytes(kept)) == kept_data
    with pytest.raises(BlockNotFoundError):
        run(s.cat_bytes(gone))
    run(s.unpin(kept))
    assert run(s.gc()).removed_blocks == 4
    assert _block_files(tmp_path) == []


def s_root_of(data: bytes) -> bytes:
    """The encoded root node of `data` (to count gc's freed bytes exactly)."""
    from peerstar.ipfs.unixfs import DagBuilder, chunk_bytes

    b = DagBuilder()
    for c in chunk_bytes(data):
        b.add_chunk(c)
    b.finish()
    return b.blocks[-1].data


def test_unwritable_root_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    s = EmbeddedStore(tmp_path / "file" / "store")
    with pytest.raises(IPFSError, match="cannot create the embedded store"):
        run(s.add(b"x"))


def test_write_failure_is_a_clear_error_and_leaves_no_temp_file(tmp_path: Path) -> None:
    s = EmbeddedStore(tmp_path)
    run(s.add(b"x"))
    cid = compute_cid(b"new content")
    shard = tmp_path / "blocks" / cid[-3:-1]
    shard.write_text("a file where the shard directory should be")  # works even as root
    with pytest.raises(IPFSError, match="cannot write block"):
        run(s.add(b"new content"))
    assert [p.name for p in (tmp_path / "blocks").rglob(".*")] == []


def test_range_reads_parse_each_link_cid_lazily(tmp_path):
    """A range read follows one link per level; the others stay unparsed bytes
    (`multiformats` costs ~0.5 ms per CID, 174 links per node)."""
    import asyncio

    from peerstar.ipfs.embedded import EmbeddedStore
    from peerstar.ipfs.unixfs import decode_file_node

    async def run() -> None:
        store = EmbeddedStore(tmp_path / "store")
        data = bytes(range(256)) * (200 * 1024)  # 200 chunks of 256 KiB: 174 + 26 leaves
        cid = await store.add(data)
        assert await store.cat_bytes(cid, 30 << 20, 100) == data[30 << 20:(30 << 20) + 100]
        from peerstar.ipfs.cid import parse_cid
        root = decode_file_node(await store.block_get(cid))
        assert len(root.links) == 2  # 200 chunks: two interior nodes under the root
        assert all(link._cid is None for link in root.links)  # nothing parsed by decoding
        assert root.links[0].cid == parse_cid(str(root.links[0].cid))

    asyncio.run(run())
