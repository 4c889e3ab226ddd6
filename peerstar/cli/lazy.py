"""`peerstar mount REF DIR` / `peerstar unmount DIR`: an image's root filesystem, lazily.

Owns only the command line; the work is `peerstar.lazyfs.image` (resolve the manifest,
mount each eStargz layer over FUSE, overlay them read-only at DIR). `umount DIR` ends a
mount as cleanly as `peerstar unmount DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mount", help="mount an eStargz image from a registry lazily at DIR")
    p.add_argument("ref", metavar="REF", help="HOST/REPOSITORY[:TAG|@DIGEST], e.g. "
                   "localhost:5050/ipfs/<CID>")
    p.add_argument("dir", metavar="DIR", type=Path, help="an existing directory")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="region and chunk caches (default /var/lib/peerstar/lazyfs-cache)")
    p.add_argument("--cache-limit-mib", type=int, default=None,
                   help="bound of each cache (regions, chunks) in MiB (default 4096)")
    p.add_argument("--work-root", type=Path, default=None,
                   help="where layer mounts live (default /var/lib/peerstar/mounts)")
    p.add_argument("--prefetch-timeout", type=float, default=10.0,
                   help="seconds reads of prioritized files wait for their prefetch (default 10)")
    p.add_argument("--plain-http", action="store_true",
                   help="plain HTTP even for a non-localhost registry")
    p.add_argument("--no-background", action="store_true",
                   help="fetch only what is read (no idle-time fetch of the rest)")
    p.add_argument("--insecure-skip-verify", action="store_true",
                   help="DANGEROUS: serve chunks without checking their digests")
    p.add_argument("--ca-file", type=Path, default=None,
                   help="PEM bundle of CAs to trust for the registry besides the system's "
                        "(SSL_CERT_FILE replaces the system's)")
    p.add_argument("--username", default=None,
                   help="registry user (password from $PEERSTAR_REGISTRY_PASSWORD); "
                        "anonymous and bearer-token registries need nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_mount)

    u = sub.add_parser("unmount", help="unmount an image mounted with `peerstar mount`")
    u.add_argument("dir", metavar="DIR", type=Path)
    u.add_argument("--work-root", type=Path, default=None)
    u.set_defaults(func=cmd_unmount)


def cmd_mount(args: argparse.Namespace) -> int:
    import pyfuse3  # noqa: F401 - the mount daemons need it: without it, say which extra

    from peerstar.distribution.auth import RegistryAuth
    from peerstar.lazyfs import image
    from peerstar.lazyfs.options import CacheOptions, FetchOptions, MountOptions, PrefetchOptions

    ca_file = "" if args.ca_file is None else str(args.ca_file.resolve())
    cache = CacheOptions() if args.cache_limit_mib is None else CacheOptions(
        args.cache_limit_mib << 20, args.cache_limit_mib << 20)
    options = MountOptions(
        fetch=FetchOptions(ca_file=ca_file), cache=cache,
        prefetch=PrefetchOptions(timeout=args.prefetch_timeout,
                                 background=not args.no_background),
        verify=not args.insecure_skip_verify)
    auth = None
    if args.username is not None:
        from peerstar.lazyfs.state import PASSWORD_ENV  # the one name of the variable

        auth = RegistryAuth(args.username, os.environ.get(PASSWORD_ENV))
    summary = image.mount_image(
        args.ref, args.dir, cache_dir=args.cache_dir or image.DEFAULT_CACHE_DIR,
        work_root=args.work_root or image.DEFAULT_WORK_ROOT, options=options,
        plain_http=True if args.plain_http else None, auth=auth)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        layers = summary["layers"]
        assert isinstance(layers, list)
        print(f"mounted {args.ref} at {summary['target']} ({len(layers)} lazy layers; "
              f"`peerstar unmount {args.dir}` or `umount {args.dir}` to end)")
    return 0


def cmd_unmount(args: argparse.Namespace) -> int:
    from peerstar.lazyfs import image

    image.unmount_image(args.dir, args.work_root or image.DEFAULT_WORK_ROOT)
    return 0
