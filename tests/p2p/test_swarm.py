"""A private swarm of js-ipfs nodes in network namespaces (REFERENCE.md sections 4 and 6).

Nodes a, b, c share one generated swarm key and bootstrap from a only; x has another
key and y none (public network), both also told to bootstrap from a. Every node has its
own loopback, so all use the same ports; the only links are the veths to a private bridge.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peerstar.k8s.keys import generate_swarm_key
from tests.p2p import swarm
from tests.support.containerd import HarnessError
from tests.support.jsipfs import JsIpfs
from tests.support.netns import Network, Node

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    net: Network
    nodes: dict[str, Node]
    daemons: dict[str, JsIpfs]

    def ids(self, *labels: str) -> set[str]:
        return {self.daemons[label].peer_id for label in labels}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    key = generate_swarm_key().encode()  # the key `peerstar swarm-key` prints
    other = generate_swarm_key().encode()
    daemons: dict[str, JsIpfs] = {}
    failure = ""
    try:
        net = Network()
    except HarnessError as exc:
        pytest.fail(f"cannot create network namespaces: {exc}", pytrace=False)
    try:
        nodes = {label: net.add_node(label) for label in "abcxy"}
        daemons["a"] = swarm.start_daemon(nodes["a"], key)
        boot = [daemons["a"].swarm_multiaddr]
        for label, k in (("b", key), ("c", key), ("x", other), ("y", None)):
            daemons[label] = swarm.start_daemon(nodes[label], k, boot)
    except HarnessError as exc:
        failure = f"cannot start the swarm: {exc}"
    try:
        if failure:
            pytest.fail(failure, pytrace=False)
        yield Cluster(net, nodes, daemons)
    finally:
        for d in daemons.values():
            d.stop()
        net.remove()


def test_same_key_nodes_join_through_the_bootstrap(cluster: Cluster) -> None:
    a = cluster.daemons["a"].peer_id
    for label in "bc":
        assert a in swarm.wait_for_peers(cluster.nodes[label], {a}), label
    got = swarm.wait_for_peers(cluster.nodes["a"], cluster.ids("b", "c"))
    # x and y dialled a too (same bootstrap list) but no connection came of it.
    assert got == cluster.ids("b", "c")


def test_b_reads_content_added_on_a_over_the_swarm(cluster: Cluster) -> None:
    na, nb = cluster.nodes["a"], cluster.nodes["b"]
    swarm.wait_for_peers(nb, cluster.ids("a"))
    data = os.urandom(3 * 1024 * 1024 + 12345)  # 13 leaves of 256 KiB + a dag-pb root
    cid = swarm.add(na, data)
    assert cid.startswith("bafybei")
    leaves = swarm.leaf_cids(data)
    assert len(leaves) == 13 and set(leaves) <= swarm.local_blocks(na)
    assert not set(leaves) & swarm.local_blocks(nb)  # b holds none of it

    # A range across the boundary of leaves 3 and 4: b fetches just those (and the root).
    part = swarm.cat(nb, cid, offset=1_000_000, length=300_000)
    assert part == data[1_000_000:1_300_000]
    held = swarm.local_blocks(nb)
    assert swarm.mh(cid) in held and {leaves[3], leaves[4]} <= held
    assert not {leaves[0], leaves[12]} & held
    # Then the whole file: every block is now on b, and the bytes are right.
    assert swarm.cat(nb, cid) == data
    assert set(leaves) | {swarm.mh(cid)} <= swarm.local_blocks(nb)


@pytest.mark.parametrize("label", ["x", "y"])
def test_node_without_the_key_cannot_connect_or_fetch(cluster: Cluster, label: str) -> None:
    outsider, na = cluster.nodes[label], cluster.nodes["a"]
    cid = swarm.add(na, os.urandom(100_000))
    a_id = cluster.daemons["a"].peer_id
    with pytest.raises(HarnessError):
        swarm.rpc(outsider, "swarm/connect", [("arg", cluster.daemons["a"].swarm_multiaddr)],
                  timeout=30)
    # Nor can a member dial it.
    with pytest.raises(HarnessError):
        swarm.rpc(cluster.nodes["b"], "swarm/connect",
                  [("arg", cluster.daemons[label].swarm_multiaddr)], timeout=30)
    assert swarm.peers(outsider) == set()
    assert cluster.daemons[label].peer_id not in swarm.peers(na)
    with pytest.raises(HarnessError):
        swarm.cat(outsider, cid, timeout=8)
    assert a_id not in swarm.peers(outsider)


def test_c_gets_content_from_b_with_a_stopped(cluster: Cluster) -> None:
    """Runs last in this module: it stops a."""
    na, nb, nc = (cluster.nodes[k] for k in "abc")
    swarm.wait_for_peers(nb, cluster.ids("a"))
    data = os.urandom(2 * 1024 * 1024 + 7)
    cid = swarm.add(na, data)
    assert swarm.cat(nb, cid) == data  # b now holds every block
    assert set(swarm.leaf_cids(data)) <= swarm.local_blocks(nb)
    assert not set(swarm.leaf_cids(data)) & swarm.local_blocks(nc)
    cluster.daemons["a"].stop()
    # c only knew a (its bootstrap); it learns b's address here, as the DHT would tell it.
    swarm.rpc(nc, "swarm/connect", [("arg", cluster.daemons["b"].swarm_multiaddr)], timeout=60)
    assert swarm.peers(nc) == cluster.ids("b")  # a is gone: b is the only possible source
    assert swarm.cat(nc, cid, offset=123, length=1_500_000) == data[123:1_500_123]
    assert swarm.cat(nc, cid) == data
    assert set(swarm.leaf_cids(data)) <= swarm.local_blocks(nc)


def test_no_host_interface_was_added(cluster: Cluster) -> None:
    """The fixture only touched its own namespaces: no veth end is on the host."""
    names = Path("/sys/class/net")
    host_ifaces = {p.name for p in names.iterdir()}
    assert not any(n.startswith("v-") for n in host_ifaces)
    for node in cluster.nodes.values():
        out = node.run(["ip", "-o", "-4", "addr"]).stdout.decode()
        assert f"inet {node.addr}/24" in out
