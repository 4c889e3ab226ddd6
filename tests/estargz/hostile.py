"""Builders of hostile inputs, byte by byte, and a CLI runner that measures memory.

Tars are written block by block here (not with `tarfile`, which refuses most of what an
attacker writes: negative base-256 ids, sizes past the end, NULs in PAX paths); blobs
are assembled from a TOC given as JSON text, with payloads that may be bombs.
`run_cli` runs `python -m peerstar ...` in a child and reports its peak RSS, so a test
can hold any command to the 256 MiB bound; `cli` runs it in this process (faster).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import zstandard

from peerstar.cli import main
from peerstar.estargz.footer import estargz_footer, skippable_frame, zstd_footer_frame
from tests.support.content import sha256_digest

BLOCK = 512
RSS_LIMIT_KIB = 256 << 10
REPO = Path(__file__).resolve().parents[2]


# --- tars ------------------------------------------------------------------------------


def raw(s: str | bytes) -> bytes:
    """Text as a tar holds it: surrogate escapes back to their bytes, other lone
    surrogates as the invalid UTF-8 an attacker can write."""
    if isinstance(s, bytes):
        return s
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogatepass")


def octal(v: int, width: int) -> bytes:
    return b"%0*o\x00" % (width - 1, v)


def base256(v: int, width: int) -> bytes:
    """GNU base-256: two's complement, top bit set as the marker."""
    raw = (v % (1 << (8 * width))).to_bytes(width, "big")
    return bytes([raw[0] | 0x80]) + raw[1:]


def header(name: str | bytes, *, typeflag: bytes = b"0", size: int | bytes = 0,
           mode: int | bytes = 0o644, uid: int | bytes = 0, gid: int | bytes = 0,
           mtime: int | bytes = 1_600_000_000, linkname: str | bytes = "",
           devmajor: int | bytes = 0, devminor: int | bytes = 0) -> bytes:
    """One USTAR header block; a bytes value is written into its field as it is."""
    def field(v: int | bytes, width: int) -> bytes:
        out = v if isinstance(v, bytes) else octal(v, width)
        assert len(out) <= width
        return out.ljust(width, b"\x00")

    blk = bytearray(BLOCK)
    n = raw(name)
    blk[0:len(n)] = n
    blk[100:108] = field(mode, 8)
    blk[108:116] = field(uid, 8)
    blk[116:124] = field(gid, 8)
    blk[124:136] = field(size, 12)
    blk[136:148] = field(mtime, 12)
    blk[148:156] = b" " * 8
    blk[156:157] = typeflag
    ln = raw(linkname)
    blk[157:157 + len(ln)] = ln
    blk[257:265] = b"ustar\x0000"
    blk[265:269] = b"root"
    blk[297:301] = b"root"
    blk[329:337] = field(devmajor, 8)
    blk[337:345] = field(devminor, 8)
    blk[148:156] = b"%06o\x00 " % sum(blk)
    return bytes(blk)


def pad(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % BLOCK)


def pax_record(key: str | bytes, value: str | bytes) -> bytes:
    k, v = raw(key), raw(value)
    body = b" " + k + b"=" + v + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def pax(records: dict) -> bytes:
    """A PAX extended header ('x') with `records`, padded, for the entry that follows."""
    data = b"".join(pax_record(k, v) for k, v in records.items())
    return header("PaxHeaders/x", typeflag=b"x", size=len(data)) + pad(data)


def member(name: str | bytes, data: bytes = b"", **kw: object) -> bytes:
    """A header and its padded payload (`size` defaults to the payload's length)."""
    kw.setdefault("size", len(data))
    return header(name, **kw) + pad(data)  # type: ignore[arg-type]


def tar(*parts: bytes, end: bool = True) -> bytes:
    return b"".join(parts) + (b"\x00" * (2 * BLOCK) if end else b"")


# --- blobs -----------------------------------------------------------------------------

sha = sha256_digest  # the name these tests use


def toc_json(entries: list[dict], **extra: object) -> bytes:
    return json.dumps({"version": 1, "entries": entries, **extra}).encode()


def gzip_member(data: bytes) -> bytes:
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def toc_member(toc: bytes) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo("stargz.index.json")
        ti.size = len(toc)
        tf.addfile(ti, io.BytesIO(toc))
    return gzip_member(bio.getvalue())


