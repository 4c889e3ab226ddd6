"""Footers of eStargz (51 bytes), legacy stargz (47 bytes) and zstd:chunked (40 bytes).

The footer says where the TOC starts. eStargz's footer is an empty gzip member whose
FEXTRA field carries `%016xSTARGZ` behind the subfield id `SG`, so a plain gzip
reader sees nothing; zstd:chunked's is a 40-byte record inside a skippable frame.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from peerstar.estargz.errors import FormatError

ESTARGZ_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
ZSTD_FOOTER_SIZE = 40
ZSTD_SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_CHUNKED_MAGIC = b"GnUlInUx"
ZSTD_MANIFEST_TYPE_CRFS = 1
MAX_FOOTER_SIZE = ESTARGZ_FOOTER_SIZE

# An empty stored deflate block (BFINAL=1, LEN=0, NLEN=0xffff), then CRC32=0, ISIZE=0.
_EMPTY_GZIP_BODY = b"\x01\x00\x00\xff\xff" + b"\x00" * 8


@dataclass(frozen=True)
class Footer:
    """Where the TOC is, as the footer says."""

    compression: str  # "gzip", "gzip-legacy" or "zstd"
    toc_offset: int  # gzip: the TOC member's first byte; zstd: the TOC frame's first byte
    toc_size: int  # compressed bytes of the TOC section
    data_end: int  # where the payload (and so the last chunk's section) ends
    footer_size: int  # bytes at the end of the blob that belong to the footer
    toc_uncompressed_size: int = 0  # zstd only (the footer records it)


def estargz_footer(toc_offset: int) -> bytes:
    subfield = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(subfield)) + subfield
    header = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(extra)) + extra
    out = header + _EMPTY_GZIP_BODY
    assert len(out) == ESTARGZ_FOOTER_SIZE
    return out


def zstd_footer_frame(toc_offset: int, toc_compressed: int, toc_uncompressed: int) -> bytes:
    """The skippable frame (8-byte frame header + 40-byte footer) ending a zstd:chunked blob."""
    body = (
        struct.pack("<QQQQ", toc_offset, toc_compressed, toc_uncompressed, ZSTD_MANIFEST_TYPE_CRFS)
        + ZSTD_CHUNKED_MAGIC
    )
    return skippable_frame(body)


def skippable_frame(body: bytes) -> bytes:
    return ZSTD_SKIPPABLE_MAGIC + struct.pack("<I", len(body)) + body


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
    if len(extra) != xlen or tail[12 + xlen :] != _EMPTY_GZIP_BODY:
        raise FormatError("gzip footer member has trailing data or a short extra field")
    return extra


def parse_footer(tail: bytes, blob_size: int) -> Footer:
    """Parse the footer from the last bytes of a blob (at least 51 bytes when the blob has them).

    Tries eStargz, legacy stargz and zstd:chunked, as the reference does, and raises
    FormatError naming what each expected when none fits.
    """
    problems = []
    if len(tail) >= ESTARGZ_FOOTER_SIZE:
        try:
            extra = _parse_gzip_extra(tail[-ESTARGZ_FOOTER_SIZE:])
            if len(extra) != 26 or extra[:2] != b"SG" or extra[2:4] != b"\x16\x00":
                raise FormatError("extra subfield is not SG with 22 bytes")
            off = _parse_hex_offset(extra[4:], "eStargz")
            return _gzip_footer("gzip", off, ESTARGZ_FOOTER_SIZE, blob_size)
        except FormatError as exc:
            problems.append(f"eStargz: {exc}")
    if len(tail) >= LEGACY_FOOTER_SIZE:
        try:
            extra = _parse_gzip_extra(tail[-LEGACY_FOOTER_SIZE:])
            if len(extra) != 22:
                raise FormatError("extra field is not 22 bytes")
            off = _parse_hex_offset(extra, "legacy stargz")
            return _gzip_footer("gzip-legacy", off, LEGACY_FOOTER_SIZE, blob_size)
        except FormatError as exc:
            problems.append(f"legacy stargz: {exc}")
    if len(tail) >= ZSTD_FOOTER_SIZE:
        body = tail[-ZSTD_FOOTER_SIZE:]
        if body[32:40] == ZSTD_CHUNKED_MAGIC:
            off, clen, ulen, mtype = struct.unpack_from("<QQQQ", body)
            if mtype != ZSTD_MANIFEST_TYPE_CRFS:
                raise FormatError(f"zstd:chunked footer has manifest type {mtype}, want 1")
            if off < 8 or off + clen > blob_size - ZSTD_FOOTER_SIZE - 8:
                raise FormatError(
                    f"zstd:chunked footer puts the TOC at {off}+{clen}, "
                    f"outside the {blob_size}-byte blob"
                )
            return Footer("zstd", off, clen, off - 8, ZSTD_FOOTER_SIZE + 8, ulen)
        problems.append("zstd:chunked: no GnUlInUx magic")
    if not problems:
        raise FormatError(f"blob of {blob_size} bytes is too small to hold a footer")
    raise FormatError("no eStargz or zstd:chunked footer (" + "; ".join(problems) + ")")


def _gzip_footer(kind: str, toc_offset: int, footer_size: int, blob_size: int) -> Footer:
    toc_end = blob_size - footer_size
    if toc_offset >= toc_end:
        raise FormatError(
            f"footer puts the TOC at offset {toc_offset}, beyond the {blob_size}-byte blob"
        )
    return Footer(kind, toc_offset, toc_end - toc_offset, toc_offset, footer_size)
