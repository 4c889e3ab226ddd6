"""Build an eStargz (gzip) or zstd:chunked blob from a layer tar.

Layout, as the reference writes it: each non-empty regular file's payload, and each
further chunk of it, starts a new compressed member (gzip member or zstd frame); the
tar headers of the entries that follow share the member of the payload before them;
the TOC comes last, then the footer. Prioritized files go first, followed by a
landmark file.

Members are compressed independently, so they are compressed on several threads
(zlib and zstd release the GIL) and written in order: the output depends only on the
input and the options, never on the thread count.

Before compressing anything the builder checks the entries with the reader's own
checks (`toc.check_entry`, `tree.Tree`, the symlink check and the TOC memory limit),
so it never writes a blob that `peerstar estargz verify` refuses. Memory stays
bounded whatever the tar holds: the input is read by offset (never mapped whole),
at most `_IN_FLIGHT` bytes wait for compression, and a member that grows past
`_LARGE` bytes is compressed as it is written.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import struct
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import zstandard

from peerstar.estargz.errors import EstargzError, FormatError
from peerstar.estargz.footer import estargz_footer, skippable_frame, zstd_footer_frame
from peerstar.estargz.tarfmt import BLOCK, TarHeader, iter_headers, padding, write_header
from peerstar.estargz.toc import (
    LANDMARK_CONTENTS,
    MAX_TOC_BYTES,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_MEMORY_LIMIT,
    TOC_TAR_NAME,
    TOCEntry,
    check_entry,
    clean_name,
    entry_cost,
    format_modtime,
    iter_toc_json,
    toc_too_large,
)
from peerstar.estargz.tree import Tree
from peerstar.oci.mediatypes import (
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    ZSTD_MANIFEST_CHECKSUM_ANNOTATION,
    ZSTD_MANIFEST_POSITION_ANNOTATION,
)

DEFAULT_CHUNK_SIZE = 4 << 20
_TASK_BYTES = 1 << 20  # members batched per thread task, so tiny files do not cost a task each
_IN_FLIGHT = 32 << 20  # uncompressed bytes submitted but not yet written
_LARGE = 8 << 20  # a member larger than this is compressed on the writing thread, streamed
_STEP = 1 << 20  # read size for payloads
_EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()
_KEEP_TOC = 16 << 20  # TOC JSON kept between its two uses up to this size
_FEED = 256 << 10  # small pieces of a streamed member are fed to the compressor together
_ZSTD_SIZE_HINT = 4 << 20  # zstd parameters are those of a level for an input this large
_ZSTD_CONTEXTS = 96 << 20  # zstd compression contexts of all threads together


@dataclass
class BuildResult:
    toc_digest: str
    diff_id: str
    uncompressed_size: int
    blob_digest: str
    blob_size: int
    toc_offset: int
    compression: str
    media_type: str
    annotations: dict[str, str]
    missing_prioritized: list[str] = field(default_factory=list)


# --- input ---------------------------------------------------------------------------


class _Input:
    """The decompressed source tar, read by offset: a file (the caller's, or a temporary
    copy of a compressed or unseekable input) or bytes."""

    def __init__(self, src: BinaryIO | bytes, spool_dir: str | None = None) -> None:
        self._spool_dir = spool_dir
        self._tmp: BinaryIO | None = None
        self._file: BinaryIO | None = None
        self._bytes: memoryview | None = None
        if isinstance(src, bytes | bytearray | memoryview):
            data = bytes(src)
            head = data[:4]
            if head[:3] != b"\x1f\x8b\x08" and head != b"\x28\xb5\x2f\xfd":
                self._bytes = memoryview(data)
                return
            src = io.BytesIO(data)
        head = _peek(src, 4)
        if head[:3] == b"\x1f\x8b\x08":
            self._spool(gzip.GzipFile(fileobj=src, mode="rb"))  # type: ignore[arg-type]
        elif head == b"\x28\xb5\x2f\xfd":
            reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
            self._spool(reader)
        elif _is_real_file(src):
            self._file = src
        else:
            self._spool(src)

    def _spool(self, reader: BinaryIO) -> None:
        """Copy the (decompressed) input to a temp file, telling read from write errors."""
        try:
            self._tmp = tempfile.TemporaryFile(prefix="peerstar-tar-", dir=self._spool_dir)
        except OSError as exc:
            where = self._spool_dir or tempfile.gettempdir()
            raise EstargzError(f"cannot create a temporary file in {where}: {exc}") from None
        while True:
            try:
                block = reader.read(1 << 20)
            except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
                raise FormatError(f"cannot decompress the input layer: {exc}") from None
            if not block:
                break
            try:
                self._tmp.write(block)
            except OSError as exc:
                where = self._spool_dir or tempfile.gettempdir()
                raise EstargzError(
                    f"cannot write the decompressed input layer to {where}: {exc.strerror or exc}"
                    " (free space there, or pass another spool directory)"
                ) from None
        self._tmp.flush()
        self._file = self._tmp

    def reader(self) -> BinaryIO:
        """The tar as a seekable stream, from its start (for reading headers)."""
        if self._bytes is not None:
            return io.BytesIO(self._bytes)  # type: ignore[arg-type]
        assert self._file is not None
        self._file.seek(0)
        return self._file

    def read_at(self, offset: int, length: int) -> bytes:
        if self._bytes is not None:
            data = bytes(self._bytes[offset:offset + length])
        else:
            assert self._file is not None
            data = os.pread(self._file.fileno(), length, offset)
        if len(data) != length:
            raise FormatError(f"the input tar changed while it was read (short read at {offset})")
        return data

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.close()


def _peek(src: BinaryIO, n: int) -> bytes:
    if hasattr(src, "peek"):
        return src.peek(n)[:n]  # type: ignore[attr-defined]
    pos = src.tell()
    head = src.read(n)
    src.seek(pos)
    return head


def _is_real_file(src: BinaryIO) -> bool:
    try:
        src.fileno()
        return src.seekable() and src.tell() == 0
    except (OSError, AttributeError, io.UnsupportedOperation):
        return False


# --- entry order ---------------------------------------------------------------------


class _NotFound(Exception):
    pass


def _sort_entries(
    headers: list[TarHeader], prioritized: Sequence[str], allow_missing: bool
) -> tuple[list[TarHeader], list[str]]:
    src: dict[str, TarHeader] = {}
    for h in headers:
        name = clean_name(h.name)
        if name in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
            continue
        src.pop(name, None)  # a later entry of the same name replaces the earlier one
        src[name] = h
    out: dict[str, TarHeader] = {}

    def move(name: str) -> None:
        """Move `name` to `out` after its parent directories and hardlink target (a
        depth-first walk with a stack: a path may have thousands of components)."""
        todo = [(clean_name(name), False)]
        active: set[str] = set()  # expanded, waiting for their parents and targets
        while todo:
            n, expanded = todo.pop()
            if expanded:
                active.discard(n)
                if n in src:
                    out[n] = src.pop(n)
                continue
            if n == "":
                if "" in src:
                    out[""] = src.pop("")
                continue
            if n in out or n in active:
                continue  # done, or a hardlink loop (the tree check reports it)
            if n not in src:
                raise _NotFound(n)
            active.add(n)
            todo.append((n, True))
            h = src[n]
            if h.typeflag == b"1":
                todo.append((clean_name(h.linkname), False))
            todo.append((posixpath.dirname(n.rstrip("/")), False))

    missing: list[str] = []
    for p in prioritized:
        try:
            move(p)
        except _NotFound as exc:
            if not allow_missing:
                raise EstargzError(
                    f"prioritized file {p!r} is not in the layer ({exc.args[0]!r} missing); "
                    "fix the list or allow missing files"
                ) from None
            missing.append(p)
    landmark = PREFETCH_LANDMARK if prioritized else NO_PREFETCH_LANDMARK
    lm = TarHeader(name=landmark, typeflag=b"0", size=len(LANDMARK_CONTENTS), data_offset=-1)
    return [*out.values(), lm, *src.values()], missing


# --- compression ---------------------------------------------------------------------


class _Compressor:
    def __init__(self, compression: str, level: int) -> None:
        self.compression = compression
        self.level = level
        self._local = threading.local()
        # zstd's parameters for a level are chosen for a 4 MiB input (the default chunk)
        # rather than for an unknown size: level 22 would take a 640 MiB context for
        # each thread; this way no context takes more than 65 MiB.
        self.zstd_params = zstandard.ZstdCompressionParameters.from_level(
            level, source_size=_ZSTD_SIZE_HINT) if compression == "zstd" else None

    def max_workers(self) -> int:
        """Threads whose compression contexts fit in _ZSTD_CONTEXTS (gzip: no limit)."""
        if self.zstd_params is None:
            return 1 << 16
        return max(1, _ZSTD_CONTEXTS // self.zstd_params.estimated_compression_context_size())

    def _zstd(self) -> zstandard.ZstdCompressor:
        zc = getattr(self._local, "zc", None)
        if zc is None:
            zc = self._local.zc = zstandard.ZstdCompressor(compression_params=self.zstd_params)
        return zc

    def member(self, pieces: list[bytes]) -> bytes:
        if self.compression == "zstd":
            return self._zstd().compress(b"".join(pieces))
        stream = self.stream()
        out = [stream.start()]
        out.extend(stream.feed(p) for p in pieces)
        out.append(stream.finish())
        return b"".join(out)

    def batch(self, members: list[list[bytes]]) -> list[bytes]:
        return [self.member(m) for m in members]

    def stream(self) -> _MemberStream:
        """A member compressed as its pieces arrive (the size is not known up front)."""
        return _MemberStream(self.compression, self.level,
                             self._zstd() if self.compression == "zstd" else None)


class _MemberStream:
    """One gzip member or zstd frame, compressed piece by piece."""

    def __init__(self, compression: str, level: int,
                 zc: zstandard.ZstdCompressor | None) -> None:
        self._level = level
        self._crc = 0
        self._size = 0
        self._c: Any = (zc.compressobj() if zc is not None
                        else zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9))
        self._gzip = zc is None

    def start(self) -> bytes:
        if not self._gzip:
            return b""
        xfl = b"\x02" if self._level == 9 else b"\x04" if self._level == 1 else b"\x00"
        return b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + xfl + b"\xff"

    def feed(self, piece: bytes) -> bytes:
        if self._gzip:
            self._crc = zlib.crc32(piece, self._crc)
            self._size += len(piece)
        return self._c.compress(piece)

    def finish(self) -> bytes:
        out = self._c.flush()
        if self._gzip:
            out += struct.pack("<II", self._crc, self._size & 0xFFFFFFFF)
        return out


class _Writer:
    """Writes members to `dst` in order. A member is buffered and compressed on the
    pool with others (in batches of about _TASK_BYTES); once it grows past _LARGE it is
    compressed here as it grows, after everything before it is written. At most
    _IN_FLIGHT bytes wait for the pool."""

    def __init__(self, dst: BinaryIO, comp: _Compressor, pool: ThreadPoolExecutor) -> None:
        self._dst = dst
        self._comp = comp
        self._pool = pool
        self.blob = hashlib.sha256()
        self.written = 0
        self.offsets: list[int] = []  # compressed offset of each member, in order
        self.members = 0  # members closed so far (the index of the open one)
        self._current: list[bytes] = []
        self._current_bytes = 0
        self._stream: _MemberStream | None = None
        self._batch: list[list[bytes]] = []
        self._batch_bytes = 0
        self._pending: deque[tuple[Future[list[bytes]], int]] = deque()
        self._in_flight = 0

    def write(self, data: bytes) -> None:
        if data:
            self._dst.write(data)
            self.blob.update(data)
            self.written += len(data)

    def add(self, piece: bytes) -> None:
        """Append uncompressed bytes to the open member."""
        self._current.append(piece)
        self._current_bytes += len(piece)
        if self._stream is not None:
            if self._current_bytes >= _FEED:
                self._feed()
            return
        if self._current_bytes > _LARGE:
            self.drain()
            self.offsets.append(self.written)
            self._stream = self._comp.stream()
            self.write(self._stream.start())
            self._feed()

    def _feed(self) -> None:
        assert self._stream is not None
        self.write(self._stream.feed(b"".join(self._current)))
        self._current, self._current_bytes = [], 0

    def close_member(self) -> None:
        if self._stream is not None:
            self._feed()
            self.write(self._stream.finish())
            self._stream = None
            self.members += 1
            return
        if not self._current:
            return
        self._batch.append(self._current)
        self._batch_bytes += self._current_bytes
        self.members += 1
        self._current, self._current_bytes = [], 0
        if self._batch_bytes >= _TASK_BYTES:
            self._submit()

    def _submit(self) -> None:
        if self._batch:
            self._pending.append((self._pool.submit(self._comp.batch, self._batch),
                                  self._batch_bytes))
            self._in_flight += self._batch_bytes
            self._batch, self._batch_bytes = [], 0
        while self._in_flight > _IN_FLIGHT:
            self._write_oldest()

    def _write_oldest(self) -> None:
        fut, n = self._pending.popleft()
        self._in_flight -= n
        for out in fut.result():
            self.offsets.append(self.written)
            self.write(out)

    def drain(self) -> None:
        """Write every closed member."""
        self._submit()
        while self._pending:
            self._write_oldest()


# --- build ---------------------------------------------------------------------------


def build(
    src: BinaryIO | bytes,
    dst: BinaryIO,
    *,
    compression: str = "gzip",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int | None = None,
    prioritized: Sequence[str] = (),
    allow_missing_prioritized: bool = False,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    spool_dir: str | None = None,
) -> BuildResult:
    """Convert the layer tar `src` (plain, gzip or zstd) into a blob written to `dst`.

    `progress`, if given, is called with the number of source bytes just processed.
    A compressed or unseekable input is first decompressed into a temporary file in
    `spool_dir` (default: the system temp dir).
    """
    if compression not in ("gzip", "zstd"):
        raise EstargzError(f"unknown compression {compression!r}: use 'gzip' or 'zstd'")
    if chunk_size <= 0:
        raise EstargzError(f"chunk size must be positive, not {chunk_size}")
    if level is None:
        level = 9 if compression == "gzip" else 3
    if compression == "gzip" and not 0 <= level <= 9:
        raise EstargzError(f"gzip level must be 0..9, not {level}")
    if compression == "zstd" and not 1 <= level <= 22:
        raise EstargzError(f"zstd level must be 1..22, not {level}")
    workers = workers or os.cpu_count() or 1
    inp = _Input(src, spool_dir)
    try:
        return _build(
            inp, dst, compression, chunk_size, level, prioritized,
            allow_missing_prioritized, workers, progress,
        )
    finally:
        inp.close()


def _meta_entry(h: TarHeader, kind: str, *, modtime: bool = True) -> TOCEntry:
    """The TOC entry of `h` without what compression adds (digests, offsets, chunks)."""
    e = TOCEntry(name=h.name, type=kind, mode=h.mode, uid=h.uid, gid=h.gid,
                 modtime=format_modtime(h.mtime) if modtime else "", xattrs=h.xattrs())
    if kind in ("hardlink", "symlink"):
        e.link_name = h.linkname
    elif kind in ("char", "block"):
        e.dev_major, e.dev_minor = h.devmajor, h.devminor
    if kind == "reg":
        e.size = h.size
    return e


def _scan(inp: _Input) -> list[TarHeader]:
    """The tar's headers, each checked as a reader checks its TOC entry."""
    headers: list[TarHeader] = []
    cost = 0
    for h in iter_headers(inp.reader()):
        kind = h.kind
        if kind is None:
            raise FormatError(
                f"tar entry {h.name!r} has type {h.typeflag!r}, which eStargz cannot hold "
                "(only dirs, regular files, links, devices and fifos)"
            )
        name = clean_name(h.name)
        if name == TOC_TAR_NAME:
            continue
        if h.name.startswith("/") or ".." in h.name.split("/"):
            raise FormatError(f"tar entry {h.name!r} has an absolute or '..' path")
        if kind == "hardlink" and (
            h.linkname.startswith("/") or ".." in h.linkname.split("/")
        ):
            raise FormatError(f"hardlink {h.name!r} points outside the layer: {h.linkname!r}")
        e = _meta_entry(h, kind, modtime=False)  # (the cost does not count modtimes)
        check_entry(e, f"tar entry {h.name!r}")
        # A lower bound of what the entry costs in the TOC (digests and further chunks
        # come later): stop reading a tar whose TOC could never be read.
        cost += entry_cost(e)
        if cost > TOC_MEMORY_LIMIT:
            raise FormatError(toc_too_large(cost, len(headers) + 1))
        headers.append(h)
    return headers


