"""The on-disk cache on a small real filesystem (a tmpfs with `size=`): a full disk
leaves no partial entry and no wrong bytes in a mount, logs one line, and the cache
writes again when space returns; a mount keeps its caches within their bounds at every
moment and fetches and verifies evicted chunks again; metrics count hits, misses,
evictions and bytes."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerstar.lazyfs import metrics, mount_layer
from peerstar.lazyfs.cache import DiskCache
from peerstar.lazyfs.options import CacheOptions, MountOptions, PrefetchOptions
from tests.lazyfs.blobserver import BlobServer
from tests.lazyfs.conftest import BIG, PRIORITY, Layer
from tests.support.waiting import wait_until


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted at the end."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _entries(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in root.glob("??/*")}


def _on_disk(root: Path) -> int:
    """Bytes of the cache's entries now (files evicted while counting are skipped)."""
    total = 0
    for p in root.glob("??/*"):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def _value(name: str, **labels: str) -> float:
    v = metrics.REGISTRY.get_sample_value(name, labels)
    return v or 0.0


@pytest.mark.parametrize("async_writes", [False, True])
def test_full_disk_leaves_no_partial_entry_and_writes_again_later(
        small_fs: Path, caplog: pytest.LogCaptureFixture, async_writes: bool) -> None:
    c = DiskCache(small_fs / "chunks", async_writes=async_writes, layer="L-enospc")
    caplog.set_level(logging.INFO, logger="peerstar.lazyfs.cache")
    c.put("fits", b"a" * (100 << 10))
    c.flush()
    filler = _fill(small_fs)  # something else takes the rest of the disk
    for i in range(3):
        c.put(f"big{i}", b"b" * (400 << 10))  # each larger than the space left
    c.flush()
    assert c.get("fits") == b"a" * (100 << 10)
    assert all(c.get(f"big{i}") is None for i in range(3))
    assert list(_entries(small_fs / "chunks").values()) == [100 << 10]  # no partial one
    assert list((small_fs / "chunks" / "wip").iterdir()) == []
    full = [r for r in caplog.records if "disk full" in r.getMessage()]
    assert len(full) == 1 and str(small_fs / "chunks") in full[0].getMessage()
    assert "No space left on device" in full[0].getMessage()
    assert _value("peerstar_lazyfs_cache_write_failures_total", layer="L-enospc",
                  cache="chunks") >= 3
    filler.unlink()  # space returns
    c.put("big0", b"b" * (400 << 10))
    c.flush()
    assert c.get("big0") == b"b" * (400 << 10)
    assert any("writes succeed again" in r.getMessage() for r in caplog.records)


def test_metrics_count_hits_misses_evictions_and_bytes(tmp_path: Path) -> None:
    before = {n: _value(f"peerstar_lazyfs_cache_{n}_total", layer="L-metrics",
                        cache="regions") for n in ("hits", "misses", "evictions")}
    c = DiskCache(tmp_path / "regions", max_bytes=10_000, layer="L-metrics")
    c.put("a", b"x" * 4000)
    assert c.get("a") is not None and c.get("nope") is None
    assert c.get("a", size=3) is None  # a wrong length is a miss
    for k in ("b", "c", "d"):
        c.put(k, b"y" * 4000)  # the third put evicts
    got = {n: _value(f"peerstar_lazyfs_cache_{n}_total", layer="L-metrics",
                     cache="regions") - before[n] for n in before}
    assert got == {"hits": 1, "misses": 2, "evictions": 2}
    on_disk = sum(_entries(tmp_path / "regions").values())
    assert _value("peerstar_lazyfs_cache_bytes", cache="regions") == on_disk == c.total
    assert on_disk <= 10_000


def _fill(d: Path) -> Path:
    """Take every free byte of the filesystem holding `d`; returns the filler file."""
    filler = d / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"f" * (64 << 10))
        except OSError:
            pass
    try:
        with open(filler, "ab", buffering=0) as f:
            while True:
                f.write(b"f")  # the last partial block
    except OSError:
        pass
    return filler


