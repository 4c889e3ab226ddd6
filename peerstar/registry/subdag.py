"""Which node of a blob's UnixFS DAG to `cat` for a byte range (the registry's reads).

Owns `SubDagLocator`. A `cat` with an offset makes the daemon walk from the file's root
down to the leaves, and js-ipfs 0.66 spends a good part of a small read on that walk:
a cat of 64 KiB inside a 256 MiB file took 3.3 ms from the root, 2.9 ms from the
interior node above it and 1.8 ms from the leaf; 1 MiB took 4.6 ms from the root and
4.0 ms from the interior node (fresh daemon, this project's 2-CPU machine). A range
that lies inside one child of a node is the same bytes as that range of the child, so a
range inside one interior node (174 leaves, ~43.5 MiB in kubo's layout) is read with a
`cat` of that node, and one inside a single leaf with a `cat` of the leaf: still one cat
of exactly the bytes served, with less work for the daemon.

Interior nodes are fetched once with the store's `block_get` (verified against their
CID), indexed by `peerstar.ipfs.unixfs.NodeIndex` (which owns the decoding and which
child holds which bytes), and kept in a bounded LRU (content is immutable, so entries
never go stale); this module owns only that cache and when to fetch. A lookup never
waits: a node not yet known is fetched in the background and the range is read from the
deepest node known, so the first reads of a blob cost what they cost before. Leaves (raw blocks)
and small nodes are not fetched by lookups: their CID in the parent is all a cat needs;
a small node someone else loaded (the warm-up) is descended into like any other.

For the warm-up and the leaf fan-out (`warmup.py`) the locator also answers which
leaves cover a range (`known_leaves` without waiting, `leaves` loading the nodes on the
way, one level at a time, every node of a level at once) and loads a blob's whole
skeleton (`load_skeleton`): the nodes it loads are the ones later lookups use. A load
someone awaits (`ensure`) is shared by everyone asking for the same node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from peerstar.ipfs.cid import RAW, cid_text, is_raw_cid, parse_cid
from peerstar.ipfs.unixfs import RAW_INDEX, NodeIndex

log = logging.getLogger("peerstar.registry.subdag")

# A child covering more file bytes than this is an interior node whose links are worth
# knowing (one block_get of a few KiB); smaller children are read as they are.
LOAD_SPAN = 4 << 20
_MAX_DEPTH = 16
_MAX_LOADING = 4
# A node that could not be fetched or decoded is not asked for again before this.
_RETRY_AFTER = 60.0

ROOT, INTERIOR, LEAF = "root", "interior", "leaf"

GetBlock = Callable[[str], Awaitable[bytes]]


@dataclass(frozen=True)
class Leaf:
    """A block holding file bytes [start, start + size) of a blob: a raw leaf, or (in
    DAGs other writers made) a node with inline data, read as a whole."""

    cid: str
    start: int
    size: int


@functools.lru_cache(maxsize=4096)
def _is_raw_text(cid: str) -> bool:
    return parse_cid(cid).codec.name == RAW


class SubDagLocator:
    """Maps (blob CID, offset, length) to the deepest known node holding the whole range.

    `get_block(cid)` returns a block's bytes verified against its CID (a ContentStore's
    `block_get`). At most `max_nodes` decoded nodes are kept (~10 KiB each for 174
    links: ~10 MiB with the default 1024).
    """

    def __init__(self, get_block: Callable[[str], Awaitable[bytes]], *,
                 max_nodes: int = 1024, timeout: float = 30.0,
                 load_span: int = LOAD_SPAN) -> None:
        self._get_block = get_block
        self.max_nodes = max_nodes
        self.timeout = timeout
        self.load_span = load_span
        self._nodes: OrderedDict[str, NodeIndex] = OrderedDict()
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._awaited: dict[str, asyncio.Task[None]] = {}  # ensure()'s, not bounded
        self._failed: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def locate(self, cid: str, offset: int, length: int) -> tuple[str, int, str]:
        """(CID to cat, offset within it, ROOT | INTERIOR | LEAF) for `length` bytes of
        the file `cid` from `offset`. Never waits; starts fetching unknown nodes."""
        node_cid, rel, kind = cid, offset, ROOT
        if length <= 0:
            return node_cid, rel, kind
        for _ in range(_MAX_DEPTH):
            node = self._nodes.get(node_cid)
            if node is None:
                self._load_soon(node_cid)
                break
            self._nodes.move_to_end(node_cid)
            i = node.child_holding(rel, length)
            if i is None:
                break  # inline data, past the end, or the range spans several children
            raw = node.child(i)
            start, end = node.bounds[i], node.bounds[i + 1]
            span = end - start
            node_cid, rel = cid_text(raw), rel - start
            if is_raw_cid(raw):
                return node_cid, rel, LEAF
            kind = INTERIOR
            if span <= self.load_span and node_cid not in self._nodes:
                break  # small: read it as it is, its links are not worth a fetch
        return node_cid, rel, kind

    def known_leaves(self, cid: str, offset: int, length: int, size: int
                     ) -> list[Leaf] | None:
        """The leaves holding `length` bytes from `offset` of the `size`-byte file `cid`,
        in order, if every node above them is known; else None (and the first unknown
        nodes are fetched in the background, as `locate` does). Never waits."""
        out: list[Leaf] = []
        missing: list[str] = []
        self._cover(cid, _is_raw_text(cid), 0, size, offset, offset + length, out, missing)
        if not missing:
            return out
        for node_cid in missing[:_MAX_LOADING]:
            self._load_soon(node_cid)
        return None

    async def leaves(self, cid: str, offset: int, length: int, size: int, *,
                     get_block: GetBlock | None = None) -> list[Leaf]:
        """`known_leaves`, loading the nodes it needs first: one level of the DAG at a
        time, all the nodes a level needs at once (`get_block` instead of the locator's
        own for the loads started here). Raises what a load raises."""
        raw_root = _is_raw_text(cid)
        for _ in range(_MAX_DEPTH + 1):
            out: list[Leaf] = []
            missing: list[str] = []
            self._cover(cid, raw_root, 0, size, offset, offset + length, out, missing)
            if not missing:
                return out
            await _all(self.ensure(c, get_block=get_block) for c in missing)
        raise ValueError(f"the DAG of {cid} is deeper than {_MAX_DEPTH} levels")

    async def load_skeleton(self, cid: str, *, get_block: GetBlock | None = None) -> int:
        """Load every node of the blob `cid` but its leaves, level by level, each level's
        nodes at once; returns how many nodes it holds. Stops below a level too wide for
        the cache (it would only evict itself)."""
        level = [cid]
        count = 0
        for _ in range(_MAX_DEPTH):
            await _all(self.ensure(c, get_block=get_block) for c in level)
            count += len(level)
            below: list[str] = []
            for node_cid in level:
                node = self._nodes.get(node_cid)
                if node is None:
                    continue  # evicted meanwhile: the cache is full of other blobs
                for i in range(len(node)):
                    raw = node.child(i)
                    if not is_raw_cid(raw):
                        below.append(cid_text(raw))
            if not below or len(below) > self.max_nodes // 2:
                break
            level = below
        return count

    async def ensure(self, cid: str, *, get_block: GetBlock | None = None) -> None:
        """Until the node `cid` is known: joins a fetch already under way, else starts
        one (with `get_block` if given) that others can join. Raises what it raises."""
        if cid in self._nodes:
            return
        task = self._loading.get(cid) or self._awaited.get(cid)
        if task is None:
            task = asyncio.get_running_loop().create_task(self.load(cid, get_block))
            self._awaited[cid] = task
            task.add_done_callback(lambda t: self._awaited.pop(cid, None) and (
                t.cancelled() or t.exception()))
        await asyncio.shield(task)
        if cid not in self._nodes and not task.cancelled() and task.exception() is None:
            await self.load(cid, get_block)  # a background load that failed quietly

    def _cover(self, cid: str, raw: bool, base: int, span: int, lo: int, hi: int,
               out: list[Leaf], missing: list[str]) -> None:
        """Append to `out` the leaves of node `cid` (file bytes [base, base + span))
        that hold bytes [lo, hi) of the file; unknown nodes on the way go to `missing`."""
        if raw:
            out.append(Leaf(cid, base, span))
            return
        node = self._nodes.get(cid)
        if node is None:
            missing.append(cid)
            return
        children = node.children_over(lo - base, hi - base)
        if children is None:
            out.append(Leaf(cid, base, span))  # inline data: the node is read whole
            return
        bounds = node.bounds
        for i in children:
            child = node.child(i)
            self._cover(cid_text(child), is_raw_cid(child), base + bounds[i],
                        bounds[i + 1] - bounds[i], lo, hi, out, missing)

    async def load(self, cid: str, get_block: GetBlock | None = None) -> None:
        """Fetch and decode the node `cid` now (raises IPFSError if it cannot)."""
        if cid in self._nodes:
            return
        if _is_raw_text(cid):
            node = RAW_INDEX
        else:
            async with asyncio.timeout(self.timeout):
                raw = await (get_block or self._get_block)(cid)
            node = NodeIndex.of_node(raw)
        self._nodes[cid] = node
        while len(self._nodes) > self.max_nodes:
            self._nodes.popitem(last=False)

    def _load_soon(self, cid: str) -> None:
        if cid in self._loading or cid in self._awaited or len(self._loading) >= _MAX_LOADING:
            return
        failed = self._failed.get(cid)
        if failed is not None:
            if time.monotonic() - failed < _RETRY_AFTER:
                return
            del self._failed[cid]
        task = asyncio.get_running_loop().create_task(self._background_load(cid))
        self._loading[cid] = task

    async def _background_load(self, cid: str) -> None:
        try:
            await self.load(cid)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # IPFSError, a timeout, a store's own error: never fatal
            # The reads go on from the node above; this one is asked for again later.
            log.info("cannot map the DAG of %s (reads go on from its parent): %s: %s", cid,
                     type(exc).__name__, exc)
            now = time.monotonic()
            # bounded: entries past their wait are dropped with each new failure
            for old in [c for c, t in self._failed.items() if now - t >= _RETRY_AFTER]:
                del self._failed[old]
            self._failed[cid] = now
        finally:
            self._loading.pop(cid, None)

    async def settle(self) -> None:
        """Until the background fetches started so far have finished (or failed)."""
        while self._loading:
            await asyncio.gather(*self._loading.values(), return_exceptions=True)

    async def close(self) -> None:
        tasks = [*self._loading.values(), *self._awaited.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


async def _all(aws: Iterable[Awaitable[None]]) -> None:
    """Await every awaitable at once; when some fail, raise the first failure once all
    have finished (none is left running behind the caller's back)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for res in results:
        if isinstance(res, BaseException):
            raise res
