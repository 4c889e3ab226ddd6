"""`peerstar ipfs add|cat|gc`: put a file into IPFS and read it back, for debugging.

Works on either backend (`peerstar.ipfs.open_store`): a daemon given by `--ipfs-address`
or found through `$IPFS_PATH/api` / `~/.ipfs/api`, else the embedded store under `--root`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import BinaryIO

from peerstar.errors import PeerstarError
from peerstar.ipfs import ContentStore, EmbeddedStore, open_store


def add_store_args(p: argparse.ArgumentParser) -> None:
    """The flags choosing an IPFS store (daemon or embedded), shared by every command."""
    p.add_argument("--ipfs-address", metavar="A",
                   help="IPFS HTTP API (multiaddr /ip4/H/tcp/P or URL); default: "
                        "$IPFS_PATH/api or ~/.ipfs/api, else the embedded store")
    p.add_argument("--root", type=Path, metavar="DIR",
                   help="embedded store directory (default ~/.local/share/peerstar)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="per-call timeout against a daemon, seconds (default 30)")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="retries after a failed daemon call (default 3)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ipfs", help="add/cat content in IPFS or the embedded store")
    s = p.add_subparsers(dest="ipfs_command", metavar="SUBCOMMAND", required=True)

    a = s.add_parser("add", help="add a file; print its CID (kubo's add --cid-version=1)")
    a.add_argument("file", help="file to add ('-' for stdin)")
    a.add_argument("--only-hash", action="store_true", help="compute the CID, store nothing")
    a.add_argument("--no-pin", action="store_true", help="do not pin the content")
    add_store_args(a)
    a.set_defaults(func=cmd_add)

    c = s.add_parser("cat", help="write the content of a CID to stdout")
    c.add_argument("cid")
    c.add_argument("--offset", type=int, default=0, metavar="N")
    c.add_argument("--length", type=int, default=None, metavar="N")
    add_store_args(c)
    c.set_defaults(func=cmd_cat)

    g = s.add_parser("gc", help="remove unpinned blocks from the embedded store")
    g.add_argument("--root", type=Path, metavar="DIR",
                   help="embedded store directory (default ~/.local/share/peerstar)")
    g.set_defaults(func=cmd_gc)


def _store(args: argparse.Namespace) -> ContentStore:
    if args.timeout <= 0:
        raise PeerstarError("--timeout must be > 0")
    if args.retries < 0:
        raise PeerstarError("--retries must be >= 0")
    return open_store(args.ipfs_address, args.root, timeout=args.timeout, retries=args.retries)


def cmd_add(args: argparse.Namespace) -> int:
    store = _store(args)  # a bad address is reported before the file is touched
    if args.file == "-":
        f: BinaryIO = sys.stdin.buffer
    else:
        try:
            f = open(args.file, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise PeerstarError(f"cannot read {args.file}: {exc.strerror}") from None

    async def run() -> str:
        try:
            return await store.add(f, pin=not args.no_pin, only_hash=args.only_hash)
        finally:
            await store.close()

    try:
        cid = asyncio.run(run())
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    print(cid)
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    if args.offset < 0:
        raise PeerstarError("--offset must be >= 0")
    if args.length is not None and args.length < 0:
        raise PeerstarError("--length must be >= 0")
    out = sys.stdout.buffer

    async def run() -> None:
        store = _store(args)
        try:
            async for part in store.cat(args.cid, args.offset, args.length):
                out.write(part)
        finally:
            await store.close()

    asyncio.run(run())
    out.flush()
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    store = EmbeddedStore(args.root)
    res = asyncio.run(store.gc())
    print(f"removed {res.removed_blocks} blocks ({res.removed_bytes} bytes), "
          f"kept {res.kept_blocks}")
    return 0
