"""Damaged blobs: real eStargz and zstd:chunked blobs with random edits and truncations.

Opened with their TOC digest (as convert, the registry and the fetcher open them), a
read either fails with peerstar's error or returns exactly the original bytes; opened
without it, nothing but peerstar's errors escapes. The CLI's ls, cat and verify give
output or one error line.
"""

from __future__ import annotations

import io
import random
import tempfile
from pathlib import Path

from hypothesis import given

from peerstar.estargz import EstargzError, Reader, build
from peerstar.estargz.reader import compute_diff_id
from tests.estargz.hostile import cli, member, pax, tar
from tests.fuzz import fuzz, ran
from tests.fuzz.strategies import mutate, seeds

FILES = {"a": b"hello\n", "d/big": bytes(range(256)) * 60, "d/empty": b"",
         "d/z": b"z" * 9000, "\u00e9\n\x1b": b"odd name\n"}
TAR = tar(member("d/", typeflag=b"5", mode=0o755),
          *(pax({"path": n}) + member("x", data) for n, data in FILES.items()),
          member("d/hard", typeflag=b"1", linkname="d/big"),
          member("d/sym", typeflag=b"2", linkname="../a"),
          pax({"mtime": "253402300800"}), member("future", b"year 10000\n"))
FILES["d/hard"] = FILES["d/big"]
FILES["future"] = b"year 10000\n"


def _blob(compression: str) -> tuple[bytes, str]:
    out = io.BytesIO()
    res = build(TAR, out, compression=compression, chunk_size=4000, workers=1)
    return out.getvalue(), res.toc_digest


BLOBS = {c: _blob(c) for c in ("gzip", "zstd")}
TMP = Path(tempfile.mkdtemp(prefix="peerstar-fuzz-blob-"))


@fuzz(1500)
@given(seed=seeds)
def test_damaged_blobs(seed: int) -> None:
    ran()
    rnd = random.Random(seed)
    compression = rnd.choice(["gzip", "zstd"])
    blob, toc_digest = BLOBS[compression]
    bad = mutate(rnd, blob, 3)
    strict = rnd.random() < 0.5
    try:
        r = Reader.from_bytes(bad, toc_digest=toc_digest if strict else None)
    except EstargzError:
        return
    for path, want in FILES.items():
        off = rnd.randrange(len(want) + 1)
        n = rnd.choice([-1, 0, 1, 100, 5000])
        try:
            got = r.read(path, off, n)
        except (EstargzError, FileNotFoundError, IsADirectoryError):
            continue
        if strict:  # the TOC is the one we wrote: no byte may differ
            assert got == (want[off:] if n < 0 else want[off:off + n]), path
    try:
        r.verify()
    except EstargzError:
        pass
    try:
        compute_diff_id(lambda o, k: bad[o:o + k], len(bad), r.codec)
    except EstargzError:
        pass


@fuzz(500)
@given(seed=seeds)
def test_damaged_blobs_through_the_cli(seed: int) -> None:
    ran()
    rnd = random.Random(seed)
    blob, _ = BLOBS[rnd.choice(["gzip", "zstd"])]
    path = TMP / "blob"
    path.write_bytes(mutate(rnd, blob, 3))
    args = rnd.choice([["verify"], ["ls", "-l"], ["ls", "--json"], ["ls"],
                       ["cat", rnd.choice(sorted(FILES))]])
    r = cli("estargz", args[0], str(path), *args[1:])
    if r.returncode != 0:
        assert str(path) in r.error_line
    elif args[0] == "ls":
        assert all(line.isprintable() for line in r.stdout.decode().splitlines())
