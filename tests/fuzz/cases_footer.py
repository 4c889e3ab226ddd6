"""Footers: any tail of a blob parses to an offset inside the blob, or to FormatError."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from peerstar.estargz import EstargzError, FormatError, Reader
from peerstar.estargz.compression import parse_footer
from peerstar.estargz.footer import skippable_frame
from tests.fuzz import fuzz, ran

_EMPTY = b"\x01\x00\x00\xff\xff" + b"\x00" * 8
hexish = st.text(alphabet="0123456789abcdefABCDEF+-_ x\x00", min_size=16, max_size=16)


def _gzip_footer(text: bytes, legacy: bool) -> bytes:
    if legacy:
        return b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x16\x00" + text + b"STARGZ" + _EMPTY
    sub = text + b"STARGZ"
    extra = b"SG" + struct.pack("<H", len(sub)) + sub
    return b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(extra)) + (
        extra + _EMPTY)


footers = st.one_of(
    st.binary(max_size=120),
    st.builds(_gzip_footer, hexish.map(str.encode) | st.binary(min_size=16, max_size=16),
              st.booleans()),
    st.builds(lambda a, b, c, t: skippable_frame(struct.pack("<QQQQ", a, b, c, t) + b"GnUlInUx"),
              st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
              st.sampled_from([1, 0, 2, 2**64 - 1])),
)


@fuzz(1500)
@given(tail=footers, extra=st.integers(0, 2**66))
def test_footer_offsets_stay_inside_the_blob(tail: bytes, extra: int) -> None:
    ran()
    size = len(tail) + extra
    try:
        f = parse_footer(tail, size)
    except FormatError:
        return
    assert 0 <= f.toc_offset and 0 <= f.toc_size
    assert f.toc_offset + f.toc_size + f.footer_size <= size


@fuzz(1000)
@given(prefix=st.binary(max_size=300), tail=footers)
def test_blobs_ending_in_any_footer(prefix: bytes, tail: bytes) -> None:
    ran()
    try:
        r = Reader.from_bytes(prefix + tail)
        r.verify()
    except EstargzError:
        pass
