"""The compressions of a layer blob behind one interface, as the Go package's
Compressor / Decompressor: eStargz (gzip), legacy stargz (gzip, read only) and
zstd:chunked.

A `Compression` owns everything that differs between them: member decompression,
how a whole compressed stream is read (`stream_reader`), the footer (parse here, bytes
in `footer`), where the TOC is and how it is framed (`toc_pieces`), the annotations a
layer descriptor carries, the media type written and the media types that may hold
it, the compression levels. Its `Compressor` (one per build) owns member compression
and writing the TOC and footer. Everything else looks one up -- `by_name`, `by_media_type`,
`sniff` (stream magic), `parse_footer` (the footer of a blob) -- and never branches on
the names.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import threading
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from peerstar.estargz.decompress import ReadAt, inflate_gzip, inflate_zstd, read_exact
from peerstar.estargz.errors import EstargzError, FormatError
from peerstar.estargz.footer import (
    EMPTY_GZIP_BODY,
    ESTARGZ_FOOTER_SIZE,
    LEGACY_FOOTER_SIZE,
    ZSTD_CHUNKED_MAGIC,
    ZSTD_FOOTER_SIZE,
    ZSTD_MANIFEST_TYPE_CRFS,
    Footer,
    estargz_footer,
    skippable_frame,
    zstd_footer_frame,
)
from peerstar.estargz.tarfmt import BLOCK, TarHeader, padding, parse_number, write_header
from peerstar.estargz.toc import MAX_TOC_BYTES, TOC_TAR_NAME
from peerstar.oci import mediatypes as mt

_ZSTD_SIZE_HINT = 4 << 20  # zstd parameters are those of a level for an input this large
_ZSTD_CONTEXTS = 96 << 20  # zstd compression contexts of all threads together


class MemberStream(ABC):
    """One member (gzip member or zstd frame) compressed piece by piece."""

    @abstractmethod
    def start(self) -> bytes: ...

    @abstractmethod
    def feed(self, piece: bytes) -> bytes: ...

    @abstractmethod
    def finish(self) -> bytes: ...


class Compressor(ABC):
    """The writing half of a compression, for one build at one level. Thread-safe:
    members are compressed on several threads."""

    def __init__(self, level: int) -> None:
        self.level = level

    def max_workers(self) -> int:
        """Threads whose compression state fits in memory (no limit by default)."""
        return 1 << 16

    @abstractmethod
    def stream(self) -> MemberStream:
        """A member compressed as its pieces arrive (the size is not known up front)."""

    def member(self, pieces: list[bytes]) -> bytes:
        stream = self.stream()
        out = [stream.start()]
        out.extend(stream.feed(p) for p in pieces)
        out.append(stream.finish())
        return b"".join(out)

    def batch(self, members: list[list[bytes]]) -> list[bytes]:
        return [self.member(m) for m in members]

    @abstractmethod
    def write_toc_and_footer(self, write: Callable[[bytes], None], offset: int,
                             toc_json: Iterable[bytes], toc_size: int,
                             uncompressed: Callable[[bytes], None]) -> tuple[int, dict[str, str]]:
        """Write the TOC (its JSON is `toc_json`, `toc_size` bytes) at blob offset
        `offset`, then the footer. `uncompressed` is given what the TOC adds to the
        decompressed blob (the DiffID). Returns the TOC offset the footer records and
        the annotations this compression adds to the layer descriptor."""


class Compression(ABC):
    """One compression of layer blobs (see the module docstring)."""

    name: str  # what `build(compression=)` and `Reader.compression` say
    media_type: str  # the OCI layer media type of a blob built with it
    source_media_types: frozenset[str]  # layer media types whose bytes may be this
    levels: tuple[int, int]  # the levels `build` accepts, inclusive
    default_level: int
    max_ratio: int  # decompressed bytes one compressed byte can become, at most
    footer_size: int  # bytes of the footer at the end of a blob

    def check_level(self, level: int | None) -> int:
        """`level`, or the default when None; EstargzError when out of range."""
        if level is None:
            return self.default_level
        lo, hi = self.levels
        if not lo <= level <= hi:
            raise EstargzError(f"{self.name} level must be {lo}..{hi}, not {level}")
        return level

    @abstractmethod
    def compressor(self, level: int) -> Compressor: ...

    @abstractmethod
    def inflate(self, read_at: ReadAt, start: int, end: int, *,
                across: bool = False) -> Generator[bytes, None, None]:
        """Decompress [start, end): one member, or with `across` all of them, in pieces
        (`decompress.inflate_gzip`)."""

    @abstractmethod
    def stream_reader(self, src: BinaryIO) -> BinaryIO:
        """The decompressed bytes of the whole stream `src` (a compressed input tar)."""

    @abstractmethod
    def parse_footer(self, tail: bytes, blob_size: int) -> Footer:
        """This compression's footer at the end of `tail`, or FormatError."""

    @abstractmethod
    def toc_pieces(self, read_at: ReadAt, footer: Footer) -> Generator[bytes, None, None]:
        """The TOC's JSON bytes from where `footer` puts them, in pieces, never past the
        size the TOC's framing gives; FormatError when it lies. (Decompression errors
        reach the caller as DecompressError / TruncatedError.)"""

    def blob_annotations(self, read_at: ReadAt, footer: Footer) -> dict[str, str]:
        """The annotations this compression adds to the descriptor of an existing blob
        (what `Compressor.write_toc_and_footer` returned when it was built)."""
        return {}


