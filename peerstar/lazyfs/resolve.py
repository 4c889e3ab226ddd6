"""Resolving a layer ahead of its mount: its footer, TOC and prioritized range fetched
into the cache directory that the layer's mount daemon will read them from.

Owns `resolve_ahead`, and `probe_size` (does a host serve a blob: how the snapshotter
picks, among a registry's mirrors, the one a layer is read from).

containerd prepares an image's layers one after another, and each mount's first reads
(footer, then TOC, then the prefetch range) are round trips that, across nodes, cost far
more than the mount itself. Every Prepare carries the image's layer list, so at the
first one the snapshotter resolves the other layers concurrently with this function (as
the Go stargz snapshotter does); when their Prepares come, their daemons find every byte
they start with in the region cache (`<cache_dir>/regions`, shared by all mounts of the
node) and mount without the network.

Nothing is verified here, because the layer list carries no TOC digests: the bytes only
fill the region cache, and the mount daemon checks the TOC digest and every chunk digest
as it always does. Raises `FetchError` / `peerstar.estargz` errors like a mount would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from peerstar.estargz import Reader
from peerstar.lazyfs.cache import DiskCache
from peerstar.lazyfs.fetcher import BlobFetcher
from peerstar.lazyfs.layer import LazyLayer
from peerstar.lazyfs.options import FetchOptions

DEFAULT_FETCH = FetchOptions()
# A host asked whether it serves a blob answers at once or is passed over.
PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Resolved:
    """What `resolve_ahead` put in the cache: the blob's size, the TOC's start, the end
    of the prefetch range (0 = none) and the bytes it fetched (not found cached)."""

    size: int
    toc_offset: int
    prefetch_end: int
    fetched_bytes: int


def region_cache(cache_dir: Path, max_bytes: int = 0) -> DiskCache:
    """The region cache the mount daemons under `cache_dir` read (`<cache_dir>/regions`);
    make it once and pass it to every `resolve_ahead` (opening it scans the directory)."""
    return DiskCache(Path(cache_dir) / "regions", max_bytes)


def probe_size(url: str, digest: str, *, fetch: FetchOptions = DEFAULT_FETCH,
               auth: httpx.Auth | None = None) -> int:
    """The size of the blob at `url`, asked once (no retries, at most PROBE_TIMEOUT
    seconds): whether a host serves the blob, before a layer is read from there.
    `FetchError` when it does not."""
    fetcher = BlobFetcher(url, digest=digest, timeout=min(fetch.request_timeout,
                                                          PROBE_TIMEOUT),
                          retries=0, ca_file=fetch.ca_file, auth=auth)
    try:
        return fetcher.size
    finally:
        fetcher.close()


def resolve_ahead(url: str, digest: str, regions: DiskCache, *,
                  fetch: FetchOptions = DEFAULT_FETCH, prefetch_size: int = 0,
                  auth: httpx.Auth | None = None,
                  on_toc: Callable[[], None] | None = None) -> Resolved:
    """Fetch the footer and TOC of the layer blob at `url` into `regions` (see
    `region_cache`) as the layer's mount with the same `fetch` options would, call
    `on_toc` (a mount of this layer now needs no network to start), then fetch its
    prefetch range (`[0, .prefetch.landmark)`, or `prefetch_size` bytes for a layer
    without landmarks) into the cache too."""
    fetcher = BlobFetcher(url, digest=digest, region_size=fetch.region_size, cache=regions,
                          timeout=fetch.request_timeout, retries=fetch.retries,
                          ca_file=fetch.ca_file, auth=auth)
    try:
        reader = Reader.open(lambda off, n: fetcher.read_at(off, n, "toc"), fetcher.size)
        if on_toc is not None:
            on_toc()
        end = LazyLayer(fetcher, reader, None, verify=False).prefetch_range(prefetch_size)
        if end > 0:
            fetcher.read_at(0, end, "prefetch")
        return Resolved(fetcher.size, reader.footer.toc_offset, end,
                        fetcher.stats.fetched_bytes)
    finally:
        fetcher.close()
