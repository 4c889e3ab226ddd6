"""The bridge as the cluster's registry mirror, end to end with real parts.

Four network namespaces: an upstream (Debian's docker-registry, access log on, so the
bytes it serves are counted) and three nodes, each with js-ipfs (one swarm key), its
bridge `peerstar registry serve --mirror http://UPSTREAM` on its own localhost:5050 and
a containerd whose `ctr image pull --hosts-dir` uses the hosts.toml that
`peerstar k8s containerd-config --hosts-dir` writes. The image is pulled by its ordinary
name `UPSTREAM/team/app:1` and run.

- node a pulls it through its bridge: the upstream serves each blob once;
- node b pulls it: zero blob bytes from the upstream (the bridges found a's CIDs over
  pubsub and the blocks came over the swarm);
- the upstream stops: node c still pulls by tag (the digest last seen in the cluster)
  and by digest;
- the upstream comes back with the tag moved: the next pull gets the new digest.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peerstar.registry.directory import TOPIC
from peerstar.source.sample import (
    SAMPLE_TEXT,
    SAMPLE_TEXT_PATH,
    SampleImage,
    build_sample_image,
)
from tests.p2p import swarm
from tests.support.cli import run_peerstar
from tests.support.containerd import Containerd, HarnessError, start_containerd
from tests.support.jsipfs import JsIpfs
from tests.support.netns import Node
from tests.support.registry import DockerRegistry, start_registry

pytestmark = pytest.mark.slow

TAG_TTL = "2s"


@dataclass
class Cluster:
    nodes: dict[str, Node]
    daemons: dict[str, JsIpfs]
    upstream: DockerRegistry
    containerds: dict[str, Containerd]
    hosts_dir: Path
    images: tuple[SampleImage, SampleImage]

    @property
    def name(self) -> str:
        return f"{self.upstream.host}/team/app"


def _push(node: Node, base: str, tag: str, layout: Path) -> str:
    code = ("import sys; from pathlib import Path; from tests.support.registry import "
            "push_layout; print(push_layout(sys.argv[1], 'team/app', sys.argv[2], "
            "Path(sys.argv[3])))")
    proc = node.run([sys.executable, "-c", code, base, tag, str(layout)], cwd=str(swarm.REPO),
                    env=dict(os.environ, PYTHONPATH=str(swarm.REPO)), timeout=120)
    if proc.returncode != 0:
        raise HarnessError(f"push to {base}: {proc.stderr.decode(errors='replace')[-2000:]}")
    return proc.stdout.decode().split()[-1]


def _topic_peers(node: Node) -> set[str]:
    arg = "u" + base64.urlsafe_b64encode(TOPIC.encode()).decode().rstrip("=")
    res = swarm.rpc(node, "pubsub/peers", [("arg", arg)]) or {}
    return set(res.get("Strings") or [])


def wait_for_topic(nodes: dict[str, Node], daemons: dict[str, JsIpfs], labels: str,
                   timeout: float = 30.0) -> None:
    """Wait until the bridges' pubsub mesh is up: the first node (every other node's
    bootstrap peer) sees every other node on the directory's topic, and each of them sees
    it."""
    first, others = labels[0], labels[1:]
    want = {daemons[x].peer_id for x in others}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if want <= _topic_peers(nodes[first]) and all(
                daemons[first].peer_id in _topic_peers(nodes[x]) for x in others):
            return
        time.sleep(0.3)
    raise HarnessError(f"the bridges' pubsub mesh did not form within {timeout} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("p2p-mirror")
    images = (build_sample_image(work / "v1", extra_mib=2),
              build_sample_image(work / "v2", extra_mib=1))
    with swarm.private_swarm("abc", bare="u") as (nodes, daemons):
        upstream = start_registry(work / "upstream", access_log=True, node=nodes["u"])
        containerds: dict[str, Containerd] = {}
        try:
            _push(nodes["u"], upstream.url, "1", images[0].path)
            hosts_dir = work / "hosts"
            proc = run_peerstar("k8s", "containerd-config", "--mirror", upstream.url,
                                "--hosts-dir", hosts_dir)
            assert proc.returncode == 0, proc.stderr
            for label in "abc":
                containerds[label] = start_containerd()
            with (swarm.registry(nodes["a"], work / "bridge-a.log", *_bridge_args(upstream)),
                  swarm.registry(nodes["b"], work / "bridge-b.log", *_bridge_args(upstream)),
                  swarm.registry(nodes["c"], work / "bridge-c.log", *_bridge_args(upstream))):
                wait_for_topic(nodes, daemons, "abc")
                yield Cluster(nodes, daemons, upstream, containerds, hosts_dir, images)
        finally:
            for c in containerds.values():
                c.stop()
            upstream.stop()


def _bridge_args(upstream: DockerRegistry) -> list[str]:
    # A lookup timeout above the default: this machine's 2 vCPUs run four nodes.
    return ["--mirror", upstream.url, "--mirror-tag-ttl", TAG_TTL,
            "--mirror-lookup-timeout", "300ms"]


def _pull(cluster: Cluster, label: str, ref: str) -> None:
    c = cluster.containerds[label]
    proc = cluster.nodes[label].run(
        ["ctr", "--address", c.address, "--namespace", c.namespace, "image", "pull",
         "--hosts-dir", str(cluster.hosts_dir), ref], timeout=180)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]


def _digest(c: Containerd, ref: str) -> str:
    for line in c.ctr.lines("images", "ls")[1:]:
        cols = line.split()
        if cols[0] == ref:
            return cols[2]
    raise AssertionError(f"{ref} not in ctr images ls")


def _run(c: Containerd, ref: str, name: str) -> bytes:
    return c.ctr.run("run", "--rm", ref, name, "cat", SAMPLE_TEXT_PATH).stdout


def test_mirror_across_nodes(cluster: Cluster) -> None:
    up = cluster.upstream
    ref = f"{cluster.name}:1"
    image = cluster.images[0]
    blobs = [image.config_digest, *image.layer_digests]
    assert up.bytes_served() == 0

    _pull(cluster, "a", ref)
    assert _digest(cluster.containerds["a"], ref) == image.manifest_digest
    assert _run(cluster.containerds["a"], ref, "mirror-a") == SAMPLE_TEXT
    served = up.bytes_served()
    # Each blob left the upstream exactly once (through a's bridge, not around it).
    assert all(up.bytes_served(d) > 0 for d in blobs)
    assert served == sum(up.bytes_served(d) for d in blobs)
    bridge_a = (cluster.hosts_dir.parent / "bridge-a.log").read_text()
    assert f"/v2/team/app/blobs/{image.layer_digests[-1]}" in bridge_a

    _pull(cluster, "b", ref)
    assert _run(cluster.containerds["b"], ref, "mirror-b") == SAMPLE_TEXT
    assert up.bytes_served() == served  # zero blob bytes from the upstream for node b

    up.take_down()
    try:
        _pull(cluster, "c", ref)
        assert _digest(cluster.containerds["c"], ref) == image.manifest_digest
        by_digest = f"{cluster.name}@{image.manifest_digest}"
        _pull(cluster, "c", by_digest)
        assert _run(cluster.containerds["c"], by_digest, "mirror-c") == SAMPLE_TEXT
    finally:
        up.bring_back()
    assert up.bytes_served() == served

    moved = _push(cluster.nodes["u"], up.url, "1", cluster.images[1].path)
    assert moved == cluster.images[1].manifest_digest
    time.sleep(2.2)  # the tag TTL
    _pull(cluster, "b", ref)
    assert _digest(cluster.containerds["b"], ref) == moved
