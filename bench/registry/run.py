"""Benchmark: Range-read throughput and latency through `peerstar registry serve` vs a
direct `cat` (offset/length) from the same IPFS daemon, in the same run.

Starts a private js-ipfs daemon, adds a random blob (default 256 MiB) as a one-layer
image in nerdctl's format, runs the registry as a separate process (as in production),
then for each concurrency (1, 32) and read size (64 KiB, 1 MiB) runs random-offset reads
for a fixed time against (a) the daemon's RPC (`POST /api/v0/cat?offset&length` of the
blob's CID), (b) the registry (`GET .../blobs/<digest>` with `Range`) and (c) a second
registry with --no-subdag, which cats every range from the blob's own
CID exactly as (a) does, so (c)/(a) is the cost of the registry's pass-through alone
and (b)/(c) what reading from the deepest DAG node saves the daemon. Same aiohttp client
for all three; prints MB/s, p50/p99 latency and the ratios to (a) (target: (b) >= 0.8x
at concurrency 32; concurrency 1 is reported).

Run (holding the bench lock, as every benchmark on the shared machine):
`flock -x /tmp/peerstar-bench.lock python bench/registry/run.py [--mib 256] [--seconds 8]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from peerstar.ipfs import open_store  # noqa: E402
from tests.support.cli import serving_registry  # noqa: E402
from tests.support.ipfsimage import push_blob_image  # noqa: E402
from tests.support.jsipfs import start_jsipfs  # noqa: E402
from tests.support.ports import free_port  # noqa: E402


def _combine(parts: list[tuple]) -> tuple[float, float, float, int]:
    """Mean throughput; latency percentiles over all slices' samples."""
    lat = sorted(x for p in parts for x in p[4])
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return (statistics.fmean(p[0] for p in parts), statistics.median(lat) * 1000,
            p99 * 1000, len(lat))


async def _run(fetch, size: int, read: int, conc: int, seconds: float, seed: int
               ) -> tuple[float, float, float, int, list[float]]:
    """(MB/s, p50 ms, p99 ms, reads, latencies) of `conc` workers calling fetch(off, n)."""
    lat: list[float] = []
    total = 0
    deadline = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal total
        rnd = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            off = rnd.randrange(0, size - read)
            t0 = time.perf_counter()
            n = await fetch(off, read)
            lat.append(time.perf_counter() - t0)
            if n != read:
                raise RuntimeError(f"short read: {n} of {read} at {off}")
            total += n

    t0 = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(conc)))
    elapsed = time.monotonic() - t0
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return (total / elapsed / 1e6, statistics.median(lat) * 1000, p99 * 1000, len(lat),
            lat)


async def bench(api_url: str, registry_urls: list[str], cid: str, size: int,
                seconds: float, concurrencies: list[int], reads: list[int]) -> list[tuple]:
    """Rows (conc, read, direct, [registry, ...]) of combined slices, one per registry."""
    rows = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def body_length(r: aiohttp.ClientResponse, status: int, who: str) -> int:
            if r.status != status:
                raise RuntimeError(f"{who} answered {r.status}")
            got = 0
            async for chunk in r.content.iter_any():
                got += len(chunk)
            return got

        def via(registry_url: str):
            async def via_registry(off: int, n: int) -> int:
                async with session.get(registry_url,
                                       headers={"Range": f"bytes={off}-{off + n - 1}"}) as r:
                    return await body_length(r, 206, "registry")
            return via_registry

        async def direct(off: int, n: int) -> int:
            params = {"arg": cid, "offset": str(off), "length": str(n)}
            async with session.post(f"{api_url}/api/v0/cat", params=params) as r:
                return await body_length(r, 200, "daemon")

        sides = [direct] + [via(u) for u in registry_urls]
        for conc in concurrencies:
            for read in reads:
                # warm every path (connection pools, daemon caches, the registries' DAG
                # maps) before measuring
                for side in sides:
                    await _run(side, size, read, conc, 1.0, 0)
                # Interleave 1 s slices of each so drift in the daemon (its GC, page
                # cache) hits every side alike; then combine the slices.
                parts: list[list[tuple]] = [[] for _ in sides]
                for i in range(max(1, int(seconds))):
                    for side, acc in zip(sides, parts, strict=True):
                        acc.append(await _run(side, size, read, conc, 1.0, i + 1))
                rows.append((conc, read, _combine(parts[0]), [_combine(p) for p in parts[1:]]))
    return rows


def _print(rows: list[tuple], title: str) -> None:
    print(f"\n{title}")
    print("registry: as shipped (each range read from the deepest DAG node holding it);")
    print("root-cat: --no-subdag (every range a cat of the blob's own CID,")
    print("          like the direct reads: the pass-through's own cost)")
    print(f"{'conc':>4} {'read':>7} | {'direct MB/s':>11} {'p50 ms':>7} {'p99 ms':>7} | "
          f"{'registry MB/s':>13} {'p50 ms':>7} {'p99 ms':>7} {'ratio':>6} | "
          f"{'root-cat MB/s':>13} {'p50 ms':>7} {'ratio':>6}")
    for conc, read, d, (r, o) in rows:
        label = f"{read >> 10} KiB" if read < (1 << 20) else f"{read >> 20} MiB"
        print(f"{conc:>4} {label:>7} | {d[0]:>11.1f} {d[1]:>7.2f} {d[2]:>7.2f} | "
              f"{r[0]:>13.1f} {r[1]:>7.2f} {r[2]:>7.2f} {r[0] / d[0]:>5.2f}x | "
              f"{o[0]:>13.1f} {o[1]:>7.2f} {o[0] / d[0]:>5.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--reads", default="65536,1048576")
    args = ap.parse_args()
    concurrencies = [int(x) for x in args.concurrency.split(",")]
    reads = [int(x) for x in args.reads.split(",")]
    size = args.mib << 20

    daemon = start_jsipfs()
    try:
        with tempfile.TemporaryDirectory(prefix="peerstar-bench-") as tmp, \
                contextlib.ExitStack() as registries:
            blob = Path(tmp) / "blob"
            blob.write_bytes(os.urandom(size))

            img = push_blob_image(lambda: open_store(daemon.api_multiaddr, timeout=300), blob)
            blob.unlink()
            layer = img.layer_digests[0]
            cid = img.cids[layer]
            urls = []
            for subdag in ("1", "0"):
                port = free_port()
                env = {k: v for k, v in os.environ.items() if not k.startswith("PEERSTAR_")}
                extra = [] if subdag == "1" else ["--no-subdag"]
                registries.enter_context(serving_registry(
                    "--ipfs-address", daemon.api_multiaddr, "--listen", f"127.0.0.1:{port}",
                    "--no-access-log", *extra, log=Path(tmp) / f"registry-subdag{subdag}.log",
                    env=env))
                urls.append(f"http://127.0.0.1:{port}/v2/ipfs/{img.root_cid}/blobs/{layer}")
            rows = asyncio.run(bench(daemon.api_url, urls, cid, size, args.seconds,
                                     concurrencies, reads))
        _print(rows, f"Range reads of a {args.mib} MiB blob, {args.seconds:g} s per cell, "
                     f"js-ipfs 0.66 daemon, {os.cpu_count()} CPUs")
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
