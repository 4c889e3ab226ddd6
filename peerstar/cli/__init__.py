"""The `peerstar` command line: one argparse tree, one module per command group.

Each module in `COMMAND_MODULES` exposes `register(subparsers)`, which adds its
sub-commands and sets `func(args) -> int` on each. Errors a user can fix arrive as
`PeerstarError` and are printed on one line with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from peerstar.errors import PeerstarError

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
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # that capability is not part of this build yet
            raise
        module.register(sub)
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
    except KeyboardInterrupt:
        print("peerstar: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
