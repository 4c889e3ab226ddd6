"""Hostile blobs against the reader and `peerstar estargz verify|ls|cat` (issue #17 item 4).

Every blob is built here, byte by byte: lying footers, TOCs that are deep, huge,
malformed or name impossible trees, odd but representable values (years 0 and 10000,
modes past 2^32, lone surrogates, control characters), and decompression bombs. Each
either works, with sane output, or fails with one error line that names the blob, with
control characters escaped, a non-zero exit and no traceback; the memory cases run the
CLI in a child and hold its peak RSS to 256 MiB.
"""

from __future__ import annotations

import json
import sys

import pytest

from peerstar.estargz import FormatError, Reader
from peerstar.estargz.footer import ESTARGZ_FOOTER_SIZE
from peerstar.estargz.toc import TOC_MEMORY_LIMIT, TOCEntry
from peerstar.estargz.tree import Tree
from tests.estargz.hostile import (
    COMPRESSIONS,
    RSS_LIMIT_KIB,
    blob_of,
    cli,
    gzip_blob,
    gzip_member,
    gzip_zeros,
    run_cli,
    sha,
    toc_json,
    zeros_digest,
    zstd_blob,
    zstd_rle_frame,
)

DATA = b"hello, world\n"


def file_entries(name: str = "f", data: bytes = DATA) -> tuple[bytes, list[dict]]:
    """A payload member holding `data` and the TOC entry for it."""
    return gzip_member(data), [{"name": name, "type": "reg", "size": len(data), "offset": 0,
                                "digest": sha(data), "chunkDigest": sha(data)}]


def with_entries(*extra: dict, compression: str = "gzip") -> bytes:
    """A valid blob of one file `f` plus the `extra` entries."""
    payload, entries = file_entries()
    if compression == "zstd":
        import zstandard
        return zstd_blob(toc_json([*entries, *extra]), zstandard.compress(DATA))
    return gzip_blob(toc_json([*entries, *extra]), payload)


def write(tmp_path, blob: bytes, name: str = "blob") -> str:
    p = tmp_path / name
    p.write_bytes(blob)
    return str(p)


def refused(tmp_path, blob: bytes, match: str, *commands: str) -> None:
    """The reader raises FormatError matching `match`; each CLI command prints one line."""
    with pytest.raises(FormatError, match=match):
        r = Reader.from_bytes(blob)
        r.verify()
    path = write(tmp_path, blob)
    for cmd in commands or ("verify", "ls"):
        args = ["estargz", cmd, path] + (["f"] if cmd == "cat" else [])
        line = cli(*args).error_line
        assert path in line


# --- footers ---------------------------------------------------------------------------


def _footer_with(offset_text: bytes, legacy: bool = False) -> bytes:
    payload, entries = file_entries()
    blob = gzip_blob(toc_json(entries), payload)
    if legacy:
        return blob[:-ESTARGZ_FOOTER_SIZE] + (
            b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x16\x00" + offset_text + b"STARGZ"
            + b"\x01\x00\x00\xff\xff" + b"\x00" * 8)
    return blob[:-ESTARGZ_FOOTER_SIZE + 16] + offset_text + blob[-ESTARGZ_FOOTER_SIZE + 32:]


@pytest.mark.parametrize("text", [b"-000000000000001", b"-7fffffffffffff0", b"+00000000000000a",
                                  b" 00000000000000a", b"0000_00000000000", b"ffffffffffffffff",
                                  b"00000000000000\xff\xfe"])
@pytest.mark.parametrize("legacy", [False, True])
def test_footer_toc_offsets_that_are_not_offsets(tmp_path, text, legacy):
    refused(tmp_path, _footer_with(text, legacy), "footer")


def test_zstd_footer_pointing_anywhere(tmp_path):
    good = with_entries(compression="zstd")
    for off, clen in ((1 << 64) - 1, 5), (8, (1 << 64) - 1), (0, 5):
        bad = bytearray(good)
        bad[-40:-24] = off.to_bytes(8, "little") + clen.to_bytes(8, "little")
        with pytest.raises(FormatError, match="footer"):
            Reader.from_bytes(bytes(bad))
    bad = bytearray(good)
    bad[-24:-16] = (1 << 62).to_bytes(8, "little")  # uncompressed TOC size
    refused(tmp_path, bytes(bad), "too large")


