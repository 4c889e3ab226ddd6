"""The settings of a lazy layer mount, as one frozen object.

Owns `MountOptions` and its groups -- `FetchOptions` (reading the blob from its
registry), `CacheOptions` (bounds of the cache directory), `PrefetchOptions` (the
prioritized files and the idle-time fetch of the rest) -- their defaults, and their
form on the mount daemon's command line: `to_argv` writes it, `add_arguments` /
`from_args` read it back in `peerstar.lazyfs.mountd`. So every setting reaches the
daemon, started with `python -m` or forked from the zygote, as an argument and never
through the environment. Registry credentials are not options: they are secrets, and
`ps` shows a command line to every user (`peerstar.lazyfs.state.auth_to_env` carries them).

Imports nothing heavy: the snapshotter's config builds these without httpx or FUSE.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from peerstar.lazyfs.cache import DEFAULT_MAX_BYTES

DEFAULT_REGION_SIZE = 50_000  # bytes per fetched region, as the stargz snapshotter


@dataclass(frozen=True)
class FetchOptions:
    """How a layer blob is read from its registry."""

    region_size: int = DEFAULT_REGION_SIZE  # fetch granularity, bytes
    request_timeout: float = 30.0  # seconds per HTTP request
    retries: int = 3
    # A PEM bundle of CAs trusted besides the usual ones (SSL_CERT_FILE / SSL_CERT_DIR,
    # else certifi plus the system store): the snapshotter's `[remote] ca_file`.
    ca_file: str = ""


@dataclass(frozen=True)
class CacheOptions:
    """Bounds of the cache directory shared by all mounts (0 = unbounded)."""

    region_bytes: int = DEFAULT_MAX_BYTES  # <cache_dir>/regions: compressed bytes
    chunk_bytes: int = DEFAULT_MAX_BYTES  # <cache_dir>/chunks: verified chunks


@dataclass(frozen=True)
class PrefetchOptions:
    """The prioritized files fetched at mount time, and the rest of the layer later."""

    timeout: float = 10.0  # seconds from the start reads of prioritized files wait for them
    wait: bool = False  # the mount reports ready only once the prefetch is done (or timed out)
    size: int = 0  # bytes to prefetch when the layer has no landmark
    background: bool = True  # fetch the rest of the layer when reads are idle
    background_idle: float = 5.0  # seconds without on-demand reads that count as idle


@dataclass(frozen=True)
class MountOptions:
    """Everything `mount_layer` needs besides the layer, its places and its credentials."""

    fetch: FetchOptions = field(default_factory=FetchOptions)
    cache: CacheOptions = field(default_factory=CacheOptions)
    prefetch: PrefetchOptions = field(default_factory=PrefetchOptions)
    verify: bool = True  # False (DANGEROUS) serves chunks without checking their digests
    open_timeout: float = 60.0  # seconds the starter waits for the daemon (not passed on)
    debug: bool = False  # the daemon logs at DEBUG level
    # A cgroup the daemon moves itself into (`peerstar.lazyfs.cgroup`), so killing its
    # starter's cgroup (a pod's container) does not end the mount; "" = stay.
    cgroup: str = ""

    def to_argv(self) -> list[str]:
        """The mount daemon's options (`add_arguments`) that give back these ones."""
        f, c, p = self.fetch, self.cache, self.prefetch
        argv = ["--region-size", str(f.region_size), "--timeout", str(f.request_timeout),
                "--retries", str(f.retries),
                "--region-cache-bytes", str(c.region_bytes),
                "--chunk-cache-bytes", str(c.chunk_bytes),
                "--prefetch-timeout", str(p.timeout), "--prefetch-size", str(p.size),
                "--background-idle", str(p.background_idle)]
        if f.ca_file:
            argv += ["--ca-file", f.ca_file]
        if p.wait:
            argv.append("--wait-prefetch")
        if not p.background:
            argv.append("--no-background")
        if not self.verify:
            argv.append("--no-verify")
        if self.debug:
            argv.append("--debug")
        if self.cgroup:
            argv += ["--cgroup", self.cgroup]
        return argv

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        """The daemon's options for these settings (defaults: the dataclasses')."""
        f, c, pf = FetchOptions(), CacheOptions(), PrefetchOptions()
        p.add_argument("--prefetch-timeout", type=float, default=pf.timeout,
                       help="seconds (from the start) reads of prioritized files wait for "
                            "the prefetch; with --wait-prefetch, the readiness report too")
        p.add_argument("--wait-prefetch", action="store_true",
                       help="report readiness only once the prefetch is done (or timed out)")
        p.add_argument("--prefetch-size", type=int, default=pf.size,
                       help="bytes to prefetch when the layer has no landmark")
        p.add_argument("--no-verify", action="store_true",
                       help="DANGEROUS: serve chunks without checking their digests")
        p.add_argument("--region-size", type=int, default=f.region_size)
        p.add_argument("--region-cache-bytes", type=int, default=c.region_bytes,
                       help="bound of <cache-dir>/regions (0 = unbounded)")
        p.add_argument("--chunk-cache-bytes", type=int, default=c.chunk_bytes,
                       help="bound of <cache-dir>/chunks (0 = unbounded)")
        p.add_argument("--timeout", type=float, default=f.request_timeout,
                       help="per HTTP request")
        p.add_argument("--retries", type=int, default=f.retries)
        p.add_argument("--ca-file", default=f.ca_file,
                       help="PEM bundle of CAs trusted for the registry besides the usual")
        p.add_argument("--no-background", action="store_true", help="no idle-time full fetch")
        p.add_argument("--background-idle", type=float, default=pf.background_idle)
        p.add_argument("--debug", action="store_true")
        p.add_argument("--cgroup", default="",
                       help="move into this cgroup (ROOT/NAME) before mounting")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MountOptions:
        """The options `add_arguments` parsed (`open_timeout` is the starter's: default)."""
        return cls(
            fetch=FetchOptions(region_size=args.region_size, request_timeout=args.timeout,
                               retries=args.retries, ca_file=args.ca_file),
            cache=CacheOptions(region_bytes=args.region_cache_bytes,
                               chunk_bytes=args.chunk_cache_bytes),
            prefetch=PrefetchOptions(timeout=args.prefetch_timeout, wait=args.wait_prefetch,
                                     size=args.prefetch_size,
                                     background=not args.no_background,
                                     background_idle=args.background_idle),
            verify=not args.no_verify, debug=args.debug, cgroup=args.cgroup)
