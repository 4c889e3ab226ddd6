"""Mount behaviour over time: prefetch ranges (landmark / no landmark), idle-time
background fetch of the whole blob, mounts surviving the process that started them,
Prometheus metrics, and the explicit no-verify option."""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from peerstar.estargz import Reader
from peerstar.lazyfs import find_mount, mount_layer
from peerstar.lazyfs.options import FetchOptions, MountOptions, PrefetchOptions
from tests.lazyfs.blobserver import BlobServer
from tests.lazyfs.conftest import BIG, PRIORITY, Layer, is_mounted
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

NO_BACKGROUND = MountOptions(prefetch=PrefetchOptions(background=False))


def _stats(mnt: Path, layer: Layer) -> dict:
    return json.loads((mnt / ".peerstar-lazyfs" / f"{layer.digest}.json").read_text())


def test_prefetch_is_exactly_the_landmark_range(rich_layer: Layer, mnt: Path,
                                                cache_dir: Path) -> None:
    server = BlobServer({rich_layer.digest: rich_layer.blob}).start()
    try:
        m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                        rich_layer.toc_digest, mnt, cache_dir,
                        MountOptions(prefetch=PrefetchOptions(background=False, wait=True)))
        try:
            end = Reader.from_bytes(rich_layer.blob).prefetch_end()
            assert end is not None and end > len(PRIORITY) // 100
            assert m.prefetch_done
            # A request for [0, landmark) rounded to regions, then nothing else: reading
            # the prioritized file needs no network.
            assert end < 50_000 and server.ranges[-1] == "bytes=0-49999"
            n = len(server.ranges)
            assert (mnt / "data/prio.txt").read_bytes() == PRIORITY
            assert len(server.ranges) == n
            assert (mnt / "data/big.bin").read_bytes()[:10] == BIG[:10]
            assert len(server.ranges) > n  # big.bin is after the landmark: fetched now
        finally:
            m.unmount()
    finally:
        server.stop()


DELAY = 5.0


def test_mount_is_ready_before_prefetch_and_reads_wait_for_it(rich_layer: Layer, mnt: Path,
                                                              cache_dir: Path) -> None:
    server = BlobServer({rich_layer.digest: rich_layer.blob}).start()
    # The prefetch range comes late; late enough that a loaded machine's daemon start-up
    # (~1-2 s under a parallel test run) cannot be mistaken for waiting on it.
    server.delays["bytes=0-49999"] = DELAY
    try:
        t0 = time.monotonic()
        m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                        rich_layer.toc_digest, mnt, cache_dir,
                        MountOptions(prefetch=PrefetchOptions(background=False, timeout=10)))
        try:
            assert not m.prefetch_done and time.monotonic() - t0 < DELAY
            # A prioritized file waits for the prefetch instead of fetching on its own:
            # one request for the range, none after it.
            assert (mnt / "data/prio.txt").read_bytes() == PRIORITY
            assert time.monotonic() - t0 >= DELAY
            assert server.ranges.count("bytes=0-49999") == 1
            assert server.ranges[-1] == "bytes=0-49999"
            assert _stats(mnt, rich_layer)["prefetchDone"] is True
        finally:
            m.unmount()
    finally:
        server.stop()


def test_files_outside_the_prefetch_range_do_not_wait(rich_layer: Layer, mnt: Path,
                                                       cache_dir: Path) -> None:
    server = BlobServer({rich_layer.digest: rich_layer.blob}).start()
    server.delays["bytes=0-"] = 4.0  # the prefetch request, whatever its rounding
    try:
        t0 = time.monotonic()
        m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                        rich_layer.toc_digest, mnt, cache_dir,
                        MountOptions(fetch=FetchOptions(region_size=4096),
                                     prefetch=PrefetchOptions(background=False, timeout=0.5)),
                        size=len(rich_layer.blob))  # no size probe: it is bytes=0-1
        try:
            # The last chunk of a file outside the prefetch range reads at once.
            with open(mnt / "data/big.bin", "rb") as f:
                f.seek(len(BIG) - 100)
                assert f.read() == BIG[-100:]
            assert time.monotonic() - t0 < 3.0
            assert not _stats(mnt, rich_layer)["prefetchDone"]
        finally:
            m.unmount()
    finally:
        server.stop()


def test_no_prefetch_landmark_fetches_only_footer_and_toc(sample_layers: list[Layer],
                                                          mnt: Path, cache_dir: Path) -> None:
    layer = sample_layers[0]  # built without prioritized files: `.no.prefetch.landmark`
    assert Reader.from_bytes(layer.blob).lookup(".no.prefetch.landmark") is not None
    server = BlobServer({layer.digest: layer.blob}).start()
    try:
        m = mount_layer(server.url(layer.digest), layer.digest, layer.toc_digest, mnt,
                        cache_dir, MountOptions(prefetch=PrefetchOptions(
                            background=False, size=10 << 20)))
        try:
            r = Reader.from_bytes(layer.blob)
            toc_bytes = layer.size - r.footer.toc_offset
            # Size probe + the tail holding footer and TOC, rounded to regions.
            assert server.bytes_served <= 2 + toc_bytes + 2 * 50_000
            assert _stats(mnt, layer)["prefetchDone"] is True
        finally:
            m.unmount()
    finally:
        server.stop()