def _check_tree(ordered: list[TarHeader]) -> None:
    """Refuse, before compressing anything, a tree that a reader would refuse: a file
    used as a directory, a root that is not a directory, hardlinks that are missing,
    loop or name a directory, symlinks that climb out of the root."""
    entries = []
    for h in ordered:
        kind = h.kind
        assert kind is not None
        entries.append(TOCEntry(name=clean_name(h.name), type=kind,
                                link_name=h.linkname if kind in ("hardlink", "symlink") else ""))
    tree = Tree(entries)
    tree.check_links()


def _build(
    inp: _Input,
    dst: BinaryIO,
    compression: str,
    chunk_size: int,
    level: int,
    prioritized: Sequence[str],
    allow_missing: bool,
    workers: int,
    progress: Callable[[int], None] | None,
) -> BuildResult:
    ordered, missing = _sort_entries(_scan(inp), prioritized, allow_missing)
    _check_tree(ordered)

    comp = _Compressor(compression, level)
    workers = min(workers, comp.max_workers())
    diff = hashlib.sha256()
    toc: list[TOCEntry] = []
    offset_slots: list[tuple[TOCEntry, int]] = []  # (entry, member index)
    usize = 0
    last_uname: dict[int, str] = {}
    last_gname: dict[int, str] = {}

    def name_if_changed(mp: dict[int, str], ident: int, name: str) -> str:
        if not name or mp.get(ident) == name:
            return ""
        mp[ident] = name
        return name

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="estargz") as pool:
        w = _Writer(dst, comp, pool)

        def emit(piece: bytes) -> None:
            nonlocal usize
            diff.update(piece)
            usize += len(piece)
            w.add(piece)

        for i, h in enumerate(ordered):
            ordered[i] = None  # type: ignore[call-overload]  # free headers as they go
            kind = h.kind
            assert kind is not None
            e = _meta_entry(h, kind)
            e.uname = name_if_changed(last_uname, h.uid, h.uname)
            e.gname = name_if_changed(last_gname, h.gid, h.gname)
            emit(write_header(h))
            toc.append(e)
            if kind != "reg":
                continue
            if h.size == 0:
                e.digest = _EMPTY_DIGEST
                continue
            whole = hashlib.sha256()
            first = e
            written = 0
            while written < h.size:
                w.close_member()
                n = min(chunk_size, h.size - written)
                if h.size - written >= chunk_size:
                    e.chunk_size = chunk_size
                e.chunk_offset = written
                offset_slots.append((e, w.members))
                piece_hash = hashlib.sha256()
                for piece in _payload(inp, h, written, n):
                    whole.update(piece)
                    piece_hash.update(piece)
                    emit(piece)
                e.chunk_digest = "sha256:" + piece_hash.hexdigest()
                written += n
                if written < h.size:
                    e = TOCEntry(name=h.name, type="chunk")
                    toc.append(e)
            first.digest = "sha256:" + whole.hexdigest()
            if first.chunk_digest == first.digest:
                first.chunk_digest = first.digest
            emit(padding(h.size))
            if progress is not None:
                progress(h.size)
        w.close_member()
        w.drain()

    for e, idx in offset_slots:
        e.offset = w.offsets[idx]
    cost = 0
    for n, e in enumerate(toc):
        cost += entry_cost(e)
        if cost > TOC_MEMORY_LIMIT:
            raise FormatError(toc_too_large(cost, n + 1))
    # The TOC's size comes before its JSON: the pieces are kept if they are few, else
    # made a second time, rather than held as one large string.
    kept: list[bytes] | None = []
    toc_size = 0
    for p in iter_toc_json(toc):
        toc_size += len(p)
        if kept is not None:
            kept.append(p)
            if toc_size > _KEEP_TOC:
                kept = None
    if toc_size > MAX_TOC_BYTES:
        raise FormatError(f"TOC would be {toc_size} bytes, more than {MAX_TOC_BYTES}")
    toc_hash = hashlib.sha256()

    def toc_json() -> Iterator[bytes]:
        for p in kept if kept is not None else iter_toc_json(toc):
            toc_hash.update(p)
            yield p

    toc_offset = w.written
    annotations: dict[str, str] = {}
    if compression == "gzip":
        th = TarHeader(name=TOC_TAR_NAME, typeflag=b"0", size=toc_size)
        stream = comp.stream()
        w.write(stream.start())
        for p in (write_header(th), *toc_json(), padding(toc_size) + b"\x00" * (2 * BLOCK)):
            diff.update(p)
            usize += len(p)
            w.write(stream.feed(p))
        w.write(stream.finish())
        w.write(estargz_footer(toc_offset))
    else:
        co = comp._zstd().compressobj(size=toc_size)
        ztoc = b"".join([*(co.compress(p) for p in toc_json()), co.flush()])
        toc_offset += 8  # the footer points past the skippable frame's own header
        w.write(skippable_frame(ztoc))
        w.write(zstd_footer_frame(toc_offset, len(ztoc), toc_size))
        annotations[ZSTD_MANIFEST_CHECKSUM_ANNOTATION] = "sha256:" + hashlib.sha256(
            ztoc
        ).hexdigest()
        annotations[ZSTD_MANIFEST_POSITION_ANNOTATION] = f"{toc_offset}:{len(ztoc)}:{toc_size}:1"
    toc_digest = "sha256:" + toc_hash.hexdigest()
    annotations = {TOC_DIGEST_ANNOTATION: toc_digest, **annotations,
                   UNCOMPRESSED_SIZE_ANNOTATION: str(usize)}
    return BuildResult(
        toc_digest=toc_digest,
        diff_id="sha256:" + diff.hexdigest(),
        uncompressed_size=usize,
        blob_digest="sha256:" + w.blob.hexdigest(),
        blob_size=w.written,
        toc_offset=toc_offset,
        compression=compression,
        media_type=OCI_LAYER_GZIP if compression == "gzip" else OCI_LAYER_ZSTD,
        annotations=annotations,
        missing_prioritized=missing,
    )


def _payload(inp: _Input, h: TarHeader, start: int, n: int) -> Iterator[bytes]:
    """Bytes [start, start+n) of `h`'s payload, in pieces of at most _STEP."""
    if h.data_offset < 0:  # the landmark
        yield LANDMARK_CONTENTS[start:start + n]
        return
    end = start + n
    while start < end:
        k = min(_STEP, end - start)
        yield inp.read_at(h.data_offset + start, k)
        start += k
