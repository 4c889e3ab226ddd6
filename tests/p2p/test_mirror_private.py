"""A private image through the cluster's mirror, end to end with real parts (issue 16
item 5): the three nodes of tests/p2p/test_mirror.py (js-ipfs on one swarm key, each
node's bridge `--mirror` on its localhost:5050, a containerd whose `ctr image pull
--hosts-dir` uses the hosts.toml `peerstar k8s containerd-config` writes), and an
upstream that wants credentials (docker-registry with htpasswd Basic auth, access log
on, in its own network namespace).

- node a pulls `UPSTREAM/team/app:1` with `ctr --user` and runs it: each blob leaves the
  upstream once, through a's bridge;
- node b pulls it with the same credentials and runs it: zero blob bytes from the
  upstream (b's bridge checked the credentials at the upstream, the blobs came from a);
- node c, without credentials, cannot pull it: its bridge refuses (the upstream's 401)
  a blob a and b hold; asked with the credentials, the same bridge serves it from the
  cluster.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerstar.source.sample import SAMPLE_TEXT, build_sample_image
from tests.p2p import swarm
from tests.p2p.test_mirror import Cluster, _bridge_args, _run, wait_for_topic
from tests.support.cli import run_peerstar
from tests.support.containerd import Containerd, HarnessError, start_containerd
from tests.support.netns import Node
from tests.support.registry import start_registry

pytestmark = pytest.mark.slow

USER, PASSWORD = "erin-8b3d", "pw-Cluster-5a61"


def _push(node: Node, base: str, layout: Path) -> None:
    code = ("import sys; from pathlib import Path; from tests.support.registry import "
            "RegistryAccess, push_layout, register_access; "
            "register_access(sys.argv[1], RegistryAccess(username=sys.argv[2], "
            "password=sys.argv[3])); "
            "push_layout(sys.argv[1], 'team/app', '1', Path(sys.argv[4]))")
    proc = node.run([sys.executable, "-c", code, base, USER, PASSWORD, str(layout)],
                    cwd=str(swarm.REPO), env=dict(os.environ, PYTHONPATH=str(swarm.REPO)),
                    timeout=120)
    if proc.returncode != 0:
        raise HarnessError(f"push to {base}: {proc.stderr.decode(errors='replace')[-2000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("p2p-mirror-private")
    image = build_sample_image(work / "v1", extra_mib=2)
    with swarm.private_swarm("abc", bare="u") as (nodes, daemons):
        upstream = start_registry(work / "upstream", access_log=True, node=nodes["u"],
                                  basic_auth=(USER, PASSWORD))
        containerds: dict[str, Containerd] = {}
        try:
            _push(nodes["u"], upstream.url, image.path)
            hosts_dir = work / "hosts"
            proc = run_peerstar("k8s", "containerd-config", "--mirror", upstream.url,
                                "--hosts-dir", hosts_dir)
            assert proc.returncode == 0, proc.stderr
            for label in "abc":
                containerds[label] = start_containerd()
            with contextlib.ExitStack() as bridges:
                for label in "abc":
                    bridges.enter_context(swarm.registry(
                        nodes[label], work / f"bridge-{label}.log", *_bridge_args(upstream)))
                wait_for_topic(nodes, daemons, "abc")
                yield Cluster(nodes, daemons, upstream, containerds, hosts_dir,
                              (image, image))
        finally:
            for c in containerds.values():
                c.stop()
            upstream.stop()


def _pull(cluster: Cluster, label: str, ref: str, *user: str
          ) -> subprocess.CompletedProcess[bytes]:
    c = cluster.containerds[label]
    return cluster.nodes[label].run(
        ["ctr", "--address", c.address, "--namespace", c.namespace, "image", "pull",
         "--hosts-dir", str(cluster.hosts_dir), *user, ref], timeout=180)


def _bridge_get(cluster: Cluster, label: str, digest: str, *headers: str) -> bytes:
    """GET a blob from node `label`'s own bridge, as its containerd would ask it."""
    url = (f"http://127.0.0.1:{swarm.REGISTRY_PORT}/v2/team/app/blobs/{digest}"
           f"?ns={cluster.upstream.host}")
    return swarm.http(cluster.nodes[label], "GET", url, headers=headers)


def test_private_image_from_the_cluster_only_with_credentials(cluster: Cluster) -> None:
    up = cluster.upstream
    ref = f"{up.host}/team/app:1"
    image = cluster.images[0]
    blobs = [image.config_digest, *image.layer_digests]
    user = ("--user", f"{USER}:{PASSWORD}")

    proc = _pull(cluster, "a", ref, *user)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert _run(cluster.containerds["a"], ref, "private-a") == SAMPLE_TEXT
    served = up.bytes_served()
    assert all(up.bytes_served(d) > 0 for d in blobs)
    assert served == sum(up.bytes_served(d) for d in blobs)

    proc = _pull(cluster, "b", ref, *user)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert _run(cluster.containerds["b"], ref, "private-b") == SAMPLE_TEXT
    assert up.bytes_served() == served  # zero blob bytes from the upstream for node b
    bridge_b = (cluster.hosts_dir.parent / "bridge-b.log").read_text()
    assert '"source":"cluster"' in bridge_b

    proc = _pull(cluster, "c", ref)
    assert proc.returncode != 0 and b"401" in proc.stderr, proc.stderr[-2000:]
    layer = image.layer_digests[-1]
    with pytest.raises(HarnessError, match="HTTP 401.*UNAUTHORIZED"):
        _bridge_get(cluster, "c", layer)
    with pytest.raises(HarnessError, match="HTTP 401"):
        _bridge_get(cluster, "c", layer, "Authorization: Basic " + base64.b64encode(
            f"{USER}:not-the-password".encode()).decode())
    assert not cluster.containerds["c"].ctr.image_exists(ref)
    # The same bridge, with the credentials: the layer a and b hold, from the cluster.
    basic = "Authorization: Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    data = _bridge_get(cluster, "c", layer, basic)
    assert data == (image.path / "blobs" / "sha256" / layer.split(":", 1)[1]).read_bytes()
    assert up.bytes_served() == served
