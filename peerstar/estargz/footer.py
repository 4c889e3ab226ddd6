"""Footers of eStargz (51 bytes), legacy stargz (47 bytes) and zstd:chunked (40 bytes):
their bytes and the `Footer` record a parsed one becomes.

The footer says where the TOC starts. eStargz's footer is an empty gzip member whose
FEXTRA field carries `%016xSTARGZ` behind the subfield id `SG`, so a plain gzip
reader sees nothing; zstd:chunked's is a 40-byte record inside a skippable frame.
Parsing is each compression's (`compression.Compression.parse_footer`);
`compression.parse_footer` finds which one a blob has.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ESTARGZ_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
ZSTD_FOOTER_SIZE = 40
ZSTD_SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_CHUNKED_MAGIC = b"GnUlInUx"
ZSTD_MANIFEST_TYPE_CRFS = 1
MAX_FOOTER_SIZE = ESTARGZ_FOOTER_SIZE

# An empty stored deflate block (BFINAL=1, LEN=0, NLEN=0xffff), then CRC32=0, ISIZE=0.
EMPTY_GZIP_BODY = b"\x01\x00\x00\xff\xff" + b"\x00" * 8


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
    out = header + EMPTY_GZIP_BODY
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
