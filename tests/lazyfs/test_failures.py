"""Failure behaviour of a lazy mount with real parts: a tampered chunk gives EIO (and a
log line) while other files stay readable; a registry outage after prefetch leaves the
cached files readable, makes uncached ones fail with EIO, and they work once it is back.
"""

from __future__ import annotations

import errno
import struct
import urllib.request
import zlib
from pathlib import Path

import pytest

from peerstar.estargz import Reader
from peerstar.lazyfs import mount_layer
from peerstar.lazyfs.options import FetchOptions, MountOptions, PrefetchOptions
from tests.lazyfs.blobserver import BlobServer
from tests.lazyfs.conftest import BIG, CHUNK, PRIORITY, Layer, push_image
from tests.support.registry import start_registry

pytestmark = pytest.mark.slow


def _read_errno(path: Path, offset: int = 0, size: int = -1) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            f.read(size)
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_tampered_chunk_gives_eio_and_others_still_read(rich_layer: Layer, mnt: Path,
                                                        cache_dir: Path) -> None:
    r = Reader.from_bytes(rich_layer.blob)
    bad = r.chunks("data/big.bin")[1]  # the second chunk: file bytes [CHUNK, 2*CHUNK)
    start, end = r.chunk_section(bad)
    blob = bytearray(rich_layer.blob)
    assert blob[start + 3] == 0  # a plain 10-byte gzip header (no flags)
    blob[(start + end) // 2] ^= 0xFF  # payload is random, so deflate stores it raw
    # Fix the member's CRC32 so that only the TOC's chunk digest can catch the change.
    content = zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(blob[start + 10:end - 8]))
    assert len(content) == CHUNK and content != BIG[CHUNK:2 * CHUNK]
    blob[end - 8:end - 4] = struct.pack("<I", zlib.crc32(content))
    server = BlobServer({rich_layer.digest: bytes(blob)}).start()
    try:
        # The TOC is untouched, so its digest still matches and the mount succeeds.
        m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                        rich_layer.toc_digest, mnt, cache_dir,
                        MountOptions(prefetch=PrefetchOptions(background=False, timeout=10)))
        try:
            assert _read_errno(mnt / "data/big.bin") == errno.EIO
            assert _read_errno(mnt / "data/big.bin", CHUNK + 10, 100) == errno.EIO
            # Bytes of the intact chunks and other files are served.
            with open(mnt / "data/big.bin", "rb") as f:
                assert f.read(1000) == BIG[:1000]
                f.seek(2 * CHUNK)
                assert f.read(CHUNK) == BIG[2 * CHUNK:3 * CHUNK]
            assert (mnt / "data/prio.txt").read_bytes() == PRIORITY
            assert (mnt / "bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
            assert _read_errno(mnt / "data/big.bin", CHUNK, 10) == errno.EIO  # still
            assert m.stats()["verifyFailures"] >= 2
        finally:
            m.unmount()
        log = m.paths.log.read_text()
        assert "the blob was altered" in log and "EIO" in log
    finally:
        server.stop()


def test_registry_outage_after_prefetch(rich_layer: Layer, mnt: Path, cache_dir: Path,
                                        tmp_path: Path) -> None:
    reg = start_registry(tmp_path / "registry")
    try:
        push_image(reg.url, "lazyfs/outage", "latest", [rich_layer])
        url = f"{reg.url}/v2/lazyfs/outage/blobs/{rich_layer.digest}"
        m = mount_layer(url, rich_layer.digest, rich_layer.toc_digest, mnt, cache_dir,
                        MountOptions(fetch=FetchOptions(retries=0, request_timeout=5),
                                     prefetch=PrefetchOptions(background=False, timeout=10,
                                                              wait=True)))
        try:
            assert m.prefetch_done
            reg.take_down()  # the registry is down from here on
            with pytest.raises(OSError):
                urllib.request.urlopen(reg.url + "/v2/", timeout=2)
            # Prefetched (prioritized) file: served from the cache, never read before.
            assert (mnt / "data/prio.txt").read_bytes() == PRIORITY
            assert (mnt / "data/hard").read_bytes() == PRIORITY
            # Not prefetched: EIO, cleanly, and again on retry.
            assert _read_errno(mnt / "data/big.bin") == errno.EIO
            assert _read_errno(mnt / "data/big.bin", 5, 5) == errno.EIO
            assert (mnt / "data/empty").read_bytes() == b""  # no fetch needed
            reg.bring_back()
            assert (mnt / "data/big.bin").read_bytes() == BIG
            assert m.stats()["verifyFailures"] == 0
        finally:
            m.unmount()
    finally:
        reg.stop()
