"""Lazy layer filesystem: eStargz layers mounted over FUSE, chunks fetched on first read.

Owns everything between a layer URL and a read-only directory: HTTP range fetching
(`fetcher`), registry auth (`auth`), on-disk caches (`cache`), the verified layer model
with prefetch and background fetch (`layer`), the pyfuse3 filesystem (`fs`), the mount
daemon (`mountd`), the mount API (`mount`) and its settings (`options`), image
resolution and the merged overlay rootfs for `peerstar mount` (`image`), the daemons'
fork server (`zygote`), and Prometheus metrics (`metrics`).

Mount API (for the snapshotter)
-------------------------------
    from peerstar.lazyfs import (mount_layer, find_mount, MountError, LayerMount,
                                 MountOptions, FetchOptions, CacheOptions, PrefetchOptions)

    options = MountOptions(      # frozen; every field optional (defaults shown)
        fetch=FetchOptions(region_size=50_000, request_timeout=30.0, retries=3,
                           ca_file=""),        # extra trusted CAs (PEM), besides the usual
        cache=CacheOptions(region_bytes=4 << 30, chunk_bytes=4 << 30),  # 0 = unbounded
        prefetch=PrefetchOptions(timeout=10.0,  # reads of prioritized files wait this long
                                 wait=False,    # True: return once the prefetch is done
                                 size=0,        # bytes to prefetch without a landmark
                                 background=True, background_idle=5.0),
        verify=True,             # False only by explicit configuration
        open_timeout=60.0,       # seconds to wait for the daemon's readiness
        cgroup="",               # "ROOT/NAME": the daemon moves into that cgroup first
    )
    m: LayerMount = mount_layer(
        url,            # "http://127.0.0.1:5050/v2/ipfs/<cid>/blobs/sha256:..." (blob_url())
        digest,         # layer blob digest
        toc_digest,     # annotation containerd.io/snapshot/stargz/toc.digest
        mountpoint,     # an existing empty directory
        cache_dir,      # shared by all layers: regions/, chunks/, mounts/ (state, logs)
        options,        # MountOptions() if omitted
        size=None,      # blob size if known (descriptor size): saves a request
        auth=None,      # a distribution.auth.RegistryAuth (anonymous if None); its credentials
                        # reach the daemon in its environment, never argv
        zygote=None,    # a running lazyfs.zygote.Zygote: fork the daemon from it
    )
    m.mountpoint, m.pid, m.mount_seconds, m.prefetch_done
    m.stats()      # {"size", "fetchedSize", "cachedSize", "fetchedPercent", ...}
    m.alive, m.mounted
    m.unmount()    # umount; the daemon exits; SIGTERM/SIGKILL only if it does not
    find_mount(mountpoint, cache_dir) -> LayerMount | None   # re-attach after a restart

`mount_layer` raises `MountError` (a `PeerstarError`) when the blob cannot be fetched,
is not eStargz/zstd:chunked, its TOC digest differs, or FUSE fails; nothing stays
mounted then. Each layer is served by its own process,
`python -m peerstar.lazyfs.mountd --url U --digest D --toc-digest T --mountpoint M
--cache-dir C [...]` (pyfuse3 allows one FUSE session per process), or, given a
`Zygote` (`peerstar.lazyfs.zygote`: `Zygote.start()`, `.close()`), forked from that
pre-warmed process in milliseconds instead of ~0.3 s of interpreter start-up and imports
(falling back to `python -m` if the zygote is gone). Either way it runs in its own
session: a snapshotter restart does not end the mounts; after restarting, the
snapshotter calls `find_mount` for each persisted remote snapshot. `umount M` ends a
daemon cleanly. Inside each mount, `/.peerstar-lazyfs/<digest>.json` (hidden from
listings) gives live fetch statistics; `<cache_dir>/mounts/<key>.stats.json` and
`.prom` hold the last saved statistics and Prometheus metrics of each daemon.
"""

from peerstar.lazyfs.fetcher import BlobFetcher, FetchError
from peerstar.lazyfs.mount import LayerMount, MountError, find_mount, mount_layer
from peerstar.lazyfs.options import CacheOptions, FetchOptions, MountOptions, PrefetchOptions

__all__ = [
    "BlobFetcher", "CacheOptions", "FetchError", "FetchOptions", "LayerMount", "MountError",
    "MountOptions", "PrefetchOptions", "find_mount", "mount_layer",
]
