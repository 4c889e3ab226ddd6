"""The bytes `build` writes, pinned: gzip and zstd:chunked outputs for a few inputs and
options (levels, chunk sizes, prioritized files, compressed inputs, members large enough
to be compressed as a stream) must stay identical across refactorings of the writer.

The inputs are made here with Python's `tarfile` alone, so a change elsewhere in the
test helpers cannot move them; the expected figures were produced by the writer as it
was before the compression interface (`peerstar.estargz.compression`) existed, and
are kept in golden_bytes.json.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import zstandard

from peerstar.estargz import Reader, build


def _data(seed: str, size: int, *, text: bool = False) -> bytes:
    if text:
        line = f"{seed}: the quick brown fox jumps over the lazy dog\n".encode()
        return (line * (size // len(line) + 1))[:size]
    return random.Random(seed).randbytes(size)


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, uid: int = 0,
          uname: str = "root", mtime: int = 1_600_000_000, **kw: object) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type, t.mode, t.uid, t.gid, t.uname, t.gname, t.mtime = (
        kind, mode, uid, uid, uname, uname, mtime)
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def small_tar() -> bytes:
    d, sym, lnk = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
    return _tar([
        (_info("./", d, mode=0o755), b""),
        (_info("./etc/", d, mode=0o755), b""),
        (_info("./etc/hostname"), b"peerstar\n"),
        (_info("etc/empty"), b""),
        (_info("etc/passwd", uid=1000, uname="alice"), _data("passwd", 7000, text=True)),
        (_info("bin/", d, mode=0o755, mtime=0), b""),
        (_info("bin/big", mode=0o755), _data("big", 300_000)),
        (_info("bin/text", uid=1001, uname="bob"), _data("text", 250_003, text=True)),
        (_info("bin/sh", sym, linkname="busybox", mode=0o777), b""),
        (_info("bin/big-link", lnk, linkname="bin/big"), b""),
        (_info("dev/", d, mode=0o755), b""),
        (_info("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3), b""),
        (_info("run/fifo", tarfile.FIFOTYPE, mode=0o600), b""),
        (_info("etc/x", pax_headers={"SCHILY.xattr.user.a": "1"}), b"x\n"),
        (_info("odd/<a&b>\u2028.txt"), b"html\n"),
    ])


def big_tar() -> bytes:
    return _tar([
        (_info("big/", tarfile.DIRTYPE, mode=0o755), b""),
        (_info("big/random"), _data("big-random", 9 << 20 | 77)),
        (_info("big/text"), _data("big-text", 9 << 20 | 5, text=True)),
        (_info("small"), b"s\n"),
    ])


CASES = {
    "small-gzip": (small_tar, None, dict(compression="gzip", chunk_size=64 << 10)),
    "small-zstd": (small_tar, None, dict(compression="zstd", chunk_size=64 << 10)),
    "small-gzip-l1-prioritized-gzip-input": (small_tar, "gzip", dict(
        compression="gzip", level=1, chunk_size=1000,
        prioritized=["bin/big-link", "etc/passwd"])),
    "small-zstd-l19-prioritized-zstd-input": (small_tar, "zstd", dict(
        compression="zstd", level=19, chunk_size=100_000, prioritized=["bin/text"])),
    "big-gzip-l0-streamed": (big_tar, None, dict(compression="gzip", level=0,
                                                 chunk_size=16 << 20)),
    "big-gzip-streamed": (big_tar, None, dict(compression="gzip", level=6, chunk_size=16 << 20)),
    "big-zstd-streamed": (big_tar, None, dict(compression="zstd", chunk_size=16 << 20)),
    "big-zstd-default": (big_tar, None, dict(compression="zstd")),
}


def make(case: str) -> tuple[bytes, dict]:
    tar_of, wrap, options = CASES[case]
    src = tar_of()
    if wrap == "gzip":
        src = gzip.compress(src, mtime=0)
    elif wrap == "zstd":
        src = zstandard.ZstdCompressor().compress(src)
    return src, options


def figures(case: str) -> dict:
    src, options = make(case)
    out = io.BytesIO()
    r = build(src, out, workers=2, **options)
    blob = out.getvalue()
    assert r.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert r.blob_size == len(blob)
    Reader.from_bytes(blob, toc_digest=r.toc_digest).verify()
    return dict(input="sha256:" + hashlib.sha256(src).hexdigest(), blob=r.blob_digest,
                size=r.blob_size, toc=r.toc_digest, diff_id=r.diff_id,
                usize=r.uncompressed_size, toc_offset=r.toc_offset, media_type=r.media_type,
                annotations=r.annotations)


GOLDEN: dict[str, dict] = json.loads(
    (Path(__file__).parent / "golden_bytes.json").read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_build_writes_the_pinned_bytes(case):
    want = GOLDEN[case]
    got = figures(case)
    assert got["input"] == want["input"], "the test input changed (Python's tarfile?)"
    assert got == want
