"""The network-namespace fixture itself: nodes reach each other over the bridge, each has
its own loopback, and removal leaves nothing behind (namespaces, processes, interfaces)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.netns import Network, netns_exists
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

# A TCP server that answers one line with a fixed word, run inside a node.
SERVER = ("import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
          "socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 7000)); s.listen(8); "
          "print('up', flush=True)\n"
          "while True:\n c,_=s.accept(); c.sendall(sys.argv[2].encode()); c.close()")
CLIENT = ("import socket,sys; c=socket.create_connection((sys.argv[1], 7000), timeout=3); "
          "print(c.recv(100).decode())")


def host_links() -> set[str]:
    return {p.name for p in Path("/sys/class/net").iterdir()}


def test_nodes_connect_over_the_bridge_and_loopbacks_are_private() -> None:
    links_before = host_links()
    with Network() as net:
        a, b = net.add_node("a"), net.add_node("b")
        names = [a.netns, b.netns, net.bridge_ns]
        assert all(netns_exists(n) for n in names)
        servers = [
            a.popen([sys.executable, "-c", SERVER, "0.0.0.0", "node-a"], stdout=subprocess.PIPE),
            b.popen([sys.executable, "-c", SERVER, "127.0.0.1", "node-b"],
                    stdout=subprocess.PIPE),
        ]
        for s in servers:
            assert s.stdout is not None and s.stdout.readline().strip() == b"up"
        # b reaches a's server through the bridge.
        r = b.run([sys.executable, "-c", CLIENT, a.addr])
        assert r.returncode == 0 and r.stdout.decode().strip() == "node-a"
        # b's 127.0.0.1:7000 is b's own server, not a's: every node has its own loopback.
        r = b.run([sys.executable, "-c", CLIENT, "127.0.0.1"])
        assert r.stdout.decode().strip() == "node-b"
        # a's loopback has nothing on 7000 bound to 127.0.0.1 by b.
        r = a.run([sys.executable, "-c", CLIENT, b.addr])
        assert r.returncode != 0  # b's server is on its loopback only
        # Unplugging a's port cuts it off; plugging it back restores it.
        net.unplug("a")
        assert b.run([sys.executable, "-c", CLIENT, a.addr]).returncode != 0
        net.plug("a")
        assert wait_until(
            lambda: b.run([sys.executable, "-c", CLIENT, a.addr]).returncode == 0, 10, 0.2)
        assert host_links() == links_before  # nothing appeared on the host
    # Removal killed the servers and deleted every namespace (with their veths and bridge).
    for s in servers:
        assert s.wait(timeout=10) != 0
    assert not any(netns_exists(n) for n in names)
    assert host_links() == links_before
