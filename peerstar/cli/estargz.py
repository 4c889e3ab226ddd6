"""`peerstar estargz verify|ls|cat`: inspect a local eStargz / zstd:chunked blob."""

from __future__ import annotations

import argparse
import base64
import json
import stat
import sys
from datetime import UTC, datetime

from peerstar.errors import PeerstarError
from peerstar.estargz import Reader, TOCEntry
from peerstar.estargz.reader import compute_diff_id
from peerstar.localfile import RangeFile


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


def _open(path: str, toc_digest: str | None = None) -> tuple[RangeFile, Reader]:
    f = RangeFile(path)
    try:
        return f, Reader.open(f.read_at, f.size, toc_digest=toc_digest)
    except PeerstarError as exc:
        f.close()
        raise PeerstarError(f"{path}: {exc}") from None


def cmd_verify(args: argparse.Namespace) -> int:
    f, r = _open(args.blob, args.toc_digest)
    with f:
        try:
            r.check_links()
            r.verify_all()
            if args.diff_id:
                got, _ = compute_diff_id(f.read_at, f.size, r.compression)
                if got != args.diff_id:
                    raise PeerstarError(f"DiffID is {got}, expected {args.diff_id}")
        except PeerstarError as exc:
            raise PeerstarError(f"{args.blob}: {exc}") from None
    files = sum(1 for e in r.entries if e.type == "reg")
    chunks = sum(1 for e in r.entries if e.is_data and e.chunk_size)
    print(f"OK {args.blob}: {r.compression}, {files} files, {chunks} chunks verified, "
          f"TOC {r.toc_digest}")
    return 0


def _type_char(e: TOCEntry) -> str:
    return {"dir": "d", "symlink": "l", "char": "c", "block": "b", "fifo": "p"}.get(e.type, "-")


def cmd_ls(args: argparse.Namespace) -> int:
    f, r = _open(args.blob)
    with f:
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
                mode = _type_char(e) + stat.filemode(e.mode)[1:]
                when = datetime.fromtimestamp(e.mtime(), UTC).strftime("%Y-%m-%d %H:%M")
                owner = f"{e.uname or e.uid}/{e.gname or e.gid}"
                link = f" -> {e.link_name}" if e.type == "symlink" else ""
                print(f"{mode} {owner:>12} {e.size:>10} {when} {path}{link}")
            else:
                print(path)
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    f, r = _open(args.blob)
    with f:
        try:
            data = r.read(args.path, args.offset, args.length)
        except (FileNotFoundError, IsADirectoryError, ValueError) as exc:
            raise PeerstarError(f"{args.blob}: {exc}") from None
        except PeerstarError as exc:
            raise PeerstarError(f"{args.blob}: {exc}") from None
    sys.stdout.buffer.write(data)
    return 0
