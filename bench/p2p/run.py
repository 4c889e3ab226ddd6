"""Benchmark: reading images node to node over the private swarm vs locally, in one run.

Two "nodes" (network namespaces on a private bridge, tests/support/netns.py), each with
js-ipfs (same generated swarm key, B bootstrapping from A) and its own
`peerstar registry serve` on its own localhost:5050. Measured in the same run:

(a) a whole layer-sized blob (default 200 MiB of random bytes) added on A:
    `cat` on A (direct, local blocks) vs `cat` on B (every block over the swarm);
(b) the files a small workload needs (busybox, /etc/passwd, the sample text: what
    `busybox cat /etc/peerstar-sample.txt` opens) from the sample image pushed on A
    with `--estargz` (plus --extra-mib of data it does not read): a lazy read through
    B's registry (blocks from A over the swarm) vs the same lazy read through A's
    registry (local), vs `cat` of every layer on A.

Bytes: what the reader received, and what crossed B's veth (rx counter of B's eth0,
so libp2p framing and bitswap overhead are included). Needs root; leaves nothing behind.
Run: `python bench/p2p/run.py [--mib 200] [--extra-mib 64] [--json FILE]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peerstar.k8s.keys import generate_swarm_key  # noqa: E402
from peerstar.sample import SAMPLE_TEXT_PATH, build_sample_image  # noqa: E402
from tests.p2p import swarm  # noqa: E402
from tests.support.netns import Network, Node  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORKLOAD_FILES = ["/bin/busybox", "/etc/passwd", SAMPLE_TEXT_PATH]

# Runs inside a node: stream `cat` of a CID to nowhere, report bytes and seconds.
_CAT = r"""
import json, sys, time, urllib.request
url = sys.argv[1]
t = time.perf_counter(); n = 0
with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=1800) as r:
    while True:
        b = r.read(1 << 20)
        if not b:
            break
        n += len(b)