def test_background_fetch_completes_then_survives_outage(rich_layer: Layer, mnt: Path,
                                                         cache_dir: Path) -> None:
    server = BlobServer({rich_layer.digest: rich_layer.blob}).start()
    try:
        m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                        rich_layer.toc_digest, mnt, cache_dir,
                        MountOptions(fetch=FetchOptions(retries=0),
                                     prefetch=PrefetchOptions(background_idle=0.2)))
        try:
            wait_until(lambda: _stats(mnt, rich_layer)["fetchedPercent"] >= 100, 20, 0.1)
            st = _stats(mnt, rich_layer)
            assert st["fetchedPercent"] == 100.0 and st["cachedSize"] == rich_layer.size
            # Background fetches are batched, not one request per region.
            assert st["requests"] < rich_layer.size // 50_000
            server.stop()
            assert (mnt / "data/big.bin").read_bytes() == BIG  # all from the cache
        finally:
            m.unmount()
    finally:
        server.stop()


def test_mount_survives_its_starter_and_writes_metrics(rich_layer: Layer, mnt: Path,
                                                       cache_dir: Path) -> None:
    server = BlobServer({rich_layer.digest: rich_layer.blob}).start()
    repo = Path(__file__).resolve().parents[2]
    script = textwrap.dedent(f"""
        import sys, os, time
        sys.path.insert(0, {str(repo)!r})
        from pathlib import Path
        from peerstar.lazyfs import mount_layer
        from peerstar.lazyfs.options import MountOptions, PrefetchOptions
        m = mount_layer({server.url(rich_layer.digest)!r}, {rich_layer.digest!r},
                        {rich_layer.toc_digest!r}, Path({str(mnt)!r}),
                        Path({str(cache_dir)!r}),
                        MountOptions(prefetch=PrefetchOptions(background=False)))
        print(m.pid, flush=True)
        time.sleep(60)
    """)
    starter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert starter.stdout is not None
        pid = int(starter.stdout.readline())
        starter.send_signal(signal.SIGKILL)  # the "snapshotter" dies hard
        starter.wait(10)
        assert is_mounted(mnt)
        assert (mnt / "data/big.bin").read_bytes() == BIG
        m = find_mount(mnt, cache_dir)
        assert m is not None and m.pid == pid
        time.sleep(2.5)  # the daemon refreshes its stats and metrics files every 2 s
        prom = m.paths.prom.read_text()
        label = rich_layer.digest[:19]
        lines = [ln for ln in prom.splitlines()
                 if ln.startswith("peerstar_lazyfs_fetched_bytes_total") and label in ln]
        assert sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) > len(BIG) // 2
        assert any(ln.startswith("peerstar_lazyfs_mount_seconds_count") and ln.endswith(
            " 1.0") for ln in prom.splitlines())
        assert "peerstar_lazyfs_prefetch_seconds_count" in prom
        assert "peerstar_lazyfs_on_demand_fetches_total" in prom
        m.unmount()
        assert not is_mounted(mnt)
        assert not os.path.exists(f"/proc/{pid}") or "Z" in Path(
            f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    finally:
        if starter.poll() is None:
            starter.kill()
        server.stop()


def test_no_verify_is_explicit(rich_layer: Layer, mnt: Path, cache_dir: Path) -> None:
    r = Reader.from_bytes(rich_layer.blob)
    c = r.chunks("data/prio.txt")[0]
    start, end = r.chunk_section(c)
    blob = bytearray(rich_layer.blob)
    # A valid gzip member of different content, same length, in place of the chunk's:
    # it decompresses fine (CRC included), only the TOC's chunk digest tells.
    new = PRIORITY.replace(b"prioritized", b"PRIORITIZED", 1)
    member = gzip.compress(new, mtime=0)
    assert len(member) <= end - start  # the bytes after it are never decompressed
    blob[start:start + len(member)] = member
    server = BlobServer({rich_layer.digest: bytes(blob)}).start()
    try:
        m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                        rich_layer.toc_digest, mnt, cache_dir,
                        replace(NO_BACKGROUND, verify=False))
        try:
            assert (mnt / "data/prio.txt").read_bytes() == new  # served unchecked
        finally:
            m.unmount()
        m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                        rich_layer.toc_digest, mnt, cache_dir / "v", NO_BACKGROUND)
        try:
            with pytest.raises(OSError):
                (mnt / "data/prio.txt").read_bytes()
        finally:
            m.unmount()
    finally:
        server.stop()


def test_sigterm_unmounts(rich_layer: Layer, mnt: Path, cache_dir: Path) -> None:
    server = BlobServer({rich_layer.digest: rich_layer.blob}).start()
    try:
        m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                        rich_layer.toc_digest, mnt, cache_dir, NO_BACKGROUND)
        fd = os.open(mnt / "data/prio.txt", os.O_RDONLY)  # even with a file open
        try:
            os.kill(m.pid, signal.SIGTERM)
            assert wait_until(lambda: not m.alive)
            assert not is_mounted(mnt)  # detached although busy
            with pytest.raises(OSError) as exc:
                os.pread(fd, 10, 0)  # the daemon is gone: an error, not bytes or a hang
            assert exc.value.errno == errno.ENOTCONN
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        log = m.paths.log.read_text()
        assert "signal 15: unmounting" in log and "unmounted" in log
    finally:
        server.stop()
