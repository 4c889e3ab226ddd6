"""The remote-snapshot side: which Prepare calls name a lazily mountable eStargz layer,
where that layer lives, and starting/stopping its FUSE mount.

Owns: reading the labels containerd passes with a layer's Prepare (ctr-remote's
`containerd.io/snapshot/remote/stargz.*`, CRI's `containerd.io/snapshot/cri.*`, the
`containerd.io/snapshot/stargz/toc.digest` annotation), resolving the registry from the
image reference (docker.io normalisation, plain HTTP for localhost/127.0.0.1/::1 and
configured insecure hosts, HTTPS otherwise -- containerd's rule, as
`peerstar.distribution.client.blob_url` applies it), the host a layer is read from
(`LayerMounter.source`: the first of the registry's hosts.toml mirrors that answers for
the blob, else the registry; `peerstar.snapshotter.hosts`), and `LayerMounter`,
the snapshotter's view of `peerstar.lazyfs`'s mount API (`mount_layer`, `find_mount`):
one mount daemon process per layer, in its own session (and, with `[remote]
daemon_cgroup`, its own cgroup: `peerstar.lazyfs.cgroup`), so a snapshotter restart --
in a pod, its container's death -- does not take running containers' layers down.
`LayerMounter` also hands each daemon the registry credentials for its layer's host
(`peerstar.snapshotter.credentials`: looked up at every mount, never stored in the
snapshot database, passed in the daemon's environment) and the `[remote]` settings as a
`peerstar.lazyfs.options.MountOptions` (`mount_options`; the extra CA file `[remote]
ca_file` among them, an argument of the zygote and of every daemon). A failed mount is
lazyfs's `MountError`, its message extended with which credentials were used.

Every reason not to go remote is a `NotRemote` with a sentence a log line can carry.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from peerstar import lazyfs
from peerstar.distribution.auth import RegistryAuth
from peerstar.distribution.client import blob_url, is_plain_http_host
from peerstar.errors import PeerstarError
from peerstar.lazyfs.mount import MountError
from peerstar.lazyfs.options import CacheOptions, FetchOptions, MountOptions, PrefetchOptions
from peerstar.oci.mediatypes import TOC_DIGEST_ANNOTATION as LABEL_TOC_DIGEST  # same name
from peerstar.snapshotter.config import RemoteConfig, cache_bound
from peerstar.snapshotter.credentials import Credentials, CredentialsError, Keychain
from peerstar.snapshotter.hosts import HostsError, RegistryHost, default_host, registry_hosts
from peerstar.snapshotter.metrics import RESOLVED_AHEAD, RESOLVED_AHEAD_BYTES

log = logging.getLogger("peerstar.snapshotter.remote")

# Layers resolved ahead at once (each a footer + TOC + prefetch-range fetch); the digests
# remembered as resolved or resolving, so a layer is resolved ahead once.
RESOLVE_AHEAD_WORKERS = 8
RESOLVE_AHEAD_REMEMBERED = 4096

LABEL_REF = "containerd.io/snapshot.ref"
LABEL_REMOTE = "containerd.io/snapshot/remote"
LABEL_STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
LABEL_STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
LABEL_STARGZ_PREFETCH = "containerd.io/snapshot/remote/stargz.prefetch"
LABEL_STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"
LABEL_URLS_PREFIX = "containerd.io/snapshot/remote/urls"
LABEL_CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"


class NotRemote(PeerstarError):
    """This layer is not mounted lazily; the message says why (it goes to the log)."""


@dataclass(frozen=True)
class ImageLocation:
    host: str  # registry host[:port] as written (docker.io normalised to its API host)
    repository: str
    registry: str = ""  # the registry as the reference names it (docker.io kept)


def parse_image_reference(ref: str) -> ImageLocation:
    """Registry host and repository of `HOST/REPO[:TAG][@DIGEST]` (docker.io rules)."""
    name = ref.split("@", 1)[0]
    slash = name.find("/")
    # A tag's colon comes after the last slash; a port's colon before the first.
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    first = name[:slash] if slash >= 0 else ""
    if first and ("." in first or ":" in first or first == "localhost"):
        host, repo = first, name[slash + 1:]
    else:
        host, repo = DOCKER_HUB, name
        if "/" not in repo:
            repo = "library/" + repo
    if not repo or not re.fullmatch(r"[a-z0-9]+(?:[._/-]+[a-z0-9]+)*", repo):
        raise NotRemote(f"cannot parse image reference {ref!r}")
    return ImageLocation(DOCKER_HUB_API if host == DOCKER_HUB else host, repo, host)


@dataclass(frozen=True)
class RemoteLayer:
    """Everything needed to mount one layer again, persisted with its snapshot."""

    reference: str
    digest: str
    toc_digest: str
    url: str
    prefetch_size: int = 0
    # The blob's size once a mount learnt it: a mount again (restart, reboot) then needs
    # no request at all when the footer and TOC are cached -- the node starts offline.
    size: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RemoteLayer:
        size = data.get("size")
        return cls(**{k: data[k] for k in ("reference", "digest", "toc_digest", "url")},
                   prefetch_size=int(data.get("prefetch_size", 0)),
                   size=size if isinstance(size, int) and size > 0 else None)


def remote_layer_from_labels(labels: dict[str, str], cfg: RemoteConfig) -> RemoteLayer:
    """The layer a Prepare's labels describe, or NotRemote saying what is missing."""
    if not cfg.enable:
        raise NotRemote("remote snapshots are disabled in the config")
    if LABEL_REF not in labels:
        raise NotRemote(f"no {LABEL_REF} label")
    if LABEL_STARGZ_REFERENCE in labels or LABEL_STARGZ_DIGEST in labels:
        reference = labels.get(LABEL_STARGZ_REFERENCE, "")
        digest = labels.get(LABEL_STARGZ_DIGEST, "")
    elif LABEL_CRI_IMAGE_REF in labels or LABEL_CRI_LAYER_DIGEST in labels:
        reference = labels.get(LABEL_CRI_IMAGE_REF, "")
        digest = labels.get(LABEL_CRI_LAYER_DIGEST, "")
    else:
        raise NotRemote("no image reference/layer digest labels (pulled without "
                        "ctr-remote rpull or CRI snapshot annotations)")
    if not reference or not _DIGEST_RE.match(digest):
        raise NotRemote(f"incomplete layer labels (reference {reference!r}, digest {digest!r})")
    toc_digest = labels.get(LABEL_TOC_DIGEST, "")
    if not toc_digest:
        # No TOC digest: not an eStargz layer (or not annotated); never mount it unverified.
        raise NotRemote(f"layer {digest} has no {LABEL_TOC_DIGEST} label (not eStargz)")
    if not _DIGEST_RE.match(toc_digest):
        raise NotRemote(f"layer {digest}: malformed TOC digest {toc_digest!r}")
    loc = parse_image_reference(reference)
    url = blob_url(loc.host, loc.repository, digest,
                   True if loc.host in cfg.insecure_hosts else None)
    try:
        prefetch = int(labels.get(LABEL_STARGZ_PREFETCH, "0") or 0)
    except ValueError:
        prefetch = 0
    return RemoteLayer(reference, digest, toc_digest, url, max(prefetch, cfg.prefetch_size))


