"""Benchmark: eStargz conversion throughput, peerstar vs the Go reference, same run.

Builds a realistic layer locally (>= 200 MiB: many small files from this machine's
/usr tree plus a few large ones), then converts it with `peerstar.estargz.build` and
with the Go library's `estargz.Build` (the conformance oracle, Debian's v0.12.0 sources,
default GOMAXPROCS), both at the same gzip level and chunk size, and prints MB/s of
input and the ratio. Run: `python bench/convert/run.py [--mib 200] [--level 9]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peerstar.estargz import build  # noqa: E402
from tests.support.goracle import build_oracle  # noqa: E402


def make_layer(path: Path, mib: int) -> int:
    """A tar of real files from /usr (small ones) plus four large files; returns its size."""
    budget = mib << 20
    large = 4
    large_size = 12 << 20
    small_budget = budget - large * large_size
    total = 0
    roots = ["/usr/lib", "/usr/share", "/usr/bin"]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for root in roots:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for fn in sorted(filenames):
                    p = os.path.join(dirpath, fn)
                    if total >= small_budget or not os.path.isfile(p) or os.path.islink(p):
                        continue
                    size = os.path.getsize(p)
                    if size > 4 << 20:
                        continue
                    try:
                        tf.add(p, arcname="." + p, recursive=False)
                    except OSError:
                        continue
                    total += size
        for i in range(large):
            # Large files: compressible but not trivial (binary chunks of /usr/bin repeated).
            seed = open("/usr/bin/python3", "rb").read() if os.path.exists(
                "/usr/bin/python3") else os.urandom(1 << 20)
            data = (seed * (large_size // len(seed) + 1))[:large_size]
            data = bytes(b ^ (i * 37 & 0xFF) for b in data[: 1 << 20]) + data[1 << 20 :]
            ti = tarfile.TarInfo(f"./opt/large/blob{i}.bin")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
            total += len(data)
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--level", type=int, default=9)
    ap.add_argument("--chunk-size", type=int, default=4 << 20)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    oracle = build_oracle()
    with tempfile.TemporaryDirectory(prefix="peerstar-bench-") as td:
        tar = Path(td) / "layer.tar"
        size = make_layer(tar, args.mib)
        files = sum(1 for _ in tarfile.open(tar))
        results: dict[str, list[float]] = {"peerstar": [], "go": []}
        out_sizes = {}
        for _ in range(args.repeat):
            t = time.perf_counter()
            with open(tar, "rb") as src, open(Path(td) / "p.blob", "wb") as dst:
                res = build(src, dst, level=args.level, chunk_size=args.chunk_size)
            results["peerstar"].append(time.perf_counter() - t)
            out_sizes["peerstar"] = res.blob_size
            t = time.perf_counter()
            env = dict(os.environ)
            env.pop("GOMAXPROCS", None)  # the reference as it runs by default: all cores
            out = subprocess.run(
                [str(oracle), "build", "--level", str(args.level), "--chunk-size",
                 str(args.chunk_size), str(tar), str(Path(td) / "g.blob")],
                env=env, check=True, capture_output=True,
            )
            results["go"].append(time.perf_counter() - t)
            out_sizes["go"] = json.loads(out.stdout)["blobSize"]
        mb = size / 1e6
        p = min(results["peerstar"])
        g = min(results["go"])
        print(f"layer: {size / 2**20:.0f} MiB, {files} entries, gzip level {args.level}, "
              f"{os.cpu_count()} cores")
        print("| converter | time (s) | input MB/s | output MiB |")
        print("|---|---|---|---|")
        print(f"| peerstar | {p:.1f} | {mb / p:.1f} | {out_sizes['peerstar'] / 2**20:.1f} |")
        print(f"| Go estargz.Build | {g:.1f} | {mb / g:.1f} | {out_sizes['go'] / 2**20:.1f} |")
        print(f"ratio peerstar/Go throughput: {g / p:.2f}x")


if __name__ == "__main__":
    main()
