"""UnixFS files as kubo's `ipfs add --cid-version=1` lays them out, computed locally.

Owns: the dag-pb / UnixFS protobuf encoding and decoding, the fixed-size chunker
(256 KiB), the balanced layout builder (at most 174 links per node, raw leaves,
sha2-256, CIDv1), ranged reads over a stored DAG, and navigation in a file's DAG
(`NodeIndex`: which child of a node holds a byte range, for readers that cat a node
below the file's root).

The protobuf encoding is hand-written: no kept Python library encodes dag-pb/UnixFS
(the PyPI candidates are 0.0.x placeholders), and the two messages are small. The
byte layout follows the dag-pb spec's canonical form, which kubo and js-ipfs both emit:
PBNode = Links (field 2) first, then Data (field 1); PBLink = Hash (1), Name (2, written
even when empty), Tsize (3). UnixFS Data = Type (1), Data (2, omitted when absent),
filesize (3), blocksizes (4, repeated, not packed).

Layout (go-unixfs `importer/balanced`, identical to js-ipfs's bottom-up batching):
- 0 bytes: one empty raw block.
- 1 chunk: the raw leaf itself is the root (`bafkrei...`, multihash = sha256 of the blob).
- otherwise: leaves are grouped 174 at a time under internal nodes, those nodes 174 at a
  time under the next level, until one node remains; every leaf sits at the same depth.
  A group of one (e.g. the 175th chunk) still gets its own parent node.
"""

from __future__ import annotations

import bisect
import functools
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from multiformats import CID

from peerstar.ipfs.cid import DAG_PB, RAW, block_cid, check_supported
from peerstar.ipfs.errors import CIDError, OffsetError

CHUNK_SIZE = 256 * 1024
MAX_LINKS = 174

# UnixFS Data.DataType values
UNIXFS_RAW = 0
UNIXFS_DIRECTORY = 1
UNIXFS_FILE = 2


# --- protobuf wire helpers ------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) for each field of a protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _read_varint(buf, pos)
            yield num, wire, val
        elif wire == 2:
            ln, pos = _read_varint(buf, pos)
            if pos + ln > len(buf):
                raise ValueError("truncated length-delimited field")
            yield num, wire, buf[pos : pos + ln]
            pos += ln
        elif wire == 1:
            yield num, wire, buf[pos : pos + 8]
            pos += 8
        elif wire == 5:
            yield num, wire, buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _ld(field_no: int, payload: bytes) -> bytes:
    return _varint(field_no << 3 | 2) + _varint(len(payload)) + payload


def _vi(field_no: int, value: int) -> bytes:
    return _varint(field_no << 3) + _varint(value)


# --- messages -------------------------------------------------------------------------


class Link:
    """A dag-pb link. A decoded link keeps the CID's bytes and parses them only when
    followed: `multiformats` takes ~0.5 ms per CID, and a read follows one link of 174."""

    __slots__ = ("_cid", "_raw", "tsize", "name")

    def __init__(self, cid: CID | None, tsize: int, name: str = "", *,
                 raw: bytes | None = None) -> None:
        self._cid = cid
        self._raw = raw
        self.tsize = tsize
        self.name = name

    @property
    def cid(self) -> CID:
        if self._cid is None:
            assert self._raw is not None
            self._cid = _cid_from_bytes(self._raw)
        return self._cid

    def cid_bytes(self) -> bytes:
        return self._raw if self._raw is not None else bytes(self.cid)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Link) and self.cid_bytes() == other.cid_bytes()
                and (self.tsize, self.name) == (other.tsize, other.name))

    def __repr__(self) -> str:
        return f"Link({self.cid}, {self.tsize}, {self.name!r})"


@functools.lru_cache(maxsize=1 << 16)
def _cid_from_bytes(raw: bytes) -> CID:
    try:
        return CID.decode(raw).set(base="base32")
    except Exception as exc:  # the library raises several unrelated types
        raise CIDError(f"malformed dag-pb link CID: {exc}") from None