@pytest.mark.slow
def test_mount_reads_right_bytes_on_a_full_disk_and_caches_again_after(
        rich_layer: Layer, mnt: Path, cache_dir: Path, small_fs: Path) -> None:
    # The caches live on the small filesystem; the mount's state and log do not (a full
    # disk there could not take the log line that says it is full).
    cache_dir.mkdir()
    for name in ("regions", "chunks"):
        (small_fs / name).mkdir()
        (cache_dir / name).symlink_to(small_fs / name)
    options = MountOptions(prefetch=PrefetchOptions(background=False, wait=True))
    server = BlobServer({rich_layer.digest: rich_layer.blob}).start()
    try:
        m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                        rich_layer.toc_digest, mnt, cache_dir, options)
        try:
            assert (mnt / "data/prio.txt").read_bytes() == PRIORITY
            before = _entries(small_fs / "chunks")
            filler = _fill(small_fs)
            assert os.statvfs(small_fs).f_bavail == 0
            n = len(server.ranges)
            assert (mnt / "data/big.bin").read_bytes() == BIG  # 0 wrong bytes
            assert len(server.ranges) > n  # fetched while the disk was full
            time.sleep(0.5)  # the daemon's writer threads try (and fail) meanwhile
            for name in ("regions", "chunks"):
                assert list((small_fs / name / "wip").iterdir()) == []
            assert _entries(small_fs / "chunks") == before  # nothing new, nothing partial
            log = m.paths.log.read_text()
            full = [ln for ln in log.splitlines() if "disk full" in ln]
            assert 1 <= len(full) <= 2, log  # one line per cache that filled up
            assert all("No space left on device" in ln for ln in full)
            filler.unlink()  # space returns
        finally:
            m.unmount()
        # A new mount (no memory copy, no kernel page cache) reads through the cache.
        m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                        rich_layer.toc_digest, mnt, cache_dir, options)
        try:
            assert (mnt / "data/big.bin").read_bytes() == BIG
            assert wait_until(lambda: len(_entries(small_fs / "chunks")) >= len(before) + 4,
                              10, 0.1), _entries(small_fs / "chunks")
            sizes = sorted(_entries(small_fs / "chunks").values())
            assert sum(sizes) - sum(before.values()) == len(BIG)  # whole chunks only
        finally:
            m.unmount()
    finally:
        server.stop()


@pytest.mark.slow
def test_mount_keeps_its_caches_within_their_bounds_and_refetches_evicted_chunks(
        rich_layer: Layer, mnt: Path, cache_dir: Path) -> None:
    # Room for one 256 KiB chunk of big.bin and two 50 kB regions: reading the file
    # evicts all the time, and a later mount finds little of it on disk.
    bounds = CacheOptions(region_bytes=100_000, chunk_bytes=300_000)
    options = MountOptions(cache=bounds, prefetch=PrefetchOptions(background=False))
    server = BlobServer({rich_layer.digest: rich_layer.blob}).start()
    peak = {"regions": 0, "chunks": 0}
    stop = threading.Event()

    def watch() -> None:  # the bound must hold at every moment, not only at the end
        while not stop.is_set():
            for name in peak:
                peak[name] = max(peak[name], _on_disk(cache_dir / name))
            time.sleep(0.002)

    try:
        for _ in range(2):
            m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                            rich_layer.toc_digest, mnt, cache_dir, options)
            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                n = len(server.ranges)
                assert (mnt / "data/big.bin").read_bytes() == BIG
                assert len(server.ranges) > n  # evicted: fetched (and verified) again
                assert m.stats()["verifyFailures"] == 0
            finally:
                stop.set()
                watcher.join()
                stop.clear()
                m.unmount()
        assert 0 < peak["chunks"] <= 300_000
        assert 0 < peak["regions"] <= 100_000
        prom = next((cache_dir / "mounts").glob("*.prom")).read_text()
        assert "peerstar_lazyfs_cache_evictions_total" in prom
    finally:
        server.stop()
