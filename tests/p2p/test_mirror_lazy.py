"""An eStargz image by its ordinary name runs lazily on node b with chunks from node a,
through the bridges' mirror mode and containerd's hosts.toml (issue 16, item 4).

Three network namespaces: an upstream (Debian's docker-registry, access log on) and nodes
a and b, each with js-ipfs (one swarm key) and its bridge `peerstar registry serve
--mirror http://UPSTREAM`. Node a pulls the image whole through its bridge (`ctr image
pull --hosts-dir`), which puts every blob in a's IPFS and announces it. Node b runs the
peerstar snapshotter in its namespace with `[remote] hosts_dir` = the hosts.toml that
`peerstar k8s containerd-config` wrote, and `ctr-remote image rpull --hosts-dir`: its
layers are mounted lazily from b's bridge, which answers their ranges from a's blocks at
once (checking each layer whole in the background). The upstream serves no layer byte to
b.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peerstar.source.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH
from tests.p2p import swarm
from tests.p2p.test_mirror import wait_for_topic
from tests.support.cli import run_peerstar
from tests.support.containerd import HarnessError, start_containerd
from tests.support.netns import Node
from tests.support.registry import start_registry
from tests.support.snapshotter import mounts_under, netns_prefix, running_stack

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


def test_estargz_by_name_runs_lazily_on_b_from_a(tmp_path: Path) -> None:
    with swarm.private_swarm("ab", bare="u") as (nodes, daemons):
        upstream = start_registry(tmp_path / "upstream", access_log=True, node=nodes["u"])
        try:
            layers = _push_estargz(nodes["u"], upstream.url)
            ref = f"{upstream.host}/{REPO}:v1"
            hosts = tmp_path / "hosts"
            proc = run_peerstar("k8s", "containerd-config", "--mirror", upstream.url,
                                "--hosts-dir", hosts)
            assert proc.returncode == 0, proc.stderr
            args = ["--mirror", upstream.url, "--mirror-lookup-timeout", "300ms"]
            with (swarm.registry(nodes["a"], tmp_path / "bridge-a.log", *args),
                  swarm.registry(nodes["b"], tmp_path / "bridge-b.log", *args)):
                wait_for_topic(nodes, daemons, "ab")
                full = start_containerd()
                try:
                    pull = nodes["a"].run(
                        ["ctr", "--address", full.address, "--namespace", full.namespace,
                         "image", "pull", "--hosts-dir", str(hosts), ref], timeout=180)
                    assert pull.returncode == 0, pull.stderr.decode(errors="replace")[-3000:]
                finally:
                    full.stop()
                served = upstream.bytes_served()
                assert all(upstream.bytes_served(d) > 0 for d in layers)

                config = (f'[remote]\nhosts_dir = "{hosts}"\nbackground_fetch = false\n'
                          "prefetch_timeout = 5.0\n")
                with running_stack(config, prefix=netns_prefix(nodes["b"])) as stack:
                    ctr = stack.containerd.ctr
                    argv = [*netns_prefix(nodes["b"]), ctr.ctr_remote_binary, "--address",
                            ctr.address, "--namespace", ctr.namespace, "image", "rpull",
                            "--plain-http", "--hosts-dir", str(hosts), "--snapshotter",
                            "peerstar", ref]
                    rpull = subprocess.run(argv, capture_output=True, timeout=300)
                    log = stack.snapshotter.log()
                    assert rpull.returncode == 0, (
                        rpull.stderr.decode(errors="replace")[-3000:], log[-3000:])
                    assert len(mounts_under(stack.snapshotter.root)) == len(layers), log[-3000:]
                    for digest in layers:  # mounted from b's own bridge, in mirror mode
                        assert f"layer {digest} mounted lazily from http://localhost:" \
                               f"{swarm.REGISTRY_PORT}/v2/{REPO}/blobs/{digest}?ns=" in log, \
                               log[-3000:]
                    out = ctr.text("run", "--snapshotter", "peerstar", "--rm", ref,
                                   "mirror-lazy", "cat", SAMPLE_TEXT_PATH)
                    assert out == SAMPLE_TEXT.decode()

                # Not one more byte from the upstream; b's bridge answered the snapshotter's
                # ranges from a's CIDs at once (then checked each layer whole, in the
                # background, which brings its blocks to b as a background fetch would).
                assert upstream.bytes_served() == served
                ranged = {entry.get("digest") for entry in _json_lines(tmp_path / "bridge-b.log")
                          if entry.get("upstream") == "mirror-ranged"}
                assert set(layers) <= ranged, ranged
                b_blocks, a_blocks = swarm.local_blocks(nodes["b"]), swarm.local_blocks(
                    nodes["a"])
                assert b_blocks and b_blocks <= a_blocks
        finally:
            upstream.stop()
