"""Load: 64 concurrent clients doing random single and multi Range reads of a 200 MiB layer
through `peerstar registry serve` (a separate process, as in production) for a bounded
time: zero wrong bytes, zero 5xx, zero dropped connections, on both backends.

PEERSTAR_LOAD_SECONDS sets the duration (default 60, as the issue asks; capped at 120).
The registry reads ranges from the blob's interior nodes and leaves once it has mapped
them (its metrics must show both), so the load covers that path too.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import aiohttp
import pytest

from peerstar.source.sample import SampleImage  # noqa: F401 - conftest fixture types
from tests.registry.helpers import parse_multipart, upstream_reads
from tests.registry.test_cli import _clean_env
from tests.support.cli import serving_registry
from tests.support.ipfsimage import StoredImage, push_blob_image
from tests.support.jsipfs import JsIpfs
from tests.support.ports import free_port

pytestmark = pytest.mark.slow

SIZE = 200 << 20
CLIENTS = 64
DURATION = min(120.0, float(os.environ.get("PEERSTAR_LOAD_SECONDS", "60")))


@pytest.fixture(scope="module")
def layer_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    data = random.Random(4).randbytes(SIZE)
    path = tmp_path_factory.mktemp("load") / "layer.bin"
    path.write_bytes(data)
    return path, data


async def _hammer(url: str, data: bytes, deadline: float) -> dict[str, int]:
    stats = {"requests": 0, "bytes": 0, "wrong": 0, "5xx": 0, "other_status": 0,
             "conn_errors": 0, "multi": 0}
    size = len(data)
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    timeout = aiohttp.ClientTimeout(total=60)

    async def client(seed: int) -> None:
        rnd = random.Random(seed)
        async with aiohttp.ClientSession(connector=connector, connector_owner=False,
                                         timeout=timeout) as session:
            while time.monotonic() < deadline:
                n = 1 if rnd.random() < 0.8 else rnd.randint(2, 4)
                specs = []
                for _ in range(n):
                    length = rnd.choice([1, 4096, 65536, 1 << 20, 4 << 20])
                    start = rnd.randrange(0, size)
                    specs.append((start, min(size - 1, start + length - 1)))
                header = "bytes=" + ",".join(f"{a}-{b}" for a, b in specs)
                try:
                    async with session.get(url, headers={"Range": header}) as resp:
                        body = await resp.read()
                        status = resp.status
                        ctype = resp.headers.get("Content-Type", "")
                except (TimeoutError, aiohttp.ClientError):
                    stats["conn_errors"] += 1
                    continue
                stats["requests"] += 1
                stats["bytes"] += len(body)
                if status >= 500:
                    stats["5xx"] += 1
                    continue
                if status != 206:
                    stats["other_status"] += 1
                    continue
                if n == 1:
                    a, b = specs[0]
                    stats["wrong"] += body != data[a:b + 1]
                else:
                    stats["multi"] += 1
                    parts = parse_multipart(ctype, body)
                    ok = len(parts) == n and all(
                        p == data[a:b + 1] and cr == f"bytes {a}-{b}/{size}"
                        for (_, cr, p), (a, b) in zip(parts, specs, strict=False))
                    stats["wrong"] += not ok

    try:
        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    finally:
        await connector.close()
    return stats


def _pushed_on(backend: str, request: pytest.FixtureRequest, tmp_path: Path, path: Path
               ) -> tuple[StoredImage, list[str]]:
    """The layer pushed to `backend` and the `registry serve` flags that reach it."""
    from peerstar.ipfs import EmbeddedStore, open_store

    if backend == "jsipfs":
        daemon: JsIpfs = request.getfixturevalue("jsipfs_daemon")
        img = push_blob_image(lambda: open_store(daemon.api_multiaddr, timeout=120), path)
        return img, ["--ipfs-address", daemon.api_multiaddr]
    root = tmp_path / "store"
    return push_blob_image(lambda: EmbeddedStore(root), path), ["--root", str(root)]


@pytest.mark.parametrize("backend", ["jsipfs", "embedded"])
def test_load_random_ranges(backend: str, request: pytest.FixtureRequest, tmp_path: Path,
                            layer_file: tuple[Path, bytes]) -> None:
    path, data = layer_file
    img, args = _pushed_on(backend, request, tmp_path, path)
    port, metrics_port = free_port(), free_port()
    with serving_registry(*args, "--listen", f"127.0.0.1:{port}", "--no-access-log",
                          "--metrics-listen", f"127.0.0.1:{metrics_port}",
                          log=tmp_path / "registry.log", env=_clean_env()):
        url = f"http://127.0.0.1:{port}/v2/ipfs/{img.root_cid}/blobs/{img.layer_digests[0]}"
        t0 = time.monotonic()
        stats = asyncio.run(_hammer(url, data, t0 + DURATION))
        elapsed = time.monotonic() - t0
        reads = upstream_reads(f"http://127.0.0.1:{metrics_port}/metrics")
    print(f"\nload[{backend}] {elapsed:.1f} s: {stats}, "
          f"{stats['bytes'] / elapsed / 1e6:.1f} MB/s, upstream reads by node {reads}")
    assert elapsed < DURATION + 70  # bounded: the last requests finish within their timeout
    assert stats["wrong"] == 0
    assert stats["5xx"] == 0
    assert stats["conn_errors"] == 0
    assert stats["other_status"] == 0
    assert stats["requests"] >= CLIENTS  # every client got answers
    assert stats["multi"] > 0
    assert reads.get("leaf", 0) > 0 and reads.get("interior", 0) > 0, reads


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("backend", ["jsipfs", "embedded"])
def test_full_blob_streams_in_bounded_memory(backend: str, request: pytest.FixtureRequest,
                                             tmp_path: Path,
                                             layer_file: tuple[Path, bytes]) -> None:
    """A whole 200 MiB GET raises the registry's peak RSS by far less than the blob."""
    import hashlib
    import http.client

    path, data = layer_file
    img, args = _pushed_on(backend, request, tmp_path, path)
    port = free_port()
    with serving_registry(*args, "--listen", f"127.0.0.1:{port}", "--no-access-log",
                          log=tmp_path / "registry.log", env=_clean_env()) as proc:
        blob_path = f"/v2/ipfs/{img.root_cid}/blobs/{img.layer_digests[0]}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("HEAD", blob_path)
        conn.getresponse().read()
        before = _peak_rss(proc.pid)
        conn.request("GET", blob_path)
        resp = conn.getresponse()
        h = hashlib.sha256()
        got = 0
        while part := resp.read(1 << 20):
            h.update(part)
            got += len(part)
        after = _peak_rss(proc.pid)
        conn.close()
    assert got == SIZE and h.digest() == hashlib.sha256(data).digest()
    print(f"\npeak RSS {before >> 20} MiB -> {after >> 20} MiB for a {SIZE >> 20} MiB blob")
    assert after - before < 48 << 20
