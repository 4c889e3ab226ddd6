"""IPFS access for peerstar: kubo-identical content addressing, a kubo RPC client, and an
embedded block store, behind one `ContentStore` interface (docs/API-CONTRACTS.md).

`open_store()` picks the backend: an explicit `ipfs_address`, else the running daemon's
`api` file (`$IPFS_PATH/api`, or `~/.ipfs/api` when IPFS_PATH is unset), else the
embedded store under `root` (default `~/.local/share/peerstar`). A configured daemon that
does not answer gives one clear `IPFSError` at the first call, never a silent fallback:
content pushed to the wrong store would be invisible to the other nodes.

Modules: `cid` (parse/normalise CIDs), `unixfs` (dag-pb/UnixFS encoding, balanced
layout, ranged reads), `address` (API address lookup), `rpc` (daemon client),
`embedded` (on-disk store), `base` (the interface), `errors`.
"""

from __future__ import annotations

from pathlib import Path

from peerstar.ipfs.address import find_api, parse_api_address
from peerstar.ipfs.base import ContentStore
from peerstar.ipfs.cid import normalize_cid, parse_cid
from peerstar.ipfs.embedded import EmbeddedStore, GCResult, default_root
from peerstar.ipfs.errors import (
    BlockNotFoundError,
    CIDError,
    CorruptBlockError,
    IPFSError,
    IPFSTimeoutError,
    OffsetError,
)
from peerstar.ipfs.rpc import RPCStore
from peerstar.ipfs.unixfs import CHUNK_SIZE, MAX_LINKS, compute_cid

__all__ = [
    "CHUNK_SIZE",
    "MAX_LINKS",
    "BlockNotFoundError",
    "CIDError",
    "ContentStore",
    "CorruptBlockError",
    "EmbeddedStore",
    "GCResult",
    "IPFSError",
    "IPFSTimeoutError",
    "OffsetError",
    "RPCStore",
    "compute_cid",
    "default_root",
    "normalize_cid",
    "open_store",
    "parse_api_address",
    "parse_cid",
]


def open_store(
    ipfs_address: str | None = None,
    root: Path | None = None,
    *,
    timeout: float = 30.0,
    retries: int = 3,
) -> ContentStore:
    """The content store to use: a daemon when one is configured, else the embedded store.

    Creating the store does no I/O on the network; an unreachable daemon is reported by
    the first call as "no IPFS API at X: start the daemon or drop --ipfs-address ...".
    """
    api = find_api(ipfs_address)
    if api is not None:
        return RPCStore(api, timeout=timeout, retries=retries)
    return EmbeddedStore(root)
