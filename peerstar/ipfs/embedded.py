"""The embedded content store: kubo's CIDs without a daemon, blocks in files on disk.

Owns the on-disk layout under `root` (default `$XDG_DATA_HOME/peerstar` or
`~/.local/share/peerstar`):
    blocks/<2 chars>/<CIDv1 base32>   one file per block; the 2 chars are the CID's
                                      next-to-last two (like kubo's flatfs), so
                                      directories fill evenly
    pins/<CIDv1 base32>               empty file = recursive pin of that root
    lock                              flock: shared while adding/pinning, exclusive for gc
Blocks are written with `localfile.atomic_write` (a temporary file in their final
directory, renamed into place), so a reader never sees half a block; every read
recomputes the sha2-256 and compares it with the CID (a corrupt block is removed, so
adding the content again repairs it).
`cat` walks the DAG with the UnixFS blocksizes and reads only the blocks covering the
requested range.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multiformats import CID

from peerstar.ipfs.base import AddInput, ContentStore, iter_input
from peerstar.ipfs.cid import check_supported, normalize_cid, parse_cid
from peerstar.ipfs.errors import BlockNotFoundError, CorruptBlockError, IPFSError
from peerstar.ipfs.unixfs import (
    DAG_PB,
    Block,
    DagBuilder,
    Rechunker,
    decode_file_node,
    file_size,
    read_range,
)
from peerstar.localfile import atomic_write, oserror_text


def default_root() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "peerstar"


@dataclass
class GCResult:
    removed_blocks: int
    removed_bytes: int
    kept_blocks: int


class EmbeddedStore(ContentStore):
    """Blocks on local disk; the same API and CIDs as the RPC client."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.description = f"embedded store at {self.root}"
        self._blocks = self.root / "blocks"
        self._pins = self.root / "pins"
        self._ready = False

    # -- layout -----------------------------------------------------------------------
    def _ensure(self) -> None:
        if self._ready:
            return
        try:
            self._blocks.mkdir(parents=True, exist_ok=True)
            self._pins.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IPFSError(f"cannot create the embedded store at {self.root}: "
                            f"{exc.strerror}") from None
        self._ready = True

    def _path(self, cid: str) -> Path:
        return self._blocks / cid[-3:-1] / cid

    @contextlib.asynccontextmanager
    async def _locked(self, exclusive: bool) -> AsyncIterator[None]:
        self._ensure()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # In a thread: another process's gc may hold the lock for a while.
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write_block(self, block: Block) -> None:
        cid = str(block.cid)
        path = self._path(cid)
        if path.exists():
            return  # content-addressed: same name, same bytes (reads verify anyway)
        try:
            path.parent.mkdir(exist_ok=True)
            # No fsync: a block lost in a crash is missing or fails its hash check on
            # read, and fsync per 256 KiB block would halve the add rate.
            with atomic_write(path, fsync=False) as f:
                f.write(block.data)
        except OSError as exc:
            raise IPFSError(f"cannot write block to {self.description}: "
                            f"{oserror_text(exc)}") from None

    def _read_block(self, cid: CID) -> bytes:
        check_supported(cid)
        name = normalize_cid(cid)
        path = self._path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlockNotFoundError(
                f"{name} is not in the {self.description} (add it first, or pass "
                f"--ipfs-address to read it from an IPFS daemon)"
            ) from None
        except OSError as exc:
            raise IPFSError(f"cannot read block {name}: {exc.strerror}") from None
        if hashlib.sha256(data).digest() != cid.raw_digest:
            with contextlib.suppress(OSError):
                path.unlink()  # so that adding the content again stores a good copy
            raise CorruptBlockError(
                f"block {name} in the {self.description} is corrupt (hash mismatch); it was "
                f"removed: add the content again"
            )
        return data

    async def _get_block(self, cid: CID) -> bytes:
        return self._read_block(cid)

    # -- ContentStore -----------------------------------------------------------------
    async def add(self, data: AddInput, *, pin: bool = True, only_hash: bool = False) -> str:
        builder = DagBuilder()
        chunker = Rechunker()
        if only_hash:
            async for piece in iter_input(data):
                for chunk in chunker.feed(piece):
                    builder.add_chunk(chunk)
                builder.blocks.clear()
            for chunk in chunker.flush():
                builder.add_chunk(chunk)
            return str(builder.finish())
        # Shared lock for the whole add: gc must not remove blocks of an add in flight
        # that is not yet pinned.
        async with self._locked(exclusive=False):
            async for piece in iter_input(data):
                for chunk in chunker.feed(piece):
                    builder.add_chunk(chunk)
                self._drain(builder)
            for chunk in chunker.flush():
                builder.add_chunk(chunk)
            root = builder.finish()
            self._drain(builder)
            cid = str(root)
            if pin:
                (self._pins / cid).touch()
        return cid

    def _drain(self, builder: DagBuilder) -> None:
        for block in builder.blocks:
            self._write_block(block)
        builder.blocks.clear()

    async def cat(self, cid: str, offset: int = 0, length: int | None = None
                  ) -> AsyncIterator[bytes]:
        if offset < 0 or (length is not None and length < 0):
            raise IPFSError("offset and length must be >= 0")
        c = parse_cid(cid)
        async for part in read_range(self._get_block, c, offset, length):
            yield part

    async def stat_size(self, cid: str) -> int:
        return await file_size(self._get_block, parse_cid(cid))

    async def block_get(self, cid: str) -> bytes:
        return self._read_block(parse_cid(cid))

    async def block_stat(self, cid: str) -> int:
        """Everything is local here: a presence check (BlockNotFoundError if absent)."""
        c = parse_cid(cid)
        check_supported(c)
        name = normalize_cid(c)
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise BlockNotFoundError(f"{name} is not in the {self.description}") from None
        except OSError as exc:
            raise IPFSError(f"cannot stat block {name}: {exc.strerror}") from None

    def _walk(self, cid: CID, seen: set[str]) -> None:
        """Add every block name under `cid` to `seen`; raise if one is missing."""
        name = normalize_cid(cid)
        if name in seen:
            return
        if cid.codec.name == DAG_PB:
            node = decode_file_node(self._read_block(cid))
            seen.add(name)
            for link in node.links:
                self._walk(link.cid, seen)
        else:
            if not self._path(name).exists():
                raise BlockNotFoundError(f"{name} is not in the {self.description}")
            seen.add(name)

    async def pin(self, cid: str) -> None:
        c = parse_cid(cid)
        name = normalize_cid(c)
        async with self._locked(exclusive=False):
            self._walk(c, set())  # pin only complete DAGs, as kubo does
            (self._pins / name).touch()

    async def unpin(self, cid: str) -> None:
        name = normalize_cid(cid)
        try:
            (self._pins / name).unlink()
        except FileNotFoundError:
            raise IPFSError(f"{name} is not pinned in the {self.description}") from None

    async def pinned(self, cid: str) -> bool:
        return (self._pins / normalize_cid(cid)).exists()

    def pins(self) -> list[str]:
        self._ensure()
        return sorted(p.name for p in self._pins.iterdir())

    async def gc(self) -> GCResult:
        """Remove every block not reachable from a pin."""
        async with self._locked(exclusive=True):
            keep: set[str] = set()
            for name in self.pins():
                try:
                    self._walk(parse_cid(name), keep)
                except BlockNotFoundError:
                    continue  # an incomplete pinned DAG keeps what it has
            removed = removed_bytes = kept = 0
            for shard in self._blocks.iterdir():
                if not shard.is_dir():
                    continue
                for path in shard.iterdir():
                    if path.name in keep:
                        kept += 1
                        continue
                    # Leftover temp files of a crashed writer go too (we hold the lock).
                    removed_bytes += path.stat().st_size
                    path.unlink()
                    removed += 1
            return GCResult(removed, removed_bytes, kept)

    def has(self, cid: str) -> bool:
        return self._path(normalize_cid(cid)).exists()

    async def id(self) -> dict[str, Any]:
        return {"ID": "embedded", "AgentVersion": "peerstar-embedded", "Root": str(self.root)}
