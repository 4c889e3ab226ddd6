"""Read an eStargz / zstd:chunked blob by range: footer, TOC, tree, verified file reads.

All bytes come through `read_at(offset, length)`, so the reader works the same on a
local file, a bytes object or a remote blob fetched with HTTP Range. Every chunk is
checked against its `chunkDigest` before any of its bytes are returned, and the TOC
against the expected TOC digest when one is given.
"""

from __future__ import annotations

import hashlib
import posixpath
import zlib
from bisect import bisect_right
from collections.abc import Callable, Iterator

import zstandard

from peerstar.estargz.errors import FormatError, VerifyError
from peerstar.estargz.footer import MAX_FOOTER_SIZE, Footer, parse_footer
from peerstar.estargz.tarfmt import BLOCK
from peerstar.estargz.toc import TOC_TAR_NAME, TOCEntry, clean_name, parse_toc

ReadAt = Callable[[int, int], bytes]
MAX_TOC_BYTES = 512 << 20  # an uncompressed TOC larger than this is treated as a bomb
# Deflate cannot expand by more than ~1032:1, zstd by ~32768:1 (RLE blocks); a TOC
# that claims more uncompressed bytes than its compressed range can hold is lying.
_MAX_RATIO = {"gzip": 1032, "gzip-legacy": 1032, "zstd": 65536}


