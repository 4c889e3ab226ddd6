"""Hostile layer tars through the tar reader, the builder and `peerstar convert`.

Each tar is a random sequence of members, PAX and GNU records, with numbers in any
encoding, sizes that lie, names from the hostile pool, and random truncation and
compression. The builder either refuses with peerstar's error or writes a blob that the
reader verifies (convert never writes what verify rejects) and whose files hold exactly
the tar's bytes; `peerstar convert` writes the target and nothing else, or one error
line and nothing at all.
"""

from __future__ import annotations

import gzip
import io
import random
import tarfile
import tempfile
from pathlib import Path

import zstandard
from hypothesis import given

from peerstar.estargz import EstargzError, Reader, build
from peerstar.estargz.toc import clean_name
from tests.estargz.hostile import base256, cli, header, octal, pad, pax, pax_record, raw
from tests.fuzz import fuzz, ran
from tests.fuzz.strategies import integer, name, seeds, text

TYPES = [b"0", b"0", b"0", b"\x00", b"1", b"2", b"3", b"4", b"5", b"5", b"6", b"7", b"S",
         b"V", b"?"]
PAX_KEYS = ["path", "linkpath", "size", "mtime", "uid", "gid", "uname", "gname",
            "SCHILY.xattr.user.a", "SCHILY.xattr.security.capability", "GNU.sparse.size",
            "comment", "atime", "ctime"]
TIMES = ["0", "1600000000", "1600000000.5", "-1", "-1.5", "253402300800", "nan", "inf",
         "1e9", "", "9" * 30, str(2**63 - 1), "+5", "5."]


def _number(rnd: random.Random, width: int, good: int, bad: float) -> int | bytes:
    k = rnd.random()
    if k >= bad:
        return good
    if k < bad / 2:
        return base256(rnd.choice([-1, -(2**40), 2**40, 2**62, good]), width)
    return rnd.choice([b"", b"-1", b"0x10", b"9" * (width - 1), b" " * width,
                       octal(8 ** (width - 1) - 1, width)])


def _name(rnd: random.Random, bad: float) -> str:
    if rnd.random() < bad:
        return name(rnd)
    return "/".join(rnd.choice(["a", "b", "d", "é", "x y", ".", "..", "\n"][:6 + (bad > 0)])
                    for _ in range(rnd.randrange(1, 4)))


def _pax_value(rnd: random.Random, key: str, names: list[str], bad: float) -> str:
    if key in ("path", "linkpath"):
        return rnd.choice(names) if names and rnd.random() < 0.4 else _name(rnd, bad)
    if key in ("size", "uid", "gid"):
        if rnd.random() >= bad:
            return str(rnd.randrange(0, 5000) if key != "size" else 0)
        return str(integer(rnd)) if rnd.random() < 0.8 else text(rnd)
    if key in ("mtime", "atime", "ctime"):
        return rnd.choice(TIMES if rnd.random() < bad else TIMES[:6])
    return text(rnd)


