"""peerstar: node-to-node container image sharing with lazy pulling.

Data flows one way: source image -> convert (`peerstar.estargz`, `peerstar.oci`)
-> IPFS (`peerstar.ipfs`) -> registry bridge (`peerstar.registry`) -> fetcher and
FUSE (`peerstar.lazyfs`) -> containerd (`peerstar.snapshotter`).
"""

__version__ = "0.1.0"