# --- TOC JSON --------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_deeply_nested_toc(tmp_path, compression):
    deep = b"[" * 100_000 + b"]" * 100_000
    for toc in (deep,
                b'{"version": 1, "entries": [' + deep + b"]}",
                b'{"version": 1, "x": ' + deep + b', "entries": []}',
                b'{"entries": [{"name": "a", "type": "reg", "xattrs": {"k": ' + deep + b"}}]}"):
        refused(tmp_path, blob_of(compression, toc), "not valid JSON|not an object|not base64")


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("field", ["size", "mode", "uid", "offset", "chunkSize"])
def test_integers_of_thousands_of_digits(tmp_path, field, compression):
    toc = toc_json([{"name": "a", "type": "reg"}]).replace(
        b'"type": "reg"', b'"type": "reg", "' + field.encode() + b'": ' + b"9" * 5000)
    refused(tmp_path, blob_of(compression, toc), "not valid JSON")
    version = b'{"version": ' + b"1" * 5000 + b', "entries": []}'
    refused(tmp_path, blob_of(compression, version), "not valid JSON")


@pytest.mark.parametrize("value, match", [(-1, "negative"), (1 << 63, "too large"),
                                          (1.5, "not an integer"), (True, "not an integer"),
                                          ("7", "not an integer")])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_integers_out_of_range(tmp_path, value, match, compression):
    refused(tmp_path, with_entries({"name": "d", "type": "dir", "mode": value},
                                   compression=compression), match)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("field", ["devMajor", "devMinor"])
def test_device_numbers_past_32_bits(tmp_path, field, compression):
    # Linux's makedev takes 32-bit halves: a mount would fail on such a node's stat.
    refused(tmp_path, with_entries({"name": "dev", "type": "char", field: 1 << 32},
                                   compression=compression), f"{field} is too large")


@pytest.mark.parametrize("toc", [b"", b"   ", b"[]", b"nul", b'{"entries": {}}',
                                 b'{"entries": [1]}', b'{"entries": [{"name": 5}]}',
                                 b'{"entries": []} trailing', b'{"entries": [] ',
                                 b'{"entries": [{"name": "a", "type": "reg"}',
                                 b'{"version": "1", "entries": []}', b"\xff\xfe{}",
                                 b'\xef\xbb\xbf{"entries": []}', b'{1: 2}'])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_malformed_toc_json(tmp_path, toc, compression):
    refused(tmp_path, blob_of(compression, toc), "TOC")


