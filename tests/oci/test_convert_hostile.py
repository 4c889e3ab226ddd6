"""`peerstar convert` refuses, in one line, every layer that `peerstar estargz verify`
would reject (issue #17 item 4), and leaves nothing behind.

The tars are written block by block (tests.estargz.hostile): names that make the root a
file, a file used as a directory, NULs, hardlink loops, self-links, missing or
directory targets, negative base-256 numbers, symlinks out of the root, broken sizes
and times. Each is converted as a single layer (the CLI, in this process) and, for a
few, inside an OCI image, including an eStargz layer that would have been kept.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from peerstar.convert import ConvertError, convert
from peerstar.oci.reference import parse_image_ref
from tests.estargz.hostile import (
    base256,
    cli,
    gzip_blob,
    gzip_member,
    header,
    member,
    pax,
    sha,
    tar,
    toc_json,
)
from tests.oci.conftest import OCI_GZIP, TOC_ANN, LayoutBuilder

DIR = b"5"
LINK = b"1"
SYMLINK = b"2"

CASES = {
    "file-named-empty": (tar(member("", b"x")), "root entry is not a directory"),
    "file-named-dot": (tar(member(".", b"x")), "root entry is not a directory"),
    "file-named-dot-slash": (tar(member("./", b"x")), "root entry is not a directory"),
    "link-named-dot": (tar(member("f", b"x"), member(".", typeflag=LINK, linkname="f")),
                       "root entry is not a directory"),
    "file-then-child": (tar(member("x", b"file"), member("x/y", b"child")),
                        "'x' is used as a directory but is a reg"),
    "file-then-deep-child": (tar(member("x/", typeflag=DIR), member("x/f", b"f"),
                                 member("x/f/g/h", b"h")), "used as a directory"),
    "dir-replaced-by-file": (tar(member("x/", typeflag=DIR), member("x/y", b"y"),
                                 member("x", b"now a file")), "used as a directory"),
    "pax-path-with-nul": (tar(pax({"path": "a\x00b"}), member("x", b"x")), "NUL"),
    "pax-linkpath-with-nul": (tar(member("t", b"t"), pax({"linkpath": "t\x00"}),
                                  member("l", typeflag=LINK)), "NUL"),
    "hardlink-loop": (tar(member("a", typeflag=LINK, linkname="b"),
                          member("b", typeflag=LINK, linkname="a")), "hardlink loop"),
    "hardlink-to-itself": (tar(member("a", typeflag=LINK, linkname="./a")), "hardlink loop"),
    "hardlink-to-missing": (tar(member("a", typeflag=LINK, linkname="nope")), "missing"),
    "hardlink-to-dir": (tar(member("d/", typeflag=DIR), member("l", typeflag=LINK,
                                                                linkname="d")),
                        "hardlink to directory 'd'"),
    "hardlink-to-implicit-dir": (tar(member("d/f", b"f"), member("l", typeflag=LINK,
                                                                  linkname="d")),
                                 "hardlink to directory"),
    "hardlink-to-root": (tar(member("l", typeflag=LINK, linkname=".")),
                         "hardlink to directory"),
    "negative-uid": (tar(member("f", b"x", uid=base256(-1, 8))), "negative uid"),
    "negative-gid": (tar(member("f", b"x", gid=base256(-5, 8))), "negative gid"),
    "negative-mode": (tar(member("f", b"x", mode=base256(-1, 8))), "negative mode"),
    "negative-devmajor": (tar(member("c", typeflag=b"3", devmajor=base256(-1, 8))),
                          "negative devmajor"),
    "negative-devminor": (tar(member("c", typeflag=b"4", devminor=base256(-7, 8))),
                          "negative devminor"),
    "symlink-out-of-root": (tar(member("a/s", typeflag=SYMLINK, linkname="../../etc/passwd")),
                            "points outside the layer root"),
    "symlink-out-via-dots": (tar(member("s", typeflag=SYMLINK, linkname="./x/../../y")),
                             "points outside the layer root"),
    "hardlink-out-of-root": (tar(member("l", typeflag=LINK, linkname="../x")),
                             "points outside the layer"),
    "absolute-name": (tar(member("/etc/x", b"x")), "absolute"),
    "dotdot-name": (tar(pax({"path": "a/../../x"}), member("x", b"x")), "'..'"),
    "truncated-payload": (tar(member("f", b"x" * 4096))[:1024], "truncated inside the payload"),
    "size-past-the-end": (tar(header("f", size=base256(1 << 62, 12))),
                          "truncated inside the payload"),
    "size-overflows-int64": (tar(header("f", size=base256(1 << 80, 12))), "out of range"),
    "pax-size-past-the-end": (tar(pax({"size": str(1 << 62)}), member("f", b"x")),
                              "truncated inside the payload"),
    "pax-mtime-nan": (tar(pax({"mtime": "nan"}), member("f", b"x" * 100)),
                      "malformed PAX mtime"),
    "pax-mtime-inf": (tar(pax({"mtime": "inf"}), member("f", b"x" * 100)),
                      "malformed PAX mtime"),
    "sparse": (tar(pax({"GNU.sparse.map": "0,1"}), member("f", b"x")), "sparse"),
    "fifo-in-file": (tar(member("p", typeflag=b"6"), member("p/x", b"x")),
                     "used as a directory"),
}


def _convert(tmp_path: Path, data: bytes, *args: str) -> tuple[str, Path]:
    src = tmp_path / "layer.tar"
    src.write_bytes(data)
    dst = tmp_path / "out.blob"
    line = cli("convert", str(src), str(dst), *args).error_line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.tar"], "left something behind"
    return line, src


@pytest.mark.parametrize("case", sorted(CASES))
def test_convert_refuses_in_one_line(tmp_path: Path, case: str) -> None:
    data, match = CASES[case]
    line, src = _convert(tmp_path, data)
    assert str(src) in line and match in line, line


@pytest.mark.parametrize("case", ["hardlink-to-dir", "pax-mtime-nan", "negative-uid",
                                  "symlink-out-of-root", "truncated-payload"])
def test_convert_refuses_compressed_and_zstd_too(tmp_path: Path, case: str) -> None:
    data, match = CASES[case]
    line, _ = _convert(tmp_path, gzip.compress(data), "--zstdchunked")
    assert match in line, line


def test_refusal_escapes_names(tmp_path: Path) -> None:
    evil = "evil\n\x1b[31mpeerstar: ok\r\u202e"
    data = tar(member(evil, typeflag=LINK, linkname="missing\n"))
    line, _ = _convert(tmp_path, data)
    assert r"evil\n\x1b[31mpeerstar: ok\r\u202e" in line and r"missing\n" in line


def test_odd_but_valid_layers_convert(tmp_path: Path) -> None:
    """What a reader accepts, convert writes: the root as "./" and as ".", a symlink
    to an absolute path, hardlinks to symlinks and devices, a year-10000 mtime."""
    data = tar(member("./", typeflag=DIR, mode=0o700), member(".", typeflag=DIR),
               member("s", typeflag=SYMLINK, linkname="/etc/../../passwd"),
               member("c", typeflag=b"3", devmajor=1, devminor=3),
               member("lc", typeflag=LINK, linkname="c"),
               member("ls", typeflag=LINK, linkname="s"),
               pax({"mtime": "253402300800"}), member("future", b"x"))
    src = tmp_path / "layer.tar"
    src.write_bytes(data)
    out = tmp_path / "out.blob"
    r = cli("convert", str(src), str(out))
    assert r.returncode == 0, r.stderr
    assert cli("estargz", "verify", str(out)).returncode == 0
    ls = cli("estargz", "ls", "-l", str(out)).stdout.decode()
    assert " 10000-01-01 00:00 future" in ls


# --- inside images ---------------------------------------------------------------------


def test_image_with_a_hostile_layer_is_refused(tmp_path: Path) -> None:
    bad = CASES["hardlink-to-dir"][0]
    good = tar(member("ok", b"fine"))
    b = LayoutBuilder(tmp_path / "src")
    bad_gz = gzip.compress(bad, mtime=0)
    man = b.image([(gzip.compress(good, mtime=0), OCI_GZIP, None), (bad_gz, OCI_GZIP, None)],
                  [sha(good), sha(bad)])
    b.tag(man, "t")
    src = b.finish()
    out = tmp_path / "out"
    r = cli("convert", f"oci:{src}:t", f"oci:{out}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = r.stderr.splitlines()[-1]  # after the progress lines of the layers
    assert line.startswith("peerstar: error: ") and line.isprintable()
    assert sha(bad_gz) in line and "hardlink to directory" in line
    assert not out.exists()


def test_estargz_layer_that_verify_rejects_is_not_kept(tmp_path: Path) -> None:
    """A well-formed eStargz layer (TOC and chunks verify) whose symlink climbs out of
    the root: verify rejects it, so convert may not keep it; reconverting it fails."""
    payload = gzip_member(header("s", typeflag=SYMLINK, linkname="../../x"))
    toc = toc_json([{"name": "s", "type": "symlink", "linkName": "../../x"}])
    blob = gzip_blob(toc, payload)
    b = LayoutBuilder(tmp_path / "src")
    diff = sha(gzip.decompress(blob))
    man = b.image([(blob, OCI_GZIP, {TOC_ANN: sha(toc)})], [diff])
    b.tag(man, "t")
    src = b.finish()
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="'s' -> '../../x' points outside the layer root"):
        convert(f"oci:{src}:t", parse_image_ref(f"oci:{out}"))
    assert not out.exists()
