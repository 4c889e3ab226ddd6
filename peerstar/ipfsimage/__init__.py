"""Images in IPFS, the third stage of the flow (source -> convert -> IPFS -> registry ->
fetcher -> FUSE -> containerd): nerdctl's on-IPFS image format, push and pull.

- `format`: the format itself, pure (the image CID, `ipfs://` URLs, parsing and emitting
  the descriptor tree); the registry bridge reads images through it too;
- `push`: `push(source, ...)` / `push_image(source, store)`: a source image
  (`peerstar.source`, optionally converted by `peerstar.convert`) into a content store;
- `platforms`: which platforms of an index a push takes;
- `pull`: `pull(ipfs://CID, oci:DIR)` / `pull_image(store, cid, writer)`: an image back
  out of IPFS into an OCI layout, every blob verified.
The content store itself (CIDs, UnixFS, daemon or embedded) is `peerstar.ipfs`.
"""

# Blobs transferred at the same time by push and pull (`--jobs`).
DEFAULT_JOBS = 4
