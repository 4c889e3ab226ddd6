"""HTTP byte ranges for the registry: parse `Range` (RFC 9110 section 14), decide whether
`If-Range` lets a Range apply, and lay out `multipart/byteranges` bodies.

Pure functions over header strings and a representation size, so every edge case is
testable without a server. aiohttp parses the HTTP message; only the value of the Range
header is interpreted here (aiohttp's own `http_range` handles a single range only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from peerstar.errors import PeerstarError

# More ranges than this in one request is treated as abuse (RFC 9110 14.2 lets a server
# reject "many small ranges"); clients such as the stargz snapshotter send a handful.
MAX_RANGES = 64
# A Range header longer than this is rejected before any parsing work.
MAX_RANGE_HEADER = 4096

# Numbers of any length are valid (RFC 9110 14.1.1): a first position past the end is
# unsatisfiable however long, a last position past it means the end. Python's ints hold
# them, and MAX_RANGE_HEADER keeps each under int()'s 4300-digit limit.
_SPEC_RE = re.compile(r"^[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*$")


class RangeNotSatisfiable(PeerstarError):
    """No requested range overlaps the representation (answer 416)."""


class RangeRejected(PeerstarError):
    """The Range header is syntactically valid but abusive (too many ranges / too long)."""


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range [start, end] inside a representation."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> list[ByteRange] | None:
    """The satisfiable ranges of a `Range` header for a representation of `size` bytes.

    Returns None when the header is absent or malformed or not in `bytes` units: the
    server then ignores it and answers 200 with the whole content (RFC 9110 14.2).
    Raises RangeNotSatisfiable when it is valid but no range overlaps the content, and
    RangeRejected when it asks for more than MAX_RANGES ranges or is absurdly long.
    Ranges keep the client's order; unsatisfiable ones are dropped.
    """
    if header is None:
        return None
    if len(header) > MAX_RANGE_HEADER:
        raise RangeRejected(f"Range header longer than {MAX_RANGE_HEADER} characters")
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = specs.split(",")
    if len(parts) > MAX_RANGES:
        raise RangeRejected(f"more than {MAX_RANGES} ranges in one request")
    out: list[ByteRange] = []
    for part in parts:
        m = _SPEC_RE.match(part)
        if m is None:
            return None
        first, last = m.group(1), m.group(2)
        if first == "":
            if last == "":
                return None
            suffix = int(last)
            if suffix == 0 or size == 0:
                continue  # a zero-length suffix selects nothing: unsatisfiable
            out.append(ByteRange(max(0, size - suffix), size - 1))
            continue
        start = int(first)
        end = int(last) if last != "" else size - 1
        if last != "" and end < start:
            return None  # invalid spec makes the whole header invalid
        if start >= size:
            continue  # unsatisfiable on its own; others may still apply
        out.append(ByteRange(start, min(end, size - 1)))
    if not out:
        raise RangeNotSatisfiable(f"no range of {header!r} lies within {size} bytes")
    return out


def if_range_allows(if_range: str | None, etag: str) -> bool:
    """Whether a Range may apply given the request's `If-Range` (RFC 9110 13.1.5).

    Our representations have a strong ETag (the quoted digest) and no Last-Modified, so
    only an exact strong ETag match keeps the Range; a date or another tag means the
    client's partial copy may be stale, and the whole content is sent with 200.
    """
    if if_range is None:
        return True
    value = if_range.strip()
    return not value.startswith("W/") and value == etag


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether `If-None-Match` names `etag` (weak comparison, `*` matches)."""
    if if_none_match is None:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


@dataclass(frozen=True)
class MultipartLayout:
    """The byte layout of a `multipart/byteranges` body: each part's header block and the
    closing delimiter, so the exact Content-Length is known before any content is read."""

    boundary: str
    heads: list[bytes]
    tail: bytes

    @property
    def content_type(self) -> str:
        return f"multipart/byteranges; boundary={self.boundary}"

    def content_length(self, ranges: list[ByteRange]) -> int:
        return sum(len(h) for h in self.heads) + sum(r.length for r in ranges) + len(self.tail)


def multipart_layout(ranges: list[ByteRange], size: int, media_type: str,
                     boundary: str) -> MultipartLayout:
    """Headers of every part of a multipart/byteranges body (RFC 9110 14.6)."""
    heads = []
    for i, r in enumerate(ranges):
        lead = b"" if i == 0 else b"\r\n"
        heads.append(lead + (
            f"--{boundary}\r\n"
            f"Content-Type: {media_type}\r\n"
            f"Content-Range: {r.content_range(size)}\r\n\r\n"
        ).encode("ascii"))
    return MultipartLayout(boundary, heads, f"\r\n--{boundary}--\r\n".encode("ascii"))