# --- gzip ----------------------------------------------------------------------------


class _GzipStream(MemberStream):
    def __init__(self, level: int) -> None:
        self._level = level
        self._crc = 0
        self._size = 0
        self._c = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9)

    def start(self) -> bytes:
        xfl = b"\x02" if self._level == 9 else b"\x04" if self._level == 1 else b"\x00"
        return b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + xfl + b"\xff"

    def feed(self, piece: bytes) -> bytes:
        self._crc = zlib.crc32(piece, self._crc)
        self._size += len(piece)
        return self._c.compress(piece)

    def finish(self) -> bytes:
        return self._c.flush() + struct.pack("<II", self._crc, self._size & 0xFFFFFFFF)


class _GzipCompressor(Compressor):
    def stream(self) -> MemberStream:
        return _GzipStream(self.level)

    def write_toc_and_footer(self, write: Callable[[bytes], None], offset: int,
                             toc_json: Iterable[bytes], toc_size: int,
                             uncompressed: Callable[[bytes], None]) -> tuple[int, dict[str, str]]:
        # The TOC is a tar entry of its own member, then the two zero blocks that end
        # the tar; the footer is an empty gzip member pointing at the TOC's member.
        header = write_header(TarHeader(name=TOC_TAR_NAME, typeflag=b"0", size=toc_size))
        stream = self.stream()
        write(stream.start())
        for p in (header, *toc_json, padding(toc_size) + b"\x00" * (2 * BLOCK)):
            uncompressed(p)
            write(stream.feed(p))
        write(stream.finish())
        write(estargz_footer(offset))
        return offset, {}


class Gzip(Compression):
    """eStargz: gzip members, the TOC as a tar entry, a 51-byte gzip footer."""

    name = "gzip"
    media_type = mt.OCI_LAYER_GZIP
    source_media_types = frozenset({mt.OCI_LAYER_GZIP, mt.OCI_LAYER_ND_GZIP,
                                    mt.DOCKER_LAYER_GZIP, mt.DOCKER_LAYER_FOREIGN_GZIP})
    levels = (0, 9)
    default_level = 9
    max_ratio = 1032  # deflate cannot expand by more than ~1032:1
    footer_size = ESTARGZ_FOOTER_SIZE

    def compressor(self, level: int) -> Compressor:
        return _GzipCompressor(level)

    def inflate(self, read_at: ReadAt, start: int, end: int, *,
                across: bool = False) -> Generator[bytes, None, None]:
        return inflate_gzip(read_at, start, end, across)

    def stream_reader(self, src: BinaryIO) -> BinaryIO:
        # (a GzipFile reads like a binary file; typeshed does not call it BinaryIO)
        return gzip.GzipFile(fileobj=src, mode="rb")  # type: ignore[return-value]  # see above

    def parse_footer(self, tail: bytes, blob_size: int) -> Footer:
        extra = _parse_gzip_extra(tail[-ESTARGZ_FOOTER_SIZE:])
        if len(extra) != 26 or extra[:2] != b"SG" or extra[2:4] != b"\x16\x00":
            raise FormatError("extra subfield is not SG with 22 bytes")
        off = _parse_hex_offset(extra[4:], "eStargz")
        return _gzip_footer(self.name, off, self.footer_size, blob_size)

    def toc_pieces(self, read_at: ReadAt, footer: Footer) -> Generator[bytes, None, None]:
        pieces = self.inflate(read_at, footer.toc_offset, footer.toc_offset + footer.toc_size)
        head = b""
        for piece in pieces:
            head += piece
            if len(head) >= BLOCK:
                break
        if len(head) < BLOCK:
            raise FormatError("TOC member is too short to hold a tar header")
        name = head[:100].split(b"\x00", 1)[0]
        if name != TOC_TAR_NAME.encode():
            raise FormatError(f"TOC tar entry is named {name!r}, expected {TOC_TAR_NAME!r}")
        n = parse_number(head[124:136], "size")
        if n < 0:
            raise FormatError("TOC tar header has a negative size")
        if n > MAX_TOC_BYTES:
            raise FormatError(f"TOC claims {n} bytes: too large")
        rest, total = head[BLOCK:], 0
        while True:
            rest = rest[:n - total]
            if rest:
                total += len(rest)
                yield rest
            if total >= n:
                break
            rest = next(pieces, b"")
            if not rest:
                break
        pieces.close()
        if total != n:
            raise FormatError(f"TOC is truncated: {total} of {n} bytes")


