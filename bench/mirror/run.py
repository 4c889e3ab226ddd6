"""Benchmark: N nodes pull the same image at once, through the mirror vs from the upstream.

What issue 16 asks of the mirror: with `peerstar registry serve --mirror` on every node,
a cluster pulling one image should cost the upstream one image's worth of bytes, not N.
All on this machine, with real parts:

- an upstream (Debian's docker-registry, access log on) and N nodes, each a network
  namespace (tests/support/netns.py); each node has js-ipfs (one swarm key), a containerd
  of its own and, in mirror mode, its bridge on its localhost:5050
  (`--mirror http://UPSTREAM`) with the hosts.toml `peerstar k8s containerd-config`
  writes;
- the image: peerstar.source.sample's with --extra-mib MiB of random data, pushed to the
  upstream under a new tag per round (fresh layers, so no node or bridge holds them);
- per round and mode, fresh containerd roots; the N nodes start
  `ctr image pull [--hosts-dir DIR] UPSTREAM/bench/app:TAG` + `ctr run ... cat
  /etc/peerstar-sample.txt` at the same moment.

  direct  `ctr image pull --plain-http` straight from the upstream;
  mirror  through each node's bridge (ordinary name, hosts.toml), bridges started fresh
          (their IPFS keeps nothing of the image: the layers are new per round).

Per round and mode: the upstream's blob bytes (its access log), and the time from the
start to the workload's output on the last node (and the first). Prints a markdown
table of medians.

Run as root: `flock /tmp/peerstar-bench.lock python bench/mirror/run.py [--nodes 3]
[--rounds 3] [--extra-mib 64] [--json FILE] [--work DIR]` (DIR keeps the bridges' logs,
whose `"upstream": "mirror"` lines say where each digest came from).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peerstar.source.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH, build_sample_image  # noqa: E402
from tests.p2p import swarm  # noqa: E402
from tests.p2p.test_mirror import _push, wait_for_topic  # noqa: E402
from tests.support.cli import run_peerstar  # noqa: E402
from tests.support.containerd import Containerd, start_containerd  # noqa: E402
from tests.support.netns import Node  # noqa: E402
from tests.support.registry import DockerRegistry, start_registry  # noqa: E402

MODES = ("direct", "mirror")


def _pull_and_run(node: Node, c: Containerd, ref: str, hosts_dir: Path | None,
                  t0: float, out: dict[str, float]) -> None:
    pull = ["ctr", "--address", c.address, "--namespace", c.namespace, "image", "pull"]
    pull += ["--hosts-dir", str(hosts_dir)] if hosts_dir else ["--plain-http"]
    proc = node.run([*pull, ref], timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"pull on {node.label}: {proc.stderr.decode()[-2000:]}")
    got = c.ctr.run("run", "--rm", ref, f"bench-{node.label}", "cat", SAMPLE_TEXT_PATH).stdout
    if got != SAMPLE_TEXT:
        raise RuntimeError(f"{node.label}: wrong output {got[:100]!r}")
    out[node.label] = time.monotonic() - t0


def _round(nodes: list[Node], up: DockerRegistry, ref: str, hosts_dir: Path | None
           ) -> dict[str, float]:
    containerds = [start_containerd() for _ in nodes]
    try:
        before = up.bytes_served()
        done: dict[str, float] = {}
        t0 = time.monotonic()
        threads = [threading.Thread(target=_pull_and_run, args=(n, c, ref, hosts_dir, t0, done))
                   for n, c in zip(nodes, containerds, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len(done) != len(nodes):
            raise RuntimeError("a node failed; see above")
        return {"upstream_bytes": up.bytes_served() - before, "last_s": max(done.values()),
                "first_s": min(done.values())}
    finally:
        for c in containerds:
            c.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--extra-mib", type=int, default=64)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, help="keep the bridges' logs and images here "
                    "(default: a temporary directory, removed)")
    args = ap.parse_args()
    if args.nodes < 2:
        ap.error("--nodes must be at least 2")
    labels = "".join(chr(ord("a") + i) for i in range(args.nodes))
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="peerstar-bench-mirror-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        with swarm.private_swarm(labels, bare="u") as (nodes, daemons):
            up = start_registry(work / "upstream", access_log=True, node=nodes["u"])
            try:
                hosts_dir = work / "hosts"
                proc = run_peerstar("k8s", "containerd-config", "--mirror", up.url,
                                    "--hosts-dir", hosts_dir)
                assert proc.returncode == 0, proc.stderr
                node_list = [nodes[label] for label in labels]
                for r in range(args.rounds):
                    for m, mode in enumerate(MODES):
                        tag = f"{mode}-{r}"
                        layout = work / f"img-{tag}"
                        # The sample's data is deterministic: another gzip level per round
                        # and mode gives every layer new bytes, so no node holds them.
                        img = build_sample_image(layout, extra_mib=args.extra_mib,
                                                 gzip_level=1 + (2 * r + m) % 9)
                        _push(nodes["u"], up.url, tag, layout)
                        image = sum(layer.size for layer in img.layers) + len(
                            (layout / "blobs" / "sha256" /
                             img.config_digest.split(":")[1]).read_bytes())
                        ref = f"{up.host}/team/app:{tag}"
                        if mode == "direct":
                            results[mode].append(_round(node_list, up, ref, None))
                            results[mode][-1]["image_bytes"] = image
                        else:
                            with contextlib.ExitStack() as stack:
                                for label in labels:
                                    stack.enter_context(swarm.registry(
                                        nodes[label], work / f"bridge-{label}-{tag}.log",
                                        "--mirror", up.url, "--mirror-lookup-timeout",
                                        "300ms"))
                                wait_for_topic(nodes, daemons, labels)
                                results[mode].append(_round(node_list, up, ref, hosts_dir))
                                results[mode][-1]["image_bytes"] = image
                        print(f"round {r} {mode}: {results[mode][-1]}", file=sys.stderr,
                              flush=True)
            finally:
                up.stop()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    image_mib = statistics.median(x["image_bytes"] for m in MODES for x in results[m]) / 2**20
    print(f"\nbench/mirror, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
          f"commit {commit}, {args.nodes} nodes pulling at once, image ~{image_mib:.1f} MiB "
          f"of blobs, medians of {args.rounds} rounds\n")
    print("| mode | upstream blob bytes (MiB) | x image | first node output (s) | "
          "last node output (s) |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        rows = results[mode]
        ub = statistics.median(x["upstream_bytes"] for x in rows) / 2**20
        ratio = statistics.median(x["upstream_bytes"] / x["image_bytes"] for x in rows)
        print(f"| {mode} | {ub:.1f} | {ratio:.2f} | "
              f"{statistics.median(x['first_s'] for x in rows):.1f} | "
              f"{statistics.median(x['last_s'] for x in rows):.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"nodes": args.nodes, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench/mirror needs root (network namespaces, containerd)")
    sys.exit(main())