def gzip_blob(toc: bytes, payload: bytes = b"") -> bytes:
    """An eStargz blob: `payload` (compressed members, at offset 0), the TOC, the footer."""
    return payload + toc_member(toc) + estargz_footer(len(payload))


def zstd_blob(toc: bytes, payload: bytes = b"") -> bytes:
    """A zstd:chunked blob: `payload` (frames, at offset 0), the TOC frame, the footer."""
    ztoc = zstandard.ZstdCompressor().compress(toc)
    toc_at = len(payload) + 8
    return (payload + skippable_frame(ztoc)
            + zstd_footer_frame(toc_at, len(ztoc), len(toc)))


COMPRESSIONS = ("gzip", "zstd")  # every test of a TOC's content runs on both


def blob_of(compression: str, toc: bytes, payload: bytes = b"") -> bytes:
    """`gzip_blob` or `zstd_blob`, by the compression's name."""
    return (zstd_blob if compression == "zstd" else gzip_blob)(toc, payload)


def zstd_rle_frame(total: int, byte: int = 0) -> bytes:
    """A zstd frame of RLE blocks that inflates to `total` bytes of `byte` from 4 bytes
    per 128 KiB (no content size in its header, as a streaming writer leaves it)."""
    out = [b"\x28\xb5\x2f\xfd", b"\x00", bytes([(17 - 10) << 3])]  # FHD, window 128 KiB
    left = total
    while left:
        n = min(left, 128 << 10)
        left -= n
        out.append(struct.pack("<I", (n << 3) | (1 << 1) | (left == 0))[:3] + bytes([byte]))
    return b"".join(out)


def gzip_zeros(total: int) -> bytes:
    """One gzip member of `total` zero bytes (a few KiB per MiB)."""
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    zero = bytes(1 << 20)
    parts = [c.compress(zero) for _ in range(total >> 20)]
    parts.append(c.compress(bytes(total & ((1 << 20) - 1))))
    return b"".join(parts) + c.flush()


def zeros_digest(total: int) -> str:
    h = hashlib.sha256()
    zero = bytes(1 << 20)
    for _ in range(total >> 20):
        h.update(zero)
    h.update(bytes(total & ((1 << 20) - 1)))
    return "sha256:" + h.hexdigest()


# --- running the CLI -------------------------------------------------------------------


@dataclass
class Run:
    returncode: int
    stdout: bytes
    stderr: str
    maxrss_kib: int = 0  # the command's peak RSS (run_cli only)

    @property
    def error_line(self) -> str:
        """The one error line, checked: `peerstar: error: ...`, no traceback."""
        assert self.returncode not in (0, 70), (self.returncode, self.stderr)
        assert "Traceback" not in self.stderr, self.stderr
        lines = self.stderr.splitlines()
        assert len(lines) == 1, self.stderr
        assert lines[0].startswith("peerstar: error: "), self.stderr
        assert lines[0].isprintable(), repr(lines[0])
        return lines[0]


def cli(*args: str) -> Run:
    """`peerstar ARGS` in this process (fast; no memory figure)."""
    out, err = io.BytesIO(), io.StringIO()
    text = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(err):
        rc = main(list(args))
    text.flush()
    return Run(rc, out.getvalue(), err.getvalue())


# The child reports the peak RSS of its own address space (VmHWM) as it exits: wait4's
# ru_maxrss would also count the parent's pages that the child had before exec.
_MEASURED = """
import atexit, runpy, sys
def _report(path=sys.argv[1]):
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(path, "w") as out:
        out.write(hwm)
atexit.register(_report)
sys.argv = ["peerstar", *sys.argv[2:]]
runpy.run_module("peerstar", run_name="__main__", alter_sys=True)
"""


def run_cli(*args: str, timeout: float = 300) -> Run:
    """`python -m peerstar ARGS` in a child; its exit code, output and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rss"
        proc = subprocess.run([sys.executable, "-c", _MEASURED, str(report), *args],
                              capture_output=True, env=env, cwd=REPO, timeout=timeout)
        rss = int(report.read_text()) if report.exists() else -1
    assert rss > 0, f"peerstar {' '.join(args)} did not report its memory: {proc.stderr!r}"
    return Run(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"), rss)
