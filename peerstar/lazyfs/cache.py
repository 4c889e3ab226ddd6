"""A bounded on-disk byte cache: fetched compressed regions and verified chunks.

Owns: file naming, atomic writes (write to `wip/`, then rename, so a reader never sees a
partial file and a crash leaves only `wip/` litter, cleared at start), and eviction of
the least recently used files once the total exceeds `max_bytes`.

Several mount daemons (one per layer) share one directory, so the bound is enforced on
the directory itself, not on per-process bookkeeping: a hit touches the file's mtime,
and after every `max_bytes / 16` bytes written (or when the estimate passes the bound)
the writer takes an exclusive `flock` on `.lock`, scans the directory and removes the
oldest files down to 90 % of the bound. A file another process evicted is simply a miss,
which is why `get` treats a vanished or short file as absent rather than as an error.

With `async_writes`, `put` hands the bytes to one writer thread and returns at once
(a cold read then waits for the network only, not for the disk); until written, the
bytes are served from memory, and at most `MAX_PENDING` bytes wait (beyond that `put`
writes itself).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import threading
from pathlib import Path

DEFAULT_MAX_BYTES = 4 << 30  # per cache (regions, chunks) and cache directory
_LOW_WATER = 0.9  # evict down to this fraction of the bound, so scans stay rare
MAX_PENDING = 64 << 20


class DiskCache:
    """Key -> bytes files under `root`, at most about `max_bytes` in total (0 = unbounded)."""

    def __init__(self, root: Path, max_bytes: int = 0, *, async_writes: bool = False) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._pending: dict[str, bytes] = {}
        self._pending_bytes = 0
        self._queue: queue.Queue[str | None] | None = None
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
        self._since_scan = 0
        self.total = self._scan(evict=bool(max_bytes))

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
        if data is not None:
            return data if size is None or len(data) == size else None
        path = self.root / self._name(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)  # recently used: the last to be evicted
        except (FileNotFoundError, NotADirectoryError):
            return None
        if size is not None and len(data) != size:
            return None
        return data

    def __contains__(self, key: str) -> bool:
        with self._lock:
            if key in self._pending:
                return True
        return (self.root / self._name(key)).exists()

    def put(self, key: str, data: bytes) -> None:
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
            except OSError:
                pass  # a cache write failing only costs a later refetch
            finally:
                with self._lock:
                    if self._pending.pop(key, None) is not None:
                        self._pending_bytes -= len(data or b"")
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued write is on disk."""
        if self._queue is not None:
            self._queue.join()

    def _write(self, key: str, data: bytes) -> None:
        path = self.root / self._name(key)
        path.parent.mkdir(exist_ok=True)
        tmp = self._wip / f"{path.name}.{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        with self._lock:
            self.total += len(data)
            self._since_scan += len(data)
            due = self.max_bytes and (self.total > self.max_bytes
                                      or self._since_scan > self.max_bytes // 16)
            if due:
                self._since_scan = 0
        if due:
            total = self._scan(evict=True)
            with self._lock:
                self.total = total

    def discard(self, key: str) -> None:
        with self._lock:
            data = self._pending.pop(key, None)
            if data is not None:
                self._pending_bytes -= len(data)
        (self.root / self._name(key)).unlink(missing_ok=True)

    def _scan(self, *, evict: bool) -> int:
        """Bytes in the cache now; with `evict`, oldest files removed first to the bound."""
        with open(self.root / ".lock", "a+") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)  # one scanner at a time across processes
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
            if evict and self.max_bytes and total > self.max_bytes:
                files.sort()
                target = int(self.max_bytes * _LOW_WATER)
                for _mtime, p, size in files:
                    if total <= target:
                        break
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        continue
                    total -= size
        return total
