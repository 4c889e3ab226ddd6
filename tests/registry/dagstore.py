"""An in-memory UnixFS store for the warm-up tests: kubo's layout (256 KiB raw leaves, 174
links, built by `peerstar.ipfs.unixfs.DagBuilder`), so the registry's locator, warm-up
and fan-out see real DAGs, with `block_get`, `block_stat` and `cat`.

Every call is recorded (`calls`: (op, cid)), the calls in flight are counted (`in_flight`,
`max_in_flight`, also per op), and calls on chosen CIDs can be held (`hold`: until
`release()`; a held call that is cancelled leaves) or failed (`fail`), for the ops in
`hold_ops` / `fail_ops`, and block calls delayed (`delay`).
`stat_barrier(n)` holds `block_stat` calls until `n` of them are in flight at once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from peerstar.ipfs.cid import parse_cid
from peerstar.ipfs.errors import BlockNotFoundError, IPFSError
from peerstar.ipfs.unixfs import DagBuilder, Rechunker, read_range


@dataclass
class DagStore:
    blocks: dict[str, bytes] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    max_by_op: Counter = field(default_factory=Counter)
    hold: set[str] = field(default_factory=set)  # CIDs whose calls wait for release()
    hold_ops: set[str] = field(default_factory=lambda: {"block_get", "block_stat", "cat"})
    fail: set[str] = field(default_factory=set)  # CIDs whose calls raise IPFSError
    fail_ops: set[str] = field(default_factory=lambda: {"block_get", "block_stat", "cat"})
    delay: float = 0.0  # seconds every block_get / block_stat takes
    _released: asyncio.Event | None = None
    _by_op: Counter = field(default_factory=Counter)
    _barrier: int = 0
    _barrier_met: asyncio.Event | None = None

    async def add(self, data: bytes | object, *, pin: bool = True,
                  only_hash: bool = False) -> str:
        if not isinstance(data, bytes | bytearray):
            data = data.read()  # type: ignore[attr-defined]
        builder = DagBuilder()
        chunker = Rechunker()
        for chunk in chunker.feed(bytes(data)):
            builder.add_chunk(chunk)
        for chunk in chunker.flush():
            builder.add_chunk(chunk)
        root = str(builder.finish())
        for block in builder.blocks:
            self.blocks[str(block.cid)] = block.data
        return root

    def release(self) -> None:
        self.hold.clear()
        if self._released is not None:
            self._released.set()

    def stat_barrier(self, n: int) -> None:
        """Hold every block_stat until `n` block_stats are in flight together."""
        self._barrier = n
        self._barrier_met = asyncio.Event()

    async def _enter(self, op: str, cid: str) -> None:
        self.calls.append((op, cid))
        self.in_flight += 1
        self._by_op[op] += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.max_by_op[op] = max(self.max_by_op[op], self._by_op[op])
        if cid in self.fail and op in self.fail_ops:
            raise IPFSError(f"{op} {cid}: injected failure")
        if cid in self.hold and op in self.hold_ops:
            if self._released is None:
                self._released = asyncio.Event()
            await self._released.wait()
        if op == "block_stat" and self._barrier_met is not None:
            if self._by_op[op] >= self._barrier:
                self._barrier_met.set()
            await self._barrier_met.wait()
        if self.delay and op != "cat":
            await asyncio.sleep(self.delay)

    def _leave(self, op: str) -> None:
        self.in_flight -= 1
        self._by_op[op] -= 1

    def _block(self, cid: str) -> bytes:
        data = self.blocks.get(str(parse_cid(cid).set(base="base32")))
        if data is None:
            raise BlockNotFoundError(f"block {cid} not found")
        return data

    async def block_get(self, cid: str) -> bytes:
        try:
            await self._enter("block_get", cid)
            return self._block(cid)
        finally:
            self._leave("block_get")

    async def block_stat(self, cid: str) -> int:
        try:
            await self._enter("block_stat", cid)
            return len(self._block(cid))
        finally:
            self._leave("block_stat")

    async def cat(self, cid: str, offset: int = 0, length: int | None = None
                  ) -> AsyncIterator[bytes]:
        try:
            await self._enter("cat", cid)

            async def get(c: object) -> bytes:
                return self._block(str(c))

            async for part in read_range(get, parse_cid(cid), offset, length):
                await asyncio.sleep(0)
                yield part
        finally:
            self._leave("cat")

    async def cat_bytes(self, cid: str, offset: int = 0, length: int | None = None) -> bytes:
        return b"".join([p async for p in self.cat(cid, offset, length)])

    async def close(self) -> None:
        self.release()

    def ops(self, op: str) -> list[str]:
        return [c for o, c in self.calls if o == op]
