"""Benchmark: time and memory of peerstar on hostile inputs (issue #17 item 4).

Times `peerstar convert` and `peerstar estargz verify` on a chain of N hardlinks (each
to the one before; the reader's resolution was quadratic: 5,000 took 8.7 s and 20,000
did not finish in 25 s), for several N, and prints each run's peak RSS; then the peak
RSS of verify and cat on decompression bombs and one huge chunk. Linear means the time
per link stays flat as N grows.
Run: `flock /tmp/peerstar-bench.lock python bench/hostile/run.py [--links 5000 20000 80000]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.estargz.hostile import (  # noqa: E402
    member,
    run_cli,
    tar,
    toc_json,
    zeros_digest,
    zstd_blob,
    zstd_rle_frame,
)


def timed(*args: str) -> tuple[float, int]:
    t = time.perf_counter()
    r = run_cli(*args, timeout=3600)
    elapsed = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    return elapsed, r.maxrss_kib


def hardlinks(tmp: Path, n: int) -> None:
    src = tmp / f"chain{n}.tar"
    parts = [member("f0", b"data\n")]
    parts += [member(f"f{i}", typeflag=b"1", linkname=f"f{i - 1}") for i in range(1, n)]
    src.write_bytes(tar(*parts))
    dst = tmp / f"chain{n}.esgz"
    c, c_rss = timed("convert", str(src), str(dst))
    v, v_rss = timed("estargz", "verify", str(dst))
    print(f"| hardlink chain of {n:>6} | convert {c:6.2f} s ({c / n * 1e6:5.1f} us/link, "
          f"{c_rss >> 10} MiB) | verify {v:6.2f} s ({v / n * 1e6:5.1f} us/link, "
          f"{v_rss >> 10} MiB) |")


def bombs(tmp: Path) -> None:
    n = 1 << 20
    blob = tmp / "bomb.zst"
    entry = {"name": "f", "type": "reg", "size": n, "offset": 0, "digest": zeros_digest(n),
             "chunkDigest": zeros_digest(n)}
    blob.write_bytes(zstd_blob(toc_json([entry]), zstd_rle_frame(2 << 30)))
    for cmd in (["estargz", "verify", str(blob)], ["estargz", "cat", str(blob), "f"]):
        t, rss = timed(*cmd)
        print(f"| zstd chunk of 1 MiB inflating to 2 GiB, {cmd[1]} | {t:.2f} s | {rss >> 10} MiB |")
    big = 1 << 30
    blob = tmp / "huge.zst"
    entry = {"name": "f", "type": "reg", "size": big, "offset": 0,
             "digest": zeros_digest(big), "chunkDigest": zeros_digest(big)}
    blob.write_bytes(zstd_blob(toc_json([entry]), zstd_rle_frame(big)))
    for cmd in (["estargz", "verify", str(blob)], ["estargz", "cat", str(blob), "f"]):
        t, rss = timed(*cmd)
        print(f"| one 1 GiB chunk, {cmd[1]} | {t:.2f} s | {rss >> 10} MiB |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--links", type=int, nargs="+", default=[5000, 20000, 80000])
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="peerstar-bench-hostile-") as d:
        tmp = Path(d)
        for n in args.links:
            hardlinks(tmp, n)
        bombs(tmp)


if __name__ == "__main__":
    main()
