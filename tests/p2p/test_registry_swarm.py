"""Images across nodes: pushed on node A, read lazily on B through B's own registry.

Each node (network namespace) runs js-ipfs with the same swarm key, bootstrapping from
A, and its own `peerstar registry serve` on its own localhost:5050. A pushes the sample
image with `peerstar push --estargz`; B reads a file through B's registry with Range
requests, the blocks coming from A over the swarm; C then reads it with A stopped.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peerstar.source.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH, SampleImage, build_sample_image
from tests.p2p import swarm
from tests.support.jsipfs import JsIpfs
from tests.support.netns import Node

pytestmark = pytest.mark.slow

REGISTRY = f"http://127.0.0.1:{swarm.REGISTRY_PORT}"


@dataclass
class Cluster:
    nodes: dict[str, Node]
    daemons: dict[str, JsIpfs]
    image: SampleImage
    logs: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("p2p-registry")
    # 8 MiB of extra file data: a read of one small file must fetch far less than that.
    image = build_sample_image(work / "layout", extra_mib=8)
    with swarm.private_swarm("abc") as (nodes, daemons):
        yield Cluster(nodes, daemons, image, work)


def lazy_read(node: Node, cid: str, path: str) -> dict[str, object]:
    proc = node.run([sys.executable, "-m", "tests.p2p.lazyread", REGISTRY, cid, path],
                    cwd=str(swarm.REPO), timeout=300,
                    env=dict(os.environ, PYTHONPATH=str(swarm.REPO)))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return json.loads(proc.stdout)


def test_pushed_on_a_read_lazily_on_b_then_c_without_a(cluster: Cluster) -> None:
    na, nb, nc = (cluster.nodes[k] for k in "abc")
    a_id = cluster.daemons["a"].peer_id
    assert a_id in swarm.wait_for_peers(nb, {a_id})
    assert a_id in swarm.wait_for_peers(nc, {a_id})
    cid = swarm.push(na, cluster.image.path, estargz=True)
    assert not swarm.local_blocks(nb) & swarm.local_blocks(na)  # b holds none of it yet

    with swarm.registry(nb, cluster.logs / "registry-b.log"):
        got = lazy_read(nb, cid, SAMPLE_TEXT_PATH)
    assert base64.b64decode(got["data"]) == SAMPLE_TEXT
    # Lazy: footer, TOC and one chunk, not the layers (which hold 8 MiB of random data).
    assert 0 < got["fetched"] < got["layers_size"] // 4, got
    b_blocks = swarm.local_blocks(nb)
    assert b_blocks and b_blocks <= swarm.local_blocks(na)  # every block b got is a's
    assert len(b_blocks) < len(swarm.local_blocks(na)) // 2  # ...and far from all of them

    # C, with A gone: the same read is served by B's blocks over the swarm.
    cluster.daemons["a"].stop()
    swarm.rpc(nc, "swarm/connect", [("arg", cluster.daemons["b"].swarm_multiaddr)], timeout=60)
    assert swarm.peers(nc) == {cluster.daemons["b"].peer_id}
    assert not swarm.local_blocks(nc) & b_blocks
    with swarm.registry(nc, cluster.logs / "registry-c.log"):
        got_c = lazy_read(nc, cid, SAMPLE_TEXT_PATH)
    assert base64.b64decode(got_c["data"]) == SAMPLE_TEXT
    assert swarm.local_blocks(nc) and swarm.local_blocks(nc) <= b_blocks