class LegacyGzip(Gzip):
    """Legacy stargz: eStargz's layout with a 47-byte footer. Read only: it is not in
    WRITABLE (its compressor, inherited, would write eStargz's footer)."""

    name = "gzip-legacy"
    footer_size = LEGACY_FOOTER_SIZE

    def parse_footer(self, tail: bytes, blob_size: int) -> Footer:
        extra = _parse_gzip_extra(tail[-LEGACY_FOOTER_SIZE:])
        if len(extra) != 22:
            raise FormatError("extra field is not 22 bytes")
        off = _parse_hex_offset(extra, "legacy stargz")
        return _gzip_footer(self.name, off, self.footer_size, blob_size)


_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def _parse_hex_offset(field: bytes, what: str) -> int:
    if field[16:] != b"STARGZ":
        raise FormatError(f"{what} footer has no STARGZ magic")
    # Sixteen hex digits and nothing else: int() would also take a sign, spaces and
    # underscores, and a negative offset must never reach a read.
    if not set(field[:16]) <= _HEX_DIGITS:
        raise FormatError(f"{what} footer has a malformed TOC offset {field[:16]!r}")
    return int(field[:16], 16)


def _parse_gzip_extra(tail: bytes) -> bytes:
    """The FEXTRA payload of a footer-sized gzip member, or raise FormatError."""
    if len(tail) < 12 or tail[:3] != b"\x1f\x8b\x08" or not tail[3] & 0x04:
        raise FormatError("not a gzip member with an extra field")
    (xlen,) = struct.unpack_from("<H", tail, 10)
    extra = tail[12 : 12 + xlen]
    if len(extra) != xlen or tail[12 + xlen :] != EMPTY_GZIP_BODY:
        raise FormatError("gzip footer member has trailing data or a short extra field")
    return extra


def _gzip_footer(kind: str, toc_offset: int, footer_size: int, blob_size: int) -> Footer:
    toc_end = blob_size - footer_size
    if toc_offset >= toc_end:
        raise FormatError(
            f"footer puts the TOC at offset {toc_offset}, beyond the {blob_size}-byte blob"
        )
    return Footer(kind, toc_offset, toc_end - toc_offset, toc_offset, footer_size)


# --- zstd:chunked --------------------------------------------------------------------


class _ZstdStream(MemberStream):
    def __init__(self, zc: zstandard.ZstdCompressor) -> None:
        self._c = zc.compressobj()

    def start(self) -> bytes:
        return b""

    def feed(self, piece: bytes) -> bytes:
        return self._c.compress(piece)

    def finish(self) -> bytes:
        return self._c.flush()


