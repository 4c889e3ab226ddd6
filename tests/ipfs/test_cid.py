"""Local content addressing == kubo's `add --cid-version=1`, checked against the real
js-ipfs daemon's `add`, js-ipfs's own importer for deep trees, and REFERENCE.md."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest
from multiformats import CID

from peerstar.ipfs import CHUNK_SIZE, MAX_LINKS, CIDError, compute_cid, normalize_cid
from peerstar.ipfs.cid import block_cid, cid_text, is_raw_cid
from peerstar.ipfs.unixfs import DagBuilder, chunk_bytes, decode_file_node, read_range
from tests.ipfs.conftest import run
from tests.support.jsipfs import JSIPFS_DIR, JsIpfs

KUBO_PARAMS = [
    ("cid-version", "1"),
    ("raw-leaves", "true"),
    ("chunker", "size-262144"),
    ("cid-base", "base32"),
]

SIZES = {
    "empty": 0,
    "one-byte": 1,
    "one-chunk": CHUNK_SIZE,
    "chunk-plus-one": CHUNK_SIZE + 1,
    "174-chunks": 174 * CHUNK_SIZE,
    "175-chunks": 175 * CHUNK_SIZE,
    "two-level-400-chunks-odd": 400 * CHUNK_SIZE + 12345,
}


def test_reference_one_mib_of_zeros() -> None:
    assert compute_cid(b"\0" * (1 << 20)) == (
        "bafybeiggzq4ryi7hscq5hzvzcnk4urnxt3asp37dhgvnjilf7exskximla"
    )


def test_small_blob_is_one_raw_block_with_its_sha256() -> None:
    data = b"peerstar" * 1000
    cid = CID.decode(compute_cid(data))
    assert cid.codec.name == "raw"
    assert cid.raw_digest == hashlib.sha256(data).digest()
    assert str(cid).startswith("bafkrei")


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
def test_cid_equals_daemon_add(jsipfs: JsIpfs, size: int) -> None:
    data = random.Random(size).randbytes(size)
    ours = compute_cid(data)
    theirs = jsipfs.add_bytes(data, KUBO_PARAMS)["Hash"]
    assert ours == theirs
    assert ours.startswith("bafkrei" if size <= CHUNK_SIZE else "bafybei")


def test_daemon_defaults_for_cidv1_match_kubo(jsipfs: JsIpfs) -> None:
    """With only cid-version=1 js-ipfs also uses raw leaves and 256 KiB chunks (like kubo);
    its answer is base58btc until normalised."""
    data = random.Random(7).randbytes(3 * CHUNK_SIZE + 5)
    answer = jsipfs.add_bytes(data, [("cid-version", "1")])["Hash"]
    assert answer.startswith("z")  # js-ipfs deviation: base58btc
    assert normalize_cid(answer) == compute_cid(data)


def test_js_importer_default_links_per_node_is_174() -> None:
    src = (JSIPFS_DIR / "node_modules/ipfs-unixfs-importer/src/options.js").read_text()
    assert "maxChildrenPerNode: 174," in src
    assert MAX_LINKS == 174


def _js_importer(tmp_path: Path, data: bytes, chunk: int, links: int) -> str:
    f = tmp_path / "blob"
    f.write_bytes(data)
    proc = subprocess.run(
        ["node", str(JSIPFS_DIR / "importer.mjs"), str(f), str(chunk), str(links)],
        capture_output=True, timeout=120, cwd=JSIPFS_DIR,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().strip()


@pytest.mark.parametrize(
    "chunks,links",
    [(2, 3), (3, 3), (4, 3), (9, 3), (10, 3), (27, 3), (28, 3), (100, 3), (64, 4),
     (65, 4), (174 * 2 + 1, 174), (174 * 174 + 1, 174)],
)
def test_multi_level_layout_equals_js_importer(tmp_path: Path, chunks: int, links: int) -> None:
    """Deep trees (3+ levels) at a size that fits a test: tiny chunks, few links."""
    chunk = 16
    data = random.Random(chunks * 1000 + links).randbytes(chunks * chunk - 3)
    ours = compute_cid(data, chunk_size=chunk, max_links=links)
    assert ours == _js_importer(tmp_path, data, chunk, links)


def test_layout_depth_and_fanout() -> None:
    """28 leaves at 3 links: levels of 10, 4, 2, then the root (all leaves at depth 4)."""
    blocks: dict[str, bytes] = {}
    b = DagBuilder(max_links=3)
    for c in chunk_bytes(bytes(range(28)), 1):
        b.add_chunk(c)
    root = b.finish()
    for blk in b.blocks:
        blocks[str(blk.cid)] = blk.data

    def depth_and_fanouts(cid: CID, d: int, acc: list[tuple[int, int]]) -> None:
        if cid.codec.name == "raw":
            acc.append((d, 0))
            return
        node = decode_file_node(blocks[str(cid)])
        acc.append((d, len(node.links)))
        for link in node.links:
            depth_and_fanouts(link.cid, d + 1, acc)

    acc: list[tuple[int, int]] = []
    depth_and_fanouts(root, 0, acc)
    assert {d for d, f in acc if f == 0} == {4}
    assert acc[0] == (0, 2)
    assert sum(1 for _, f in acc if f == 0) == 28


def test_read_range_every_offset_and_length() -> None:
    data = bytes(random.Random(3).randbytes(50))
    blocks: dict[str, bytes] = {}
    b = DagBuilder(max_links=3)
    for c in chunk_bytes(data, 4):
        b.add_chunk(c)
    root = b.finish()
    blocks.update({str(x.cid): x.data for x in b.blocks})

    async def get(cid: CID) -> bytes:
        return blocks[str(cid)]

    async def read(off: int, ln: int | None) -> bytes:
        return b"".join([p async for p in read_range(get, root, off, ln)])

    for off in range(len(data) + 1):
        assert run(read(off, None)) == data[off:]
        for ln in range(0, len(data) - off + 3):
            assert run(read(off, ln)) == data[off : off + ln], (off, ln)


def test_normalize_cid() -> None:
    v1 = "bafybeiggzq4ryi7hscq5hzvzcnk4urnxt3asp37dhgvnjilf7exskximla"
    b58 = str(CID.decode(v1).set(base="base58btc"))
    assert b58.startswith("z")
    assert normalize_cid(b58) == v1
    assert normalize_cid("ipfs://" + v1) == v1
    assert normalize_cid("QmVkbauSDEaMP4Tkq6Epm9uW75mWm136n81YH8fGtfwdHU") == (
        "bafybeidoeq3sicgbxby4b2h3ju2pd2ekivpgijs5vxv6vbozv6k3dd2ahm"
    )
    for bad in ("", "hello", "bafyxx", "Qm123"):
        with pytest.raises(CIDError):
            normalize_cid(bad)


def test_compute_cid_random_sizes_round_trip_structure() -> None:
    """Sizes around chunk boundaries give a tree whose UnixFS filesize is the input size."""
    for size in (CHUNK_SIZE - 1, 2 * CHUNK_SIZE, 2 * CHUNK_SIZE + 1):
        data = os.urandom(size)
        b = DagBuilder()
        for c in chunk_bytes(data):
            b.add_chunk(c)
        root = b.finish()
        if root.codec.name == "dag-pb":
            node = decode_file_node(b.blocks[-1].data)
            assert node.size == size
            assert sum(node.blocksizes) == size


def test_cid_text_of_link_bytes_equals_normalize_cid() -> None:
    """The registry's fast CID text (no multiformats) for the binary CIDs dag-pb links
    hold: CIDv1 raw and dag-pb as they are, CIDv0 as its CIDv1 dag-pb form."""
    rnd = random.Random(9)
    for _ in range(50):
        data = rnd.randbytes(rnd.randrange(0, 300))
        for codec in ("raw", "dag-pb"):
            cid = block_cid(codec, data)
            assert cid_text(bytes(cid)) == normalize_cid(str(cid)) == str(cid)
            assert is_raw_cid(bytes(cid)) == (codec == "raw")
    v0 = "QmVkbauSDEaMP4Tkq6Epm9uW75mWm136n81YH8fGtfwdHU"
    assert cid_text(bytes(CID.decode(v0))) == normalize_cid(v0)
    assert not is_raw_cid(bytes(CID.decode(v0)))
    for bad in (b"", b"\x12\x20" + b"x" * 10, b"\x02\x55\x12\x20" + b"x" * 32):
        with pytest.raises(CIDError):
            cid_text(bad)
