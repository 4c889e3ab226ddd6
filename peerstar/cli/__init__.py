"""The `peerstar` command line: one argparse tree, one module per command group.

Each module in `COMMAND_MODULES` exposes `register(subparsers)`, which adds its
sub-commands and sets `func(args) -> int` on each. Errors a user can fix arrive as
`PeerstarError` and are printed on one line with a non-zero exit, never a traceback; so
is a command that needs an optional part of peerstar that is not installed (`EXTRAS`:
which pip extra brings which module).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from peerstar.errors import PeerstarError

# Modules that only an extra installs, and that extra: `pip install 'peerstar[EXTRA]'`.
EXTRAS = {"pyfuse3": "fuse", "trio": "fuse", "grpc": "grpc", "grpc_tools": "grpc",
          "google": "grpc"}

# Order is the order of `peerstar --help`.
COMMAND_MODULES = [
    "peerstar.cli.demo",
    "peerstar.cli.convert",
    "peerstar.cli.estargz",
    "peerstar.cli.ipfs",
    "peerstar.cli.image",
    "peerstar.cli.registry",
    "peerstar.cli.lazy",
    "peerstar.cli.snapshotter",
    "peerstar.cli.k8s",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peerstar",
        description="Node-to-node container image sharing with lazy pulling.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import logging

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except PeerstarError as exc:
        print(f"peerstar: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        module = (exc.name or "").split(".")[0]
        extra = EXTRAS.get(module)
        if extra is None:
            raise
        print(f"peerstar: error: `peerstar {args.command}` needs the {extra!r} extra "
              f"(module {module!r} is not installed): pip install 'peerstar[{extra}]'"
              + (" (builds pyfuse3: needs libfuse3-dev and pkg-config)"
                 if extra == "fuse" else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peerstar: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
