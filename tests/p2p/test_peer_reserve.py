"""Peers re-serve what they fetched: node C, started after node B ran an image lazily and
after node A (which pushed it) stopped its daemon, runs the same image lazily from B's
blocks alone.

Each node is a network namespace with its own js-ipfs (one private swarm), its own
`peerstar registry serve` on its own localhost:5050, a peerstar snapshotter in its
network namespace (nsenter --net, so its FUSE mounts are the ones containerd sees) and
a containerd; `ctr-remote` pulls inside the node's namespace.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from peerstar.k8s.keys import generate_swarm_key
from peerstar.source.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH, build_sample_image
from tests.p2p import swarm
from tests.p2p.test_lazy_node import SNAPSHOTTER_CONFIG
from tests.support.containerd import Containerd, HarnessError
from tests.support.netns import Network, Node
from tests.support.snapshotter import netns_prefix, running_stack

pytestmark = pytest.mark.slow


@contextmanager
def lazy_node(node: Node, work: Path) -> Iterator[Containerd]:
    """The node's bridge, snapshotter and containerd (proxy plugin `peerstar`)."""
    with running_stack(SNAPSHOTTER_CONFIG, prefix=netns_prefix(node),
                       namespace=f"p2p-{node.label}") as stack, \
            swarm.registry(node, work / f"registry-{node.label}.log"):
        yield stack.containerd


def run_lazily(node: Node, containerd: Containerd, ref: str) -> str:
    """rpull through the node's bridge, then `cat` the sample text in a container."""
    ctr = containerd.ctr
    proc = subprocess.run(
        [*netns_prefix(node), ctr.ctr_remote_binary, "--address", ctr.address, "--namespace",
         ctr.namespace, "image", "rpull", "--plain-http", "--snapshotter", "peerstar", ref],
        capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return ctr.text("run", "--snapshotter", "peerstar", "--rm", ref, f"reserve-{node.label}",
                    "cat", SAMPLE_TEXT_PATH)


def test_c_runs_the_image_lazily_from_b_after_a_is_gone(tmp_path: Path) -> None:
    image = build_sample_image(tmp_path / "layout", extra_mib=8)
    key = generate_swarm_key().encode()
    with ExitStack() as stack:
        try:
            net = stack.enter_context(Network())
            a, b = net.add_node("a"), net.add_node("b")
            da = swarm.start_daemon(a, key)
            stack.callback(da.stop)
            db = swarm.start_daemon(b, key, [da.swarm_multiaddr])
            stack.callback(db.stop)
        except HarnessError as exc:
            pytest.fail(f"cannot start the swarm: {exc}", pytrace=False)
        assert da.peer_id in swarm.wait_for_peers(b, {da.peer_id})
        cid = swarm.push(a, image.path, estargz=True)
        ref = f"localhost:{swarm.REGISTRY_PORT}/ipfs/{cid}:latest"
        a_blocks = swarm.local_blocks(a)

        with lazy_node(b, tmp_path) as containerd_b:
            assert run_lazily(b, containerd_b, ref) == SAMPLE_TEXT.decode()
        b_blocks = swarm.local_blocks(b)
        assert b_blocks and b_blocks <= a_blocks and len(b_blocks) < len(a_blocks) // 2

        da.stop()  # A is gone for good; C starts afterwards and knows only B
        c = net.add_node("c")
        dc = swarm.start_daemon(c, key, [db.swarm_multiaddr])
        stack.callback(dc.stop)
        assert db.peer_id in swarm.wait_for_peers(c, {db.peer_id})
        assert da.peer_id not in swarm.peers(c)
        with lazy_node(c, tmp_path) as containerd_c:
            assert run_lazily(c, containerd_c, ref) == SAMPLE_TEXT.decode()
        # Every block C holds came from B (A was gone), and C too fetched only part.
        c_blocks = swarm.local_blocks(c)
        assert c_blocks and c_blocks <= b_blocks