@dataclass
class FileNode:
    """A decoded dag-pb node holding UnixFS file (or raw) data."""

    links: list[Link] = field(default_factory=list)
    unixfs_type: int = UNIXFS_FILE
    data: bytes = b""
    filesize: int | None = None
    blocksizes: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        """File bytes under this node."""
        if self.filesize is not None:
            return self.filesize
        return len(self.data) + sum(self.blocksizes)

    def child_starts(self) -> list[int]:
        """The file offset (within this node) where each child's bytes begin: after the
        node's inline data, children in link order (UnixFS file semantics)."""
        starts = []
        pos = len(self.data)
        for bs in self.blocksizes:
            starts.append(pos)
            pos += bs
        return starts


def encode_unixfs_data(
    filesize: int, blocksizes: list[int], data: bytes | None = None, type_: int = UNIXFS_FILE
) -> bytes:
    out = bytearray(_vi(1, type_))
    if data is not None:
        out += _ld(2, data)
    out += _vi(3, filesize)
    for bs in blocksizes:
        out += _vi(4, bs)
    return bytes(out)


def encode_pbnode(links: list[Link], data: bytes) -> bytes:
    out = bytearray()
    for link in links:
        body = _ld(1, link.cid_bytes()) + _ld(2, link.name.encode()) + _vi(3, link.tsize)
        out += _ld(2, body)
    out += _ld(1, data)
    return bytes(out)


def decode_file_node(raw: bytes) -> FileNode:
    """Decode a dag-pb block that holds a UnixFS file or raw node; raise CIDError otherwise."""
    try:
        node = FileNode()
        unixfs = None
        for num, wire, val in _fields(raw):
            # isinstance next to the wire type narrows int | bytes for the type checker
            if num == 2 and wire == 2 and isinstance(val, bytes):
                hash_, name, tsize = b"", "", 0
                for lnum, lwire, lval in _fields(val):
                    if lnum == 1 and lwire == 2 and isinstance(lval, bytes):
                        hash_ = lval
                    elif lnum == 2 and lwire == 2 and isinstance(lval, bytes):
                        name = lval.decode()
                    elif lnum == 3 and isinstance(lval, int):
                        tsize = lval
                node.links.append(Link(None, tsize, name, raw=bytes(hash_)))
            elif num == 1 and wire == 2 and isinstance(val, bytes):
                unixfs = val
        if unixfs is None:
            raise ValueError("dag-pb node without UnixFS data")
        for num, wire, val in _fields(unixfs):
            if isinstance(val, int):
                if num == 1:
                    node.unixfs_type = val
                elif num == 3:
                    node.filesize = val
                elif num == 4:
                    node.blocksizes.append(val)
            elif num == 2 and wire == 2:
                node.data = bytes(val)
            elif num == 4 and wire == 2:  # tolerate packed encoding from other writers
                pos = 0
                while pos < len(val):
                    v, pos = _read_varint(val, pos)
                    node.blocksizes.append(v)
    except (ValueError, UnicodeDecodeError, AssertionError) as exc:
        raise CIDError(f"malformed dag-pb/UnixFS block: {exc}") from None
    if node.unixfs_type not in (UNIXFS_FILE, UNIXFS_RAW):
        raise CIDError("the CID names a UnixFS directory or other non-file node, not a file")
    if node.links and len(node.blocksizes) != len(node.links):
        raise CIDError("malformed UnixFS file node: blocksizes do not match links")
    return node


