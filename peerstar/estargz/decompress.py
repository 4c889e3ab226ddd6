"""Bounded, streaming decompression of the gzip members and zstd frames of a blob.

A blob says how many bytes a chunk or its TOC holds, but the compressed bytes may
inflate to far more (a bomb) or lie about where they end. Everything here reads the
compressed range in pieces of at most `STEP` bytes through `read_at` and yields the
output in pieces of at most `STEP` bytes, so a caller that stops at the size it was
told never holds more than a few pieces, whatever the input declares. Which of the
two a blob needs is its `compression.Compression`'s to say.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Generator

import zstandard

ReadAt = Callable[[int, int], bytes]
STEP = 1 << 20
_GZIP = zlib.MAX_WBITS | 16


class DecompressError(Exception):
    """The compressed bytes are corrupt (callers turn this into their own error)."""


class TruncatedError(Exception):
    """`read_at` returned fewer bytes than the blob's size promised."""

    def __init__(self, offset: int, wanted: int, got: int) -> None:
        super().__init__(f"blob is truncated: wanted {wanted} bytes at offset {offset}, got {got}")


def read_exact(read_at: ReadAt, offset: int, length: int) -> bytes:
    data = read_at(offset, length)
    if len(data) != length:
        raise TruncatedError(offset, length, len(data))
    return data


class _RangeReader:
    """`read_at` over [start, end) as a file object (for zstd's stream reader)."""

    def __init__(self, read_at: ReadAt, start: int, end: int) -> None:
        self._read_at = read_at
        self._pos = start
        self._end = end

    def read(self, n: int = -1) -> bytes:
        n = self._end - self._pos if n < 0 else min(n, self._end - self._pos, STEP)
        if n <= 0:
            return b""
        data = read_exact(self._read_at, self._pos, n)
        self._pos += n
        return data


def inflate_zstd(read_at: ReadAt, start: int, end: int,
                 across: bool = False) -> Generator[bytes, None, None]:
    """Decompress [start, end): one zstd frame, or with `across` all of them (skippable
    frames are skipped).

    Yields non-empty pieces of at most STEP bytes; raises DecompressError on corrupt
    data and TruncatedError on a short read. Stopping early (closing the iterator) is
    how a caller bounds the output.
    """
    source = _RangeReader(read_at, start, end)
    reader = zstandard.ZstdDecompressor().stream_reader(
        source,  # type: ignore[arg-type]  # any object with read() will do; the stub says IO
        read_size=STEP, read_across_frames=across)
    while True:
        try:
            out = reader.read(STEP)
        except zstandard.ZstdError as exc:
            raise DecompressError(str(exc)) from None
        if not out:
            return
        yield out
        # Without `across`, a read stops short at the end of the frame, and the next one
        # would go on into the next frame. (A frame ending exactly at a full read is not
        # seen: callers stop at the size they expect, and chunk digests check the rest.)
        if not across and len(out) < STEP:
            return


def inflate_gzip(read_at: ReadAt, start: int, end: int,
                 across: bool = False) -> Generator[bytes, None, None]:
    """`inflate_zstd` for gzip members."""
    d = zlib.decompressobj(_GZIP)
    pos = start
    pending = b""
    try:
        while True:
            if not pending and pos < end:
                n = min(STEP, end - pos)
                pending = read_exact(read_at, pos, n)
                pos += n
            # With no input left this drains what zlib still holds (at most STEP a call).
            out = d.decompress(pending, STEP)
            pending = d.unconsumed_tail
            if out:
                yield out
            if d.eof:
                if not across:
                    return
                pending = d.unused_data  # (unconsumed_tail may repeat it)
                d = zlib.decompressobj(_GZIP)
                if not pending and pos >= end:
                    return
            elif not out and not pending and pos >= end:
                return  # the input ends inside a member: the caller sees the short output
    except zlib.error as exc:
        raise DecompressError(str(exc)) from None

