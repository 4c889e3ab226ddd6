"""An eStargz image by its ordinary name runs lazily on a node with chunks from another
node, through the bridges' mirror mode and containerd's hosts.toml (issue 16, item 4),
pulled with ctr-remote and with CRI.

Four network namespaces: an upstream (Debian's docker-registry, access log on) and nodes
a, b and c, each with js-ipfs (one swarm key) and its bridge `peerstar registry serve
--mirror http://UPSTREAM`. Node a pulls the image whole through its bridge (`ctr image
pull --hosts-dir`), which puts every blob in a's IPFS and announces it. Node b (ctr-remote)
and node c (CRI) then each run the peerstar snapshotter in their namespace with `[remote]
hosts_dir` = the hosts.toml that `peerstar k8s containerd-config` wrote: b with
`ctr-remote image rpull --hosts-dir`, c with a containerd in c's namespace whose CRI
plugin has that hosts.toml as `config_path` and pulls through the kubelet's PullImage.
Their layers are mounted lazily from their own bridge, which answers the ranges from the
blocks of the cluster at once (checking each layer whole in the background). The upstream
serves no byte to b or c.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peerstar.source.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH
from tests.p2p import swarm
from tests.p2p.test_mirror import wait_for_topic
from tests.support.cli import run_peerstar
from tests.support.containerd import (
    CRI_NAMESPACE,
    CriOptions,
    Ctr,
    HarnessError,
    start_containerd,
)
from tests.support.cri.client import CriImages
from tests.support.netns import Node
from tests.support.registry import DockerRegistry, start_registry
from tests.support.snapshotter import Stack, mounts_under, netns_prefix, running_stack

pytestmark = pytest.mark.slow

REPO = "team/lazy"


def _push_estargz(node: Node, base: str) -> list[str]:
    """The snapshotter tests' eStargz sample image pushed from inside `node`; its layer
    digests."""
    code = ("import sys; from tests.snapshotter.test_lazy_pull import push_image; "
            "print(' '.join(la.digest for la in push_image(sys.argv[1], sys.argv[2], 'v1', "
            "estargz=True, extra_mib=8)))")
    proc = node.run([sys.executable, "-c", code, base, REPO], cwd=str(swarm.REPO),
                    env=dict(os.environ, PYTHONPATH=str(swarm.REPO)), timeout=180)
    if proc.returncode != 0:
        raise HarnessError(f"push to {base}: {proc.stderr.decode(errors='replace')[-2000:]}")
    return proc.stdout.decode().split()


def _json_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                out.append(entry)
    return out



@dataclass
class Mirrored:
    """The cluster once node a has pulled the image through its bridge."""

    nodes: dict[str, Node]
    upstream: DockerRegistry
    ref: str
    layers: list[str]  # the image's layer digests
    hosts: Path  # the hosts.toml directory `peerstar k8s containerd-config` wrote
    work: Path  # the bridges' logs: bridge-<label>.log
    served: int  # the upstream's bytes served after a's pull


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirrored]:
    work = tmp_path_factory.mktemp("p2p-mirror-lazy")
    with swarm.private_swarm("abc", bare="u") as (nodes, daemons):
        upstream = start_registry(work / "upstream", access_log=True, node=nodes["u"])
        try:
            layers = _push_estargz(nodes["u"], upstream.url)
            ref = f"{upstream.host}/{REPO}:v1"
            hosts = work / "hosts"
            proc = run_peerstar("k8s", "containerd-config", "--mirror", upstream.url,
                                "--hosts-dir", hosts)
            assert proc.returncode == 0, proc.stderr
            args = ["--mirror", upstream.url, "--mirror-lookup-timeout", "300ms"]
            with contextlib.ExitStack() as bridges:
                for label in "abc":
                    bridges.enter_context(swarm.registry(
                        nodes[label], work / f"bridge-{label}.log", *args))
                wait_for_topic(nodes, daemons, "abc")
                full = start_containerd()
                try:
                    pull = nodes["a"].run(
                        ["ctr", "--address", full.address, "--namespace", full.namespace,
                         "image", "pull", "--hosts-dir", str(hosts), ref], timeout=180)
                    assert pull.returncode == 0, pull.stderr.decode(errors="replace")[-3000:]
                finally:
                    full.stop()
                assert all(upstream.bytes_served(d) > 0 for d in layers)
                yield Mirrored(nodes, upstream, ref, layers, hosts, work,
                               upstream.bytes_served())
        finally:
            upstream.stop()


def _snapshotter_config(m: Mirrored) -> str:
    return (f'[remote]\nhosts_dir = "{m.hosts}"\nbackground_fetch = false\n'
            "prefetch_timeout = 5.0\n")


def _assert_lazy_from_peers(m: Mirrored, label: str, stack: Stack) -> None:
    """Every layer of the image mounted lazily on node `label` from its own bridge in
    mirror mode, the bridge answering their ranges from the cluster's blocks, and not one
    more byte from the upstream."""
    log = stack.snapshotter.log()
    assert len(mounts_under(stack.snapshotter.root)) == len(m.layers), log[-3000:]
    for digest in m.layers:
        assert f"layer {digest} mounted lazily from http://localhost:{swarm.REGISTRY_PORT}" \
               f"/v2/{REPO}/blobs/{digest}?ns=" in log, log[-3000:]
    assert m.upstream.bytes_served() == m.served
    # The bridge answered the snapshotter's ranges from the CIDs of other nodes at once
    # (then checked each layer whole, in the background, which brings its blocks to the
    # node as a background fetch would): every block the node holds is one of those a
    # stored from the upstream, so it came from the swarm.
    ranged = {entry.get("digest") for entry in _json_lines(m.work / f"bridge-{label}.log")
              if entry.get("upstream") == "mirror-ranged"}
    assert set(m.layers) <= ranged, ranged
    blocks = swarm.local_blocks(m.nodes[label])
    assert blocks and blocks <= swarm.local_blocks(m.nodes["a"])


def test_estargz_by_name_runs_lazily_on_b_from_a(mirrored: Mirrored) -> None:
    m = mirrored
    with running_stack(_snapshotter_config(m), prefix=netns_prefix(m.nodes["b"])) as stack:
        ctr = stack.containerd.ctr
        argv = [*netns_prefix(m.nodes["b"]), ctr.ctr_remote_binary, "--address", ctr.address,
                "--namespace", ctr.namespace, "image", "rpull", "--plain-http",
                "--hosts-dir", str(m.hosts), "--snapshotter", "peerstar", m.ref]
        rpull = subprocess.run(argv, capture_output=True, timeout=300)
        assert rpull.returncode == 0, (rpull.stderr.decode(errors="replace")[-3000:],
                                       stack.snapshotter.log()[-3000:])
        out = ctr.text("run", "--snapshotter", "peerstar", "--rm", m.ref, "mirror-lazy",
                       "cat", SAMPLE_TEXT_PATH)
        assert out == SAMPLE_TEXT.decode()
        _assert_lazy_from_peers(m, "b", stack)


def test_cri_pull_by_name_runs_lazily_on_c_from_the_cluster(mirrored: Mirrored) -> None:
    # containerd's CRI plugin pulls from the daemon, so c's containerd runs in c's
    # namespace, where its hosts.toml's mirror (localhost:5050) is c's bridge.
    m = mirrored
    cri = CriOptions(snapshotter="peerstar", config_path=str(m.hosts))
    prefix = netns_prefix(m.nodes["c"])
    with running_stack(_snapshotter_config(m), cri=cri, prefix=prefix,
                       containerd_prefix=prefix) as stack:
        with CriImages(stack.containerd.address, timeout=300) as images:
            images.pull(m.ref)
        ctr = Ctr(stack.containerd.address, CRI_NAMESPACE)
        out = ctr.text("run", "--snapshotter", "peerstar", "--rm", m.ref, "mirror-lazy-cri",
                       "cat", SAMPLE_TEXT_PATH)
        assert out == SAMPLE_TEXT.decode()
        _assert_lazy_from_peers(m, "c", stack)
