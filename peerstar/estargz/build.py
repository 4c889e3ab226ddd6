"""Build an eStargz (gzip) or zstd:chunked blob from a layer tar.

Layout, as the reference writes it: each non-empty regular file's payload, and each
further chunk of it, starts a new compressed member (gzip member or zstd frame); the
tar headers of the entries that follow share the member of the payload before them;
the TOC comes last, then the footer. Prioritized files go first, followed by a
landmark file.

`build` runs named steps: `_scan` (read and check the tar's headers), `_sort_entries`
(prioritized order, landmark), `_check_tree`, then `_BlobWriter.write_entries` (headers
and payloads as members, chunk by chunk), `.write_toc_and_footer` and `.result`.
Everything that differs between gzip and zstd:chunked (member compression, the TOC's
framing, the footer, annotations, media type, levels) is the `compression.Compressor`'s.

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

import hashlib
import io
import os
import posixpath
import tempfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from peerstar.estargz.compression import (
    Compression,
    Compressor,
    LayerInfo,
    MemberStream,
    layer_annotations,
    sniff,
    writable,
)
from peerstar.estargz.errors import EstargzError, FormatError
from peerstar.estargz.tarfmt import TarHeader, iter_headers, padding, write_header
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

DEFAULT_CHUNK_SIZE = 4 << 20
_TASK_BYTES = 1 << 20  # members batched per thread task, so tiny files do not cost a task each
_IN_FLIGHT = 32 << 20  # uncompressed bytes submitted but not yet written
_LARGE = 8 << 20  # a member larger than this is compressed on the writing thread, streamed
_STEP = 1 << 20  # read size for payloads
_EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()
_KEEP_TOC = 16 << 20  # TOC JSON kept between its two uses up to this size
_FEED = 256 << 10  # small pieces of a streamed member are fed to the compressor together


@dataclass
class BuildResult(LayerInfo):
    """What the descriptor records (`LayerInfo`: TOC digest, DiffID, uncompressed size,
    media type, annotations) and what the build saw on the way."""

    blob_digest: str = ""
    blob_size: int = 0
    toc_offset: int = 0
    compression: str = ""  # the `Compression`'s name
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
            if sniff(data[:4]) is None:
                self._bytes = memoryview(data)
                return
            src = io.BytesIO(data)
        codec = sniff(_peek(src, 4))
        if codec is not None:
            self._spool(codec.stream_reader(src))
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
            return io.BytesIO(self._bytes)  # type: ignore[arg-type]  # a memoryview is fine at run time
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
        return src.peek(n)[:n]  # type: ignore[attr-defined]  # BinaryIO declares no peek; hasattr above
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


# --- members -------------------------------------------------------------------------


class _Writer:
    """Writes members to `dst` in order. A member is buffered and compressed on the
    pool with others (in batches of about _TASK_BYTES); once it grows past _LARGE it is
    compressed here as it grows, after everything before it is written. At most
    _IN_FLIGHT bytes wait for the pool."""

    def __init__(self, dst: BinaryIO, comp: Compressor, pool: ThreadPoolExecutor) -> None:
        self._dst = dst
        self._comp = comp
        self._pool = pool
        self.blob = hashlib.sha256()
        self.written = 0
        self.offsets: list[int] = []  # compressed offset of each member, in order
        self.members = 0  # members closed so far (the index of the open one)
        self._current: list[bytes] = []
        self._current_bytes = 0
        self._stream: MemberStream | None = None
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

    `compression` names a `compression.WRITABLE` one ("gzip": eStargz, "zstd":
    zstd:chunked). `progress`, if given, is called with the number of source bytes just
    processed. A compressed or unseekable input is first decompressed into a temporary
    file in `spool_dir` (default: the system temp dir).
    """
    codec = writable(compression)
    if chunk_size <= 0:
        raise EstargzError(f"chunk size must be positive, not {chunk_size}")
    level = codec.check_level(level)
    workers = workers or os.cpu_count() or 1
    inp = _Input(src, spool_dir)
    try:
        ordered, missing = _sort_entries(_scan(inp), prioritized, allow_missing_prioritized)
        _check_tree(ordered)
        writer = _BlobWriter(inp, dst, codec, level, chunk_size, progress)
        writer.write_entries(ordered, workers)
        writer.write_toc_and_footer()
        return writer.result(missing)
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


