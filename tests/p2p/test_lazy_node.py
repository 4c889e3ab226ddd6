"""The whole path on one "node": an image pushed on node A runs lazily on node B.

Node B's network namespace holds its js-ipfs, its `peerstar registry serve` on B's own
localhost:5050 and the peerstar snapshotter. The snapshotter and `ctr-remote` enter only
B's network namespace (nsenter --net), not a mount namespace of their own (which
`ip netns exec` would give them), so the FUSE mounts are those containerd and runc see.
containerd itself needs no network for this: ctr-remote resolves and fetches in the
client, the snapshotter fetches the layers.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from peerstar.source.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH, SampleImage, build_sample_image
from tests.p2p import swarm
from tests.support.containerd import Containerd
from tests.support.jsipfs import JsIpfs
from tests.support.netns import Node
from tests.support.snapshotter import (
    SnapshotterProc,
    mounts_under,
    netns_prefix,
    running_stack,
)

pytestmark = pytest.mark.slow

SNAPSHOTTER_CONFIG = "[remote]\nprefetch_timeout = 5.0\nbackground_fetch = false\n"


@dataclass
class NodeB:
    a: Node
    b: Node
    daemons: dict[str, JsIpfs]
    image: SampleImage
    snapshotter: SnapshotterProc
    containerd: Containerd


@pytest.fixture(scope="module")
def node_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeB]:
    work = tmp_path_factory.mktemp("p2p-lazy")
    image = build_sample_image(work / "layout", extra_mib=8)
    # Stopped in reverse: B's registry, then containerd and the snapshotter (which
    # unmounts the lazy layers); the swarm goes last.
    with swarm.private_swarm("ab") as (nodes, daemons):
        a, b = nodes["a"], nodes["b"]
        with running_stack(SNAPSHOTTER_CONFIG, prefix=netns_prefix(b)) as stack, \
                swarm.registry(b, work / "registry-b.log"):
            yield NodeB(a, b, daemons, image, stack.snapshotter, stack.containerd)


def test_rpull_and_run_lazily_on_b(node_b: NodeB) -> None:
    a_id = node_b.daemons["a"].peer_id
    assert a_id in swarm.wait_for_peers(node_b.b, {a_id})
    cid = swarm.push(node_b.a, node_b.image.path, estargz=True)
    ref = f"localhost:{swarm.REGISTRY_PORT}/ipfs/{cid}:latest"
    ctr = node_b.containerd.ctr
    argv = [*netns_prefix(node_b.b), ctr.ctr_remote_binary, "--address", ctr.address,
            "--namespace", ctr.namespace, "image", "rpull", "--plain-http", "--snapshotter",
            "peerstar", ref]
    proc = subprocess.run(argv, capture_output=True, timeout=300)
    assert proc.returncode == 0, (proc.stderr.decode(errors="replace")[-3000:],
                                  node_b.snapshotter.log()[-3000:])

    # Every layer is a lazy FUSE mount; containerd's content store never got the layers.
    fuse = mounts_under(node_b.snapshotter.root)
    assert len(fuse) == len(node_b.image.layers), (fuse, node_b.snapshotter.log()[-3000:])
    layers = {layer["digest"] for layer in manifest(node_b.b, cid)["layers"]}
    assert len(layers) == len(node_b.image.layers)
    content = {line.split()[0] for line in ctr.lines("content", "ls")[1:]}
    assert content and not content & layers
    out = ctr.text("run", "--snapshotter", "peerstar", "--rm", ref, "p2p-cat", "cat",
                   SAMPLE_TEXT_PATH)
    assert out == SAMPLE_TEXT.decode()

    # Lazy and node to node: b holds only blocks it got from a, far from all of them.
    b_blocks, a_blocks = swarm.local_blocks(node_b.b), swarm.local_blocks(node_b.a)
    assert b_blocks and b_blocks <= a_blocks
    assert len(b_blocks) < len(a_blocks) // 2


def manifest(node: Node, cid: str) -> dict[str, Any]:
    """The image manifest as the node's registry serves it (through the index if any)."""
    accept = ("Accept: application/vnd.oci.image.index.v1+json, "
              "application/vnd.oci.image.manifest.v1+json")
    base = f"http://127.0.0.1:{swarm.REGISTRY_PORT}/v2/ipfs/{cid}/manifests"
    doc = json.loads(swarm.http(node, "GET", f"{base}/latest", headers=[accept]))
    if "manifests" in doc:
        digest = doc["manifests"][0]["digest"]
        doc = json.loads(swarm.http(node, "GET", f"{base}/{digest}", headers=[accept]))
    return doc
