"""Benchmark: `peerstar push` against plain `add` of the same blobs, same run, through a
js-ipfs daemon and through the embedded store.

Builds the sample image locally with `--extra-mib` MiB of incompressible files (default
300, so the image is > 300 MiB), then for each backend measures, each on a fresh store
(the embedded store skips blocks it already has; a fresh js-ipfs repo per run likewise):
- raw add: `store.add(file)` of every blob file of the layout, one after the other, as
  `ipfs add --cid-version=1` of each file would;
- push: `peerstar.ipfsimage.push.push("oci:LAYOUT")` in-process: walk the image, verify
  every source digest while streaming, add every blob (4 at a time), rewrite and add the
  manifest and the top descriptor. No eStargz conversion (the target excludes it).
Each measurement is repeated `--repeat` times, raw and push alternating; page cache is
warmed first. Prints MB/s (10^6 bytes/s of blob data) of the best and the median run and
the push/raw ratios; the target is >= 0.9. On a busy machine the spread between runs is
large: read the median next to the best.

Run: `python bench/push/run.py [--extra-mib 300] [--repeat 3] [--backend both] [--json]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peerstar.ipfs import open_store  # noqa: E402
from peerstar.ipfsimage.push import push  # noqa: E402
from peerstar.source.sample import build_sample_image  # noqa: E402
from tests.support.jsipfs import start_jsipfs  # noqa: E402


def blob_files(layout: Path) -> list[Path]:
    return sorted((layout / "blobs" / "sha256").iterdir())


def warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(8 << 20):
                pass


async def raw_add(files: list[Path], store_kwargs: dict) -> tuple[float, list[str]]:
    store = open_store(**store_kwargs)
    try:
        start = time.perf_counter()
        cids = []
        for f in files:
            with open(f, "rb") as fh:
                cids.append(await store.add(fh, pin=True))
        return time.perf_counter() - start, cids
    finally:
        await store.close()


def do_push(layout: Path, store_kwargs: dict) -> tuple[float, str, dict[str, str]]:
    start = time.perf_counter()
    res = push(f"oci:{layout}", ipfs_address=store_kwargs.get("ipfs_address"),
               root=store_kwargs.get("root"), timeout=300, retries=0)
    return time.perf_counter() - start, res.cid, res.blobs


def measure(backend: str, kind: str, layout: Path, files: list[Path], tmp: Path,
            run: int) -> tuple[float, object]:
    """One timed run on a fresh store; returns (seconds, what it produced)."""
    daemon = None
    if backend == "daemon":
        daemon = start_jsipfs()
        kwargs: dict = {"ipfs_address": daemon.api_multiaddr, "timeout": 300, "retries": 0}
    else:
        root = tmp / f"store-{kind}-{run}"
        kwargs = {"root": root}
    try:
        warm(files)
        if kind == "raw":
            secs, cids = asyncio.run(raw_add(files, kwargs))
            return secs, cids
        secs, cid, blobs = do_push(layout, {k: v for k, v in kwargs.items()
                                            if k in ("ipfs_address", "root")})
        return secs, (cid, blobs)
    finally:
        if daemon is not None:
            daemon.stop()
        if backend == "embedded":
            shutil.rmtree(tmp / f"store-{kind}-{run}", ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extra-mib", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", choices=["both", "daemon", "embedded"], default="both")
    ap.add_argument("--json", action="store_true", help="also print a JSON summary")
    args = ap.parse_args()
    backends = ["daemon", "embedded"] if args.backend == "both" else [args.backend]

    with tempfile.TemporaryDirectory(prefix="peerstar-bench-push-") as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        image = build_sample_image(tmp / "layout", extra_mib=args.extra_mib, gzip_level=1)
        files = blob_files(image.path)
        total = sum(f.stat().st_size for f in files)
        print(f"image: {len(files)} blobs, {total / 1e6:.1f} MB "
              f"(built in {time.perf_counter() - t0:.1f} s)")
        summary: dict = {"blobs": len(files), "bytes": total, "results": {}}
        for backend in backends:
            times: dict[str, list[float]] = {"raw": [], "push": []}
            raw_cids: list[str] = []
            pushed: dict[str, str] = {}
            for run in range(args.repeat):
                # Alternate the order so neither side always gets the warmer machine.
                order = ["raw", "push"] if run % 2 == 0 else ["push", "raw"]
                for kind in order:
                    secs, out = measure(backend, kind, image.path, files, tmp, run)
                    times[kind].append(secs)
                    if kind == "raw":
                        raw_cids = out  # type: ignore[assignment]
                    else:
                        pushed = out[1]  # type: ignore[index]
            # Sanity: push stored the same blobs under the same CIDs as raw add.
            by_digest = {"sha256:" + f.name: c for f, c in zip(files, raw_cids, strict=True)}
            same = sum(1 for d, c in pushed.items() if by_digest.get(d) == c)
            name = "js-ipfs daemon" if backend == "daemon" else "embedded store"
            result: dict = {}
            for stat, pick in (("best", min), ("median", statistics.median)):
                raw_mbs = total / pick(times["raw"]) / 1e6
                push_mbs = total / pick(times["push"]) / 1e6
                ratio = push_mbs / raw_mbs
                print(f"{name:15s} {stat:6s}  raw add {raw_mbs:7.1f} MB/s  push "
                      f"{push_mbs:7.1f} MB/s  ratio {ratio:.2f}")
                result[stat] = {"raw_MBps": round(raw_mbs, 1), "push_MBps": round(push_mbs, 1),
                                "ratio": round(ratio, 3)}
            print(f"{name:15s}         {same} of {len(pushed)} pushed blobs have the CID raw "
                  f"add gave (the others: rewritten manifests/indexes); runs: raw "
                  f"{[round(t, 2) for t in times['raw']]} s, push "
                  f"{[round(t, 2) for t in times['push']]} s")
            summary["results"][backend] = result
        if args.json:
            print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
