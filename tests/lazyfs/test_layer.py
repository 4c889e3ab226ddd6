"""LazyLayer without FUSE: verified reads across chunk boundaries, one fetch and one
verification per chunk under concurrent readers, bad bytes forgotten, async cache
writes served from memory until on disk."""

from __future__ import annotations

import io
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from peerstar.estargz import Reader, build
from peerstar.lazyfs.cache import DiskCache
from peerstar.lazyfs.fetcher import BlobFetcher
from peerstar.lazyfs.layer import BIG_CHUNK_BYTES, ChunkVerifyError, LazyLayer
from peerstar.source.sample import pseudo_random_bytes
from tests.lazyfs.blobserver import BlobServer
from tests.lazyfs.conftest import BIG, CHUNK, MTIME, PRIORITY, Layer
from tests.support.tars import Entry, write_tar
from tests.support.waiting import wait_until


@pytest.fixture
def served(rich_layer: Layer):  # type: ignore[no-untyped-def]
    server = BlobServer({rich_layer.digest: rich_layer.blob}).start()
    yield server
    server.stop()


def _layer(server: BlobServer, layer: Layer, tmp_path: Path, **kw) -> LazyLayer:  # type: ignore[no-untyped-def]
    f = BlobFetcher(server.url(layer.digest), cache=DiskCache(tmp_path / "regions"))
    return LazyLayer.open(f, toc_digest=layer.toc_digest,
                          chunk_cache=DiskCache(tmp_path / "chunks"), **kw)


def test_reads_across_chunks(served: BlobServer, rich_layer: Layer, tmp_path: Path) -> None:
    lay = _layer(served, rich_layer, tmp_path)
    e = lay.reader.lookup("data/big.bin")
    assert e is not None and len(lay.reader.chunks("data/big.bin")) == 4
    for off, n in ((0, 10), (CHUNK - 3, 6), (CHUNK * 2 - 1, CHUNK + 2), (len(BIG) - 1, 9)):
        assert lay.read_file(e, off, n) == BIG[off:off + n]
    assert lay.read_file(e, len(BIG), 10) == b""


