"""What a bridge in mirror mode pinned in the node's IPFS, bounded: the mirror's pin ledger.

Owns `PinLedger`: the content the mirror pinned (digest -> CID, size), least recently
served first. `keep` pins a verified CID and, once the ledger holds more than
`max_bytes`, unpins the least recently served entries until it is within the bound
again (the newest entry is kept even when it alone is bigger); kubo's GC
(`Datastore.StorageMax`, `--enable-gc`) then reclaims their blocks. `touch` marks an
entry served. A CID that was pinned before the mirror met it (by `peerstar push`, or an
operator) is not the ledger's: it is neither recorded nor ever unpinned by the mirror.

The ledger is persisted in a JSON file (written to a temporary name, then renamed) on
every pin and unpin, so a restarted bridge still knows, and still bounds, what it pinned;
the served order rides along, and is otherwise written at most every `SAVE_EVERY`
seconds (and at close), so a crash loses at most that much of the order, never a pin.
A ledger without a file (`path` None) forgets its pins at exit: they are then the
operator's (docs/mirror.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

from peerstar.errors import PeerstarError
from peerstar.ipfs import ContentStore
from peerstar.ipfs.cid import normalize_cid

log = logging.getLogger("peerstar.registry.pins")

SAVE_EVERY = 30.0  # seconds between writes of the served order alone
_VERSION = 1


class PinLedgerError(PeerstarError):
    """The ledger file exists but cannot be read or is not a ledger."""


class PinLedger:
    """The mirror's pins in `store`, at most `max_bytes` (0 = unbounded), kept in `path`."""

    def __init__(self, store: ContentStore, max_bytes: int, path: Path | None) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.path = path
        # digest -> (CID, size), least recently served first
        self.entries: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self.bytes = 0
        self._saved_at = 0.0
        self._dirty = False
        self._lock = asyncio.Lock()
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise PinLedgerError(f"mirror pin ledger {path}: cannot read it: "
                                 f"{exc.strerror or exc}") from None
        try:
            doc = json.loads(text)
            if doc.get("version") != _VERSION:
                raise ValueError(f"version {doc.get('version')!r}, expected {_VERSION}")
            for digest, cid, size in doc["pins"]:
                if not (isinstance(digest, str) and isinstance(cid, str)
                        and isinstance(size, int) and size >= 0):
                    raise ValueError(f"bad entry {[digest, cid, size]!r:.200}")
                self.entries[digest] = (cid, size)
                self.bytes += size
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise PinLedgerError(f"mirror pin ledger {path}: not a ledger ({exc}); move it "
                                 "away (its CIDs are then the operator's to unpin)") from None

    def __contains__(self, digest: str) -> bool:
        return digest in self.entries

    def touch(self, digest: str) -> None:
        """`digest` was just served: the last to be unpinned."""
        if digest in self.entries:
            self.entries.move_to_end(digest)
            self._dirty = True
            if time.monotonic() - self._saved_at > SAVE_EVERY:
                self.save()

    async def keep(self, digest: str, cid: str, size: int) -> list[tuple[str, str]]:
        """Pin `cid` (holding `digest`, verified) as the most recently served, then unpin
        the least recently served past the bound; returns the (digest, CID) unpinned."""
        async with self._lock:  # one change at a time: the pins and the file agree
            return await self._keep(digest, cid, size)

    async def _keep(self, digest: str, cid: str, size: int) -> list[tuple[str, str]]:
        if digest in self.entries:
            self.touch(digest)
            return []
        if not self._owns(cid) and await self._pinned(cid):
            return []  # pinned by someone else (a push): theirs to keep
        await self.store.pin(cid)
        self.entries[digest] = (cid, size)
        self.bytes += size
        dropped: list[tuple[str, str]] = []
        while self.max_bytes and self.bytes > self.max_bytes and len(self.entries) > 1:
            old, (old_cid, old_size) = self.entries.popitem(last=False)
            self.bytes -= old_size
            if not self._owns(old_cid):  # (two digests of one content share a CID)
                await self._unpin(old_cid)
            dropped.append((old, old_cid))
        self.save()
        if dropped:
            log.info("mirror pins over %d bytes: unpinned %d least recently served "
                     "(%s)", self.max_bytes, len(dropped),
                     ", ".join(f"{d} {c}" for d, c in dropped[:5]))
        return dropped

    def _owns(self, cid: str) -> bool:
        return any(c == cid for c, _ in self.entries.values())

    async def _pinned(self, cid: str) -> bool:
        pinned = getattr(self.store, "pinned", None)
        return bool(pinned is not None and await pinned(cid))

    async def _unpin(self, cid: str) -> None:
        try:
            await self.store.unpin(cid)
        except PeerstarError as exc:  # (already unpinned by hand: nothing to give back)
            log.warning("mirror: unpinning %s: %s", normalize_cid(cid), exc)

    def save(self) -> None:
        """Write the ledger (temp + rename); a failure is logged, the next save retries."""
        self._saved_at = time.monotonic()
        if self.path is None:
            return
        doc = {"version": _VERSION,
               "pins": [[d, c, s] for d, (c, s) in self.entries.items()]}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc, separators=(",", ":")))
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.error("mirror pin ledger %s: cannot write it (%s): a restart would forget "
                      "the pins made since", self.path, exc.strerror or exc)
            return
        self._dirty = False

    def close(self) -> None:
        if self._dirty:
            self.save()
