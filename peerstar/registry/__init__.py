"""peerstar's registry bridge: IPFS-stored images (nerdctl's format) served to containerd
and other OCI clients as a read-only distribution registry with byte-range support.

Public API:
- `RegistryServer(store, ServerOptions(...))`: `app()`, `start(host, port, ...)`, `stop()`.
- `ReadPolicy(timeout, retries)`: per-IPFS-read timeout and retries.
- `UpstreamError` (a read failed after its retries) and its `ContentNotFound` (the store
  does not hold the content), both `PeerstarError`s.
- `MirrorOptions` (in `ServerOptions.mirror`): mirror mode, containerd's registry mirror
  of upstream registries with content from the cluster (`mirror`, `origin`,
  `directory`; docs/mirror.md).
- `LearnOptions` (in `ServerOptions.learn`; None turns it off): learning which ranges a
  container start reads from each layer, shared through the directory and warmed by the
  other nodes' bridges (`profiles`; docs/learning.md).
`peerstar registry serve` (peerstar.cli.registry) runs one server until stopped.
"""

from peerstar.registry.mirror import MirrorOptions
from peerstar.registry.profiles import LearnOptions
from peerstar.registry.server import RegistryServer, ServerOptions, check_bind_address
from peerstar.registry.upstream import ContentNotFound, ReadPolicy, UpstreamError

__all__ = [
    "ContentNotFound",
    "LearnOptions",
    "MirrorOptions",
    "ReadPolicy",
    "RegistryServer",
    "ServerOptions",
    "UpstreamError",
    "check_bind_address",
]