class NodeIndex:
    """Where the children of a UnixFS file node lie in the file: the offsets bounding them
    (child i holds node-relative bytes [bounds[i], bounds[i+1]); children are contiguous,
    after the node's inline data) and each child's binary CID, packed: ~10 KiB for 174
    links, where lists of ints and bytes took ~44 KiB. A raw block has no children."""

    __slots__ = ("_cid_at", "_cids", "bounds")

    def __init__(self, bounds: list[int], children: list[bytes]) -> None:
        self.bounds = array("Q", bounds)
        self._cids = b"".join(children)
        self._cid_at = array("I", [0])
        for raw in children:
            self._cid_at.append(self._cid_at[-1] + len(raw))

    @classmethod
    def of_node(cls, raw: bytes) -> NodeIndex:
        """The index of a dag-pb file node's block (CIDError if it is not one)."""
        node = decode_file_node(raw)
        bounds = node.child_starts()
        if bounds:
            bounds.append(bounds[-1] + node.blocksizes[-1])
        return cls(bounds, [link.cid_bytes() for link in node.links])

    def __len__(self) -> int:
        """How many children the node has."""
        return max(len(self.bounds) - 1, 0)

    def child(self, i: int) -> bytes:
        """The binary CID of child `i` (`cid.cid_text` / `cid.is_raw_cid` read it)."""
        return self._cids[self._cid_at[i]:self._cid_at[i + 1]]

    def child_holding(self, offset: int, length: int) -> int | None:
        """The child holding all of the node-relative bytes [offset, offset + length), or
        None when they start in inline data, lie past the end or span several children."""
        bounds = self.bounds
        i = bisect.bisect_right(bounds, offset) - 1
        if i < 0 or i + 1 >= len(bounds) or offset + length > bounds[i + 1]:
            return None
        return i

    def children_over(self, lo: int, hi: int) -> range | None:
        """The children holding node-relative bytes of [lo, hi) (`lo` below 0 counts as
        0), in order; None when `lo` falls in the node's inline data or it has no
        children (the node is then read as a whole)."""
        bounds = self.bounds
        lo = max(lo, 0)
        if len(bounds) < 2 or lo < bounds[0]:
            return None
        first = bisect.bisect_right(bounds, lo) - 1
        return range(first, min(len(bounds) - 1, bisect.bisect_left(bounds, hi)))


RAW_INDEX = NodeIndex([], [])  # a raw block: nothing below it


@functools.lru_cache(maxsize=512)
def _decode_cached(raw: bytes) -> FileNode:
    """Interior nodes are read again by every range read below them; content is immutable."""
    return decode_file_node(raw)


# --- builder --------------------------------------------------------------------------


@dataclass
class Block:
    cid: CID
    data: bytes


@dataclass
class _Entry:
    """A finished child: its CID, Tsize (cumulative DAG bytes) and file bytes below it."""

    cid: CID
    tsize: int
    filesize: int


class DagBuilder:
    """Streaming balanced-layout builder: feed chunks, collect blocks, then `finish()`.

    Only the pending links of each level are held (at most 174 per level), so memory
    stays small whatever the file size. Every block produced is appended to `blocks`;
    the caller drains that list (writes or uploads) as it goes.
    """

    def __init__(self, max_links: int = MAX_LINKS) -> None:
        self.max_links = max_links
        self.levels: list[list[_Entry]] = [[]]
        self.blocks: list[Block] = []
        self.size = 0
        self._count = 0

    def add_chunk(self, chunk: bytes) -> None:
        cid = block_cid(RAW, chunk)
        self.blocks.append(Block(cid, chunk))
        self.size += len(chunk)
        self._count += 1
        self._push(0, _Entry(cid, len(chunk), len(chunk)))

    def _push(self, level: int, entry: _Entry) -> None:
        while len(self.levels) <= level + 1:
            self.levels.append([])
        self.levels[level].append(entry)
        # A full group is final whatever comes next: reduce it now to keep memory flat.
        if len(self.levels[level]) == self.max_links:
            group = self.levels[level]
            self.levels[level] = []
            self._push(level + 1, self._reduce(group))

    def _reduce(self, group: list[_Entry]) -> _Entry:
        filesize = sum(e.filesize for e in group)
        data = encode_unixfs_data(filesize, [e.filesize for e in group])
        raw = encode_pbnode([Link(e.cid, e.tsize) for e in group], data)
        cid = block_cid(DAG_PB, raw)
        self.blocks.append(Block(cid, raw))
        return _Entry(cid, len(raw) + sum(e.tsize for e in group), filesize)

    def finish(self) -> CID:
        """Close every level bottom-up and return the root CID."""
        if self._count == 0:
            # kubo: an empty file is one empty raw block.
            cid = block_cid(RAW, b"")
            self.blocks.append(Block(cid, b""))
            return cid
        if self._count == 1:
            return self.levels[0][0].cid
        level = 0
        while True:
            higher = any(self.levels[j] for j in range(level + 1, len(self.levels)))
            pending = self.levels[level]
            if not higher and len(pending) == 1 and level > 0:
                return pending[0].cid
            if pending:
                self.levels[level] = []
                entry = self._reduce(pending)
                while len(self.levels) <= level + 1:
                    self.levels.append([])
                self.levels[level + 1].append(entry)
            level += 1


