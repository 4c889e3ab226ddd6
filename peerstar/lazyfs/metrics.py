"""Prometheus metrics of the lazy layer filesystem.

Owns: the metric objects, the on-disk caches' among them (one registry per process, so
a mount daemon can write its own text file and a host process can expose them on
`/metrics`). Labels are the layer digest, so one scrape tells which layer is fetching;
the caches' byte gauge is the shared directory's, so it has the cache's name only.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, write_to_textfile

REGISTRY = CollectorRegistry(auto_describe=True)

ON_DEMAND_FETCHES = Counter(
    "peerstar_lazyfs_on_demand_fetches", "HTTP range requests made for on-demand reads",
    ["layer"], registry=REGISTRY)
FETCHED_BYTES = Counter(
    "peerstar_lazyfs_fetched_bytes", "compressed bytes fetched from the registry",
    ["layer", "kind"], registry=REGISTRY)  # kind: on_demand | readahead | prefetch | background
FETCH_LATENCY = Histogram(
    "peerstar_lazyfs_fetch_seconds", "latency of one HTTP range request",
    ["layer"], registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
READ_LATENCY = Histogram(
    "peerstar_lazyfs_read_seconds", "latency of one FUSE read (cache hits included)",
    ["layer"], registry=REGISTRY,
    buckets=(0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
VERIFY_FAILURES = Counter(
    "peerstar_lazyfs_verify_failures", "chunks whose digest did not match the TOC",
    ["layer"], registry=REGISTRY)
PREFETCH_SECONDS = Histogram(
    "peerstar_lazyfs_prefetch_seconds", "time to fetch the prioritized files at mount",
    ["layer"], registry=REGISTRY, buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60))
MOUNT_SECONDS = Histogram(
    "peerstar_lazyfs_mount_seconds", "time from mount start to the filesystem being ready",
    ["layer"], registry=REGISTRY, buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60))

# The on-disk caches (`peerstar.lazyfs.cache`); cache: regions | chunks.
CACHE_BYTES = Gauge(
    "peerstar_lazyfs_cache_bytes", "bytes in the cache directory (shared by every mount)",
    ["cache"], registry=REGISTRY)
CACHE_HITS = Counter(
    "peerstar_lazyfs_cache_hits", "cache reads that found the bytes",
    ["layer", "cache"], registry=REGISTRY)
CACHE_MISSES = Counter(
    "peerstar_lazyfs_cache_misses", "cache reads that did not (never cached, or evicted)",
    ["layer", "cache"], registry=REGISTRY)
CACHE_EVICTIONS = Counter(
    "peerstar_lazyfs_cache_evictions", "files removed to keep the cache within its bound",
    ["layer", "cache"], registry=REGISTRY)
CACHE_WRITE_FAILURES = Counter(
    "peerstar_lazyfs_cache_write_failures", "cache writes that failed (disk full...)",
    ["layer", "cache"], registry=REGISTRY)


def write_textfile(path: Path) -> None:
    """Write this process's metrics in the text format (node-exporter textfile style)."""
    write_to_textfile(str(path), REGISTRY)

