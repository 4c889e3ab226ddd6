"""`peerstar estargz verify|ls|cat`: inspect a local eStargz / zstd:chunked blob.

Every error names the blob; names from the blob are printed escaped
(`escape.printable`) and times of any year are shown (the TOC may say year 10000).
`cat` writes a chunk's bytes only once the chunk is verified, keeping at most
`_IN_MEMORY` bytes of it in memory (a larger part goes through a temporary file), so
no blob can make it hold a huge chunk.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator

from peerstar.cli.escape import printable
from peerstar.errors import PeerstarError
from peerstar.estargz import Reader, TOCEntry
from peerstar.estargz.reader import ReadAt, compute_diff_id
from peerstar.estargz.toc import format_year, parse_modtime, utc_fields
from peerstar.localfile import RangeFile, oserror_text

_IN_MEMORY = 16 << 20


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estargz", help="inspect eStargz / zstd:chunked blobs")
    s = p.add_subparsers(dest="estargz_command", metavar="SUBCOMMAND", required=True)

    v = s.add_parser("verify", help="check the TOC digest and every chunk digest")
    v.add_argument("blob")
    v.add_argument("--toc-digest", help="expected TOC digest (sha256:...)")
    v.add_argument("--diff-id", help="also check the DiffID (decompresses the whole blob)")
    v.set_defaults(func=cmd_verify)

    ls = s.add_parser("ls", help="list the files in a blob")
    ls.add_argument("blob")
    ls.add_argument("-l", "--long", action="store_true", help="mode, owner, size, mtime")
    ls.add_argument("--json", action="store_true", help="one JSON object per path")
    ls.set_defaults(func=cmd_ls)

    c = s.add_parser("cat", help="print a file from a blob (verified)")
    c.add_argument("blob")
    c.add_argument("path")
    c.add_argument("--offset", type=int, default=0)
    c.add_argument("--length", type=int, default=-1)
    c.set_defaults(func=cmd_cat)


@contextlib.contextmanager
def _blob(path: str, toc_digest: str | None = None) -> Iterator[tuple[ReadAt, int, Reader]]:
    """(read_at, size, reader) of the blob at `path`; any problem with it, from opening
    to the last read, is one error that names it."""
    with RangeFile(path) as f:

        def read_at(offset: int, length: int) -> bytes:
            try:
                return f.read_at(offset, length)
            except OSError as exc:
                raise PeerstarError(f"cannot read: {oserror_text(exc)}") from None

        try:
            yield read_at, f.size, Reader.open(read_at, f.size, toc_digest=toc_digest)
        except PeerstarError as exc:
            raise PeerstarError(f"{path}: {exc}") from None


def cmd_verify(args: argparse.Namespace) -> int:
    with _blob(args.blob, args.toc_digest) as (read_at, size, r):
        r.verify()
        if args.diff_id:
            got, _ = compute_diff_id(read_at, size, r.codec)
            if got != args.diff_id:
                raise PeerstarError(f"DiffID is {got}, expected {args.diff_id}")
    files = sum(1 for e in r.entries if e.type == "reg")
    chunks = sum(1 for e in r.entries if e.is_data and e.chunk_size)
    print(f"OK {printable(args.blob)}: {r.compression}, {files} files, {chunks} chunks "
          f"verified, TOC {r.toc_digest}")
    return 0


def _type_char(e: TOCEntry) -> str:
    return {"dir": "d", "symlink": "l", "char": "c", "block": "b", "fifo": "p"}.get(e.type, "-")


def _when(e: TOCEntry) -> str:
    """The entry's mtime as "YYYY-MM-DD HH:MM" UTC, for any year (the epoch when the TOC
    has none or a malformed one)."""
    y, mo, d, hh, mm, _ = utc_fields(parse_modtime(e.modtime) or 0)
    return f"{format_year(y)}-{mo:02d}-{d:02d} {hh:02d}:{mm:02d}"


def cmd_ls(args: argparse.Namespace) -> int:
    with _blob(args.blob) as (_, _, r):
        for path, e in r.walk():
            if args.json:
                print(json.dumps({
                    "path": path, "type": e.type, "mode": e.mode, "uid": e.uid, "gid": e.gid,
                    "userName": e.uname, "groupName": e.gname, "size": e.size,
                    "modtime": e.modtime, "linkName": e.link_name, "numLink": e.num_link,
                    "devMajor": e.dev_major, "devMinor": e.dev_minor,
                    "xattrs": {k: base64.b64encode(v).decode() for k, v in e.xattrs.items()},
                    "chunks": [[c.chunk_offset, c.chunk_size] for c in r.chunks(path)],
                }))
            elif args.long:
                # Permission bits only: the TOC's mode may hold anything up to 2^63.
                mode = _type_char(e) + stat.filemode(e.mode & 0o7777)[1:]
                owner = printable(f"{e.uname or e.uid}/{e.gname or e.gid}")
                link = f" -> {printable(e.link_name)}" if e.type == "symlink" else ""
                print(f"{mode} {owner:>12} {e.size:>10} {_when(e)} {printable(path)}{link}")
            else:
                print(printable(path))
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    if args.offset < 0:
        raise PeerstarError(f"--offset must not be negative, not {args.offset}")
    out = sys.stdout.buffer
    with _blob(args.blob) as (_, _, r):
        e = r.lookup(args.path)
        if e is None:
            raise PeerstarError(f"{args.path!r} is not in this layer")
        if e.type != "reg":
            raise PeerstarError(f"{args.path!r} is a {e.type}, not a regular file")
        for chunk, lo, hi in r.chunk_spans(e, args.offset, args.length):
            if hi - lo <= _IN_MEMORY:
                out.write(b"".join(r.iter_chunk(chunk, lo, hi)))
                continue
            with tempfile.TemporaryFile(prefix="peerstar-cat-") as spool:
                for piece in r.iter_chunk(chunk, lo, hi):
                    spool.write(piece)
                spool.seek(0)  # the whole chunk verified: now its bytes may be shown
                shutil.copyfileobj(spool, out, 1 << 20)
    out.flush()
    return 0
