"""Snapshotter error kinds, one per gRPC status containerd understands.

Owns: the exception types the core raises; `peerstar.snapshotter.service` maps each to
the gRPC code containerd's `errdefs.FromGRPC` turns back into its own error kinds
(NotFound, AlreadyExists, FailedPrecondition, InvalidArgument).
"""

from __future__ import annotations

from peerstar.errors import PeerstarError


class SnapshotError(PeerstarError):
    """Base of every snapshotter error; unmapped ones become gRPC UNKNOWN."""


class NotFound(SnapshotError):
    pass


class AlreadyExists(SnapshotError):
    pass


class FailedPrecondition(SnapshotError):
    pass


class InvalidArgument(SnapshotError):
    pass
