"""A bounded on-disk byte cache: fetched compressed regions and verified chunks.

Owns: file naming, atomic writes (write to `wip/`, then rename, so a reader never sees a
partial file and a crash leaves only `wip/` litter, cleared at start), and eviction of
the least recently used files once the total exceeds `max_bytes`.

Several mount processes may share one directory. Each keeps its own LRU bookkeeping,
so the bound is per process; a file another process evicted is simply a miss here,
which is why `get` treats a vanished or short file as absent rather than as an error.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path


class DiskCache:
    """Key -> bytes files under `root`, at most `max_bytes` in total (0 = unbounded)."""

    def __init__(self, root: Path, max_bytes: int = 0) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._wip = self.root / "wip"
        self._wip.mkdir(parents=True, exist_ok=True)
        for stale in self._wip.iterdir():  # partial writes of a crashed process
            stale.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()  # file name -> size, oldest first
        self.total = 0
        files = []
        for sub in self.root.iterdir():
            if sub.name == "wip" or not sub.is_dir():
                continue
            for f in sub.iterdir():
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, f"{sub.name}/{f.name}", st.st_size))
        for _mtime, name, size in sorted(files):
            self._lru[name] = size
            self.total += size

    @staticmethod
    def _name(key: str) -> str:
        # Hashing keeps names short and safe whatever the key holds; two hex characters
        # of fan-out keep directories small.
        h = hashlib.sha256(key.encode()).hexdigest()
        return f"{h[:2]}/{h}"

    def get(self, key: str, size: int | None = None) -> bytes | None:
        """The cached bytes, or None (absent, evicted meanwhile, or not `size` long)."""
        name = self._name(key)
        try:
            with open(self.root / name, "rb") as f:
                data = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if size is not None and len(data) != size:
            return None
        with self._lock:
            if name in self._lru:
                self._lru.move_to_end(name)
        return data

    def __contains__(self, key: str) -> bool:
        return (self.root / self._name(key)).exists()

    def put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        path = self.root / name
        path.parent.mkdir(exist_ok=True)
        tmp = self._wip / f"{path.name}.{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        with self._lock:
            old = self._lru.pop(name, None)
            if old is not None:
                self.total -= old
            self._lru[name] = len(data)
            self.total += len(data)
            victims = []
            while self.max_bytes and self.total > self.max_bytes and len(self._lru) > 1:
                victim, vsize = self._lru.popitem(last=False)
                self.total -= vsize
                victims.append(victim)
        for victim in victims:
            (self.root / victim).unlink(missing_ok=True)

    def discard(self, key: str) -> None:
        name = self._name(key)
        (self.root / name).unlink(missing_ok=True)
        with self._lock:
            size = self._lru.pop(name, None)
            if size is not None:
                self.total -= size