print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t}))
"""


def rx_bytes(node: Node) -> int:
    out = subprocess.run(["ip", "-n", node.netns, "-j", "-s", "link", "show", "eth0"],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])


def timed_cat(node: Node, cid: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{swarm.API_PORT}/api/v0/cat?arg={cid}"
    before = rx_bytes(node)
    proc = node.run([sys.executable, "-c", _CAT, url], timeout=1900)
    if proc.returncode != 0:
        raise SystemExit(f"cat in {node.label} failed: {proc.stderr.decode()[-2000:]}")
    res = json.loads(proc.stdout)
    res["wire_rx_bytes"] = rx_bytes(node) - before
    res["MBps"] = res["bytes"] / res["seconds"] / 1e6
    return res


def lazy(node: Node, cid: str, log: Path) -> dict[str, Any]:
    with swarm.registry(node, log):
        before = rx_bytes(node)
        proc = node.run([sys.executable, "-m", "tests.p2p.lazyread",
                         f"http://127.0.0.1:{swarm.REGISTRY_PORT}", cid, *WORKLOAD_FILES],
                        cwd=str(REPO), timeout=900, env=dict(os.environ, PYTHONPATH=str(REPO)))
        after = rx_bytes(node)
    if proc.returncode != 0:
        raise SystemExit(f"lazy read in {node.label} failed: {proc.stderr.decode()[-2000:]}")
    res = json.loads(proc.stdout)
    res.pop("data")
    res["wire_rx_bytes"] = after - before
    return res


def push(node: Node, layout: Path) -> str:
    proc = node.run([sys.executable, "-m", "peerstar", "push", "--estargz", "--ipfs-address",
                     f"/ip4/127.0.0.1/tcp/{swarm.API_PORT}", f"oci:{layout}:latest"],
                    cwd=str(REPO), timeout=900, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0:
        raise SystemExit(f"push failed: {proc.stderr.decode()[-2000:]}")
    return proc.stdout.decode().strip().splitlines()[-1]


def layer_cids(node: Node, cid: str) -> list[tuple[str, int]]:
    """(CID, size) of every layer of the pushed image, from its descriptors' ipfs URLs."""
    top = json.loads(swarm.cat(node, cid))
    manifest = top
    if "manifests" in top:
        url = top["manifests"][0]["urls"][0]
        manifest = json.loads(swarm.cat(node, url.removeprefix("ipfs://")))
    elif "urls" in top:  # a descriptor: follow it to the manifest
        manifest = json.loads(swarm.cat(node, top["urls"][0].removeprefix("ipfs://")))
        if "manifests" in manifest:
            url = manifest["manifests"][0]["urls"][0]
            manifest = json.loads(swarm.cat(node, url.removeprefix("ipfs://")))
    return [(layer["urls"][0].removeprefix("ipfs://"), layer["size"])
            for layer in manifest["layers"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=200, help="size of the blob in (a)")
    ap.add_argument("--extra-mib", type=int, default=64,
                    help="data in the sample image the workload does not read, for (b)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")

    results: dict[str, Any] = {"mib": args.mib, "extra_mib": args.extra_mib}
    key = generate_swarm_key().encode()
    with tempfile.TemporaryDirectory(prefix="peerstar-bench-p2p-") as tmp, Network() as net:
        work = Path(tmp)
        a, b = net.add_node("a"), net.add_node("b")
        daemons = []
        try:
            da = swarm.start_daemon(a, key)
            daemons.append(da)
            db = swarm.start_daemon(b, key, [da.swarm_multiaddr])
            daemons.append(db)
            if da.peer_id not in swarm.wait_for_peers(b, {da.peer_id}):
                raise SystemExit("B did not connect to A")

            # (a) a whole blob
            blob = os.urandom(args.mib << 20)
            cid = swarm.add(a, blob)
            del blob
            results["blob"] = {"direct_cat_on_A": timed_cat(a, cid),
                               "swarm_cat_on_B": timed_cat(b, cid)}

            # (b) the files a small workload needs
            image = build_sample_image(work / "layout", extra_mib=args.extra_mib)
            image_cid = push(a, image.path)
            layers = layer_cids(a, image_cid)
            cat_all = [timed_cat(a, c) for c, _ in layers]
            results["workload"] = {
                "files": WORKLOAD_FILES,
                "layers_size": sum(s for _, s in layers),
                "direct_cat_all_layers_on_A": {
                    "bytes": sum(r["bytes"] for r in cat_all),
                    "seconds": sum(r["seconds"] for r in cat_all)},
                "lazy_via_registry_on_A": lazy(a, image_cid, work / "reg-a.log"),
                "lazy_via_swarm_on_B": lazy(b, image_cid, work / "reg-b.log"),
            }
        finally:
            for d in daemons:
                with contextlib.suppress(Exception):
                    d.stop()

    blob = results["blob"]
    wl = results["workload"]
    mib = 1 << 20
    print(f"(a) whole {args.mib} MiB blob")
    for name, r in blob.items():
        print(f"  {name:28s} {r['bytes'] / mib:8.1f} MiB in {r['seconds']:7.2f} s "
              f"= {r['MBps']:7.1f} MB/s   B's veth rx {r['wire_rx_bytes'] / mib:8.1f} MiB")
    ratio = blob["swarm_cat_on_B"]["MBps"] / blob["direct_cat_on_A"]["MBps"]
    print(f"  swarm / direct throughput: {ratio:.2f}")
    print(f"(b) workload files {', '.join(WORKLOAD_FILES)} of a "
          f"{wl['layers_size'] / mib:.1f} MiB image")
    d = wl["direct_cat_all_layers_on_A"]
    print(f"  {'direct_cat_all_layers_on_A':28s} {d['bytes'] / mib:8.2f} MiB in "
          f"{d['seconds']:7.2f} s")
    for name in ("lazy_via_registry_on_A", "lazy_via_swarm_on_B"):
        r = wl[name]
        print(f"  {name:28s} {r['fetched'] / mib:8.2f} MiB by Range ({r['ranges']} reads) in "
              f"{r['seconds']:7.2f} s   veth rx {r['wire_rx_bytes'] / mib:8.2f} MiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