def test_toc_of_whitespace_is_read_in_bounded_memory(tmp_path):
    """300 MiB of whitespace around a valid TOC: read as a stream, not held."""
    payload, entries = file_entries()
    body = toc_json(entries)
    import io
    import tarfile
    import zlib
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    space = b" \n\t\r" * (1 << 18)
    n = 300 << 20
    bio = io.BytesIO()
    ti = tarfile.TarInfo("stargz.index.json")
    ti.size = n + len(body)
    parts = [c.compress(ti.tobuf(tarfile.USTAR_FORMAT))]
    parts += [c.compress(space) for _ in range(n // len(space))]
    parts += [c.compress(body + bytes(-(n + len(body)) % 512 + 1024)), c.flush()]
    del bio
    from peerstar.estargz.footer import estargz_footer
    path = write(tmp_path, payload + b"".join(parts) + estargz_footer(len(payload)))
    r = run_cli("estargz", "verify", path)
    assert r.returncode == 0, r.stderr
    assert r.maxrss_kib < RSS_LIMIT_KIB / 2, r.maxrss_kib


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_toc_too_large_for_memory_is_refused_in_bounded_memory(tmp_path, compression):
    n = TOC_MEMORY_LIMIT // 640 + 1000
    entries = ",".join(f'{{"name":"d{i}","type":"dir"}}' for i in range(n))
    blob = blob_of(compression, b'{"version":1,"entries":[' + entries.encode() + b"]}")
    path = write(tmp_path, blob)
    r = run_cli("estargz", "ls", path)
    assert "TOC is too large" in r.error_line
    assert r.maxrss_kib < RSS_LIMIT_KIB, r.maxrss_kib


# --- odd but representable values ------------------------------------------------------


def test_odd_values_are_listed_sanely(tmp_path):
    long = "/".join(["d"] * 1000) + "/deep"
    surrogate = "lone\udc80\ud800"
    control = "ctl\n\x1b[2J\r\t\x7f\u202eevil"
    blob = with_entries(
        {"name": "y0", "type": "dir", "modtime": "0000-01-01T00:00:00Z"},
        {"name": "y10000", "type": "dir", "modtime": "10000-01-01T00:00:00Z"},
        {"name": "yneg", "type": "dir", "modtime": "-0001-12-31T23:59:59Z"},
        {"name": "yhuge", "type": "dir", "modtime": "99999999999-01-01T00:00:00Z"},
        {"name": "ygarbage", "type": "dir", "modtime": "yesterday"},
        {"name": "mode32", "type": "dir", "mode": (1 << 32) | 0o755},
        {"name": "mode63", "type": "dir", "mode": (1 << 63) - 1},
        {"name": long, "type": "symlink", "linkName": "../" * 1000 + "f"},
        {"name": surrogate, "type": "symlink", "linkName": surrogate},
        {"name": control, "type": "fifo"},
    )
    r = Reader.from_bytes(blob)
    r.verify()
    assert r.lookup("y10000").mtime() == (1 << 63) // 10**9 - 1  # clamped for file systems
    assert r.lookup("y0").mtime() == -((1 << 63) // 10**9 - 1)
    assert r.lookup("lone\ufffd\ufffd") is not None  # as Go decodes lone surrogates
    path = write(tmp_path, blob)
    ls = cli("estargz", "ls", "-l", path)
    assert ls.returncode == 0 and ls.stderr == "", ls.stderr
    lines = ls.stdout.decode("utf-8").splitlines()
    by_name = {line.rsplit(" ", 1)[-1] if " -> " not in line else line.split(" -> ")[0]
               .rsplit(" ", 1)[-1]: line for line in lines}
    assert " 0000-01-01 00:00 y0" in by_name["y0"]
    assert " 10000-01-01 00:00 y10000" in by_name["y10000"]
    assert " -0001-12-31 23:59 yneg" in by_name["yneg"]
    assert " 99999999999-01-01 00:00 yhuge" in by_name["yhuge"]
    assert " 1970-01-01 00:00 ygarbage" in by_name["ygarbage"]
    assert by_name["mode32"].startswith("drwxr-xr-x ")
    assert by_name["mode63"].startswith("drwsrwsrwt ")
    assert any(line.endswith(" -> " + "../" * 1000 + "f") for line in lines)
    assert any("lone\ufffd\ufffd -> lone\ufffd\ufffd" in line for line in lines)
    assert any(line.endswith(r"ctl\n\x1b[2J\r\t\x7f\u202eevil") for line in lines)
    assert len(lines) == 1 + 10 + 1000  # f, the ten, and 1,000 directories made for `long`
    plain = cli("estargz", "ls", path)
    assert plain.returncode == 0
    listed = plain.stdout.decode().splitlines()
    assert len(listed) == len(lines) and all(line.isprintable() for line in listed)
    js = cli("estargz", "ls", "--json", path)
    assert js.returncode == 0
    rows = [json.loads(line) for line in js.stdout.splitlines()]
    assert {row["path"] for row in rows} >= {control, "lone\ufffd\ufffd", long}


def test_error_messages_escape_what_they_quote(tmp_path):
    blob = with_entries({"name": "x", "type": "reg\n\x1b[31mFAKE"})
    path = write(tmp_path, blob, "blob\nwith\x1bnewline")
    line = cli("estargz", "verify", path).error_line
    assert r"blob\nwith\x1bnewline" in line and "unknown type" in line
    line = cli("estargz", "cat", write(tmp_path, with_entries()), "no\nsuch").error_line
    assert r"no\nsuch" in line


# --- trees that cannot be --------------------------------------------------------------


@pytest.mark.parametrize("extra, match", [
    ([{"name": "x", "type": "fifo"}, {"name": "x/y", "type": "fifo"}], "used as a directory"),
    ([{"name": "a/b", "type": "fifo"}, {"name": "a/b/c/d", "type": "fifo"}],
     "used as a directory"),
    ([{"name": "l", "type": "hardlink", "linkName": "l"}], "loop"),
    ([{"name": "l1", "type": "hardlink", "linkName": "l2"},
      {"name": "l2", "type": "hardlink", "linkName": "./l1"}], "loop"),
    ([{"name": "l", "type": "hardlink", "linkName": "nope"}], "missing"),
    ([{"name": "d", "type": "dir"}, {"name": "l", "type": "hardlink", "linkName": "d"}],
     "directory"),
    ([{"name": "l", "type": "hardlink", "linkName": "."}], "directory"),
    ([{"name": "a/b", "type": "fifo"}, {"name": "l", "type": "hardlink", "linkName": "a"}],
     "directory"),
    ([{"name": "", "type": "reg"}], "root"),
    ([{"name": ".", "type": "fifo"}], "root"),
    ([{"name": "./", "type": "symlink", "linkName": "x"}], "root"),
    ([{"name": "a/../../b", "type": "fifo"}], "'..'"),
    ([{"name": "a", "type": "fifo\u0000"}], "unknown type"),
    ([{"name": "a\u0000b", "type": "fifo"}], "NUL"),
    ([{"name": "d/s", "type": "symlink", "linkName": "../../etc/passwd"}], "outside"),
])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_impossible_trees(tmp_path, extra, match, compression):
    refused(tmp_path, with_entries(*extra, compression=compression), match, "verify")


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_root_entries_that_are_directories_are_fine(compression):
    for name in ("", ".", "./", "/", "//."):
        if name.startswith("/"):
            continue  # absolute names are refused, tested above
        r = Reader.from_bytes(with_entries({"name": name, "type": "dir", "mode": 0o700},
                                           compression=compression))
        r.verify()
        assert r.lookup("").mode == 0o700


def test_hardlink_chains_resolve_in_linear_steps():
    """Resolving a chain of n hardlinks (each to the one before) must cost O(n) lines of
    Python, not O(n^2): counted with a line tracer, so machine load cannot flake it."""
    def steps(n: int) -> int:
        entries = [TOCEntry(name="f0", type="reg")]
        entries += [TOCEntry(name=f"f{i}", type="hardlink", link_name=f"f{i - 1}")
                    for i in range(1, n)]
        count = 0

        def tracer(frame, event, arg):
            nonlocal count
            if frame.f_code.co_filename.endswith("tree.py"):
                if event == "line":
                    count += 1
                return tracer
            return None

        sys.settrace(tracer)
        try:
            tree = Tree(entries)
        finally:
            sys.settrace(None)
        assert tree.source(entries[-1]) is entries[0]
        assert entries[0].num_link == n
        return count

    small, big = steps(1000), steps(8000)
    assert big < 9 * small, (small, big)  # linear: 8x; quadratic: 64x


# --- bombs -----------------------------------------------------------------------------


def test_zstd_chunk_that_inflates_far_past_its_size(tmp_path):
    """A frame inflating to 2 GiB behind a 1 MiB chunk: decompression stops at 1 MiB."""
    n = 1 << 20
    payload = zstd_rle_frame(2 << 30)
    entry = {"name": "f", "type": "reg", "size": n, "offset": 0, "digest": zeros_digest(n),
             "chunkDigest": zeros_digest(n)}
    path = write(tmp_path, zstd_blob(toc_json([entry]), payload))
    v = run_cli("estargz", "verify", path)
    assert v.returncode == 0, v.stderr
    assert v.maxrss_kib < RSS_LIMIT_KIB / 2, v.maxrss_kib
    c = run_cli("estargz", "cat", path, "f")
    assert c.returncode == 0 and c.stdout == bytes(n), c.stderr
    assert c.maxrss_kib < RSS_LIMIT_KIB / 2, c.maxrss_kib


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_one_huge_chunk_is_verified_and_printed_in_bounded_memory(tmp_path, compression):
    """A real 384 MiB file in one chunk (its digest right): verify and cat stream it."""
    n = 384 << 20
    payload = zstd_rle_frame(n) if compression == "zstd" else gzip_zeros(n)
    digest = zeros_digest(n)
    entry = {"name": "big", "type": "reg", "size": n, "offset": 0, "digest": digest,
             "chunkDigest": digest}
    make = zstd_blob if compression == "zstd" else gzip_blob
    path = write(tmp_path, make(toc_json([entry]), payload))
    v = run_cli("estargz", "verify", path)
    assert v.returncode == 0, v.stderr
    assert v.maxrss_kib < RSS_LIMIT_KIB, v.maxrss_kib
    c = run_cli("estargz", "cat", path, "big")
    assert c.returncode == 0, c.stderr
    assert len(c.stdout) == n and c.stdout.count(0) == n
    assert c.maxrss_kib < RSS_LIMIT_KIB, c.maxrss_kib
    part = run_cli("estargz", "cat", path, "big", "--offset", str(n - 10), "--length", "100")
    assert part.stdout == bytes(10)


def test_chunk_that_is_shorter_than_declared(tmp_path):
    n = 1 << 20
    payload = zstd_rle_frame(n - 1) + zstd_rle_frame(5)  # the next frame must not count
    entry = {"name": "f", "type": "reg", "size": n, "offset": 0, "digest": zeros_digest(n),
             "chunkDigest": zeros_digest(n)}
    path = write(tmp_path, zstd_blob(toc_json([entry]), payload))
    line = cli("estargz", "verify", path).error_line
    assert "holds 1048575 bytes, TOC says 1048576" in line
