"""`peerstar push SOURCE` and `peerstar pull ipfs://CID --output oci:DIR`: images in IPFS.

Owns argument handling and the display: per-blob rich progress bars on stderr when it is
a terminal (nothing otherwise, so scripts read clean output), the pushed image's CID as
the last line of stdout. The work is done by `peerstar.ipfsimage`.
"""

from __future__ import annotations

import argparse
import sys

from peerstar.cli.ipfs import add_store_args
from peerstar.cli.progress import Bars, human
from peerstar.errors import PeerstarError
from peerstar.ipfsimage import DEFAULT_JOBS
from peerstar.ipfsimage.pull import pull
from peerstar.ipfsimage.push import push
from peerstar.source.docker import parse_credentials


def _store_args(p: argparse.ArgumentParser) -> None:
    add_store_args(p)
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS, metavar="N",
                   help=f"blobs transferred at the same time (default {DEFAULT_JOBS})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="store an image in IPFS (nerdctl's format); prints its CID",
        description=(
            "Add every blob of an image to IPFS (CIDv1, pinned), rewrite its manifests and "
            "index with ipfs:// URLs and OCI media types, and print the CID of its top "
            "descriptor as the last line of stdout. SOURCE is oci:DIR[:TAG], "
            "docker-archive:FILE or docker://HOST/REPO:TAG (a bare reference means docker://)."
        ),
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--estargz", action="store_true",
                   help="convert every layer to eStargz first (gzip level 9, 4 MiB chunks)")
    plat = p.add_mutually_exclusive_group()
    plat.add_argument("--platform", action="append", metavar="OS/ARCH[/VARIANT]",
                      help="push only this platform of a multi-platform image (repeatable; "
                           "default: this machine's)")
    plat.add_argument("--all-platforms", action="store_true",
                      help="push every platform of a multi-platform image")
    p.add_argument("--plain-http", action="store_true",
                   help="talk HTTP, not HTTPS, to the docker:// registry (local registries)")
    p.add_argument("--creds", metavar="USER:PASSWORD",
                   help="registry credentials (default: anonymous; bearer tokens are fetched "
                        "either way)")
    _store_args(p)
    p.set_defaults(func=cmd_push)

    q = sub.add_parser(
        "pull",
        help="fetch an image from IPFS into an OCI image layout",
        description=(
            "Resolve the image descriptor at CID, fetch every blob by its ipfs:// URL, "
            "verify each digest while streaming and write an OCI image layout (atomically: "
            "on any error nothing is left behind)."
        ),
    )
    q.add_argument("image", metavar="ipfs://CID", help="the CID printed by push (ipfs:// "
                   "optional)")
    q.add_argument("--output", "-o", required=True, metavar="oci:DIR[:TAG]",
                   help="the OCI layout to write (tag default: latest)")
    _store_args(q)
    q.set_defaults(func=cmd_pull)


def _progress() -> Bars | None:
    """Per-blob bars with transfer speed on a terminal; nothing otherwise."""
    return Bars(speed=True) if sys.stderr.isatty() else None


def _check(args: argparse.Namespace) -> None:
    if args.timeout <= 0:
        raise PeerstarError(f"--timeout must be positive, not {args.timeout:g}")
    if args.retries < 0:
        raise PeerstarError(f"--retries must be >= 0, not {args.retries}")
    if args.jobs < 1:
        raise PeerstarError(f"--jobs must be >= 1, not {args.jobs}")


def cmd_push(args: argparse.Namespace) -> int:
    _check(args)
    credentials = parse_credentials(args.creds)
    progress = _progress()
    try:
        result = push(
            args.source, estargz=args.estargz, platforms=args.platform,
            all_platforms=args.all_platforms, ipfs_address=args.ipfs_address, root=args.root,
            plain_http=args.plain_http, timeout=args.timeout, retries=args.retries,
            progress=progress, jobs=args.jobs,
            credentials=credentials,
        )
    finally:
        if progress is not None:
            progress.close()
    top = result.descriptor
    print(f"pushed {top['mediaType']} {top['digest']} ({len(result.blobs)} blobs, "
          f"{human(result.bytes_added)} of layers and configs)", file=sys.stderr)
    print(result.cid)  # the last line of stdout, as nerdctl prints it
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    _check(args)
    progress = _progress()
    try:
        result = pull(
            args.image, args.output, ipfs_address=args.ipfs_address, root=args.root,
            timeout=args.timeout, retries=args.retries, progress=progress,
            jobs=args.jobs,
        )
    finally:
        if progress is not None:
            progress.close()
    top = result.descriptor
    if result.skipped_platforms:
        print(f"note: not in IPFS, left out: platforms {', '.join(result.skipped_platforms)} "
              "(pushed without --all-platforms)", file=sys.stderr)
    print(f"pulled ipfs://{result.cid}: {top['mediaType']} {top['digest']} "
          f"({human(result.bytes_fetched)}) -> oci:{result.output}:{result.tag}",
          file=sys.stderr)
    print(f"{top['digest']}")
    return 0

