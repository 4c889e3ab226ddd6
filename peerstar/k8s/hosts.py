"""containerd's registry host configuration (`config_path`, hosts.toml) for the mirror.

Owns: the hosts.toml that makes a node's containerd pull an upstream registry's images
through the node's peerstar bridge first, the upstream itself as the fallback
(REFERENCE.md §7: hosts are tried in order, `server` last; a request to the bridge carries
`?ns=<registry host>`), and where each file goes: `<config_path>/<ns>/hosts.toml`.
Pure: text in, text out; `peerstar k8s containerd-config --hosts-dir` writes the files.
"""

from __future__ import annotations

from peerstar.registry.origin import MirrorUpstream

CONFIG_PATH = "/etc/containerd/certs.d"
DEFAULT_BRIDGE = "http://localhost:5050"


def hosts_toml(upstream: MirrorUpstream, bridge: str = DEFAULT_BRIDGE) -> str:
    """The hosts.toml of `upstream.ns`: the bridge first, the upstream as `server`."""
    return f"""\
# peerstar: pull {upstream.ns} images through this node's bridge (content from the
# cluster's nodes, tags resolved at the upstream); the upstream itself is the fallback.
server = "{upstream.url}"

[host."{bridge}"]
  capabilities = ["pull", "resolve"]
"""


def hosts_files(upstreams: tuple[MirrorUpstream, ...], bridge: str = DEFAULT_BRIDGE,
                config_path: str = CONFIG_PATH) -> dict[str, str]:
    """Path of each hosts.toml -> its text."""
    return {f"{config_path}/{u.ns}/hosts.toml": hosts_toml(u, bridge) for u in upstreams}


def cri_registry_config(config_path: str = CONFIG_PATH) -> str:
    """The containerd config.toml lines that make CRI read the hosts.toml files."""
    return f"""\
# peerstar mirror: CRI reads each registry's hosts.toml under this directory.
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{config_path}"
"""
