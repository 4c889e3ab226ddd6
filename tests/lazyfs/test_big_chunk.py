"""A layer whose one file is one chunk of 512 MiB (highly compressible, so the blob is
small), mounted over FUSE: a few KiB at a large offset and the whole file read right,
with the mount daemon's peak RSS within 256 MiB; the same chunk tampered gives EIO to
every read, and nothing of it is left in the chunk cache."""

from __future__ import annotations

import errno
import hashlib
import io
import struct
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerstar.estargz import Reader, build
from peerstar.lazyfs import mount_layer
from peerstar.lazyfs.layer import BIG_CHUNK_BYTES
from peerstar.lazyfs.options import CacheOptions, MountOptions, PrefetchOptions
from peerstar.source.sample import pseudo_random_bytes
from tests.lazyfs.blobserver import BlobServer
from tests.lazyfs.conftest import MTIME, Layer

pytestmark = pytest.mark.slow

SIZE = 512 << 20
PERIOD = 16381  # a prime: a window read at a wrong offset shows
PATTERN = pseudo_random_bytes("lazyfs/big-chunk", PERIOD)
RANDOM_AT = 300 << 20  # where incompressible bytes sit (stored raw: tamperable)
RANDOM = pseudo_random_bytes("lazyfs/big-chunk/raw", 64 << 10)
RSS_LIMIT = 256 << 20


def _content(offset: int, n: int) -> bytes:
    """Bytes [offset, offset+n) of the big file."""
    out = bytearray()
    pos = offset
    while pos < offset + n:
        if RANDOM_AT <= pos < RANDOM_AT + len(RANDOM):
            piece = RANDOM[pos - RANDOM_AT:]
        else:
            k = pos % PERIOD
            piece = PATTERN[k:] + PATTERN * 64
            if pos < RANDOM_AT:
                piece = piece[:RANDOM_AT - pos]
        piece = piece[:offset + n - pos]
        out += piece
        pos += len(piece)
    return bytes(out)


def _pieces(step: int = 4 << 20) -> Iterator[bytes]:
    for off in range(0, SIZE, step):
        yield _content(off, min(step, SIZE - off))


class _Stream:
    def __init__(self) -> None:
        self._it = _pieces()
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while len(self._buf) < n:
            more = next(self._it, b"")
            if not more:
                break
            self._buf += more
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


@pytest.fixture(scope="module")
def big_layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layer, str]:
    """(the layer, the file's sha256); the layer's `tar` is left empty (it is large)."""
    tar_path = tmp_path_factory.mktemp("bigchunk") / "layer.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("big.bin")
        info.size, info.mtime, info.mode = SIZE, MTIME, 0o644
        tf.addfile(info, _Stream())  # type: ignore[arg-type]  # read() is all it needs
    h = hashlib.sha256()
    for piece in _pieces():
        h.update(piece)
    out = io.BytesIO()
    with open(tar_path, "rb") as f:
        res = build(f, out, chunk_size=1 << 30)  # the file is one chunk
    tar_path.unlink()
    layer = Layer(out.getvalue(), res.blob_digest, res.toc_digest, b"")
    assert layer.size < 4 << 20  # highly compressible: the blob is small
    return layer, "sha256:" + h.hexdigest()


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def _options() -> MountOptions:
    return MountOptions(prefetch=PrefetchOptions(background=False))


def _cached_files(cache_dir: Path) -> list[int]:
    return sorted(p.stat().st_size for p in (cache_dir / "chunks").glob("*/*"))


