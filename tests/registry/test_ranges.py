"""Range header parsing, If-Range, and multipart layout: pure functions, exact values."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerstar.registry.ranges import (
    MAX_RANGES,
    ByteRange,
    RangeNotSatisfiable,
    RangeRejected,
    etag_matches,
    if_range_allows,
    multipart_layout,
    parse_range,
)


@pytest.mark.parametrize(("header", "size", "expected"), [
    ("bytes=0-0", 10, [(0, 0)]),
    ("bytes=0-9", 10, [(0, 9)]),
    ("bytes=0-99", 10, [(0, 9)]),           # end clamped
    ("bytes=5-", 10, [(5, 9)]),
    ("bytes=-3", 10, [(7, 9)]),
    ("bytes=-30", 10, [(0, 9)]),            # suffix longer than content
    ("bytes=0-1,4-5", 10, [(0, 1), (4, 5)]),
    ("bytes=4-5,0-1", 10, [(4, 5), (0, 1)]),  # client order kept
    ("bytes= 1 - 2 , 3-4", 10, [(1, 2), (3, 4)]),
    ("BYTES=1-2", 10, [(1, 2)]),
    ("bytes=20-30,2-3", 10, [(2, 3)]),      # unsatisfiable part dropped
    ("bytes=0-0,0-0", 10, [(0, 0), (0, 0)]),
    # positions of any length (RFC 9110 14.1.1): a last past the end is the end,
    # a suffix longer than the content the whole content, leading zeros nothing
    ("bytes=0-" + "9" * 25, 10, [(0, 9)]),
    ("bytes=-" + "9" * 25, 10, [(0, 9)]),
    ("bytes=" + "0" * 25 + "5-", 10, [(5, 9)]),
    ("bytes=" + "9" * 20 + "-,1-2", 10, [(1, 2)]),
])
def test_parse_valid(header: str, size: int, expected: list[tuple[int, int]]) -> None:
    assert parse_range(header, size) == [ByteRange(a, b) for a, b in expected]


@pytest.mark.parametrize("header", [
    "bytes=5-2", "bytes=a-b", "bytes=", "bytes=-", "items=0-1", "bytes 0-1", "0-1",
    "bytes=0-1;x", "bytes=--1", "bytes=1-2-3", "bytes=" + "9" * 30 + "-5",
    "bytes=" + "9" * 30 + "-" + "9" * 29, "bytes=0-1,,2-3", "bytes=\u0661-2",
])
def test_parse_malformed_is_ignored(header: str) -> None:
    assert parse_range(header, 10) is None


def test_absent() -> None:
    assert parse_range(None, 10) is None


@pytest.mark.parametrize(("header", "size"), [
    ("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=-0", 10), ("bytes=0-", 0),
    ("bytes=-5", 0), ("bytes=100-200,300-400", 10),
    # a first position of 20 or more digits is past any end (not a malformed header)
    ("bytes=" + "9" * 20 + "-", 10), ("bytes=" + "9" * 30 + "-", 10),
    ("bytes=" + "1" + "0" * 19 + "-", (1 << 63) - 1),
    ("bytes=" + "9" * 20 + "-" + "9" * 21, 10),
])
def test_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


def test_too_many_or_too_long_rejected() -> None:
    ok = "bytes=" + ",".join(f"{i}-{i}" for i in range(MAX_RANGES))
    assert len(parse_range(ok, 1000)) == MAX_RANGES
    with pytest.raises(RangeRejected):
        parse_range("bytes=" + ",".join(f"{i}-{i}" for i in range(MAX_RANGES + 1)), 1000)
    with pytest.raises(RangeRejected):
        parse_range("bytes=0-1" + " " * 5000, 1000)


def test_if_range() -> None:
    etag = '"sha256:abc"'
    assert if_range_allows(None, etag)
    assert if_range_allows('"sha256:abc"', etag)
    assert not if_range_allows('"sha256:abd"', etag)
    assert not if_range_allows('W/"sha256:abc"', etag)  # weak never matches for ranges
    assert not if_range_allows("Wed, 21 Oct 2015 07:28:00 GMT", etag)
    assert etag_matches('"y", "sha256:abc"', '"sha256:abc"')
    assert etag_matches("*", '"a"') and not etag_matches('"b"', '"a"')
    assert not etag_matches(None, '"a"')


def test_multipart_layout_lengths() -> None:
    ranges = [ByteRange(0, 4), ByteRange(10, 19)]
    lay = multipart_layout(ranges, 100, "application/x", "BOUND")
    assert lay.heads[0] == (b"--BOUND\r\nContent-Type: application/x\r\n"
                            b"Content-Range: bytes 0-4/100\r\n\r\n")
    assert lay.heads[1].startswith(b"\r\n--BOUND\r\n")
    assert lay.tail == b"\r\n--BOUND--\r\n"
    assert lay.content_length(ranges) == len(lay.heads[0]) + len(lay.heads[1]) + 15 + len(
        lay.tail)
    assert lay.content_type == "multipart/byteranges; boundary=BOUND"


@given(size=st.integers(0, 10_000), data=st.data())
def test_parse_matches_model(size: int, data: st.DataObject) -> None:
    """Every satisfiable spec maps to the inclusive range a direct model computes."""
    specs = data.draw(st.lists(st.one_of(
        st.tuples(st.integers(0, 12_000), st.none()),
        st.tuples(st.none(), st.integers(1, 12_000)),
        st.tuples(st.integers(0, 12_000), st.integers(0, 12_000)).map(
            lambda t: (min(t), max(t))),
    ), min_size=1, max_size=8))
    text = "bytes=" + ",".join(
        f"{'' if a is None else a}-{'' if b is None else b}" for a, b in specs)
    expected = []
    for a, b in specs:
        if a is None:
            if size:
                expected.append(ByteRange(max(0, size - b), size - 1))
        elif a < size:
            expected.append(ByteRange(a, min(size - 1, size - 1 if b is None else b)))
    if not expected:
        with pytest.raises(RangeNotSatisfiable):
            parse_range(text, size)
    else:
        got = parse_range(text, size)
        assert got == expected
        assert all(0 <= r.start <= r.end < size for r in got)