class _BlobWriter:
    """Writes one blob from checked, ordered tar headers, in named steps:
    `write_entries` (headers and payloads as members, chunk by chunk, on a pool),
    `write_toc_and_footer` (the compression's TOC framing and footer), `result`. Keeps
    on the way what the descriptor will record: DiffID, uncompressed size, TOC."""

    def __init__(self, inp: _Input, dst: BinaryIO, codec: Compression, level: int,
                 chunk_size: int, progress: Callable[[int], None] | None) -> None:
        self._inp = inp
        self._dst = dst
        self._codec = codec
        self._comp = codec.compressor(level)
        self._chunk_size = chunk_size
        self._progress = progress
        self._diff = hashlib.sha256()
        self._usize = 0
        self._toc: list[TOCEntry] = []
        self._offset_slots: list[tuple[TOCEntry, int]] = []  # (entry, member index)
        self._last_uname: dict[int, str] = {}
        self._last_gname: dict[int, str] = {}
        self._members: _Writer | None = None
        self._toc_digest = ""
        self._toc_offset = 0
        self._extra: dict[str, str] = {}

    @property
    def _w(self) -> _Writer:
        assert self._members is not None
        return self._members

    # -- entries --------------------------------------------------------------------

    def write_entries(self, ordered: list[TarHeader], workers: int) -> None:
        """Every entry's header and payload, as members compressed on `workers` threads;
        then the entries' offsets are known."""
        workers = min(workers, self._comp.max_workers())
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="estargz") as pool:
            self._members = _Writer(self._dst, self._comp, pool)
            for i, h in enumerate(ordered):
                ordered[i] = None  # type: ignore[call-overload]  # free headers as they go
                self._write_entry(h)
            self._w.close_member()
            self._w.drain()
        for e, idx in self._offset_slots:
            e.offset = self._w.offsets[idx]

    def _emit(self, piece: bytes) -> None:
        """Uncompressed bytes of the layer tar, into the open member."""
        self._diff.update(piece)
        self._usize += len(piece)
        self._w.add(piece)

    def _name_if_changed(self, mp: dict[int, str], ident: int, name: str) -> str:
        """The user/group name for the TOC: written only when it changes for that id."""
        if not name or mp.get(ident) == name:
            return ""
        mp[ident] = name
        return name

    def _write_entry(self, h: TarHeader) -> None:
        kind = h.kind
        assert kind is not None
        e = _meta_entry(h, kind)
        e.uname = self._name_if_changed(self._last_uname, h.uid, h.uname)
        e.gname = self._name_if_changed(self._last_gname, h.gid, h.gname)
        self._emit(write_header(h))
        self._toc.append(e)
        if kind != "reg":
            return
        if h.size == 0:
            e.digest = _EMPTY_DIGEST
            return
        self._write_chunks(h, e)
        self._emit(padding(h.size))
        if self._progress is not None:
            self._progress(h.size)

    def _write_chunks(self, h: TarHeader, first: TOCEntry) -> None:
        """The payload of regular file `h`, each chunk starting a member; `first` is its
        entry, further chunks get entries of their own."""
        whole = hashlib.sha256()
        e = first
        written = 0
        chunk_size = self._chunk_size
        while written < h.size:
            self._w.close_member()
            n = min(chunk_size, h.size - written)
            if h.size - written >= chunk_size:
                e.chunk_size = chunk_size
            e.chunk_offset = written
            self._offset_slots.append((e, self._w.members))
            piece_hash = hashlib.sha256()
            for piece in _payload(self._inp, h, written, n):
                whole.update(piece)
                piece_hash.update(piece)
                self._emit(piece)
            e.chunk_digest = "sha256:" + piece_hash.hexdigest()
            written += n
            if written < h.size:
                e = TOCEntry(name=h.name, type="chunk")
                self._toc.append(e)
        first.digest = "sha256:" + whole.hexdigest()
        if first.chunk_digest == first.digest:
            first.chunk_digest = first.digest

    # -- TOC and footer -------------------------------------------------------------

    def _toc_size(self) -> tuple[int, list[bytes] | None]:
        """The TOC JSON's size (refusing a TOC a reader would refuse) and its pieces,
        kept if they are few: the size comes before the JSON, and the pieces are made a
        second time rather than held as one large string."""
        cost = 0
        for n, e in enumerate(self._toc):
            cost += entry_cost(e)
            if cost > TOC_MEMORY_LIMIT:
                raise FormatError(toc_too_large(cost, n + 1))
        kept: list[bytes] | None = []
        toc_size = 0
        for p in iter_toc_json(self._toc):
            toc_size += len(p)
            if kept is not None:
                kept.append(p)
                if toc_size > _KEEP_TOC:
                    kept = None
        if toc_size > MAX_TOC_BYTES:
            raise FormatError(f"TOC would be {toc_size} bytes, more than {MAX_TOC_BYTES}")
        return toc_size, kept

    def write_toc_and_footer(self) -> None:
        toc_size, kept = self._toc_size()
        toc_hash = hashlib.sha256()

        def toc_json() -> Iterator[bytes]:
            for p in kept if kept is not None else iter_toc_json(self._toc):
                toc_hash.update(p)
                yield p

        def uncompressed(piece: bytes) -> None:
            self._diff.update(piece)
            self._usize += len(piece)

        self._toc_offset, self._extra = self._comp.write_toc_and_footer(
            self._w.write, self._w.written, toc_json(), toc_size, uncompressed)
        self._toc_digest = "sha256:" + toc_hash.hexdigest()

    # -- result ---------------------------------------------------------------------

    def result(self, missing: list[str]) -> BuildResult:
        return BuildResult(
            toc_digest=self._toc_digest,
            diff_id="sha256:" + self._diff.hexdigest(),
            uncompressed_size=self._usize,
            media_type=self._codec.media_type,
            annotations=layer_annotations(self._toc_digest, self._usize, self._extra),
            blob_digest="sha256:" + self._w.blob.hexdigest(),
            blob_size=self._w.written,
            toc_offset=self._toc_offset,
            compression=self._codec.name,
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
