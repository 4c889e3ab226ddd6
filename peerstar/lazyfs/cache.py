"""A bounded on-disk byte cache: fetched compressed regions and verified chunks.

Owns: file naming, atomic writes (write to `wip/`, then rename, so a reader never sees a
partial file and a crash leaves only `wip/` litter, cleared at start), eviction of the
least recently used files so the total stays within `max_bytes`, what a full disk does
to it, and its metrics (bytes, hits, misses, evictions, failed writes).

Several mount daemons (one per layer) share one directory, so the bound is enforced on
the directory itself, not on per-process bookkeeping: every write of a bounded cache
takes an exclusive `flock` on `.lock`, which also holds the directory's byte count.
If the new file would take the count past `max_bytes`, the writer scans the directory
(the exact count) and removes the least recently used files (a hit touches a file's
mtime) down to 90 % of the bound less the new file, then writes it. So the directory
never holds more than `max_bytes`, or one file more: when that file alone is bigger than
the bound, or when another process scanned while a streamed entry was being written
(`put_stream` counts it before it exists, a scan sees only what exists). The count may
run high (a key written twice, a file removed by hand) -- that only brings the next scan
sooner -- never low. A file another process evicted is simply
a miss, which is why `get` treats a vanished or short file as absent, not as an error.

Nothing a reader holds is evicted from under it: `get` reads a whole file into memory
in one go (an unlinked file stays readable through the open descriptor), and the layer
serves the chunk it is reading from that memory copy, so eviction only ever turns a
later read into a miss, which fetches and verifies the bytes again. A large entry is
never held whole: `put_stream` writes it piece by piece (published by the rename only
once its source, a verifying iterator, ended without error) and `read_range` reads one
window of it from the file; eviction between two windows is again only a miss.

A write that fails (disk full -- ENOSPC or EDQUOT -- or any other OSError) leaves
nothing behind (its `wip/` file is removed) and is not an error for the caller: the
bytes were fetched and, for chunks, verified, and are served from memory; only a later
read fetches them again. One log line says which cache could not be written and why;
the next write that succeeds logs that the cache writes again.

With `async_writes`, `put` hands the bytes to one writer thread and returns at once
(a cold read then waits for the network only, not for the disk); until written, the
bytes are served from memory, and at most `MAX_PENDING` bytes wait (beyond that `put`
writes itself).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from peerstar.lazyfs import metrics

log = logging.getLogger("peerstar.lazyfs.cache")

DEFAULT_MAX_BYTES = 4 << 30  # per cache (regions, chunks) and cache directory
_LOW_WATER = 0.9  # evict down to this fraction of the bound, so scans stay rare
MAX_PENDING = 64 << 20


class DiskCache:
    """Key -> bytes files under `root`, at most `max_bytes` in total (0 = unbounded).

    `layer` labels this process's hit/miss/eviction metrics (the mount daemon's layer)."""

    def __init__(self, root: Path, max_bytes: int = 0, *, async_writes: bool = False,
                 layer: str = "") -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._pending: dict[str, bytes] = {}
        self._pending_bytes = 0
        self._queue: queue.Queue[str | None] | None = None
        name = self.root.name
        self._hits = metrics.CACHE_HITS.labels(layer, name)
        self._misses = metrics.CACHE_MISSES.labels(layer, name)
        self._evictions = metrics.CACHE_EVICTIONS.labels(layer, name)
        self._write_failures = metrics.CACHE_WRITE_FAILURES.labels(layer, name)
        self._bytes = metrics.CACHE_BYTES.labels(name)
        self._failing: str | None = None  # why writes fail, while they do
        if async_writes:
            self._queue = queue.Queue()
            threading.Thread(target=self._writer, daemon=True, name="cache-writer").start()
        self._wip = self.root / "wip"
        self._wip.mkdir(parents=True, exist_ok=True)
        for stale in self._wip.iterdir():
            # Partial writes of a crashed process (ours carry the writer's pid).
            pid = stale.name.rsplit(".", 2)[-2] if stale.name.count(".") >= 2 else ""
            if not (pid.isdigit() and os.path.exists(f"/proc/{pid}")):
                stale.unlink(missing_ok=True)
        self._lock = threading.Lock()
        with self._locked() as lockf:
            self.total = self._scan(evict=bool(max_bytes))
            try:
                _store_count(lockf, self.total)
            except OSError:
                pass  # a full disk: the next bounded write counts again
        self._bytes.set(self.total)

    @staticmethod
    def _name(key: str) -> str:
        # Hashing keeps names short and safe whatever the key holds; two hex characters
        # of fan-out keep directories small.
        h = hashlib.sha256(key.encode()).hexdigest()
        return f"{h[:2]}/{h}"

    def get(self, key: str, size: int | None = None) -> bytes | None:
        """The cached bytes, or None (absent, evicted meanwhile, or not `size` long)."""
        with self._lock:
            data = self._pending.get(key)
        if data is None:
            path = self.root / self._name(key)
            try:
                with open(path, "rb") as f:
                    data = f.read()
                os.utime(path)  # recently used: the last to be evicted
            except (FileNotFoundError, NotADirectoryError):
                data = None
        if data is None or (size is not None and len(data) != size):
            self._misses.inc()
            return None
        self._hits.inc()
        return data

    def __contains__(self, key: str) -> bool:
        with self._lock:
            if key in self._pending:
                return True
        return (self.root / self._name(key)).exists()

    def put(self, key: str, data: bytes) -> None:
        """Cache `data` under `key`; never raises for the disk (see the module doc)."""
        if self._queue is not None:
            with self._lock:
                queued = self._pending_bytes + len(data) <= MAX_PENDING
                if queued and key not in self._pending:
                    self._pending[key] = data
                    self._pending_bytes += len(data)
                    self._queue.put(key)
            if queued:
                return
        self._write(key, data)

    def _writer(self) -> None:
        assert self._queue is not None
        while True:
            key = self._queue.get()
            if key is None:
                self._queue.task_done()
                return
            with self._lock:
                data = self._pending.get(key)
            try:
                if data is not None:
                    self._write(key, data)
            finally:
                with self._lock:
                    if self._pending.pop(key, None) is not None:
                        self._pending_bytes -= len(data or b"")
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued write is on disk (or has failed)."""
        if self._queue is not None:
            self._queue.join()

    def _write(self, key: str, data: bytes) -> None:
        path = self.root / self._name(key)
        tmp = self._wip / f"{path.name}.{os.getpid()}.{threading.get_ident()}"
        try:
            if not self.max_bytes:
                _store(tmp, path, data)
                with self._lock:
                    self.total += len(data)
            else:
                with self._locked() as lockf:
                    total = _load_count(lockf)
                    if total is None or total + len(data) > self.max_bytes:
                        total = self._scan(evict=True, room=len(data))
                    _store(tmp, path, data)
                    total += len(data)
                    _store_count(lockf, total)
                    self.total = total
        except OSError as exc:
            tmp.unlink(missing_ok=True)  # no partial entry, in wip/ or elsewhere
            self._write_failed(exc)
            return
        self._written()

    def _write_failed(self, exc: OSError) -> None:
        self._write_failures.inc()
        why = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "cannot write"
        if self._failing != why:
            self._failing = why
            log.error("cache %s: %s (%s): not caching until writes succeed again; "
                      "reads fetch what is not cached", self.root, why, exc.strerror or exc)

    def _written(self) -> None:
        self._bytes.set(self.total)
        if self._failing is not None:
            self._failing = None
            log.info("cache %s: writes succeed again", self.root)

    def put_stream(self, key: str, size: int, pieces: Iterable[bytes]) -> bool:
        """Cache the `size` bytes `pieces` yields under `key`, one piece in memory at a
        time; True once the entry is in place.

        The entry appears (a rename) only after `pieces` is exhausted without raising, so
        an iterator that verifies as it goes (`Reader.iter_chunk`) publishes verified
        bytes only; what it raises is passed on, with nothing left behind. False, having
        consumed nothing, when `size` alone is over the bound; False, with nothing left
        behind, when the disk fails (logged as for `put`). Room is made, and counted,
        before the first byte, so the cross-process lock is not held while `pieces`
        fetches: a scan meanwhile does not see the entry being written, which may take
        the directory past its bound by that entry until the next write's scan.
        """
        if self.max_bytes and size > self.max_bytes:
            return False
        path = self.root / self._name(key)
        tmp = self._wip / f"{path.name}.{os.getpid()}.{threading.get_ident()}"
        counted: int | None = None
        try:
            if self.max_bytes:
                with self._locked() as lockf:
                    total = _load_count(lockf)
                    if total is None or total + size > self.max_bytes:
                        total = self._scan(evict=True, room=size)
                    counted = total + size
                    _store_count(lockf, counted)
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                for piece in pieces:
                    f.write(piece)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self._write_failed(exc)
            return False
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            self.total = counted if counted is not None else self.total + size
        self._written()
        return True

    def read_range(self, key: str, offset: int, length: int, size: int) -> bytes | None:
        """`length` bytes at `offset` of the entry `key`, read from its file alone, or
        None (absent, evicted meanwhile, or not `size` long): a large entry is served
        without ever being in memory whole."""
        path = self.root / self._name(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = os.pread(f.fileno(), length, offset) if st.st_size == size else None
            if data is not None and time.time() - st.st_mtime > 1:
                os.utime(path)  # recently used (once a second is enough for the order)
        except (FileNotFoundError, NotADirectoryError):
            data = None
        if data is None or len(data) != min(length, max(size - offset, 0)):
            self._misses.inc()
            return None
        self._hits.inc()
        return data

    def discard(self, key: str) -> None:
        with self._lock:
            data = self._pending.pop(key, None)
            if data is not None:
                self._pending_bytes -= len(data)
        (self.root / self._name(key)).unlink(missing_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[IO[str]]:
        """`.lock`, held exclusively: one writer or scanner at a time across processes."""
        with open(self.root / ".lock", "a+") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            yield lockf

    def _scan(self, *, evict: bool, room: int = 0) -> int:
        """Bytes in the cache now; with `evict` (and a bound), the least recently used
        files removed once the total plus `room` passes the bound, down to the low-water
        mark less `room`. Call with `_locked` held."""
        files = []
        total = 0
        for sub in os.scandir(self.root):
            if sub.name == "wip" or not sub.is_dir():
                continue
            for f in os.scandir(sub.path):
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime_ns, f.path, st.st_size))
                total += st.st_size
        if evict and self.max_bytes and total + room > self.max_bytes:
            files.sort()
            target = int(self.max_bytes * _LOW_WATER) - room
            for _mtime, p, size in files:
                if total <= target:
                    break
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    continue
                total -= size
                self._evictions.inc()
        return total


def _store(tmp: Path, path: Path, data: bytes) -> None:
    path.parent.mkdir(exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _load_count(lockf: IO[str]) -> int | None:
    lockf.seek(0)
    text = lockf.read().strip()
    return int(text) if text.isdigit() else None


def _store_count(lockf: IO[str], total: int) -> None:
    lockf.seek(0)
    lockf.truncate()
    lockf.write(str(total))
    lockf.flush()
