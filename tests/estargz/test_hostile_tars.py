"""Hostile layer tars against the builder (issue #17 item 4): truncations, sizes that
point past the end, numbers out of range, malformed PAX records, and odd values that
must convert and read back sanely. Each either builds a blob that the reader verifies,
or raises one FormatError that says what is wrong (never a seek error, an overflow or
a BufferError masking the cause). Tars are written block by block (tests.estargz.hostile).
"""

from __future__ import annotations

import io
import sys

import pytest

from peerstar.estargz import FormatError, Reader, build
from peerstar.estargz.tarfmt import MAX_META
from tests.estargz.hostile import (
    RSS_LIMIT_KIB,
    base256,
    header,
    member,
    pad,
    pax,
    run_cli,
    tar,
)


def blob_of(data: bytes, **kw: object) -> Reader:
    out = io.BytesIO()
    res = build(data, out, **kw)  # type: ignore[arg-type]
    r = Reader.from_bytes(out.getvalue(), toc_digest=res.toc_digest)
    r.verify()
    return r


def refused(data: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        build(data, io.BytesIO())


# --- sizes and truncation --------------------------------------------------------------


def test_truncated_inside_a_payload():
    whole = tar(member("a", b"x" * 1000))
    refused(whole[:512 + 500], "truncated inside the payload of 'a'")
    refused(tar(member("a", b"x" * 10), header("b", size=10_000), end=False),
            "truncated inside the payload of 'b'")


@pytest.mark.parametrize("size, match", [
    (base256(1 << 40, 12), "truncated inside the payload"),
    (base256((1 << 63) - 1, 12), "truncated inside the payload"),
    (base256(1 << 63, 12), "out of range"),
    (base256(1 << 90, 12), "out of range"),
    (base256(-1, 12), "negative size"),
    (b"77777777777\x00", "truncated inside the payload"),
    (b"-0000000001\x00", "not a number"),
    (b"0o000000001\x00", "not a number"),
    (b"0000_000001\x00", "not a number"),
])
def test_header_sizes_past_the_end(size, match):
    refused(tar(header("a", size=size), b"x" * 512), match)


@pytest.mark.parametrize("value, match", [
    ("99999999999", "truncated inside the payload"),
    (str((1 << 63) - 1), "truncated inside the payload"),
    (str(1 << 63), "malformed PAX size"),
    ("9" * 5000, "malformed PAX size"),
    ("-5", "negative size"),
    ("1e3", "malformed PAX size"),
    (" 12", "malformed PAX size"),
    ("", "malformed PAX size"),
])
def test_pax_sizes(value, match):
    refused(tar(pax({"size": value}), member("a", b"x" * 10)), match)


def test_metadata_entries_past_the_limit():
    big = MAX_META + 1
    refused(tar(header("././@LongLink", typeflag=b"L", size=big), b"a" * big), "limit of Go")
    refused(tar(header("p", typeflag=b"x", size=big), b"a" * big), "limit of Go")
    refused(tar(header("p", typeflag=b"x", size=base256(1 << 62, 12))), "limit of Go")


def test_pax_records_that_pile_up():
    """Consecutive 'x' headers accumulate for the next entry, global ones for all: both
    bounded, so neither memory nor the per-entry merge can grow without limit."""
    big = {f"SCHILY.xattr.user.k{i}": "v" * 100 for i in range(5000)}  # ~600 KiB each
    refused(tar(pax(big), pax({k + "x": v for k, v in big.items()}), member("a")),
            "PAX records for one entry")
    many = {f"comment{i}": "" for i in range(300)}
    glob = pax(many).replace(b"PaxHeaders/x", b"PaxHeaders/g", 1)
    blk = bytearray(glob[:512])
    blk[156:157] = b"g"
    blk[148:156] = b" " * 8
    blk[148:156] = b"%06o\x00 " % sum(blk)
    refused(tar(bytes(blk) + glob[512:], member("a")), "global PAX records")
    r = blob_of(tar(pax({"path": "x"}), pax({"mtime": "1"}), member("ignored", b"data")))
    assert r.read("x") == b"data" and r.lookup("x").modtime == "1970-01-01T00:00:01Z"


# --- numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["uid", "gid", "mode", "devmajor", "devminor"])
def test_negative_base256_numbers(field):
    refused(tar(member("d", typeflag=b"3", **{field: base256(-2, 8)})),
            f"negative {field}")


@pytest.mark.parametrize("field", ["uid", "gid"])
def test_pax_ids(field):
    refused(tar(pax({field: "-1"}), member("a")), f"negative {field}")
    refused(tar(pax({field: "1" * 5000}), member("a")), f"malformed PAX {field}")
    refused(tar(pax({field: "0x10"}), member("a")), f"malformed PAX {field}")
    r = blob_of(tar(pax({field: str((1 << 63) - 1)}), member("a")))
    assert getattr(r.lookup("a"), field) == (1 << 63) - 1


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e5", "0x10", "", " 5",
                                   "5.5.5", str(1 << 63), "1" * 5000])
def test_pax_mtimes_that_are_not_times(value):
    """Never a ValueError or a BufferError from the input mapping: one FormatError."""
    refused(tar(pax({"mtime": value}), member("a", b"data")), "malformed PAX mtime")


