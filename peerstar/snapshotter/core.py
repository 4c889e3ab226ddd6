"""The snapshotter itself: containerd's overlayfs snapshotter semantics plus remote layers.

Owns: the on-disk layout under the root (`metadata.db`, `snapshots/<id>/fs` and
`snapshots/<id>/work`, `cache/` for lazy layers), the mount lists handed to containerd,
usage accounting, removal and cleanup, the remote-snapshot handshake and the re-mount of
remote layers at start.

Mounts are those of containerd's overlayfs snapshotter: a snapshot without parents gets
a bind mount of its own `fs` (rw for Active, ro for View); a View of exactly one parent
is a read-only bind mount of that parent's `fs`; otherwise an overlay whose lowerdirs are
the parents' `fs` directories nearest first, with `upperdir`/`workdir` for Active
snapshots. A remote (lazily pulled) committed snapshot's `fs` is the mountpoint of its
FUSE layer, so it is a lowerdir like any other.

A remote parent whose mount is gone is mounted again before its mounts are handed
out; if that fails, so does the call (FailedPrecondition, saying which layer and why).

Remote handshake (REFERENCE.md section 2): an Active Prepare carrying
`containerd.io/snapshot.ref` and eStargz layer labels is mounted lazily and committed
under the ref with label `containerd.io/snapshot/remote`; the caller gets AlreadyExists
and containerd skips downloading the layer. Any failure: the snapshot stays a normal
Active one and a log line says why, so containerd pulls and unpacks the layer itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from peerstar.lazyfs import MountError
from peerstar.lazyfs.state import fuse_mounts_under
from peerstar.snapshotter.config import RemoteConfig
from peerstar.snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from peerstar.snapshotter.filters import compile_filters
from peerstar.snapshotter.metadata import Kind, MetaStore, Snapshot
from peerstar.snapshotter.metrics import REMOTE_PREPARES
from peerstar.snapshotter.remote import (
    LABEL_REF,
    LABEL_REMOTE,
    LayerMounter,
    NotRemote,
    RemoteLayer,
    image_layer_digests,
    remote_layer_from_labels,
)

log = logging.getLogger("peerstar.snapshotter")

MAX_LABEL_BYTES = 4096  # containerd: a key/value pair may not exceed 4096 bytes
REMOTE_LABEL_VALUE = "remote snapshot"  # the value stargz-snapshotter writes


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


def _overlay_index_param() -> bool:
    # containerd adds `index=off` when the kernel has the parameter: the overlay index
    # would tie upper dirs to the lower dirs' file handles across remounts.
    return os.path.exists("/sys/module/overlay/parameters/index")


def _check_labels(labels: dict[str, str]) -> None:
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgument(f"label {k[:64]!r}: key and value exceed {MAX_LABEL_BYTES} "
                                  "bytes")


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes, inodes) under `path` as containerd counts them: allocated blocks, each
    inode once (hardlinks are not double counted), the root included."""
    seen: set[tuple[int, int]] = set()
    size = 0

    def visit(st: os.stat_result) -> None:
        nonlocal size
        ident = (st.st_dev, st.st_ino)
        if ident not in seen:
            seen.add(ident)
            size += st.st_blocks * 512

    try:
        visit(os.lstat(path))
    except FileNotFoundError:
        return 0, 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                visit(os.lstat(os.path.join(dirpath, name)))
            except FileNotFoundError:
                continue
    return size, len(seen)


