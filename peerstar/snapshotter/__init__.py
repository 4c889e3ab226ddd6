"""peerstar's containerd remote snapshotter (`peerstar snapshotter serve`).

Owns: a gRPC server implementing containerd's snapshots v1 API on a unix socket, with
overlay snapshots for normal layers (containerd's overlayfs snapshotter semantics) and
eStargz layers mounted lazily over FUSE (`peerstar.lazyfs.mountd`, one process per
layer) when a Prepare carries the remote-snapshot labels. Metadata lives in SQLite under
the root; remote layers are mounted again when the daemon starts.

Modules: `config` (TOML + flags), `metadata` (SQLite), `filters` (List filters),
`remote` (labels -> layer, mount daemons), `credentials` (registry credentials from a
docker config file), `core` (snapshot semantics, handshake),
`service` (gRPC), `protogen` (regenerates the committed stubs in `_proto/`).

containerd `config.toml` (version 2)::

    [proxy_plugins.peerstar]
      type = "snapshot"
      address = "/run/peerstar/snapshotter.sock"

    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "peerstar"
      # CRI passes the layer annotations as snapshot labels only when this is false.
      disable_snapshot_annotations = false

Then `peerstar snapshotter serve` (before containerd, or containerd reconnects), and
`ctr-remote image rpull --snapshotter peerstar IMAGE` / `ctr run --snapshotter peerstar`.
See README.md in this directory.
"""
