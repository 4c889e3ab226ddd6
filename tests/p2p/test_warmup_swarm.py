"""The registry bridge's warm-up and leaf fan-out across nodes (`peerstar.registry.warmup`).

An eStargz image whose upper layer has prioritized files (8 MiB of extra data besides)
is pushed on node A. Node B's bridge is asked for the image manifest, and nothing else:
B's daemon then holds every layer's DAG root, its footer and TOC leaves and the leaves of
its prioritized range -- fetched from A in the background -- and none of the layers'
other leaves. Then a Range read over several leaves B does not hold returns the right
bytes, and the bridge's upstream log shows a `block_stat` of each of those leaves in
flight at once beside the read's cat (the fan-out), all of them over the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peerstar.estargz import Reader
from peerstar.ipfs.unixfs import CHUNK_SIZE, DagBuilder, chunk_bytes
from peerstar.source.sample import build_sample_image
from tests.p2p import swarm
from tests.support.jsipfs import JsIpfs
from tests.support.netns import Node

pytestmark = pytest.mark.slow

REGISTRY = f"http://127.0.0.1:{swarm.REGISTRY_PORT}"
ACCEPT = "Accept: application/vnd.oci.image.manifest.v1+json"
# in the upper layer: a 37-byte text, 70,000 random bytes and 1 MiB + 4097 random bytes
PRIORITIZED = ("/etc/peerstar-sample.txt", "/opt/peerstar/small-random.bin",
               "/opt/peerstar/random/extra-1.bin")


@dataclass
class LayerDag:
    """A layer blob of the pushed image and its DAG as `add --cid-version=1` lays it out."""

    digest: str
    blob: bytes
    root: str
    inner: list[str]  # CIDs of the nodes above the leaves
    leaves: list[str]  # leaf CIDs in file order

    @classmethod
    def of(cls, digest: str, blob: bytes) -> LayerDag:
        builder = DagBuilder()
        for piece in chunk_bytes(blob):
            builder.add_chunk(piece)
        root = str(builder.finish())
        return cls(digest, blob, root,
                   [str(b.cid) for b in builder.blocks if b.cid.codec.name == "dag-pb"],
                   [str(b.cid) for b in builder.blocks if b.cid.codec.name == "raw"])

    def leaves_of(self, start: int, end: int) -> list[str]:
        return self.leaves[start // CHUNK_SIZE:(end - 1) // CHUNK_SIZE + 1]


@dataclass
class Cluster:
    nodes: dict[str, Node]
    daemons: dict[str, JsIpfs]
    layout: Path
    logs: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("p2p-warmup")
    build_sample_image(work / "plain", extra_mib=8)
    proc = subprocess.run([sys.executable, "-m", "peerstar", "convert",
                           f"oci:{work / 'plain'}:latest", f"oci:{work / 'layout'}:latest",
                           "--estargz", "--prioritize", *PRIORITIZED],
                          cwd=str(swarm.REPO), capture_output=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(swarm.REPO)))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    with swarm.private_swarm("ab") as (nodes, daemons):
        yield Cluster(nodes, daemons, work / "layout", work)


def _layers(layout: Path) -> list[LayerDag]:
    def blob(digest: str) -> bytes:
        return (layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()

    [desc] = json.loads((layout / "index.json").read_bytes())["manifests"]
    manifest = json.loads(blob(desc["digest"]))
    return [LayerDag.of(layer["digest"], blob(layer["digest"])) for layer in manifest["layers"]]


def _upstream_lines(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"upstream":' in line:
            out.append(json.loads(line))
    return out


def test_manifest_warms_layers_on_b_then_a_multi_leaf_read_fans_out(cluster: Cluster) -> None:
    na, nb = cluster.nodes["a"], cluster.nodes["b"]
    a_id = cluster.daemons["a"].peer_id
    assert a_id in swarm.wait_for_peers(nb, {a_id})
    cid = swarm.push(na, cluster.layout)  # converted already: its blobs pushed as they are
    layers = _layers(cluster.layout)
    assert len(layers) == 2

    skeleton: set[str] = set()
    warm: set[str] = set()  # footer + TOC and prioritized leaves
    for layer in layers:
        r = Reader.from_bytes(layer.blob)
        skeleton |= {swarm.mh(c) for c in layer.inner}
        warm |= {swarm.mh(c) for c in layer.leaves_of(r.footer.toc_offset, len(layer.blob))}
        end = r.prefetch_end()
        if end:
            warm |= {swarm.mh(c) for c in layer.leaves_of(0, end)}
    upper = layers[1]
    prefetch_end = Reader.from_bytes(upper.blob).prefetch_end()
    assert prefetch_end and prefetch_end > 1 << 20  # the prioritized range: 5 leaves
    every_leaf = {swarm.mh(c) for layer in layers for c in layer.leaves}
    rest = every_leaf - warm
    assert len(rest) > 20  # 8 MiB of unprioritized data: "not the rest" means something
    assert not (skeleton | every_leaf) & swarm.local_blocks(nb)

    log = cluster.logs / "registry-b.log"
    with swarm.registry(nb, log):
        started = time.monotonic()
        body = swarm.http(nb, "GET", f"{REGISTRY}/v2/ipfs/{cid}/manifests/latest",
                          headers=[ACCEPT])
        assert [layer["digest"] for layer in json.loads(body)["layers"]] == [
            layer.digest for layer in layers]
        # only the manifest was asked for; the warm-up runs behind it
        deadline = time.monotonic() + 180
        while True:
            held = swarm.local_blocks(nb)
            if skeleton | warm <= held or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        warmed_after = time.monotonic() - started
        assert skeleton <= held, "skeleton nodes missing on B"
        assert warm <= held, f"{len(warm - held)} footer/TOC/prioritized leaves missing on B"
        assert not rest & held, f"{len(rest & held)} other leaves fetched"

        # a range over 5 leaves of the upper layer that B does not hold
        first = next(i for i, c in enumerate(upper.leaves)
                     if swarm.mh(c) in rest and all(swarm.mh(x) in rest
                                                    for x in upper.leaves[i:i + 5]))
        start, end = first * CHUNK_SIZE + 100, (first + 5) * CHUNK_SIZE - 100
        got = swarm.http(nb, "GET", f"{REGISTRY}/v2/ipfs/{cid}/blobs/{upper.digest}",
                         headers=[f"Range: bytes={start}-{end - 1}"])
        assert got == upper.blob[start:end]
        wanted = set(upper.leaves[first:first + 5])
        assert {swarm.mh(c) for c in wanted} <= swarm.local_blocks(nb)
    lines = _upstream_lines(log)
    stats = [x for x in lines if x["upstream"] == "fanout-stat" and x["cid"] in wanted]
    # each leaf's stat went out, over the network (>= slow_read: logged at INFO), and
    # all of them were in flight at once: each began before any of them ended
    assert {x["cid"] for x in stats} == wanted, stats
    assert max(x["ts"] for x in stats) < min(x["ts"] + x["ms"] / 1000 for x in stats)
    reads = [x for x in lines if x["upstream"] == "read" and x.get("blob") == upper.root]
    warm_ops = [x for x in lines if x["upstream"].startswith("warm-")]
    print(f"\nwarm-up: every expected block on B {warmed_after:.2f} s after the manifest "
          f"GET; {len(warm_ops)} warm-up operations needed the network "
          f"({', '.join(sorted({x['upstream'] for x in warm_ops}))}); the 5-leaf read: "
          f"{[(x['node'], x['ms']) for x in reads]} ms, fan-out stats "
          f"{sorted(x['ms'] for x in stats)} ms")