@dataclass(frozen=True)
class LayerSource:
    """Where one layer is read from: its blob URL on one of its registry's hosts (a
    mirror, or the registry), with that host's fetch options."""

    url: str
    host: str
    fetch: FetchOptions
    size: int | None = None  # learnt when the host was asked (several hosts listed)


def image_layer_digests(labels: dict[str, str]) -> list[str]:
    """The layer digests of the image a Prepare belongs to, as its labels list them
    (ctr-remote's `stargz.layers`, CRI's `cri.image-layers`: this layer and the ones
    above it, cut short where a label would grow too long); malformed items skipped."""
    value = labels.get(LABEL_STARGZ_LAYERS) or labels.get(LABEL_CRI_IMAGE_LAYERS) or ""
    return [d for d in (item.strip() for item in value.split(",")) if _DIGEST_RE.match(d)]


def mount_options(cfg: RemoteConfig, cache_dir: Path) -> MountOptions:
    """The lazyfs mount options `[remote]` sets (a layer's prefetch size aside); cache
    bounds given as a share of the disk are taken of the one holding `cache_dir`."""
    return MountOptions(
        fetch=FetchOptions(region_size=cfg.region_size, request_timeout=cfg.request_timeout,
                           retries=cfg.retries,
                           ca_file=str(Path(cfg.ca_file).resolve()) if cfg.ca_file else ""),
        cache=CacheOptions(region_bytes=cache_bound(cfg.region_cache_bytes, cache_dir),
                           chunk_bytes=cache_bound(cfg.chunk_cache_bytes, cache_dir)),
        prefetch=PrefetchOptions(timeout=cfg.prefetch_timeout, size=cfg.prefetch_size,
                                 background=cfg.background_fetch),
        verify=cfg.verify, open_timeout=cfg.mount_timeout, cgroup=cfg.daemon_cgroup)


