"""Read an eStargz / zstd:chunked blob by range: footer, TOC, tree, verified file reads.

All bytes come through `read_at(offset, length)`, so the reader works the same on a
local file, a bytes object or a remote blob fetched with HTTP Range. Every chunk is
checked against its `chunkDigest` before any of its bytes are returned, and the TOC
against the expected TOC digest when one is given.

Memory stays bounded whatever the blob declares: the TOC is decompressed and parsed
as a stream (and refused beyond `toc.TOC_MEMORY_LIMIT`), chunks are decompressed in
pieces and never past the size the TOC gives them, and `verify_all` and
`iter_entry` hold one piece at a time, however large a chunk is.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Callable, Generator, Iterator

from peerstar.estargz.compression import (
    Compression,
    LayerInfo,
    by_name,
    layer_annotations,
    parse_footer,
)
from peerstar.estargz.decompress import DecompressError, TruncatedError, read_exact
from peerstar.estargz.errors import FormatError, VerifyError
from peerstar.estargz.footer import MAX_FOOTER_SIZE, Footer
from peerstar.estargz.tarfmt import BLOCK
from peerstar.estargz.toc import TOCEntry, clean_name, parse_toc
from peerstar.estargz.tree import Tree

ReadAt = Callable[[int, int], bytes]
_EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()


class Reader:
    """A parsed blob: the TOC, the tree built from it, and range reads."""

    def __init__(self, read_at: ReadAt, size: int, footer: Footer) -> None:
        """Read and parse the TOC that `footer` points at (use `open`)."""
        self._read_at = read_at
        self.size = size
        self.footer = footer
        self.codec: Compression = by_name(footer.compression)
        self.compression = footer.compression  # the codec's name
        h = hashlib.sha256()

        def hashed() -> Iterator[bytes]:
            for piece in _toc_pieces(read_at, footer):
                h.update(piece)
                yield piece

        self.version, self.entries = parse_toc(hashed())
        self.toc_digest = "sha256:" + h.hexdigest()
        self._chunks: dict[str, list[TOCEntry]] = {}
        self._index()

    @property
    def toc_json(self) -> bytes:
        """The TOC's JSON bytes, read again from the blob (not kept: it can be large)."""
        return b"".join(_toc_pieces(self._read_at, self.footer))

    # -- opening --------------------------------------------------------------------

    @classmethod
    def open(cls, read_at: ReadAt, size: int, *, toc_digest: str | None = None) -> Reader:
        """Parse footer and TOC through `read_at`; check the TOC digest if one is given."""
        if size < 40:
            raise FormatError(f"blob of {size} bytes is too small to be eStargz or zstd:chunked")
        tail_len = min(size, MAX_FOOTER_SIZE)
        tail = _read_checked(read_at, size - tail_len, tail_len)
        footer = parse_footer(tail, size)
        r = cls(read_at, size, footer)
        if toc_digest is not None and r.toc_digest != toc_digest:
            raise VerifyError(
                f"TOC digest is {r.toc_digest}, expected {toc_digest}: the blob does not "
                "match its descriptor (tampered, or the wrong blob)"
            )
        return r

    @classmethod
    def from_bytes(cls, blob: bytes, *, toc_digest: str | None = None) -> Reader:
        view = memoryview(blob)
        return cls.open(lambda off, n: bytes(view[off : off + n]), len(blob), toc_digest=toc_digest)

    # -- the tree -------------------------------------------------------------------

    def _index(self) -> None:
        last_reg: TOCEntry | None = None
        last_name = ""
        unames: dict[int, str] = {}
        gnames: dict[int, str] = {}
        for e in self.entries:
            e.name = clean_name(e.name)
            if e.type == "chunk":
                if last_reg is None:
                    raise FormatError(f"chunk entry {e.name!r} does not follow a regular file")
                e.name = last_name
                self._chunks[e.name].append(e)
                if e.chunk_size == 0:
                    e.chunk_size = last_reg.size - e.chunk_offset
                continue
            last_name = e.name
            if e.uname:
                unames[e.uid] = e.uname
            else:
                e.uname = unames.get(e.uid, "")
            if e.gname:
                gnames[e.gid] = e.gname
            else:
                e.gname = gnames.get(e.gid, "")
            if e.type == "reg":
                last_reg = e
                self._chunks[e.name] = [e]
                if e.chunk_size == 0:
                    e.chunk_size = e.size
            else:
                last_reg = None
        self._tree = Tree(self.entries)
        self._by_name = self._tree.by_name
        self._check_chunks()

    def _check_chunks(self) -> None:
        """Reject TOCs whose data entries lie: overlaps, gaps, offsets past the payload."""
        data_end = self.footer.data_end
        # A TOC that claims more uncompressed bytes than its compressed range can hold
        # is lying.
        ratio = self.codec.max_ratio
        prev = -1
        data_entries = [e for e in self.entries if e.is_data and e.chunk_size > 0]
        for e in data_entries:
            if e.offset <= prev:
                raise FormatError(
                    f"{e.name!r}: chunk at offset {e.offset} overlaps the previous chunk "
                    f"(offsets must increase)"
                )
            if e.offset >= data_end:
                raise FormatError(
                    f"{e.name!r}: chunk offset {e.offset} is beyond the payload ({data_end} bytes)"
                )
            prev = e.offset
        for i, e in enumerate(data_entries):
            e.next_offset = data_entries[i + 1].offset if i + 1 < len(data_entries) else data_end
            if e.chunk_size > (e.next_offset - e.offset) * ratio + BLOCK:
                raise FormatError(
                    f"{e.name!r}: chunk claims {e.chunk_size} bytes from "
                    f"{e.next_offset - e.offset} compressed bytes (impossible; a bomb or a lie)"
                )
        for name, chunks in self._chunks.items():
            reg = chunks[0]
            expect = 0
            for c in chunks:
                if c.chunk_offset != expect:
                    raise FormatError(
                        f"{name!r}: chunk at {c.chunk_offset} should start at {expect} "
                        "(chunks must cover the file without gaps or overlaps)"
                    )
                if c.chunk_size <= 0 and (reg.size or c is not reg):
                    # (a chunk entry's size defaults to the rest of the file, which a
                    # lying size makes zero or negative)
                    raise FormatError(f"{name!r}: chunk at {c.chunk_offset} has no size")
                expect += c.chunk_size
            if expect != reg.size:
                raise FormatError(f"{name!r}: chunks cover {expect} bytes, file has {reg.size}")

    # -- lookups --------------------------------------------------------------------

    def lookup(self, path: str) -> TOCEntry | None:
        """The entry at `path` (normalised like the reference); hardlinks resolved."""
        e = self._by_name.get(clean_name(path))
        if e is not None and e.type == "hardlink":
            e = self._tree.source(e)
        return e

    def listdir(self, path: str) -> dict[str, TOCEntry]:
        name = clean_name(path)
        e = self.lookup(name)
        if e is None or e.type != "dir":
            raise FileNotFoundError(f"{path!r} is not a directory in this layer")
        return dict(self._tree.children.get(name, {}))

    def walk(self) -> Iterator[tuple[str, TOCEntry]]:
        """Every path in the tree (depth first, sorted), with its (resolved) entry."""
        return self._tree.walk()

    def chunks(self, path: str) -> list[TOCEntry]:
        e = self.lookup(path)
        if e is None or e.type != "reg":
            return []
        return [c for c in self._chunks.get(e.name, []) if c.chunk_size]  # none for empty files

    def entry_chunks(self, entry: TOCEntry) -> list[TOCEntry]:
        """The chunks of regular file `entry` in file order (the entry itself first); the
        reader's own list, not a copy: do not change it."""
        return self._chunks.get(entry.name, [])

    # -- data -----------------------------------------------------------------------

    def chunk_section(self, chunk: TOCEntry) -> tuple[int, int]:
        """The compressed byte range [start, end) holding `chunk`."""
        return chunk.offset, chunk.next_offset

    def iter_chunk(self, chunk: TOCEntry, lo: int = 0, hi: int | None = None, *,
                   verify: bool = True, section: bytes | None = None,
                   read_at: ReadAt | None = None) -> Iterator[bytes]:
        """Bytes [lo, hi) of `chunk` (chunk-relative), in pieces, decompressed from the
        blob (or from its already fetched compressed `section`; `read_at` reads the blob
        instead of the reader's own, e.g. a fetcher's read naming its request kind).

        The whole chunk is decompressed and hashed, one piece at a time and never past
        its size in the TOC; the pieces are verified only when the iterator finishes
        without raising VerifyError: consume it to the end before trusting them.
        """
        n = chunk.chunk_size
        hi = n if hi is None else min(hi, n)
        if section is None:
            pieces = self.codec.inflate(read_at or self._read_at, chunk.offset,
                                        chunk.next_offset)
        else:
            view = memoryview(section)
            pieces = self.codec.inflate(lambda off, k: bytes(view[off:off + k]), 0, len(view))
        h = hashlib.sha256() if verify else None
        got = 0
        try:
            for piece in pieces:
                if got + len(piece) > n:
                    piece = piece[:n - got]
                if h is not None:
                    h.update(piece)
                a, b = max(lo - got, 0), min(hi - got, len(piece))
                if a < b:
                    yield piece if (a, b) == (0, len(piece)) else piece[a:b]
                got += len(piece)
                if got == n:
                    break
        except DecompressError as exc:
            raise VerifyError(
                f"{chunk.name!r}: chunk at offset {chunk.offset} does not decompress: {exc}"
            ) from None
        except TruncatedError as exc:
            raise FormatError(str(exc)) from None
        finally:
            pieces.close()
        if got != n:
            raise VerifyError(
                f"{chunk.name!r}: chunk at offset {chunk.offset} holds {got} bytes, "
                f"TOC says {n}"
            )
        if h is not None:
            want = chunk.chunk_digest or (chunk.digest if chunk.size == n else "")
            if not want:
                raise VerifyError(f"{chunk.name!r}: chunk at {chunk.chunk_offset} has no digest")
            got_digest = "sha256:" + h.hexdigest()
            if got_digest != want:
                raise VerifyError(
                    f"{chunk.name!r}: chunk at file offset {chunk.chunk_offset} has digest "
                    f"{got_digest}, TOC says {want}: the blob was altered"
                )

    def decompress_chunk(self, chunk: TOCEntry, section: bytes, *, verify: bool = True) -> bytes:
        """A chunk's bytes from its compressed section, checked against its digest."""
        return b"".join(self.iter_chunk(chunk, verify=verify, section=section))

    def read_chunk(self, chunk: TOCEntry, *, verify: bool = True) -> bytes:
        return b"".join(self.iter_chunk(chunk, verify=verify))

    def read(self, path: str, offset: int = 0, size: int = -1) -> bytes:
        """`size` bytes of the file at `path` from `offset` (all when -1), verified."""
        e = self.lookup(path)
        if e is None:
            raise FileNotFoundError(f"{path!r} is not in this layer")
        if e.type != "reg":
            raise IsADirectoryError(f"{path!r} is a {e.type}, not a regular file")
        if offset < 0:
            raise ValueError("offset must not be negative")
        return self.read_entry(e, offset, size)

    def read_entry(self, entry: TOCEntry, offset: int, size: int = -1) -> bytes:
        """Bytes [offset, offset+size) of the regular file `entry`, from the chunks that
        cover them (each fetched and verified whole, keeping only the bytes asked for)."""
        return b"".join(b"".join(self.iter_chunk(c, lo, hi))
                        for c, lo, hi in self.chunk_spans(entry, offset, size))

    def chunk_spans(self, entry: TOCEntry, offset: int,
                    size: int = -1) -> Iterator[tuple[TOCEntry, int, int]]:
        """(chunk, lo, hi) for each chunk holding bytes [offset, offset+size) of regular
        file `entry`, with [lo, hi) relative to the chunk."""
        end = entry.size if size < 0 else min(entry.size, offset + size)
        if offset >= end:
            return
        chunks = self.entry_chunks(entry)
        starts = [c.chunk_offset for c in chunks]
        i = max(0, bisect_right(starts, offset) - 1)
        while i < len(chunks) and chunks[i].chunk_offset < end:
            c = chunks[i]
            lo = max(offset, c.chunk_offset) - c.chunk_offset
            hi = min(end, c.chunk_offset + c.chunk_size) - c.chunk_offset
            yield c, lo, hi
            i += 1

    def verify_all(self) -> None:
        """Check every chunk of every file against its digest (and each file's digest),
        one piece in memory at a time."""
        for name, chunks in self._chunks.items():
            reg = chunks[0]
            if reg.size == 0:
                if reg.digest and reg.digest != _EMPTY_DIGEST:
                    raise VerifyError(f"{name!r}: empty file with the digest {reg.digest!r}")
                continue
            h = hashlib.sha256()
            for c in chunks:
                for piece in self.iter_chunk(c):
                    h.update(piece)
            if reg.digest and "sha256:" + h.hexdigest() != reg.digest:
                raise VerifyError(f"{name!r}: file digest does not match the TOC")

    def check_links(self) -> None:
        """Reject relative symlinks whose target climbs above the layer root
        (`Tree.check_links`)."""
        self._tree.check_links()

    def verify(self) -> None:
        """Everything `peerstar estargz verify` checks once the TOC is open: links stay
        inside the root, every chunk and file digest matches."""
        self.check_links()
        self.verify_all()

    def describe(self) -> LayerInfo:
        """What the blob's layer descriptor records, as `build` reports it: DiffID and
        uncompressed size (the whole blob is decompressed, streamed), media type and
        annotations."""
        diff_id, usize = compute_diff_id(self._read_at, self.size, self.codec)
        try:
            extra = self.codec.blob_annotations(self._read_at, self.footer)
        except TruncatedError as exc:
            raise FormatError(str(exc)) from None
        return LayerInfo(self.toc_digest, diff_id, usize, self.codec.media_type,
                         layer_annotations(self.toc_digest, usize, extra))

    def prefetch_end(self) -> int | None:
        """Offset of `.prefetch.landmark` (end of the prioritized files), if present."""
        e = self._by_name.get(".prefetch.landmark")
        if e is not None and e.type == "reg" and e.offset:
            return e.offset
        return None


# --- helpers -------------------------------------------------------------------------


def _read_checked(read_at: ReadAt, offset: int, length: int) -> bytes:
    try:
        return read_exact(read_at, offset, length)
    except TruncatedError as exc:
        raise FormatError(str(exc)) from None


def _toc_pieces(read_at: ReadAt, footer: Footer) -> Generator[bytes, None, None]:
    """The TOC's JSON bytes, in pieces, never past the size its header or footer gives."""
    try:
        yield from by_name(footer.compression).toc_pieces(read_at, footer)
    except DecompressError as exc:
        raise FormatError(f"TOC member does not decompress: {exc}") from None
    except TruncatedError as exc:
        raise FormatError(str(exc)) from None


def compute_diff_id(read_at: ReadAt, size: int, codec: Compression) -> tuple[str, int]:
    """sha256 and length of the whole decompressed blob (its DiffID), streamed."""
    h = hashlib.sha256()
    total = 0
    try:
        for piece in codec.inflate(read_at, 0, size, across=True):
            h.update(piece)
            total += len(piece)
    except DecompressError as exc:
        raise VerifyError(f"blob does not decompress: {exc}") from None
    except TruncatedError as exc:
        raise FormatError(str(exc)) from None
    return "sha256:" + h.hexdigest(), total
