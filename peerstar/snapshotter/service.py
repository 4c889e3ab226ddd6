"""containerd's snapshots v1 gRPC service over a unix socket, backed by `Snapshotter`.

Owns: translating requests/responses between the generated protobuf types and the core,
mapping snapshotter errors to the gRPC codes containerd's `errdefs.FromGRPC` reads back
(NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT; anything else is
UNKNOWN with a log line), the operation metrics, and `serve` -- binding the socket
(a stale socket file from a previous run is replaced), re-mounting remote layers first,
then serving until SIGTERM/SIGINT. Remote layer mounts are left in place on exit: their
daemons run in their own sessions so containers keep reading across a restart.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from peerstar.snapshotter._proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from peerstar.snapshotter.config import SnapshotterConfig
from peerstar.snapshotter.core import Mount, Snapshotter
from peerstar.snapshotter.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from peerstar.snapshotter.metadata import Snapshot
from peerstar.snapshotter.metrics import OPERATION_SECONDS, OPERATIONS, start_metrics_server

log = logging.getLogger("peerstar.snapshotter.service")

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
]

T = TypeVar("T")


def _mount_pb(m: Mount) -> mount_pb2.Mount:
    return mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))


def _info_pb(s: Snapshot) -> snapshots_pb2.Info:
    info = snapshots_pb2.Info(name=s.key, parent=s.parent, kind=int(s.kind),
                              labels=s.labels)
    info.created_at.FromNanoseconds(s.created)
    info.updated_at.FromNanoseconds(s.updated)
    return info


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    """Each RPC calls the core; errors become gRPC statuses."""

    def __init__(self, core: Snapshotter) -> None:
        self.core = core

    def _call(self, method: str, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        t0 = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            return fn()
        except Exception as exc:
            for kind, c in _CODES:
                if isinstance(exc, kind):
                    code = c
                    break
            else:
                code = grpc.StatusCode.UNKNOWN
                log.exception("%s failed", method)
            if code != grpc.StatusCode.ALREADY_EXISTS:
                log.debug("%s: %s: %s", method, code.name, exc)
            context.abort(code, str(exc))
            raise  # abort raises; this keeps type checkers and readers sure of it
        finally:
            OPERATIONS.labels(method, code.name).inc()
            OPERATION_SECONDS.labels(method).observe(time.monotonic() - t0)

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call("Prepare", context, lambda: self.core.prepare(
            request.key, request.parent, dict(request.labels)))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=[_mount_pb(m) for m in mounts])

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call("View", context, lambda: self.core.view(
            request.key, request.parent, dict(request.labels)))
        return snapshots_pb2.ViewSnapshotResponse(mounts=[_mount_pb(m) for m in mounts])

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call("Mounts", context, lambda: self.core.mounts(request.key))
        return snapshots_pb2.MountsResponse(mounts=[_mount_pb(m) for m in mounts])

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call("Commit", context, lambda: self.core.commit(
            request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call("Remove", context, lambda: self.core.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        snap = self._call("Stat", context, lambda: self.core.stat(request.key))
        return snapshots_pb2.StatSnapshotResponse(info=_info_pb(snap))

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        snap = self._call("Update", context, lambda: self.core.update(
            request.info.name, dict(request.info.labels), paths))
        return snapshots_pb2.UpdateSnapshotResponse(info=_info_pb(snap))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        snaps = self._call("List", context, lambda: self.core.list(list(request.filters)))
        # containerd's server sends batches too; 100 keeps each message small.
        for i in range(0, len(snaps), 100):
            yield snapshots_pb2.ListSnapshotsResponse(
                info=[_info_pb(s) for s in snaps[i:i + 100]])

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        size, inodes = self._call("Usage", context, lambda: self.core.usage(request.key))
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._call("Cleanup", context, self.core.cleanup)
        return empty_pb2.Empty()


def _bind_socket_path(address: Path) -> None:
    address.parent.mkdir(parents=True, exist_ok=True)
    if address.exists() or address.is_symlink():
        if not address.is_socket():
            raise OSError(f"{address} exists and is not a socket; refusing to replace it")
        address.unlink()  # a previous run's socket: nothing listens on it any more


def start_server(cfg: SnapshotterConfig, core: Snapshotter | None = None,
                 workers: int = 32) -> tuple[grpc.Server, Snapshotter]:
    """Bind and start the gRPC server (remote layers re-mounted first); returns it."""
    core = core or Snapshotter(cfg.root, cfg.remote)
    start_zygote = getattr(core.mounter, "start_zygote", None)
    if start_zygote is not None:
        # Warm the mount daemons' fork server while we bind; the re-mounts and the first
        # Prepare fork from it instead of starting a Python per layer.
        start_zygote()
    restored = core.restore_remote_mounts()
    if restored:
        log.info("remote snapshots at start: %s", restored)
    address = Path(cfg.address)
    _bind_socket_path(address)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="snapshots"))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(core), server)
    if server.add_insecure_port(f"unix://{address}") == 0:
        raise OSError(f"cannot listen on unix socket {address}")
    server.start()
    os.chmod(address, 0o600)  # only root (containerd) talks to us
    return server, core


def serve(cfg: SnapshotterConfig, ready: Callable[[], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    server, core = start_server(cfg)
    metrics = None
    if cfg.metrics_address:
        metrics = start_metrics_server(cfg.metrics_address, core.mounts_dir)
        log.info("metrics on http://%s/metrics", cfg.metrics_address)
    log.warning("peerstar snapshotter serving on %s (root %s)", cfg.address, cfg.root)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    if ready:
        ready()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        server.stop(grace=5).wait()
        if metrics is not None:
            metrics.shutdown()
        core.close()
        try:
            Path(cfg.address).unlink()
        except OSError:
            pass
    return 0
