"""The kubo repository settings peerstar's pods need, applied to an existing kubo config.

Owns: `configure_kubo()`, the pure edit of a kubo `config` JSON (loopback-only RPC API
and gateway, TCP-only swarm on every interface, NoAnnounce/AddrFilters cleared so pod IPs
connect, the bootstrap list, DHT routing instead of public delegated routers, StorageMax,
and, for the bootstrap peer, its fixed identity), and `configure_repo()`, which applies it
to `$IPFS_PATH/config` atomically (`localfile.atomic_write`, mode kept). The init
container `peerstar k8s kubo-config` runs it on every pod start: the repo itself (peer
id, blocks, pins) is never wiped.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from peerstar.errors import PeerstarError
from peerstar.k8s.keys import Identity
from peerstar.localfile import atomic_write

API_ADDRESS = "/ip4/127.0.0.1/tcp/5001"
GATEWAY_ADDRESS = "/ip4/127.0.0.1/tcp/8080"
SWARM_PORT = 4001


def bootstrap_multiaddr(host: str, peer_id: str, port: int = SWARM_PORT) -> str:
    """The multiaddr nodes dial to reach the bootstrap peer through its Service name."""
    return f"/dns4/{host}/tcp/{port}/p2p/{peer_id}"


def configure_kubo(
    config: dict[str, Any],
    *,
    bootstrap: list[str],
    storage_max: str | None = None,
    identity: Identity | None = None,
    swarm_port: int = SWARM_PORT,
) -> dict[str, Any]:
    """Return a copy of a kubo config with peerstar's settings applied (idempotent)."""
    cfg = copy.deepcopy(config)
    addresses = cfg.setdefault("Addresses", {})
    # RPC and gateway on the pod's loopback only: containers of the same pod reach them,
    # nothing else can (the RPC API can delete pins and shut the daemon down).
    addresses["API"] = API_ADDRESS
    addresses["Gateway"] = GATEWAY_ADDRESS
    # TCP only: a private network (swarm.key) cannot use QUIC/WebTransport/WebRTC.
    addresses["Swarm"] = [f"/ip4/0.0.0.0/tcp/{swarm_port}"]
    # `--profile=server` announces/filters out private ranges; pod IPs are private.
    addresses["NoAnnounce"] = []
    addresses["Announce"] = []
    cfg.setdefault("Swarm", {})["AddrFilters"] = None
    cfg["Bootstrap"] = list(bootstrap)
    # "auto" routing asks public HTTP routers; a private swarm must only use its own DHT.
    cfg.setdefault("Routing", {})["Type"] = "dht"
    cfg.setdefault("Discovery", {}).setdefault("MDNS", {})["Enabled"] = False
    # The bridges' mirror directory talks over pubsub (docs/mirror.md); kubo has it off.
    cfg.setdefault("Pubsub", {})["Enabled"] = True
    if storage_max:
        cfg.setdefault("Datastore", {})["StorageMax"] = storage_max
    if identity is not None:
        cfg["Identity"] = {"PeerID": identity.peer_id, "PrivKey": identity.private_key}
    return cfg


def configure_repo(
    repo: Path,
    *,
    bootstrap: list[str],
    storage_max: str | None = None,
    identity: Identity | None = None,
) -> dict[str, Any]:
    """Apply `configure_kubo` to `repo/config` in place (atomic replace, mode kept)."""
    path = repo / "config"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise PeerstarError(f"no kubo config at {path}: run `ipfs init` first") from None
    except json.JSONDecodeError as exc:
        raise PeerstarError(f"{path} is not JSON: {exc}") from None
    new = configure_kubo(config, bootstrap=bootstrap, storage_max=storage_max, identity=identity)
    with atomic_write(path, mode=path.stat().st_mode & 0o777) as f:
        f.write((json.dumps(new, indent=2) + "\n").encode())
    return new