def chunk_bytes(data: bytes, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


class Rechunker:
    """Turn arbitrary byte pieces into fixed-size chunks (the last one may be short)."""

    def __init__(self, size: int = CHUNK_SIZE) -> None:
        self.size = size
        self._buf = bytearray()

    def feed(self, piece: bytes) -> Iterator[bytes]:
        if not self._buf and len(piece) == self.size:
            yield bytes(piece)  # the common case when reading a file chunk by chunk
            return
        self._buf += piece
        while len(self._buf) >= self.size:
            yield bytes(self._buf[: self.size])
            del self._buf[: self.size]

    def flush(self) -> Iterator[bytes]:
        if self._buf:
            yield bytes(self._buf)
            self._buf = bytearray()


def compute_cid(data: bytes, *, chunk_size: int = CHUNK_SIZE, max_links: int = MAX_LINKS) -> str:
    """The CIDv1 base32 kubo's `add --cid-version=1` gives `data` (nothing stored).

    `chunk_size`/`max_links` other than the defaults exist for tests of the layout."""
    b = DagBuilder(max_links)
    for chunk in chunk_bytes(data, chunk_size):
        b.add_chunk(chunk)
        b.blocks.clear()
    return str(b.finish())


# --- reading --------------------------------------------------------------------------

GetBlock = Callable[[CID], Awaitable[bytes]]


async def file_size(get_block: GetBlock, cid: CID) -> int:
    """UnixFS file size of the DAG rooted at `cid` (reads only the root block)."""
    check_supported(cid)
    raw = await get_block(cid)
    if cid.codec.name == RAW:
        return len(raw)
    return decode_file_node(raw).size


async def read_range(
    get_block: GetBlock, cid: CID, offset: int = 0, length: int | None = None
) -> AsyncIterator[bytes]:
    """Yield the file bytes [offset, offset+length) of the DAG at `cid`, fetching only the
    blocks that cover that range (blocksizes tell which children to skip)."""
    if offset < 0 or (length is not None and length < 0):
        raise ValueError("offset and length must be >= 0")
    end = None if length is None else offset + length
    if end is not None and end <= offset:
        return
    async for part in _read_node(get_block, cid, offset, end, top=True):
        yield part


async def _read_node(
    get_block: GetBlock, cid: CID, start: int, end: int | None, top: bool = False
) -> AsyncIterator[bytes]:
    check_supported(cid)
    raw = await get_block(cid)
    if top:
        size = len(raw) if cid.codec.name == RAW else decode_file_node(raw).size
        if start > size:
            # As kubo: reading at the end gives nothing, past the end is an error.
            raise OffsetError(f"offset {start} is past the end of {cid} ({size} bytes)")
    if cid.codec.name == RAW:
        piece = raw[start:end]
        if piece:
            yield piece
        return
    node = _decode_cached(raw)
    # Inline data comes before the children's bytes (UnixFS file semantics).
    if node.data:
        piece = node.data[start : None if end is None else max(end, 0)]
        if piece:
            yield piece
    for link, bs, child_start in zip(node.links, node.blocksizes, node.child_starts(),
                                     strict=True):
        child_end = child_start + bs
        if child_end <= start:
            continue
        if end is not None and child_start >= end:
            break
        sub_start = max(start - child_start, 0)
        sub_end = None if end is None or end >= child_end else end - child_start
        async for piece in _read_node(get_block, link.cid, sub_start, sub_end):
            yield piece