class Snapshotter:
    """All snapshot operations on one root; thread-safe."""

    def __init__(self, root: Path, remote: RemoteConfig | None = None,
                 mounter: LayerMounter | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "snapshots").mkdir(exist_ok=True)
        self.remote_cfg = remote or RemoteConfig()
        self.mounter = mounter or LayerMounter(self.remote_cfg, self.root / "cache")
        self.meta = MetaStore(self.root / "metadata.db")
        # Where lazyfs mount daemons keep state/stats/.prom files (peerstar.lazyfs.state).
        self.mounts_dir = self.root / "cache" / "mounts"
        self.index_off = _overlay_index_param()
        # Directory creation/removal and mounting are not part of the SQL transaction;
        # one lock keeps a Remove from racing a Prepare on the same parent.
        self._lock = threading.RLock()
        self._remount_guard = threading.Lock()
        self._remount_locks: dict[int, threading.Lock] = {}

    def close(self) -> None:
        close_mounter = getattr(self.mounter, "close", None)
        if close_mounter is not None:  # stops the zygote; layer daemons keep serving
            close_mounter()
        self.meta.close()

    # -- paths -----------------------------------------------------------------------

    def snapshot_dir(self, snap: Snapshot) -> Path:
        return self.root / "snapshots" / str(snap.id)

    def fs_path(self, snap: Snapshot) -> Path:
        return self.snapshot_dir(snap) / "fs"

    def work_path(self, snap: Snapshot) -> Path:
        return self.snapshot_dir(snap) / "work"

    # -- mounts ----------------------------------------------------------------------

    def mounts(self, key: str) -> list[Mount]:
        return self._mounts(self.meta.get(key))

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        parents = self.meta.chain(snap)
        self._heal_chain(parents)
        if not parents:
            flag = "rw" if snap.kind == Kind.ACTIVE else "ro"
            return [Mount("bind", str(self.fs_path(snap)), (flag, "rbind"))]
        options: list[str] = ["index=off"] if self.index_off else []
        if snap.kind == Kind.ACTIVE:
            options += [f"workdir={self.work_path(snap)}", f"upperdir={self.fs_path(snap)}"]
        elif len(parents) == 1:
            return [Mount("bind", str(self.fs_path(parents[0])), ("ro", "rbind"))]
        options.append("lowerdir=" + ":".join(str(self.fs_path(p)) for p in parents))
        return [Mount("overlay", "overlay", tuple(options))]

    # -- create ----------------------------------------------------------------------

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> Snapshot:
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        _check_labels(labels)
        with self._lock:
            snap = self.meta.create(key, parent, kind, labels)
            try:
                d = self.snapshot_dir(snap)
                if d.exists():  # left over from a crash between mkdir and the row
                    shutil.rmtree(d)
                (d / "fs").mkdir(parents=True, mode=0o755)
                if kind == Kind.ACTIVE:
                    (d / "work").mkdir(mode=0o711)
            except OSError:
                self.meta.delete(key)
                raise
        return snap

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        """A new Active snapshot, or (remote layer) AlreadyExists after a lazy mount."""
        labels = dict(labels)
        target = labels.get(LABEL_REF, "")
        layer: RemoteLayer | None = None
        if target:
            try:
                layer = remote_layer_from_labels(labels, self.remote_cfg)
            except NotRemote as exc:
                REMOTE_PREPARES.labels("fallback_labels").inc()
                log.info("prepare %s: normal snapshot, containerd pulls the layer itself: %s",
                         key, exc)
        if layer is not None and self.meta.find(target) is not None:
            # The layer is already here (another image shares it); containerd finds it
            # by the ref label, as after a fresh remote mount.
            raise AlreadyExists(f"target snapshot {target!r} already exists")
        if layer is not None:
            # The image's other layers start resolving now, beside this layer's mount:
            # their Prepares then find their footer, TOC and prefetch range local.
            self.mounter.resolve_ahead(layer, image_layer_digests(labels))
        snap = self._create(Kind.ACTIVE, key, parent, labels)
        if layer is not None and self._try_remote(snap, target, layer, labels):
            raise AlreadyExists(f"target snapshot {target!r} mounted remotely")
        return self._mounts_of_new(snap)

    def _mounts_of_new(self, snap: Snapshot) -> list[Mount]:
        """The mounts of a snapshot just created; if a lazy parent layer cannot be
        mounted, the snapshot is removed again and the error is the caller's."""
        try:
            return self._mounts(snap)
        except FailedPrecondition:
            self.remove(snap.key)
            raise

    def _try_remote(self, snap: Snapshot, target: str, layer: RemoteLayer,
                    labels: dict[str, str]) -> bool:
        fs = self.fs_path(snap)
        try:
            report = self.mounter.mount(layer, fs)
        except (MountError, OSError) as exc:
            log.warning("prepare %s: remote mount of layer %s from %s failed, falling back "
                        "to a normal snapshot (containerd pulls the layer): %s",
                        snap.key, layer.digest, layer.url, exc)
            REMOTE_PREPARES.labels("fallback_mount_failed").inc()
            self.mounter.unmount(fs)
            return False
        committed = dict(labels)
        committed[LABEL_REMOTE] = REMOTE_LABEL_VALUE
        if isinstance(report.get("size"), int):
            layer = replace(layer, size=report["size"])  # mounts again need no HEAD
        try:
            with self._lock:
                self.meta.commit(snap.key, target, committed, 0, 0, remote=layer.to_json())
        except AlreadyExists:
            # Lost a race with a concurrent Prepare of the same layer: theirs stands.
            self.mounter.unmount(fs)
            self.remove(snap.key)
            return True
        shutil.rmtree(self.work_path(snap), ignore_errors=True)  # no upperdir to serve
        REMOTE_PREPARES.labels("remote").inc()
        log.info("prepare %s: layer %s mounted lazily from %s as %s (%s)", snap.key,
                 layer.digest, report.pop("url", layer.url), target, report)
        return True

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._mounts_of_new(self._create(Kind.VIEW, key, parent, dict(labels)))

    # -- commit / remove -------------------------------------------------------------

    def commit(self, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        if not name:
            raise InvalidArgument("commit name must not be empty")
        _check_labels(labels)
        with self._lock:
            snap = self.meta.get(key)
            size, inodes = (disk_usage(self.fs_path(snap)) if snap.kind == Kind.ACTIVE
                            else (0, 0))
            committed = self.meta.commit(key, name, dict(labels), size, inodes)
            # The work dir only serves an overlay with an upperdir; drop it.
            shutil.rmtree(self.work_path(committed), ignore_errors=True)
            return committed

    def remove(self, key: str) -> None:
        with self._lock:
            snap = self.meta.delete(key)
            d = self.snapshot_dir(snap)
            if snap.remote:
                self.mounter.unmount(self.fs_path(snap))
            self._remove_dir(d)

    def _remove_dir(self, d: Path) -> None:
        # Rename first: a crash mid-rmtree leaves a name Cleanup removes, never a
        # half-deleted dir under a live id.
        trash = d.with_name(f"rm-{d.name}")
        try:
            os.rename(d, trash)
        except FileNotFoundError:
            return
        except OSError:
            trash = d
        shutil.rmtree(trash, ignore_errors=True)

    def cleanup(self) -> None:
        """Remove directories no snapshot owns (crash leftovers, interrupted removals)."""
        with self._lock:
            live = {str(i) for i in self.meta.ids()}
            for entry in (self.root / "snapshots").iterdir():
                if entry.name in live:
                    continue
                fs = entry / "fs"
                if (fs.exists() or os.path.islink(fs)) and self.mounter.is_mounted(fs):
                    self.mounter.unmount(fs)
                shutil.rmtree(entry, ignore_errors=True)

    # -- info ------------------------------------------------------------------------

    def stat(self, key: str) -> Snapshot:
        return self.meta.get(key)

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """containerd's storage.UpdateInfo: only labels are mutable."""
        _check_labels(labels)
        with self._lock:
            snap = self.meta.get(key)
            new = dict(snap.labels)
            if not paths:
                new = dict(labels)
            for path in paths:
                if path.startswith("labels."):
                    k = path[len("labels."):]
                    if labels.get(k):
                        new[k] = labels[k]
                    else:
                        new.pop(k, None)  # an empty value deletes the label
                elif path == "labels":
                    new = dict(labels)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {key!r}")
            return self.meta.set_labels(key, {k: v for k, v in new.items() if v})

    def list(self, filters: list[str]) -> list[Snapshot]:
        match = compile_filters(filters)
        return [s for s in self.meta.all() if match(s)]

    def usage(self, key: str) -> tuple[int, int]:
        snap = self.meta.get(key)
        if snap.kind == Kind.ACTIVE:
            return disk_usage(self.fs_path(snap))
        return snap.size, snap.inodes

    # -- restart ---------------------------------------------------------------------

    def _ensure_mounted(self, snap: Snapshot) -> str:
        """Mount remote snapshot `snap` again if its mount is gone; "alive" | "remounted"
        | "failed: why". A lock per snapshot: two calls never race to mount the same
        directory, different layers mount in parallel."""
        assert snap.remote is not None
        fs = self.fs_path(snap)
        with self._remount_guard:
            lock = self._remount_locks.setdefault(snap.id, threading.Lock())
        with lock:
            if self.mounter.is_mounted(fs):
                return "alive"
            self.mounter.unmount(fs)  # a dead FUSE mount (ENOTCONN) must go first
            layer = RemoteLayer.from_json(snap.remote)
            try:
                report = self.mounter.mount(layer, fs)
            except (MountError, OSError) as exc:
                log.error("remote snapshot %s (layer %s): cannot mount again: %s; its "
                          "containers will get I/O errors", snap.key,
                          snap.remote.get("digest"), exc)
                return f"failed: {exc}"
            if layer.size is None and isinstance(report.get("size"), int):
                # Committed before sizes were kept: the next mount needs no request.
                self.meta.set_remote(snap.key, replace(layer, size=report["size"]).to_json())
        log.warning("remote snapshot %s (layer %s): its mount was gone; mounted again",
                    snap.key, snap.remote.get("digest"))
        return "remounted"

    def _heal_chain(self, parents: Sequence[Snapshot]) -> None:
        # A mount daemon that died (crash, OOM kill) leaves a dead FUSE mount; containers
        # already running on it cannot be saved, but new ones get a fresh mount. A layer
        # that cannot be mounted (a node started offline without its TOC in the cache)
        # is an error: an overlay over its empty directory would run the container on
        # the wrong files.
        for p in parents:
            if p.remote:
                result = self._ensure_mounted(p)
                if result.startswith("failed"):
                    raise FailedPrecondition(
                        f"lazily pulled layer {p.remote.get('digest')} (snapshot {p.key}) "
                        f"is not mounted and cannot be mounted again: "
                        f"{result.removeprefix('failed: ')}; it starts once its registry "
                        "is reachable")

    def restore_remote_mounts(self) -> dict[str, str]:
        """Mount every remote snapshot whose mount is gone (snapshotter/node restart).

        Live mounts (their daemons survived us) are kept: running containers keep using
        them. Returns key -> "alive" | "remounted" | "failed: why".
        """
        remote = [snap for snap in self.meta.all() if snap.remote]
        self._unmount_strays({self.fs_path(snap) for snap in remote})
        if not remote:
            return {}
        # In parallel: with the registry unreachable each mount waits for its timeout,
        # and containerd cannot reach us until this is done.
        with ThreadPoolExecutor(max_workers=min(8, len(remote)),
                                thread_name_prefix="restore") as pool:
            results = list(pool.map(self._ensure_mounted, remote))
        return {snap.key: r for snap, r in zip(remote, results, strict=True)}

    def _unmount_strays(self, wanted: set[Path]) -> None:
        """Unmount the lazy mounts under our root that no remote snapshot owns (a
        snapshotter killed between a Remove's commit and its unmount, or between a
        mount and its commit): their daemons, which outlived us, then exit."""
        points = {p.resolve() for p in fuse_mounts_under(self.root / "snapshots")}
        for state in self.mounts_dir.glob("*.json"):
            if state.name.endswith(".stats.json"):
                continue
            try:
                point = json.loads(state.read_text()).get("mountpoint", "")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(point, str) and point.startswith(str(self.root) + os.sep):
                points.add(Path(point))
        for point in sorted(points - {p.resolve() for p in wanted}):
            if self.mounter.is_mounted(point) or os.path.ismount(point):
                log.warning("lazy mount %s belongs to no snapshot: unmounting it", point)
                self.mounter.unmount(point)