class Reader:
    """A parsed blob: the TOC, the tree built from it, and range reads."""

    def __init__(self, read_at: ReadAt, size: int, footer: Footer, toc_json: bytes) -> None:
        self._read_at = read_at
        self.size = size
        self.footer = footer
        self.compression = footer.compression
        self.toc_json = toc_json
        self.toc_digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
        self.version, self.entries = parse_toc(toc_json)
        self._by_name: dict[str, TOCEntry] = {}
        self._chunks: dict[str, list[TOCEntry]] = {}
        self._children: dict[str, dict[str, TOCEntry]] = {}
        self._index()

    # -- opening --------------------------------------------------------------------

    @classmethod
    def open(cls, read_at: ReadAt, size: int, *, toc_digest: str | None = None) -> Reader:
        """Parse footer and TOC through `read_at`; check the TOC digest if one is given."""
        if size < 40:
            raise FormatError(f"blob of {size} bytes is too small to be eStargz or zstd:chunked")
        tail_len = min(size, MAX_FOOTER_SIZE)
        tail = _read_checked(read_at, size - tail_len, tail_len)
        footer = parse_footer(tail, size)
        toc_json = _read_toc(read_at, footer)
        r = cls(read_at, size, footer, toc_json)
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
                self._chunks.setdefault(e.name, []).append(e)
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
            if e.type == "dir":
                e.num_link += 1
            self._by_name[e.name] = e
        self._by_name.setdefault("", TOCEntry(name="", type="dir", mode=0o755, num_link=2))
        root = self._by_name[""]
        if root.type != "dir":
            raise FormatError("the TOC's root entry is not a directory")
        self._children[""] = {}
        for e in self.entries:
            if e.type == "chunk" or e.name == "":
                continue
            if self._by_name.get(e.name) is not e:
                continue  # a later entry of the same name replaced this one
            parent = self._dir(posixpath.dirname(e.name))
            target = e
            e.num_link += 1
            if e.type == "hardlink":
                target = self._source(e)
                target.num_link += 1
            if target.type == "dir":
                parent.num_link += 1
            self._children[parent.name][posixpath.basename(e.name)] = target
        self._check_chunks()

    def _dir(self, name: str) -> TOCEntry:
        e = self._by_name.get(name)
        if e is None:
            e = TOCEntry(name=name, type="dir", mode=0o755, num_link=2)
            self._by_name[name] = e
            parent = self._dir(posixpath.dirname(name))
            parent.num_link += 1
            self._children[parent.name][posixpath.basename(name)] = e
        elif e.type != "dir":
            raise FormatError(f"{name!r} is used as a directory but is a {e.type}")
        self._children.setdefault(name, {})
        return e

    def _source(self, e: TOCEntry) -> TOCEntry:
        seen = set()
        while e.type == "hardlink":
            if e.name in seen:
                raise FormatError(f"hardlink loop at {e.name!r}")
            seen.add(e.name)
            target = self._by_name.get(clean_name(e.link_name))
            if target is None:
                raise FormatError(f"{e.name!r} is a hardlink to {e.link_name!r}, which is missing")
            e = target
        return e

    def _check_chunks(self) -> None:
        """Reject TOCs whose data entries lie: overlaps, gaps, offsets past the payload."""
        data_end = self.footer.data_end
        ratio = _MAX_RATIO[self.compression]
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
                if reg.size and c.chunk_size <= 0:
                    raise FormatError(f"{name!r}: chunk at {c.chunk_offset} has no size")
                expect += c.chunk_size
            if expect != reg.size:
                raise FormatError(f"{name!r}: chunks cover {expect} bytes, file has {reg.size}")

    # -- lookups --------------------------------------------------------------------

    def lookup(self, path: str) -> TOCEntry | None:
        """The entry at `path` (normalised like the reference); hardlinks resolved."""
        e = self._by_name.get(clean_name(path))
        if e is not None and e.type == "hardlink":
            e = self._source(e)
        return e

    def listdir(self, path: str) -> dict[str, TOCEntry]:
        name = clean_name(path)
        e = self.lookup(name)
        if e is None or e.type != "dir":
            raise FileNotFoundError(f"{path!r} is not a directory in this layer")
        return dict(self._children.get(name, {}))

    def walk(self) -> Iterator[tuple[str, TOCEntry]]:
        """Every path in the tree (depth first, sorted), with its (resolved) entry."""
        stack = [""]
        while stack:
            d = stack.pop()
            for base, e in sorted(self._children.get(d, {}).items(), reverse=True):
                p = f"{d}/{base}" if d else base
                if e.type == "dir":
                    stack.append(p)
            for base, e in sorted(self._children.get(d, {}).items()):
                yield (f"{d}/{base}" if d else base), e

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

    def decompress_chunk(self, chunk: TOCEntry, section: bytes, *, verify: bool = True) -> bytes:
        """A chunk's bytes from its compressed section, checked against its digest."""
        n = chunk.chunk_size
        try:
            if self.compression == "zstd":
                d = zstandard.ZstdDecompressor().decompressobj()
                out = d.decompress(section)[:n]  # one frame: bounded by its content size
            else:
                d = zlib.decompressobj(zlib.MAX_WBITS | 16)
                out = d.decompress(section, n)
        except (zlib.error, zstandard.ZstdError) as exc:
            raise VerifyError(
                f"{chunk.name!r}: chunk at offset {chunk.offset} does not decompress: {exc}"
            ) from None
        if len(out) != n:
            raise VerifyError(
                f"{chunk.name!r}: chunk at offset {chunk.offset} holds {len(out)} bytes, "
                f"TOC says {n}"
            )
        if verify:
            want = chunk.chunk_digest or (chunk.digest if chunk.size == n else "")
            if not want:
                raise VerifyError(f"{chunk.name!r}: chunk at {chunk.chunk_offset} has no digest")
            got = "sha256:" + hashlib.sha256(out).hexdigest()
            if got != want:
                raise VerifyError(
                    f"{chunk.name!r}: chunk at file offset {chunk.chunk_offset} has digest "
                    f"{got}, TOC says {want}: the blob was altered"
                )
        return out

    def read_chunk(self, chunk: TOCEntry, *, verify: bool = True) -> bytes:
        start, end = self.chunk_section(chunk)
        return self.decompress_chunk(chunk, _read_checked(self._read_at, start, end - start),
                                     verify=verify)

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

    def read_entry(self, entry: TOCEntry, offset: int, size: int = -1, *,
                   read_chunk: Callable[[TOCEntry], bytes] | None = None) -> bytes:
        """Bytes [offset, offset+size) of the regular file `entry`, from the chunks that
        cover them; `read_chunk` (default: fetch and verify) lets a caller serve chunks
        from a cache."""
        end = entry.size if size < 0 else min(entry.size, offset + size)
        if offset >= end:
            return b""
        get = read_chunk or self.read_chunk
        chunks = self.entry_chunks(entry)
        starts = [c.chunk_offset for c in chunks]
        i = max(0, bisect_right(starts, offset) - 1)
        out = []
        while i < len(chunks) and chunks[i].chunk_offset < end:
            c = chunks[i]
            data = get(c)
            lo = max(offset, c.chunk_offset) - c.chunk_offset
            hi = min(end, c.chunk_offset + c.chunk_size) - c.chunk_offset
            out.append(data[lo:hi])
            i += 1
        return b"".join(out)

    def verify_all(self) -> None:
        """Check every chunk of every file against its digest (and each file's digest)."""
        for name, chunks in self._chunks.items():
            reg = chunks[0]
            if reg.size == 0:
                continue
            h = hashlib.sha256()
            for c in chunks:
                h.update(self.read_chunk(c))
            if reg.digest and "sha256:" + h.hexdigest() != reg.digest:
                raise VerifyError(f"{name!r}: file digest does not match the TOC")

    def check_links(self) -> None:
        """Reject relative symlinks whose target climbs above the layer root.

        Absolute targets are fine: runtimes resolve them inside the container's root.
        A relative target with more `..` than the link has parent directories can only
        mean to reach outside the tree (an extractor that follows it writes outside the
        target), so strict readers refuse the layer.
        """
        for path, e in self.walk():
            if e.type != "symlink" or e.link_name.startswith("/"):
                continue
            depth = path.count("/")
            for part in e.link_name.split("/"):
                if part == "..":
                    depth -= 1
                    if depth < 0:
                        raise FormatError(
                            f"symlink {path!r} -> {e.link_name!r} points outside the layer root"
                        )
                elif part not in ("", "."):
                    depth += 1

    def prefetch_end(self) -> int | None:
        """Offset of `.prefetch.landmark` (end of the prioritized files), if present."""
        e = self._by_name.get(".prefetch.landmark")
        if e is not None and e.type == "reg" and e.offset:
            return e.offset
        return None


