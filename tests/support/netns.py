"""Several "nodes" on one machine: Linux network namespaces joined by veth pairs to a bridge.

Owns: creating a bridge namespace and node namespaces (REFERENCE.md section 6), running
commands inside a node, stopping a node's link, and removing everything again (processes
in the namespaces first, then the namespaces, which takes their veths and bridge along).

The bridge lives in a namespace of its own, so the host's network is never touched: no
interface, route or address is added to the host, and nothing here can reach an address
outside the namespaces it created. Needs root (CI runs as root).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.support.containerd import HarnessError

SUBNET = "10.77.0"  # /24 inside the private bridge; never routed anywhere else


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise HarnessError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class Node:
    """One node: a network namespace with `eth0` (address `addr`) on the bridge and `lo`."""

    label: str
    netns: str
    addr: str

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside this node."""
        return ["ip", "netns", "exec", self.netns]

    def run(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("timeout", 120)
        return subprocess.run([*self.prefix, *cmd], **kwargs)

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen([*self.prefix, *cmd], **kwargs)

    def pids(self) -> list[int]:
        proc = _ip("netns", "pids", self.netns, check=False)
        return [int(p) for p in proc.stdout.split()]


@dataclass
class Network:
    """A bridge namespace plus node namespaces; use as a context manager or call `remove()`."""

    token: str = field(default_factory=lambda: secrets.token_hex(3))
    nodes: dict[str, Node] = field(default_factory=dict)
    bridge_ns: str = ""

    def __post_init__(self) -> None:
        if os.geteuid() != 0:
            raise HarnessError("network namespaces need root (CI runs the tests as root)")
        self.bridge_ns = f"peerstar-{self.token}-br"
        _ip("netns", "add", self.bridge_ns)
        try:
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        except BaseException:
            self.remove()
            raise

    def add_node(self, label: str) -> Node:
        """A new node namespace with eth0 on the bridge (address 10.77.0.<n>/24) and lo up."""
        if label in self.nodes or not label.isalnum() or len(label) > 10:
            raise ValueError(f"bad or duplicate node label {label!r}")
        node = Node(label, f"peerstar-{self.token}-{label}",
                    f"{SUBNET}.{10 + len(self.nodes)}")
        self.nodes[label] = node
        _ip("netns", "add", node.netns)
        # veth created directly in the two namespaces: no interface ever appears on the host.
        _ip("link", "add", "eth0", "netns", node.netns, "type", "veth",
            "peer", "name", f"v-{label}", "netns", self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "set", f"v-{label}", "master", "br0", "up")
        _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
        _ip("-n", node.netns, "link", "set", "eth0", "up")
        _ip("-n", node.netns, "link", "set", "lo", "up")
        return node

    def unplug(self, label: str) -> None:
        """Take a node's bridge port down (its processes stay up but unreachable)."""
        _ip("-n", self.bridge_ns, "link", "set", f"v-{label}", "down")

    def plug(self, label: str) -> None:
        _ip("-n", self.bridge_ns, "link", "set", f"v-{label}", "up")

    def remove(self) -> None:
        """Kill what runs in our namespaces (only those: `ip netns pids`), delete them."""
        names = [n.netns for n in self.nodes.values()] + ([self.bridge_ns] if self.bridge_ns
                                                            else [])
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = False
            for name in names:
                for pid in Node("", name, "").pids():
                    alive = True
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            if not alive:
                break
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(Node("", n, "").pids() for n in names):
                time.sleep(0.1)
        for name in names:
            _ip("netns", "del", name, check=False)
        self.nodes.clear()
        self.bridge_ns = ""

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def netns_exists(name: str) -> bool:
    return name in _ip("netns", "list").stdout.split()


HOST_LINK_NET = "10.78"  # 10.78.<n>.0/30 per host-linked node; never routed beyond it


@dataclass
class HostLinkedNode:
    """A namespace joined to the host by one veth pair, so the host itself (containerd,
    the snapshotter) reaches a server in it at a non-loopback address: host side
    `host_addr`, namespace side `node.addr`, a /30 of 10.78.<n>.0 picked unused.

    This adds one interface and its /30 route to the host, for the test's lifetime;
    `remove()` (or the context manager) kills what runs in the namespace and deletes it,
    which takes the veth pair along."""

    label: str
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    node: Node = field(init=False)
    host_ifname: str = field(init=False)
    host_addr: str = field(init=False)

    def __post_init__(self) -> None:
        if os.geteuid() != 0:
            raise HarnessError("network namespaces need root (CI runs the tests as root)")
        if not self.label.isalnum() or len(self.label) > 10:
            raise ValueError(f"bad node label {self.label!r}")
        used = _ip("-4", "route", "show").stdout + _ip("-4", "addr", "show").stdout
        free = [n for n in range(1, 255) if f"{HOST_LINK_NET}.{n}." not in used]
        if not free:
            raise HarnessError(f"no free {HOST_LINK_NET}.N.0/30 for a host-linked namespace")
        n = free[secrets.randbelow(len(free))]  # concurrent sessions rarely pick the same
        self.host_ifname = f"psh{self.token}"  # <= 15 characters (IFNAMSIZ)
        self.host_addr = f"{HOST_LINK_NET}.{n}.1"
        self.node = Node(self.label, f"peerstar-{self.token}-{self.label}",
                         f"{HOST_LINK_NET}.{n}.2")
        _ip("netns", "add", self.node.netns)
        try:
            _ip("link", "add", self.host_ifname, "type", "veth", "peer", "name", "eth0",
                "netns", self.node.netns)
            _ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_ifname)
            _ip("link", "set", self.host_ifname, "up")
            _ip("-n", self.node.netns, "addr", "add", f"{self.node.addr}/30", "dev", "eth0")
            _ip("-n", self.node.netns, "link", "set", "eth0", "up")
            _ip("-n", self.node.netns, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Kill what runs in the namespace (only it: `ip netns pids`), delete it."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.node.pids() if netns_exists(self.node.netns) else []
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while pids and time.monotonic() < deadline and self.node.pids():
                time.sleep(0.1)
        _ip("netns", "del", self.node.netns, check=False)
        _ip("link", "del", self.host_ifname, check=False)  # gone with the namespace, or not

    def __enter__(self) -> HostLinkedNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
