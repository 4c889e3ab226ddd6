"""Build an eStargz (gzip) or zstd:chunked blob from a layer tar.

Layout, as the reference writes it: each non-empty regular file's payload, and each
further chunk of it, starts a new compressed member (gzip member or zstd frame); the
tar headers of the entries that follow share the member of the payload before them;
the TOC comes last, then the footer. Prioritized files go first, followed by a
landmark file.

Members are compressed independently, so they are compressed on several threads
(zlib and zstd release the GIL) and written in order: the output depends only on the
input and the options, never on the thread count.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import mmap
import os
import posixpath
import struct
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from peerstar.estargz.errors import EstargzError, FormatError
from peerstar.estargz.footer import estargz_footer, skippable_frame, zstd_footer_frame
from peerstar.estargz.tarfmt import BLOCK, TarHeader, iter_headers, padding, write_header
from peerstar.estargz.toc import (
    LANDMARK_CONTENTS,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    TOCEntry,
    clean_name,
    format_modtime,
    marshal_toc,
)
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
    """The decompressed source tar, random-access (mmap of a file, or bytes)."""

    def __init__(self, src: BinaryIO | bytes, spool_dir: str | None = None) -> None:
        self._spool_dir = spool_dir
        self._tmp: BinaryIO | None = None
        self._mm: mmap.mmap | None = None
        if isinstance(src, bytes | bytearray | memoryview):
            data = bytes(src)
            head = data[:4]
            if head[:3] != b"\x1f\x8b\x08" and head != b"\x28\xb5\x2f\xfd":
                self.buf: bytes | mmap.mmap = data
                return
            src = io.BytesIO(data)
        head = _peek(src, 4)
        if head[:3] == b"\x1f\x8b\x08":
            self._spool(gzip.GzipFile(fileobj=src, mode="rb"))  # type: ignore[arg-type]
        elif head == b"\x28\xb5\x2f\xfd":
            reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
            self._spool(reader)
        elif _is_real_file(src):
            self._map(src)
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
        self._map(self._tmp)

    def _map(self, f: BinaryIO) -> None:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            self.buf = b""
            return
        self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.buf = self._mm

    def reader(self) -> BinaryIO:
        if isinstance(self.buf, bytes):
            return io.BytesIO(self.buf)
        self.buf.seek(0)
        return self.buf  # type: ignore[return-value]

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
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
        name = clean_name(name)
        if name == "":
            if "" in src:
                out[""] = src.pop("")
            return
        if name not in src and name not in out:
            raise _NotFound(name)
        move(posixpath.dirname(name.rstrip("/")))
        h = src.get(name)
        if h is not None and h.typeflag == b"1":
            move(h.linkname)
        if name in src:
            out[name] = src.pop(name)

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

    def member(self, pieces: list[bytes | memoryview]) -> bytes:
        if self.compression == "gzip":
            c = zlib.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS, 9)
            crc = 0
            size = 0
            xfl = b"\x02" if self.level == 9 else b"\x04" if self.level == 1 else b"\x00"
            out = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + xfl + b"\xff"]
            for p in pieces:
                out.append(c.compress(p))
                crc = zlib.crc32(p, crc)
                size += len(p)
            out.append(c.flush())
            out.append(struct.pack("<II", crc, size & 0xFFFFFFFF))
            return b"".join(out)
        zc = getattr(self._local, "zc", None)
        if zc is None:
            zc = self._local.zc = zstandard.ZstdCompressor(level=self.level)
        return zc.compress(b"".join(pieces))

    def batch(self, members: list[list[bytes | memoryview]]) -> list[bytes]:
        return [self.member(m) for m in members]


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
    headers = []
    buf_len = len(inp.buf)
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
        if kind == "reg" and h.data_offset + h.size > buf_len:
            raise FormatError(f"tar is truncated inside the payload of {h.name!r}")
        headers.append(h)
    ordered, missing = _sort_entries(headers, prioritized, allow_missing)

    data = memoryview(inp.buf) if len(inp.buf) else memoryview(b"")
    comp = _Compressor(compression, level)
    diff = hashlib.sha256()
    blob = hashlib.sha256()
    toc: list[TOCEntry] = []
    offset_slots: list[tuple[TOCEntry, int]] = []  # (entry, member index)
    member_offsets: list[int] = []
    state = {"written": 0, "usize": 0}
    pending: deque[Future[list[bytes]]] = deque()
    batch: list[list[bytes | memoryview]] = []
    batch_bytes = 0
    current: list[bytes | memoryview] = []
    n_members = 0
    last_uname: dict[int, str] = {}
    last_gname: dict[int, str] = {}

    def write_out(parts: list[bytes]) -> None:
        for p in parts:
            member_offsets.append(state["written"])
            dst.write(p)
            blob.update(p)
            state["written"] += len(p)

    def flush_batch() -> None:
        nonlocal batch, batch_bytes
        if batch:
            pending.append(pool.submit(comp.batch, batch))
            batch, batch_bytes = [], 0
        while len(pending) > workers * 3:
            write_out(pending.popleft().result())

    def close_member() -> None:
        nonlocal current, n_members, batch_bytes
        if current:
            batch.append(current)
            batch_bytes += sum(len(p) for p in current)
            n_members += 1
            current = []
            if batch_bytes >= _TASK_BYTES:
                flush_batch()

    def emit(piece: bytes | memoryview) -> None:
        diff.update(piece)
        state["usize"] += len(piece)
        current.append(piece)

    def name_if_changed(mp: dict[int, str], ident: int, name: str) -> str:
        if not name or mp.get(ident) == name:
            return ""
        mp[ident] = name
        return name

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="estargz") as pool:
        for h in ordered:
            kind = h.kind
            assert kind is not None
            e = TOCEntry(
                name=h.name,
                type=kind,
                mode=h.mode,
                uid=h.uid,
                gid=h.gid,
                uname=name_if_changed(last_uname, h.uid, h.uname),
                gname=name_if_changed(last_gname, h.gid, h.gname),
                modtime=format_modtime(h.mtime),
                xattrs=h.xattrs(),
            )
            if kind in ("hardlink", "symlink"):
                e.link_name = h.linkname
            elif kind in ("char", "block"):
                e.dev_major, e.dev_minor = h.devmajor, h.devminor
            emit(write_header(h))
            if kind != "reg":
                toc.append(e)
                continue
            e.size = h.size
            payload = (
                memoryview(LANDMARK_CONTENTS)
                if h.data_offset < 0
                else data[h.data_offset : h.data_offset + h.size]
            )
            e.digest = "sha256:" + hashlib.sha256(payload).hexdigest()
            if h.size == 0:
                toc.append(e)
                continue
            written = 0
            while written < h.size:
                close_member()
                n = min(chunk_size, h.size - written)
                if h.size - written >= chunk_size:
                    e.chunk_size = chunk_size
                e.chunk_offset = written
                piece = payload[written : written + n]
                e.chunk_digest = (
                    e.digest if n == h.size else "sha256:" + hashlib.sha256(piece).hexdigest()
                )
                offset_slots.append((e, n_members))
                emit(piece)
                toc.append(e)
                written += n
                e = TOCEntry(name=h.name, type="chunk")
            emit(padding(h.size))
            if progress is not None:
                progress(h.size)
        close_member()
        flush_batch()
        while pending:
            write_out(pending.popleft().result())

    for e, idx in offset_slots:
        e.offset = member_offsets[idx]
    toc_json = marshal_toc(toc)
    toc_digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
    toc_offset = state["written"]
    annotations = {TOC_DIGEST_ANNOTATION: toc_digest}
    if compression == "gzip":
        th = TarHeader(name=TOC_TAR_NAME, typeflag=b"0", size=len(toc_json))
        toc_tar = write_header(th) + toc_json + padding(len(toc_json)) + b"\x00" * (2 * BLOCK)
        diff.update(toc_tar)
        state["usize"] += len(toc_tar)
        tail = comp.member([toc_tar]) + estargz_footer(toc_offset)
    else:
        ztoc = zstandard.ZstdCompressor(level=level).compress(toc_json)
        toc_offset += 8  # the footer points past the skippable frame's own header
        tail = skippable_frame(ztoc) + zstd_footer_frame(toc_offset, len(ztoc), len(toc_json))
        annotations[ZSTD_MANIFEST_CHECKSUM_ANNOTATION] = "sha256:" + hashlib.sha256(
            ztoc
        ).hexdigest()
        annotations[ZSTD_MANIFEST_POSITION_ANNOTATION] = (
            f"{toc_offset}:{len(ztoc)}:{len(toc_json)}:1"
        )
    dst.write(tail)
    blob.update(tail)
    annotations[UNCOMPRESSED_SIZE_ANNOTATION] = str(state["usize"])
    return BuildResult(
        toc_digest=toc_digest,
        diff_id="sha256:" + diff.hexdigest(),
        uncompressed_size=state["usize"],
        blob_digest="sha256:" + blob.hexdigest(),
        blob_size=state["written"] + len(tail),
        toc_offset=toc_offset,
        compression=compression,
        media_type=OCI_LAYER_GZIP if compression == "gzip" else OCI_LAYER_ZSTD,
        annotations=annotations,
        missing_prioritized=missing,
    )