# --- helpers -------------------------------------------------------------------------


def _read_checked(read_at: ReadAt, offset: int, length: int) -> bytes:
    data = read_at(offset, length)
    if len(data) != length:
        raise FormatError(
            f"blob is truncated: wanted {length} bytes at offset {offset}, got {len(data)}"
        )
    return data


def _read_toc(read_at: ReadAt, footer: Footer) -> bytes:
    raw = _read_checked(read_at, footer.toc_offset, footer.toc_size)
    if footer.compression == "zstd":
        if footer.toc_uncompressed_size > MAX_TOC_BYTES:
            raise FormatError(f"TOC claims {footer.toc_uncompressed_size} bytes: too large")
        try:
            d = zstandard.ZstdDecompressor()
            out = d.decompress(raw, max_output_size=footer.toc_uncompressed_size or MAX_TOC_BYTES)
        except zstandard.ZstdError as exc:
            raise FormatError(f"TOC frame does not decompress: {exc}") from None
        if footer.toc_uncompressed_size and len(out) != footer.toc_uncompressed_size:
            raise FormatError("TOC size differs from the size in the footer")
        return out
    d = zlib.decompressobj(zlib.MAX_WBITS | 16)
    try:
        head = d.decompress(raw, BLOCK)
        if len(head) < BLOCK:
            raise FormatError("TOC member is too short to hold a tar header")
        name = head[:100].split(b"\x00", 1)[0]
        if name != TOC_TAR_NAME.encode():
            raise FormatError(f"TOC tar entry is named {name!r}, expected {TOC_TAR_NAME!r}")
        size_field = head[124:136].split(b"\x00", 1)[0].strip()
        try:
            n = int(size_field or b"0", 8)
        except ValueError:
            raise FormatError("TOC tar header has a malformed size") from None
        if n > MAX_TOC_BYTES:
            raise FormatError(f"TOC claims {n} bytes: too large")
        body = d.decompress(d.unconsumed_tail, n)
    except zlib.error as exc:
        raise FormatError(f"TOC member does not decompress: {exc}") from None
    if len(body) != n:
        raise FormatError(f"TOC is truncated: {len(body)} of {n} bytes")
    return body


def compute_diff_id(read_at: ReadAt, size: int, compression: str) -> tuple[str, int]:
    """sha256 and length of the whole decompressed blob (its DiffID), streamed."""
    h = hashlib.sha256()
    total = 0
    step = 1 << 20

    def pieces() -> Iterator[bytes]:
        for off in range(0, size, step):
            yield _read_checked(read_at, off, min(step, size - off))

    try:
        if compression == "zstd":
            d = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
            for p in pieces():
                out = d.decompress(p)
                h.update(out)
                total += len(out)
        else:
            d = zlib.decompressobj(zlib.MAX_WBITS | 16)
            for p in pieces():
                while p:
                    out = d.decompress(p)
                    h.update(out)
                    total += len(out)
                    if d.eof:
                        p = d.unused_data
                        d = zlib.decompressobj(zlib.MAX_WBITS | 16)
                    else:
                        p = b""
    except (zlib.error, zstandard.ZstdError) as exc:
        raise VerifyError(f"blob does not decompress: {exc}") from None
    return "sha256:" + h.hexdigest(), total
