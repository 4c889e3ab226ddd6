"""peerstar: node-to-node container image sharing with lazy pulling.

Data flows one way, one package per stage; a module never reaches past its neighbour:
source image (`peerstar.source`) -> convert (`peerstar.convert`, the eStargz format in
`peerstar.estargz`) -> IPFS (`peerstar.ipfsimage` in nerdctl's format, over the content
store `peerstar.ipfs`) -> registry bridge (`peerstar.registry`) -> fetcher and FUSE
(`peerstar.lazyfs`) -> containerd (`peerstar.snapshotter`).

Shared by every stage: the OCI image model (`peerstar.oci`: media types and annotation
names, digests, tags, platforms, descriptors, the layout writer), `peerstar.errors`,
`peerstar.localfile` (range reads, the one atomic file write), `peerstar.progress`.
"""

__version__ = "0.1.0"