def test_concurrent_readers_share_one_fetch_and_verify(served: BlobServer, rich_layer: Layer,
                                                       tmp_path: Path) -> None:
    lay = _layer(served, rich_layer, tmp_path)
    e = lay.reader.lookup("data/big.bin")
    assert e is not None
    calls = []
    real = lay.reader.decompress_chunk

    def counting(chunk, section, verify=True):  # type: ignore[no-untyped-def]
        calls.append(chunk.chunk_offset)
        time.sleep(0.2)  # keep the others waiting on the first
        return real(chunk, section, verify=verify)

    lay.reader.decompress_chunk = counting  # type: ignore[method-assign]
    out: list[bytes] = []
    threads = [threading.Thread(target=lambda i=i: out.append(
        lay.read_file(e, CHUNK + i * 1000, 100))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(out) == sorted(BIG[CHUNK + i * 1000:CHUNK + i * 1000 + 100] for i in range(6))
    assert calls.count(CHUNK) == 1  # (the read-ahead decompresses the chunks after it)
    assert set(calls) <= {CHUNK, CHUNK * 2, CHUNK * 3}


def test_bad_bytes_are_forgotten(rich_layer: Layer, tmp_path: Path) -> None:
    r = Reader.from_bytes(rich_layer.blob)
    c = r.chunks("data/prio.txt")[0]
    start, end = r.chunk_section(c)
    bad = bytearray(rich_layer.blob)
    bad[start + 20] ^= 0x55
    server = BlobServer({rich_layer.digest: bytes(bad)}).start()
    try:
        lay = _layer(server, rich_layer, tmp_path)
        e = lay.reader.lookup("data/prio.txt")
        assert e is not None
        with pytest.raises(ChunkVerifyError):
            lay.read_file(e, 0, 10)
        assert lay.verify_failures == 1
        f = lay.fetcher
        assert not f.is_cached(start // f.region_size)
        server.blobs[rich_layer.digest] = rich_layer.blob  # the server is fixed
        assert lay.read_file(e, 0, len(PRIORITY)) == PRIORITY
    finally:
        server.stop()


def test_async_cache_serves_pending_then_flushes(tmp_path: Path) -> None:
    c = DiskCache(tmp_path / "c", async_writes=True)
    gate = threading.Event()
    real = c._write

    def slow_write(key: str, data: bytes) -> None:
        gate.wait(5)
        real(key, data)

    c._write = slow_write  # type: ignore[method-assign]
    c.put("k", b"v" * 100)
    assert c.get("k") == b"v" * 100 and "k" in c  # from memory
    assert not any(p.is_file() for p in (tmp_path / "c").glob("??/*"))
    gate.set()
    c.flush()
    files = list((tmp_path / "c").glob("??/*"))
    assert len(files) == 1 and files[0].read_bytes() == b"v" * 100
    assert c.get("k") == b"v" * 100


def test_background_fetch_waits_for_idle_from_mount_time_and_across_layers(
        served: BlobServer, rich_layer: Layer, tmp_path: Path) -> None:
    """Background fetch must not start the moment a layer is mounted (the container is
    about to read it), and a read of another layer of the node defers it too."""
    lay = _layer(served, rich_layer, tmp_path)
    lay.activity_file = tmp_path / "activity"
    before = served.bytes_served
    lay.start_background(0.6)
    try:
        time.sleep(0.3)
        assert served.bytes_served == before  # still inside the idle window after mount
        lay.activity_file.touch()  # another layer sharing the cache was just read
        lay.last_foreground = time.monotonic() - 10
        time.sleep(0.3)
        assert served.bytes_served == before
        # idle now: the rest of the layer is fetched
        assert wait_until(lambda: served.bytes_served > before)
    finally:
        lay.stop()


def test_read_ahead_along_a_file_never_holds_up_other_reads(
        served: BlobServer, rich_layer: Layer, tmp_path: Path) -> None:
    lay = _layer(served, rich_layer, tmp_path)
    big = lay.reader.lookup("data/big.bin")
    prio = lay.reader.lookup("data/prio.txt")
    assert big is not None and prio is not None
    chunks = lay.reader.entry_chunks(big)
    assert len(chunks) == 4
    keys = [lay._chunk_key(c) for c in chunks]
    # Chunk 2 is held back (after its fetch) until `gate` opens: the read-ahead is stuck
    # on it.
    gate = threading.Event()
    real = lay.reader.decompress_chunk

    def gated(chunk, section, verify=True):  # type: ignore[no-untyped-def]
        if chunk is chunks[2]:
            assert gate.wait(30)
        return real(chunk, section, verify=verify)

    lay.reader.decompress_chunk = gated  # type: ignore[method-assign]
    try:
        assert lay.read_file(big, 0, 100) == BIG[:100]  # chunk 0; chunks 1 and 2 queued
        # fetched and verified ahead of the reader
        assert wait_until(lambda: keys[1] in lay._mem, interval=0.02)
        assert keys[2] in lay._chunk_inflight and keys[3] not in lay._mem
        # Another file's on-demand read does not queue behind the held read-ahead.
        assert lay.read_file(prio, 0, len(PRIORITY)) == PRIORITY
        assert keys[2] in lay._chunk_inflight
        # The reader reaching chunk 2 joins the read-ahead's work (no second request for
        # its bytes), and the read-ahead moves on to chunk 3.
        n = len(served.ranges)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(
            lay.read_file(big, CHUNK * 2, 10)))
        reader.start()
        time.sleep(0.2)
        assert not got  # waiting on the read-ahead
        gate.set()
        reader.join(30)
        assert got == [BIG[CHUNK * 2:CHUNK * 2 + 10]]
        assert wait_until(lambda: keys[3] in lay._mem, interval=0.02)
        _, end2 = lay.reader.chunk_section(chunks[2])
        firsts = [int(r.removeprefix("bytes=").split("-")[0]) for r in served.ranges[n:]]
        assert all(f >= end2 // lay.fetcher.region_size * lay.fetcher.region_size
                   for f in firsts)  # at most chunk 3's fetch, none for chunk 2
    finally:
        gate.set()
        lay.stop()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_big_chunk_is_read_by_windows_never_whole(compression: str, tmp_path: Path) -> None:
    """A chunk over BIG_CHUNK_BYTES is streamed, verified, into the chunk cache once
    (however many readers ask at once) and served from that file: the reads allocate
    a few MiB, not the chunk."""
    data = pseudo_random_bytes("lazyfs/window", 4096) * ((BIG_CHUNK_BYTES + (8 << 20)) // 4096)
    out = io.BytesIO()
    res = build(write_tar([Entry("big", data=data, mtime=MTIME)]), out,
                compression=compression, chunk_size=1 << 30)
    layer = Layer(out.getvalue(), res.blob_digest, res.toc_digest, b"")
    server = BlobServer({layer.digest: layer.blob}).start()
    try:
        lay = _layer(server, layer, tmp_path)
        e = lay.reader.lookup("big")
        assert e is not None and [c.chunk_size for c in lay.reader.chunks("big")] == [len(data)]
        assert lay.chunk_cache is not None
        streams = []
        real = lay.chunk_cache.put_stream

        def counting(key, size, pieces):  # type: ignore[no-untyped-def]
            streams.append(key)
            return real(key, size, pieces)

        lay.chunk_cache.put_stream = counting  # type: ignore[method-assign]
        offsets = [5, len(data) // 2 + 77, len(data) - 1000, 4096 * 3001 + 1]
        tracemalloc.start()
        try:
            got: dict[int, bytes] = {}
            threads = [threading.Thread(target=lambda o=o: got.__setitem__(
                o, lay.read_file(e, o, 128 << 10))) for o in offsets]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert {o: got[o] for o in offsets} == {o: data[o:o + (128 << 10)] for o in offsets}
        assert len(streams) == 1
        assert peak < 16 << 20, f"{peak >> 20} MiB allocated for {len(data) >> 20} MiB chunk"
    finally:
        server.stop()