class LayerMounter:
    """Starts, checks and stops lazy layer mounts through `peerstar.lazyfs`'s mount API
    (one mount daemon process per layer, in its own session).

    The daemons are forked from a zygote (`peerstar.lazyfs.zygote`, started by
    `start_zygote` when the snapshotter starts, or at the first mount): containerd
    prepares layers one after the other, and a fork costs milliseconds where a fresh
    `python -m` daemon costs ~0.3-0.4 s of interpreter start-up and imports per layer.
    The zygote exits with the snapshotter (its control socket closes); the daemons do
    not. Without a working zygote (or with `zygote = false`) each mount starts its
    daemon with `python -m`, as before."""

    def __init__(self, cfg: RemoteConfig, cache_dir: Path) -> None:
        self.cfg = cfg
        self.options = mount_options(cfg, cache_dir)
        self.cache_dir = Path(cache_dir)
        self._mounts: dict[Path, Any] = {}  # mountpoint -> lazyfs LayerMount
        self._lock = threading.Lock()
        self._zygote: Any = None  # peerstar.lazyfs.zygote.Zygote
        self._zygote_lock = threading.Lock()
        self._closed = False
        # digest -> set once its footer and TOC are in the cache (or resolving failed)
        self._ahead: OrderedDict[str, threading.Event] = OrderedDict()
        self._ahead_pool: ThreadPoolExecutor | None = None
        self._regions: Any = None  # lazyfs DiskCache of cache_dir/regions, opened once
        self.keychain = Keychain(cfg.auth_file)
        try:
            self.keychain.check()
        except CredentialsError as exc:  # the default file: say so now, not per layer
            log.warning("%s; layers from registries needing credentials will be pulled "
                        "by containerd", exc)

    def start_zygote(self) -> None:
        """Start the zygote now, without waiting for its imports (~0.4 s): by the first
        Prepare it is warm. A no-op if one runs or the config says no."""
        self._get_zygote()

    def _get_zygote(self) -> Any:
        """The running zygote, started if there is none. A dead one is replaced, and
        this mount falls back to `python -m` (as fast as waiting for the new zygote's
        imports); the next ones fork again. None when disabled or it cannot start."""
        if not (self.cfg.enable and self.cfg.zygote):
            return None
        with self._zygote_lock:
            if self._closed:
                return None
            z = self._zygote
            if z is not None and z.alive:
                return z
            replacing = z is not None
            if z is not None:
                log.warning("the mount daemon zygote (pid %d) is gone (exit status %s); "
                            "starting a new one", z.proc.pid, z.proc.returncode)
                z.close()
                self._zygote = None
            from peerstar.lazyfs.zygote import Zygote

            try:
                # It builds the TLS context (with the CA file) every daemon forks with.
                self._zygote = Zygote.start(ca_file=self.options.fetch.ca_file)
            except OSError as exc:
                log.warning("cannot start the mount daemon zygote: %s; layer daemons start "
                            "with python -m", exc)
                return None
            return None if replacing else self._zygote

    def close(self) -> None:
        """Stop the zygote and the resolving ahead (mount daemons keep running)."""
        with self._zygote_lock:
            self._closed = True
            z, self._zygote = self._zygote, None
        if z is not None:
            z.close()
        with self._lock:
            pool, self._ahead_pool = self._ahead_pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _credentials(self, host: str) -> Credentials:
        try:
            return self.keychain.lookup(host) or Credentials()
        except CredentialsError as exc:
            raise MountError(f"registry credentials for {host}: {exc}") from None

    @staticmethod
    def _auth(creds: Credentials) -> RegistryAuth:
        """lazyfs's `RegistryAuth` for these credentials (anonymous when empty)."""
        return RegistryAuth(creds.username, creds.password, creds.registry_token,
                            creds.identity_token)

    def resolve_ahead(self, layer: RemoteLayer, digests: Iterable[str]) -> int:
        """Start resolving the other layers of `layer`'s image (`digests`, from the
        Prepare's layer-list label) in the background, at most RESOLVE_AHEAD_WORKERS at
        once: footer, TOC and prefetch range into the cache their mounts read from
        (`peerstar.lazyfs.resolve`). Returns how many were started; a layer already
        resolved or resolving is not started again."""
        todo: list[tuple[str, threading.Event]] = []
        with self._lock:
            if self._closed:
                return 0
            for digest in digests:
                if digest == layer.digest or digest in self._ahead:
                    continue
                ready = self._ahead[digest] = threading.Event()
                todo.append((digest, ready))
            while len(self._ahead) > RESOLVE_AHEAD_REMEMBERED:
                _, old = self._ahead.popitem(last=False)
                old.set()
            if todo and self._ahead_pool is None:
                from peerstar.lazyfs.resolve import region_cache

                self._regions = region_cache(self.cache_dir, self.options.cache.region_bytes)
                self._ahead_pool = ThreadPoolExecutor(RESOLVE_AHEAD_WORKERS,
                                                      thread_name_prefix="resolve-ahead")
            pool = self._ahead_pool
        for digest, ready in todo:
            assert pool is not None
            pool.submit(self._resolve_one, layer, digest, ready)
        return len(todo)

    def _resolve_one(self, layer: RemoteLayer, digest: str, ready: threading.Event) -> None:
        from peerstar.lazyfs.resolve import resolve_ahead

        try:
            source = self.source(layer, digest)
            creds = self._credentials(source.host)
            res = resolve_ahead(source.url, digest, self._regions, fetch=source.fetch,
                                prefetch_size=layer.prefetch_size, auth=self._auth(creds),
                                on_toc=ready.set)
            RESOLVED_AHEAD.labels("ok").inc()
            RESOLVED_AHEAD_BYTES.inc(res.fetched_bytes)
            log.info("layer %s resolved ahead of its mount (TOC at %d, prefetch %d bytes, "
                     "%d bytes fetched)", digest, res.toc_offset, res.prefetch_end,
                     res.fetched_bytes)
        except Exception as exc:  # its own mount will fetch (and report) it
            RESOLVED_AHEAD.labels("failed").inc()
            log.info("layer %s: not resolved ahead (its mount fetches it): %s", digest, exc)
        finally:
            ready.set()

    def _wait_resolved(self, digest: str) -> None:
        """If `digest` is being resolved ahead, wait (at most the mount timeout) until its
        TOC is in the cache: its mount then starts without the network."""
        with self._lock:
            ready = self._ahead.get(digest)
        if ready is not None and not ready.wait(self.cfg.mount_timeout):
            log.info("layer %s: still resolving ahead after %.0f s; mounting it anyway",
                     digest, self.cfg.mount_timeout)

    def source(self, layer: RemoteLayer, digest: str) -> LayerSource:
        """Where blob `digest` of `layer`'s image is read from: the first host of its
        registry's hosts.toml (`[remote] hosts_dir`, containerd's config_path) that
        answers for the blob -- mirrors in the file's order, with `?ns=<registry>`,
        then the registry -- each asked once (`probe_size`). Without a hosts.toml,
        the registry, unasked (`layer.url`). MountError when no host serves it."""
        loc = parse_image_reference(layer.reference)
        plain = loc.host in self.cfg.insecure_hosts or is_plain_http_host(loc.host)
        hosts = registry_hosts(self.cfg.hosts_dir, loc.registry, plain_http=plain)
        if hosts == [default_host(loc.registry, plain)]:
            return LayerSource(f"{layer.url.rsplit('/', 1)[0]}/{digest}", loc.host,
                               self.options.fetch)
        from peerstar.lazyfs.fetcher import FetchError
        from peerstar.lazyfs.resolve import probe_size

        failures = []
        for h in hosts:
            url = h.blob_url(loc.registry, loc.repository, digest)
            try:
                fetch = self._fetch_options(h)
                size = probe_size(url, digest, fetch=fetch,
                                  auth=self._auth(self._credentials(h.host)))
            except (FetchError, MountError, HostsError) as exc:
                failures.append(f"{h.host}: {exc}")
                log.info("layer %s: not read from %s (%s); trying the next host", digest,
                         h.host, exc)
                continue
            return LayerSource(url, h.host, fetch, size)
        raise MountError(f"layer {digest}: no host of registry {loc.registry} serves it: "
                         + "; ".join(failures))

    def _fetch_options(self, host: RegistryHost) -> FetchOptions:
        """The fetch options for `host`: its hosts.toml `ca` file instead of `[remote]
        ca_file`; HostsError for TLS settings the lazy fetcher cannot honour."""
        if host.scheme == "https" and host.skip_verify:
            raise HostsError("skip_verify is not supported for lazily read layers: give "
                             "the host's CA as `ca` instead")
        if len(host.ca) > 1:
            raise HostsError("several `ca` files: give one PEM bundle holding them all")
        return replace(self.options.fetch, ca_file=host.ca[0]) if host.ca else \
            self.options.fetch

    def mount(self, layer: RemoteLayer, mountpoint: Path) -> dict[str, Any]:
        """Mount `layer` at `mountpoint` (read from `source`); returns a short report
        for the log, the URL it is read from included."""
        mountpoint = Path(mountpoint).resolve()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        source = self.source(layer, layer.digest)
        host = source.host
        creds = self._credentials(host)
        self._wait_resolved(layer.digest)
        options = replace(self.options, fetch=source.fetch,
                          prefetch=replace(self.options.prefetch, size=layer.prefetch_size))
        try:
            m = lazyfs.mount_layer(
                source.url, layer.digest, layer.toc_digest, mountpoint, self.cache_dir,
                options, size=source.size or layer.size, auth=self._auth(creds),
                zygote=self._get_zygote())
        except MountError as exc:
            # Which credentials were used (never their value): a 401 reads at once as
            # "none configured" or "these were refused".
            used = (f"credentials for {host} from {creds.source}" if not creds.empty else
                    f"no credentials for {host} in {self.keychain.path}")
            raise MountError(f"{exc} ({used})") from None
        with self._lock:
            self._mounts[mountpoint] = m
        return {"url": source.url, "pid": m.pid, "mount_seconds": m.mount_seconds,
                "prefetch_done": m.prefetch_done, "size": m.size}

    def _find(self, mountpoint: Path) -> Any:
        mountpoint = Path(mountpoint).resolve()
        with self._lock:
            m = self._mounts.get(mountpoint)
        if m is not None and m.alive and m.mounted:
            return m
        m = lazyfs.find_mount(mountpoint, self.cache_dir)
        if m is not None:
            with self._lock:
                self._mounts[mountpoint] = m
        return m

    def is_mounted(self, mountpoint: Path) -> bool:
        """A live FUSE mount is at `mountpoint`. Judged from the mount table and a stat
        (a mount whose daemon died fails it with ENOTCONN), not from the daemon's state
        file, which says less: it can be missing while the mount serves fine."""
        mountpoint = Path(mountpoint).resolve()
        if not (_mount_fstype(mountpoint) or "").startswith("fuse"):
            return False
        try:
            os.stat(mountpoint)
        except OSError:
            return False
        return True

    def unmount(self, mountpoint: Path) -> None:
        """Unmount (the daemon then exits); lazily if the mount is busy or dead."""
        mountpoint = Path(mountpoint).resolve()
        m = self._find(mountpoint)
        with self._lock:
            self._mounts.pop(mountpoint, None)
        if m is not None:
            try:
                m.unmount()
                return
            except Exception as exc:  # busy or dead: detach it below
                log.warning("unmount %s: %s; detaching it lazily", mountpoint, exc)
        if (_mount_fstype(mountpoint) or "").startswith("fuse"):
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True,
                           check=False)


def _mount_fstype(mountpoint: Path) -> str | None:
    target = str(Path(mountpoint))
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5:
                    point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                                   fields[4])
                    if point == target:
                        found = right.split()[0]
    except OSError:
        return None
    return found
