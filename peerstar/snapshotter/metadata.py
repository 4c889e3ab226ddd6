"""Snapshot metadata persisted in SQLite: what containerd's bolt `storage` package keeps.

Owns: the `snapshots` table (one row per snapshot, keyed by its key/name; integer id
naming its directory; parent key; kind Active/View/Committed; labels as JSON; created
and updated timestamps in nanoseconds; committed usage; the remote-layer spec as JSON
for lazily mounted layers) and every read/write of it. One connection behind a lock:
gRPC calls arrive on several threads and each operation is one transaction, so a crash
leaves either the old or the new state, never half of it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from peerstar.snapshotter.errors import AlreadyExists, FailedPrecondition, NotFound


class Kind(IntEnum):
    """Values of containerd's snapshots.v1 `Kind` enum."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass
class Snapshot:
    id: int
    key: str
    parent: str
    kind: Kind
    created: int  # ns since the epoch
    updated: int
    labels: dict[str, str] = field(default_factory=dict)
    size: int = 0  # committed usage (bytes); active usage is measured on demand
    inodes: int = 0
    remote: dict[str, Any] | None = None  # lazy-layer spec for remote snapshots


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent TEXT NOT NULL DEFAULT '',
    kind INTEGER NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    remote TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""

_COLUMNS = "id, key, parent, kind, created, updated, labels, size, inodes, remote"


def _row(row: tuple[Any, ...]) -> Snapshot:
    return Snapshot(id=row[0], key=row[1], parent=row[2], kind=Kind(row[3]), created=row[4],
                    updated=row[5], labels=json.loads(row[6]), size=row[7], inodes=row[8],
                    remote=json.loads(row[9]) if row[9] else None)


class MetaStore:
    """The SQLite database of one snapshotter root."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # check_same_thread=False: access is serialised by self._lock instead.
        self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of work (re-entrant within a thread)."""
        with self._lock:
            if self._db.in_transaction:
                yield self._db
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- reads -----------------------------------------------------------------------

    def find(self, key: str) -> Snapshot | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?",
                                   (key,)).fetchone()
        return _row(row) if row else None

    def get(self, key: str) -> Snapshot:
        snap = self.find(key)
        if snap is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return snap

    def all(self) -> list[Snapshot]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id").fetchall()
        return [_row(r) for r in rows]

    def chain(self, snap: Snapshot) -> list[Snapshot]:
        """The ancestors of `snap`, nearest parent first."""
        out: list[Snapshot] = []
        parent = snap.parent
        with self._lock:
            while parent:
                p = self.get(parent)
                out.append(p)
                parent = p.parent
        return out

    def has_children(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM snapshots WHERE parent = ? LIMIT 1",
                                    (key,)).fetchone() is not None

    # -- writes ----------------------------------------------------------------------

    def create(self, key: str, parent: str, kind: Kind, labels: dict[str, str]) -> Snapshot:
        """A new Active or View snapshot; the parent must exist and be committed."""
        now = time.time_ns()
        with self.transaction() as db:
            if self.find(key) is not None:
                raise AlreadyExists(f"snapshot {key!r} already exists")
            if parent:
                p = self.find(parent)
                if p is None:
                    raise NotFound(f"parent snapshot {parent!r} does not exist")
                if p.kind != Kind.COMMITTED:
                    raise FailedPrecondition(f"parent {parent!r} is not a committed snapshot")
            cur = db.execute(
                "INSERT INTO snapshots (key, parent, kind, created, updated, labels) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, parent, int(kind), now, now, json.dumps(labels, sort_keys=True)))
            sid = cur.lastrowid
        assert sid is not None
        return self.get(key)

    def commit(self, key: str, name: str, labels: dict[str, str], size: int, inodes: int,
               remote: dict[str, Any] | None = None) -> Snapshot:
        """Turn active `key` into committed `name` (same id, so the same directory)."""
        now = time.time_ns()
        with self.transaction() as db:
            snap = self.get(key)
            if snap.kind != Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active (it is "
                                         f"{snap.kind.name.lower()})")
            if self.find(name) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, updated = ?, labels = ?, size = ?, "
                "inodes = ?, remote = ? WHERE id = ?",
                (name, int(Kind.COMMITTED), now, json.dumps(labels, sort_keys=True), size,
                 inodes, json.dumps(remote) if remote else None, snap.id))
        return self.get(name)

    def set_remote(self, key: str, remote: dict[str, Any]) -> Snapshot:
        """Replace the remote-layer spec of committed snapshot `key`."""
        with self.transaction() as db:
            snap = self.get(key)
            db.execute("UPDATE snapshots SET remote = ? WHERE id = ?",
                       (json.dumps(remote), snap.id))
        return self.get(key)

    def set_labels(self, key: str, labels: dict[str, str]) -> Snapshot:
        with self.transaction() as db:
            self.get(key)
            db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE key = ?",
                       (json.dumps(labels, sort_keys=True), time.time_ns(), key))
        return self.get(key)

    def delete(self, key: str) -> Snapshot:
        with self.transaction() as db:
            snap = self.get(key)
            if self.has_children(key):
                raise FailedPrecondition(f"cannot remove snapshot {key!r}: it has children")
            db.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
        return snap

    def ids(self) -> set[int]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM snapshots")}
