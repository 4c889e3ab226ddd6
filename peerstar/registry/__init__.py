"""peerstar's registry bridge: IPFS-stored images (nerdctl's format) served to containerd
and other OCI clients as a read-only distribution registry with byte-range support.

Public API:
- `RegistryServer(store, ServerOptions(...))`: `app()`, `start(host, port, ...)`, `stop()`.
- `ReadPolicy(timeout, retries)`: per-IPFS-read timeout and retries.
- `serve(...)`: run until cancelled (what `peerstar registry serve` calls).
"""

from peerstar.registry.server import (
    RegistryError,
    RegistryServer,
    ServerOptions,
    check_bind_address,
)
from peerstar.registry.upstream import ReadPolicy, UpstreamError

__all__ = [
    "ReadPolicy",
    "RegistryError",
    "RegistryServer",
    "ServerOptions",
    "UpstreamError",
    "check_bind_address",
]