@pytest.mark.parametrize("value, modtime", [
    ("253402300800", "10000-01-01T00:00:00Z"),
    ("-62135596801", "0000-12-31T23:59:59Z"),
    ("-62135596800", ""),  # Go's zero time is written as no time
    ("-62198755200", "-0001-01-01T00:00:00Z"),
    (str((1 << 63) - 1), "292277026596-12-04T15:30:07Z"),
    ("0.9", ""),
    ("1600000000.5", "2020-09-13T12:26:41Z"),
    ("1600000000.000", "2020-09-13T12:26:40Z"),
    ("+1600000000", "2020-09-13T12:26:40Z"),
])
def test_pax_mtimes_of_any_year(value, modtime):
    r = blob_of(tar(pax({"mtime": value}), member("a", b"data")))
    assert r.lookup("a").modtime == modtime


@pytest.mark.parametrize("key", ["path", "linkpath", "uname", "gname"])
def test_pax_names_with_nul(key):
    refused(tar(pax({key: "a\x00b"}), member("a", typeflag=b"2", linkname="t")), "NUL")


def test_pax_records_that_lie():
    refused(tar(header("p", typeflag=b"x", size=8), pad(b"99 a=b\n\n"), member("a")),
            "out of range")
    refused(tar(header("p", typeflag=b"x", size=7), pad(b"x a=b\n\n"), member("a")),
            "no length")
    refused(tar(header("p", typeflag=b"x", size=7), pad(b"7 =b\n\n\n"), member("a")),
            "empty key")
    refused(tar(pax({b"k\x00": "v"}), member("a")), "NUL")


# --- odd names and trees that work -----------------------------------------------------


def test_path_of_a_thousand_components_and_prioritized():
    deep = "/".join(["d"] * 1000)
    dirs = [part for i in range(1, 1001)
            for part in (pax({"path": "d/" * i}), member("x", typeflag=b"5", mode=0o755))]
    data = tar(*dirs, pax({"path": deep + "/f"}), member("x", b"deep\n"),
               pax({"path": deep + "/l", "linkpath": deep + "/f"}),
               member("y", typeflag=b"1"))
    r = blob_of(data, prioritized=[deep + "/l"])
    assert r.read(deep + "/f") == b"deep\n" == r.read(deep + "/l")
    # Its 1,000 directories first, then the link's target, then the link.
    assert [e.name for e in r.entries[999:1002]] == [deep, deep + "/f", deep + "/l"]
    assert r.lookup(deep + "/f").num_link == 2


def test_hardlink_chain_prioritized_is_not_recursive():
    n = sys.getrecursionlimit() * 3
    parts = [member("f0", b"data")]
    parts += [member(f"f{i}", typeflag=b"1", linkname=f"f{i - 1}") for i in range(1, n)]
    r = blob_of(tar(*parts), prioritized=[f"f{n - 1}"])
    assert r.read(f"f{n - 1}") == b"data"
    assert r.lookup("f0").num_link == n


def test_odd_but_valid_names_convert():
    names = ["./", "a\nb", "c\x1b[2J", "sp ace", "é\u2028", "bad-utf8-\udcff"]
    data = tar(member("./", typeflag=b"5", mode=0o700),
               *(member(n, n.encode("utf-8", "surrogateescape")) for n in names[1:]))
    r = blob_of(data)
    assert r.lookup("").mode == 0o700
    assert r.read("a\nb") == b"a\nb"
    assert r.lookup("bad-utf8-\ufffd") is not None  # invalid UTF-8 is U+FFFD in the TOC


# --- memory ----------------------------------------------------------------------------


def test_convert_of_a_large_layer_stays_bounded(tmp_path):
    """512 MiB of file data, one chunk of 256 MiB among them: the input is read by
    offset, not mapped, and a large member is compressed as it is written."""
    src = tmp_path / "big.tar"
    with src.open("wb") as f:
        for name, size in (("a", 256 << 20), ("b", 256 << 20)):
            f.write(header(name, size=size))
            f.truncate(f.tell() + size)  # zeros, without writing them
            f.seek(0, 2)
        f.write(b"\x00" * 1024)
    dst = tmp_path / "big.esgz"
    r = run_cli("convert", str(src), str(dst), "--level", "1", "--chunk-size", "256MiB")
    assert r.returncode == 0, r.stderr
    assert r.maxrss_kib < RSS_LIMIT_KIB, r.maxrss_kib
    v = run_cli("estargz", "verify", str(dst))
    assert v.returncode == 0, v.stderr
    assert v.maxrss_kib < RSS_LIMIT_KIB, v.maxrss_kib


def test_tar_whose_toc_would_not_fit_is_refused_early(tmp_path):
    from peerstar.estargz.toc import ENTRY_OVERHEAD, TOC_MEMORY_LIMIT
    name = "n" * 3000  # long names: fewer entries reach the limit
    n = TOC_MEMORY_LIMIT // (ENTRY_OVERHEAD + len(name)) + 100
    src = tmp_path / "many.tar"
    with src.open("wb") as f:
        for i in range(n):
            f.write(pax({"path": f"{i}{name}/"}) + header("x", typeflag=b"5", mode=0o755))
        f.write(b"\x00" * 1024)
    r = run_cli("convert", str(src), str(tmp_path / "out"))
    assert "TOC is too large" in r.error_line and str(src) in r.error_line
    assert r.maxrss_kib < RSS_LIMIT_KIB, r.maxrss_kib
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.tar"]
