"""The `ContentStore` interface shared by the kubo RPC client and the embedded store, and
the input adapter that turns bytes / file objects / async iterables into 256 KiB pieces."""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, BinaryIO

from peerstar.ipfs.errors import IPFSError
from peerstar.ipfs.unixfs import CHUNK_SIZE

AddInput = bytes | bytearray | memoryview | AsyncIterable[bytes] | BinaryIO

# File objects are read 1 MiB at a time (4 chunks): few thread hops, little memory.
_READ_SIZE = 4 * CHUNK_SIZE


async def iter_input(data: AddInput) -> AsyncIterator[bytes]:
    """Yield `data` in pieces without reading it all into memory first."""
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for i in range(0, len(view), _READ_SIZE):
            yield bytes(view[i : i + _READ_SIZE])
        return
    if isinstance(data, AsyncIterable):
        async for piece in data:
            if piece:
                yield bytes(piece)
        return
    while True:
        # Local files are fast to read but may be on slow disks: keep the loop free.
        piece = await asyncio.to_thread(data.read, _READ_SIZE)
        if not piece:
            return
        yield piece


def rewindable(data: AddInput) -> int | None:
    """Position to rewind to before a retry, or None when the input can be read only once."""
    if isinstance(data, bytes | bytearray | memoryview):
        return 0
    if isinstance(data, AsyncIterable):
        return None
    try:
        if data.seekable():
            return int(data.tell())
    except (OSError, ValueError):
        return None
    return None


class ContentStore(abc.ABC):
    """Content-addressed storage with kubo's CIDs; see docs/API-CONTRACTS.md."""

    #: human-readable location, for messages ("embedded store at DIR", "IPFS API at X")
    description: str = ""

    @abc.abstractmethod
    async def add(self, data: AddInput, *, pin: bool = True, only_hash: bool = False) -> str:
        """Store `data` as a UnixFS file; return its CIDv1 base32."""

    @abc.abstractmethod
    def cat(self, cid: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Stream the file bytes [offset, offset+length): the ranged read, the one way
        peerstar reads content. `cid` may name any node of a file's DAG (the bytes under
        it). Raises BlockNotFoundError when the store does not hold a block it needs and
        cannot get it, OffsetError when `offset` is past the end."""

    async def cat_bytes(self, cid: str, offset: int = 0, length: int | None = None) -> bytes:
        parts = [p async for p in self.cat(cid, offset, length)]
        return b"".join(parts)

    @abc.abstractmethod
    async def stat_size(self, cid: str) -> int:
        """UnixFS file size of `cid`."""

    @abc.abstractmethod
    async def pin(self, cid: str) -> None:
        """Pin `cid` recursively."""

    async def unpin(self, cid: str) -> None:
        """Remove the recursive pin of `cid` (its blocks stay until a GC); IPFSError if
        it is not pinned."""
        raise IPFSError(f"{self.description or type(self).__name__}: cannot unpin")

    async def pinned(self, cid: str) -> bool:
        """Whether `cid` is pinned recursively (this default: a store without pins)."""
        return False

    @abc.abstractmethod
    async def block_get(self, cid: str) -> bytes:
        """The raw bytes of one block, verified against its CID."""

    async def block_stat(self, cid: str) -> int:
        """The size of one block, having the node fetch it if it does not hold it, without
        shipping its bytes to the caller: how a caller warms a node's block store. This
        default reads the block; stores with a cheaper way override it."""
        return len(await self.block_get(cid))

    @abc.abstractmethod
    async def id(self) -> dict[str, Any]:
        """Identity of the node (kubo's `id` answer; a small dict for the embedded store)."""

    # -- pubsub: the one way bridges talk to each other (peerstar.registry.directory) ----
    async def pubsub_publish(self, topic: str, data: bytes) -> None:
        """Send `data` to every subscriber of `topic` in the swarm (this node included).
        This default is a one-node swarm: the subscribers in this process."""
        for queue in list(self._local_topics().get(topic, ())):
            with contextlib.suppress(asyncio.QueueFull):  # a slow subscriber loses messages
                queue.put_nowait(bytes(data))

    async def pubsub_subscribe(self, topic: str) -> AsyncIterator[bytes]:
        """Yield the messages published on `topic` from now on, until the caller stops.
        This default hears the publishers of this process only."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1024)
        subscribers = self._local_topics().setdefault(topic, [])
        subscribers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            subscribers.remove(queue)

    def _local_topics(self) -> dict[str, list[asyncio.Queue[bytes]]]:
        topics = self.__dict__.get("_pubsub_topics")
        if topics is None:
            topics = self.__dict__["_pubsub_topics"] = {}
        return topics

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections/locks."""

    async def __aenter__(self) -> ContentStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