def hostile_tar(rnd: random.Random) -> tuple[bytes, list[str]]:
    """A tar from a spectrum of hostility: `bad` is the chance of each corruption."""
    bad = rnd.choice([0.0, 0.01, 0.05, 0.2])
    parts: list[bytes] = []
    names: list[str] = []
    for _ in range(rnd.randrange(1, 9)):
        k = rnd.random()
        if k < 0.25:
            keys = rnd.sample(PAX_KEYS[:8] if rnd.random() >= bad else PAX_KEYS,
                              rnd.randrange(1, 4))
            parts.append(pax({key: _pax_value(rnd, key, names, bad) for key in keys}))
        elif k < 0.3:
            data = raw(_name(rnd, bad)) + b"\x00"
            parts.append(header("././@LongLink", typeflag=rnd.choice([b"L", b"K"]),
                                size=len(data)) + pad(data))
        elif k < 0.3 + bad:
            recs = pax_record(rnd.choice([b"path", b"", b"a=b", b"k\x00"]), text(rnd))
            junk = rnd.choice([recs, b"99 x=y\n", b"x", recs[:-1]])
            parts.append(header("p", typeflag=rnd.choice([b"x", b"g"]), size=len(junk))
                         + pad(junk))
        n = _name(rnd, bad)
        names.append(n)
        typeflag = rnd.choice(TYPES if rnd.random() < bad else TYPES[:11])
        data = rnd.randbytes(rnd.choice([0, 1, 100, 513, 5000]))
        if typeflag in (b"1", b"2", b"3", b"4", b"5", b"6"):
            data = b""  # these carry no payload, whatever their size says
        size: int | bytes = len(data)
        if rnd.random() < bad:
            size = _number(rnd, 12, len(data) + rnd.choice([1, 512, 10_000]), 0.5)
        link = rnd.choice(names) if rnd.random() < 0.7 else _name(rnd, bad)
        parts.append(header(raw(n)[:99], typeflag=typeflag, size=size,
                            mode=_number(rnd, 8, rnd.choice([0o644, 0o755, 0o4777]), bad),
                            uid=_number(rnd, 8, rnd.choice([0, 1000]), bad),
                            gid=_number(rnd, 8, 0, bad),
                            mtime=_number(rnd, 12, rnd.choice([0, 1_600_000_000]), bad),
                            linkname=raw(link)[:99],
                            devmajor=_number(rnd, 8, 1, bad), devminor=_number(rnd, 8, 3, bad))
                     + pad(data))
    data = b"".join(parts) + (b"\x00" * 1024 if rnd.random() < 0.8 else b"")
    if rnd.random() < bad:
        data = data[:rnd.randrange(len(data) + 1)]
    k = rnd.random()
    if k < 0.1:
        data = gzip.compress(data, mtime=0)
    elif k < 0.15:
        data = zstandard.compress(data)
    prioritized = rnd.sample(names, min(len(names), rnd.randrange(3)))
    return data, prioritized


def _tar_files(data: bytes) -> dict[str, bytes]:
    """The regular files of a plain tar as Python's tarfile reads it (later wins)."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        for m in tf.getmembers():
            n = clean_name(m.name)
            out.pop(n, None)
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                out[n] = f.read()
    return out


@fuzz(2000)
@given(seed=seeds)
def test_hostile_tars_build_or_fail(seed: int) -> None:
    ran()
    rnd = random.Random(seed)
    data, prioritized = hostile_tar(rnd)
    out = io.BytesIO()
    try:
        res = build(data, out, compression=rnd.choice(["gzip", "zstd"]),
                    chunk_size=rnd.choice([1, 100, 4096, 1 << 20]), workers=1,
                    prioritized=prioritized, allow_missing_prioritized=rnd.random() < 0.5)
    except EstargzError:
        return
    r = Reader.from_bytes(out.getvalue(), toc_digest=res.toc_digest)
    r.verify()  # what the builder writes, verify accepts
    try:
        expected = _tar_files(data)
    except (tarfile.TarError, EOFError, ValueError, OSError, UnicodeError):
        expected = None  # tarfile cannot read it: the TOC digests vouch for the bytes
    for path, e in r.walk():
        if e.type == "reg" and not path.endswith("landmark"):
            got = r.read(path)
            if expected is not None and e.name in expected:
                assert got == expected[e.name], path


TMP = Path(tempfile.mkdtemp(prefix="peerstar-fuzz-convert-"))


@fuzz(300)
@given(seed=seeds)
def test_convert_writes_the_target_or_nothing(seed: int) -> None:
    ran()
    rnd = random.Random(seed)
    data, prioritized = hostile_tar(rnd)
    work = Path(tempfile.mkdtemp(dir=TMP))
    src, dst = work / "layer.tar", work / "out.blob"
    src.write_bytes(data)
    listed = [p for p in prioritized if p.strip() == p and p.isprintable() and p[:1] != "#"]
    plist = work / "prioritized"
    plist.write_text("".join(p + "\n" for p in listed), "utf-8", "surrogateescape")
    args = ["--prioritize-from", str(plist), "--allow-missing-prioritized",
            "--chunk-size", rnd.choice(["1", "1000", "4MiB"])]
    if rnd.random() < 0.5:
        args.append("--zstdchunked")
    r = cli("convert", str(src), str(dst), *args)
    plist.unlink()
    left = sorted(p.name for p in work.iterdir())
    if r.returncode == 0:
        assert left == ["layer.tar", "out.blob"]
        assert cli("estargz", "verify", str(dst)).returncode == 0
        dst.unlink()
    else:
        assert str(src) in r.error_line
        assert left == ["layer.tar"]
    src.unlink()
    work.rmdir()