class _ZstdCompressor(Compressor):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self._local = threading.local()
        # zstd's parameters for a level are chosen for a 4 MiB input (the default chunk)
        # rather than for an unknown size: level 22 would take a 640 MiB context for
        # each thread; this way no context takes more than 65 MiB.
        self._params = zstandard.ZstdCompressionParameters.from_level(
            level, source_size=_ZSTD_SIZE_HINT)

    def max_workers(self) -> int:
        """Threads whose compression contexts fit in _ZSTD_CONTEXTS."""
        return max(1, _ZSTD_CONTEXTS // self._params.estimated_compression_context_size())

    def _zstd(self) -> zstandard.ZstdCompressor:
        zc = getattr(self._local, "zc", None)
        if zc is None:
            zc = self._local.zc = zstandard.ZstdCompressor(compression_params=self._params)
        return zc

    def member(self, pieces: list[bytes]) -> bytes:
        return self._zstd().compress(b"".join(pieces))

    def stream(self) -> MemberStream:
        return _ZstdStream(self._zstd())

    def write_toc_and_footer(self, write: Callable[[bytes], None], offset: int,
                             toc_json: Iterable[bytes], toc_size: int,
                             uncompressed: Callable[[bytes], None]) -> tuple[int, dict[str, str]]:
        # The TOC is a zstd frame of the bare JSON inside a skippable frame (so it is
        # not part of the decompressed blob); the footer points past that frame's header.
        co = self._zstd().compressobj(size=toc_size)
        ztoc = b"".join([*(co.compress(p) for p in toc_json), co.flush()])
        offset += 8
        write(skippable_frame(ztoc))
        write(zstd_footer_frame(offset, len(ztoc), toc_size))
        return offset, _manifest_annotations(offset, ztoc, toc_size)


def _manifest_annotations(toc_offset: int, ztoc: bytes, toc_size: int) -> dict[str, str]:
    return {
        mt.ZSTD_MANIFEST_CHECKSUM_ANNOTATION: "sha256:" + hashlib.sha256(ztoc).hexdigest(),
        mt.ZSTD_MANIFEST_POSITION_ANNOTATION: f"{toc_offset}:{len(ztoc)}:{toc_size}:1",
    }


class ZstdChunked(Compression):
    """zstd:chunked: zstd frames, the TOC in a skippable frame, a 40-byte footer."""

    name = "zstd"
    media_type = mt.OCI_LAYER_ZSTD
    source_media_types = frozenset({mt.OCI_LAYER_ZSTD, mt.OCI_LAYER_ND_ZSTD})
    levels = (1, 22)
    default_level = 3
    max_ratio = 65536  # zstd can expand by ~32768:1 (RLE blocks)
    footer_size = ZSTD_FOOTER_SIZE

    def compressor(self, level: int) -> Compressor:
        return _ZstdCompressor(level)

    def inflate(self, read_at: ReadAt, start: int, end: int, *,
                across: bool = False) -> Generator[bytes, None, None]:
        return inflate_zstd(read_at, start, end, across)

    def stream_reader(self, src: BinaryIO) -> BinaryIO:
        # (a stream reader reads like a binary file; its stub does not call it BinaryIO)
        return zstandard.ZstdDecompressor().stream_reader(  # type: ignore[return-value]  # above
            src, read_across_frames=True)

    def parse_footer(self, tail: bytes, blob_size: int) -> Footer:
        body = tail[-ZSTD_FOOTER_SIZE:]
        if body[32:40] != ZSTD_CHUNKED_MAGIC:
            raise FormatError("no GnUlInUx magic")
        off, clen, ulen, mtype = struct.unpack_from("<QQQQ", body)
        if mtype != ZSTD_MANIFEST_TYPE_CRFS:
            raise _FooterLie(f"zstd:chunked footer has manifest type {mtype}, want 1")
        if off < 8 or off + clen > blob_size - ZSTD_FOOTER_SIZE - 8:
            raise _FooterLie(
                f"zstd:chunked footer puts the TOC at {off}+{clen}, "
                f"outside the {blob_size}-byte blob"
            )
        return Footer(self.name, off, clen, off - 8, ZSTD_FOOTER_SIZE + 8, ulen)

    def toc_pieces(self, read_at: ReadAt, footer: Footer) -> Generator[bytes, None, None]:
        declared = footer.toc_uncompressed_size
        if declared > MAX_TOC_BYTES:
            raise FormatError(f"TOC claims {declared} bytes: too large")
        limit = declared or MAX_TOC_BYTES
        total = 0
        for piece in self.inflate(read_at, footer.toc_offset,
                                  footer.toc_offset + footer.toc_size):
            total += len(piece)
            if total > limit:
                if declared:
                    raise FormatError("TOC size differs from the size in the footer")
                raise FormatError(f"TOC is larger than {MAX_TOC_BYTES} bytes: too large")
            yield piece
        if declared and total != declared:
            raise FormatError("TOC size differs from the size in the footer")

    def blob_annotations(self, read_at: ReadAt, footer: Footer) -> dict[str, str]:
        ztoc = read_exact(read_at, footer.toc_offset, footer.toc_size)
        return _manifest_annotations(footer.toc_offset, ztoc, footer.toc_uncompressed_size)


class _FooterLie(FormatError):
    """A footer that is this compression's but points nowhere sensible: not worth
    trying the other compressions for."""


# --- what a layer descriptor says ---------------------------------------------------


@dataclass
class LayerInfo:
    """What a layer descriptor (and its image config) records about a blob."""

    toc_digest: str
    diff_id: str
    uncompressed_size: int
    media_type: str
    annotations: dict[str, str]


def layer_annotations(toc_digest: str, uncompressed_size: int,
                      extra: dict[str, str]) -> dict[str, str]:
    """The descriptor annotations of a blob: the TOC digest, what its compression adds
    (`extra`), the uncompressed size -- in the order `build` has always written them."""
    return {mt.TOC_DIGEST_ANNOTATION: toc_digest, **extra,
            mt.UNCOMPRESSED_SIZE_ANNOTATION: str(uncompressed_size)}


# --- lookup --------------------------------------------------------------------------

GZIP = Gzip()
LEGACY_GZIP = LegacyGzip()
ZSTD_CHUNKED = ZstdChunked()
# What `build` writes, by the name its `compression` option takes.
WRITABLE: dict[str, Compression] = {c.name: c for c in (GZIP, ZSTD_CHUNKED)}
# Footers are tried in this order, as the reference does.
_READABLE = (("eStargz", GZIP), ("legacy stargz", LEGACY_GZIP), ("zstd:chunked", ZSTD_CHUNKED))
_BY_NAME = {c.name: c for _, c in _READABLE}
_BY_MEDIA_TYPE = {t: c for c in WRITABLE.values() for t in c.source_media_types}
# Every annotation a build may write (a conversion drops stale copies of them).
FORMAT_ANNOTATIONS = (mt.TOC_DIGEST_ANNOTATION, mt.UNCOMPRESSED_SIZE_ANNOTATION,
                      mt.ZSTD_MANIFEST_CHECKSUM_ANNOTATION, mt.ZSTD_MANIFEST_POSITION_ANNOTATION)


def by_name(name: str) -> Compression:
    """The compression called `name` ("gzip", "gzip-legacy" or "zstd")."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise EstargzError(f"unknown compression {name!r}: use 'gzip' or 'zstd'") from None


def by_media_type(media_type: str) -> Compression | None:
    """The compression a layer of `media_type` has (its `source_media_types`), if any."""
    return _BY_MEDIA_TYPE.get(media_type)


def writable(name: str) -> Compression:
    """The compression `build(compression=name)` writes, or EstargzError."""
    try:
        return WRITABLE[name]
    except KeyError:
        raise EstargzError(f"unknown compression {name!r}: use 'gzip' or 'zstd'") from None


def sniff(head: bytes) -> Compression | None:
    """The compression of a stream starting with `head` (its first 4 bytes), None when
    it starts with neither a gzip nor a zstd frame magic (plain tar)."""
    if head[:3] == b"\x1f\x8b\x08":
        return GZIP
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return ZSTD_CHUNKED
    return None


def parse_footer(tail: bytes, blob_size: int) -> Footer:
    """Parse the footer from the last bytes of a blob (at least 51 bytes when the blob has
    them). Tries eStargz, legacy stargz and zstd:chunked, as the reference does, and
    raises FormatError naming what each expected when none fits."""
    problems = []
    for label, c in _READABLE:
        if len(tail) < c.footer_size:
            continue
        try:
            return c.parse_footer(tail, blob_size)
        except _FooterLie:
            raise
        except FormatError as exc:
            problems.append(f"{label}: {exc}")
    if not problems:
        raise FormatError(f"blob of {blob_size} bytes is too small to hold a footer")
    raise FormatError("no eStargz or zstd:chunked footer (" + "; ".join(problems) + ")")

