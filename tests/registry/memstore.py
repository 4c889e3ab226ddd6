"""An in-memory content store for registry tests, with fault injection.

Speaks the part of `peerstar.ipfs.ContentStore` the registry uses (`add`, `cat`,
`cat_bytes`, `close`). CIDs are real CIDv1 raw-codec sha2-256 CIDs of the whole content,
so the registry's CID parsing sees what it sees in production. Counts `cat` calls and
bytes, and can stall or fail a CID after N bytes to test timeouts and mid-stream death.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from multiformats import CID, multihash

from peerstar.ipfs.errors import BlockNotFoundError, IPFSError


def raw_cid(data: bytes) -> str:
    """CIDv1 base32, raw codec, sha2-256: what `add --cid-version=1` gives a one-block blob."""
    mh = multihash.wrap(hashlib.sha256(data).digest(), "sha2-256")
    return str(CID("base32", 1, "raw", mh))


@dataclass
class Fault:
    """Misbehave on reads of a CID on reaching byte offset `at` of its content."""

    at: int
    kind: str = "stall"  # "stall": hang until released; "fail": raise IPFSError
    times: int = 1_000_000  # how many cat calls misbehave before it heals


@dataclass
class MemoryStore:
    chunk: int = 64 << 10
    blobs: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, Fault] = field(default_factory=dict)
    cats: list[tuple[str, int, int | None]] = field(default_factory=list)
    bytes_read: int = 0

    async def add(self, data: bytes, *, pin: bool = True, only_hash: bool = False) -> str:
        cid = raw_cid(bytes(data))
        if not only_hash:
            self.blobs[cid] = bytes(data)
        return cid

    async def cat(self, cid: str, offset: int = 0, length: int | None = None
                  ) -> AsyncIterator[bytes]:
        self.cats.append((cid, offset, length))
        data = self.blobs.get(cid)
        if data is None:
            raise BlockNotFoundError(f"block {cid} not found")
        end = len(data) if length is None else min(len(data), offset + length)
        fault = self.faults.get(cid)
        if fault is not None and fault.times > 0:
            fault.times -= 1
        else:
            fault = None
        pos = offset
        while pos < end:
            if fault is not None and pos >= fault.at:
                if fault.kind == "stall":
                    await asyncio.Event().wait()  # forever: only a timeout gets us out
                raise IPFSError("daemon went away")
            step = min(self.chunk, end - pos)
            if fault is not None and pos < fault.at:
                step = min(step, fault.at - pos)
            part = data[pos:pos + step]
            pos += step
            self.bytes_read += step
            await asyncio.sleep(0)
            yield part

    async def cat_bytes(self, cid: str, offset: int = 0, length: int | None = None) -> bytes:
        return b"".join([p async for p in self.cat(cid, offset, length)])

    async def close(self) -> None:
        pass