def test_big_chunk_reads_right_in_bounded_memory(big_layer: tuple[Layer, str], mnt: Path,
                                                 cache_dir: Path) -> None:
    layer, file_digest = big_layer
    server = BlobServer({layer.digest: layer.blob}).start()
    try:
        m = mount_layer(server.url(layer.digest), layer.digest, layer.toc_digest, mnt,
                        cache_dir, _options())
        try:
            path = mnt / "big.bin"
            assert path.stat().st_size == SIZE > BIG_CHUNK_BYTES
            at = 400 << 20 | 1234
            with open(path, "rb") as f:
                f.seek(at)
                assert f.read(5000) == _content(at, 5000)
                f.seek(RANDOM_AT - 100)
                assert f.read(300) == _content(RANDOM_AT - 100, 300)
            # The verified chunk is in the cache, as one file.
            assert SIZE in _cached_files(cache_dir)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while piece := f.read(1 << 20):
                    h.update(piece)
            assert "sha256:" + h.hexdigest() == file_digest
            rss = _peak_rss(m.pid)
            assert rss <= RSS_LIMIT, f"mount daemon peaked at {rss >> 20} MiB"
        finally:
            m.unmount()
    finally:
        server.stop()


def test_tampered_big_chunk_gives_eio(big_layer: tuple[Layer, str], mnt: Path,
                                      cache_dir: Path) -> None:
    layer, _ = big_layer
    blob = bytearray(layer.blob)
    # The random bytes are stored raw by deflate: changing one there keeps the stream
    # valid; with the member's CRC32 fixed, only the chunk digest can catch it.
    at = blob.find(RANDOM[32768:32800])  # (the middle: in a stored block of its own)
    assert at > 0
    blob[at + 16] ^= 0xFF
    start, end = Reader.from_bytes(layer.blob).chunk_section(
        Reader.from_bytes(layer.blob).chunks("big.bin")[0])
    assert blob[start + 3] == 0  # a plain 10-byte gzip header (no flags)
    d, crc = zlib.decompressobj(-zlib.MAX_WBITS), 0
    tail = bytes(blob[start + 10:end - 8])
    while tail:
        crc = zlib.crc32(d.decompress(tail, 64 << 20), crc)
        tail = d.unconsumed_tail
    blob[end - 8:end - 4] = struct.pack("<I", crc)
    server = BlobServer({layer.digest: bytes(blob)}).start()
    try:
        m = mount_layer(server.url(layer.digest), layer.digest, layer.toc_digest, mnt,
                        cache_dir, _options())
        try:
            for offset in (0, 400 << 20, RANDOM_AT):
                with open(mnt / "big.bin", "rb") as f:
                    f.seek(offset)
                    with pytest.raises(OSError) as exc:
                        f.read(4096)
                assert exc.value.errno == errno.EIO
            assert m.stats()["verifyFailures"] >= 1
            assert "the blob was altered" in m.paths.log.read_text()
            assert SIZE not in _cached_files(cache_dir)
            assert not any((cache_dir / "chunks" / "wip").iterdir())
            rss = _peak_rss(m.pid)
            assert rss <= RSS_LIMIT, f"mount daemon peaked at {rss >> 20} MiB"
        finally:
            m.unmount()
    finally:
        server.stop()


def test_big_chunk_over_the_cache_bound_is_still_verified(big_layer: tuple[Layer, str],
                                                          mnt: Path, cache_dir: Path) -> None:
    """No room on disk: each read decompresses and verifies the whole chunk again."""
    layer, _ = big_layer
    server = BlobServer({layer.digest: layer.blob}).start()
    opts = MountOptions(prefetch=PrefetchOptions(background=False),
                        cache=CacheOptions(region_bytes=0, chunk_bytes=64 << 20))
    try:
        m = mount_layer(server.url(layer.digest), layer.digest, layer.toc_digest, mnt,
                        cache_dir, opts)
        try:
            at = SIZE - 10_000
            with open(mnt / "big.bin", "rb") as f:
                f.seek(at)
                assert f.read(4096) == _content(at, 4096)
            assert SIZE not in _cached_files(cache_dir)
            assert _peak_rss(m.pid) <= RSS_LIMIT
        finally:
            m.unmount()
        assert "does not fit the chunk cache" in m.paths.log.read_text()
    finally:
        server.stop()
