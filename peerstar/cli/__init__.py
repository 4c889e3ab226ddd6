"""The `peerstar` command line: one argparse tree, one module per command group.

Each module in `COMMAND_MODULES` exposes `register(subparsers)`, which adds its
sub-commands and sets `func(args) -> int` on each. Errors a user can fix arrive as
`PeerstarError` and are printed on one line with a non-zero exit, never a traceback; so
is a command that needs an optional part of peerstar that is not installed (`EXTRAS`:
which pip extra brings which module). Every message is printed through
`escape.printable` (it may quote hostile input). Anything else that escapes a command
is a bug or an exhausted machine: it too is one line (`internal error`, exit 70; the
traceback with `-v`), as are running out of memory and an I/O error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from peerstar.cli.escape import printable
from peerstar.errors import PeerstarError
from peerstar.localfile import oserror_text

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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except PeerstarError as exc:
        _error(str(exc))
        return exc.exit_code
    except ModuleNotFoundError as exc:
        module = (exc.name or "").split(".")[0]
        extra = EXTRAS.get(module)
        if extra is None:
            return _internal_error(args, exc)
        _error(f"`peerstar {args.command}` needs the {extra!r} extra "
               f"(module {module!r} is not installed): pip install 'peerstar[{extra}]'"
               + (" (builds pyfuse3: needs libfuse3-dev and pkg-config)"
                  if extra == "fuse" else ""))
        return 2
    except KeyboardInterrupt:
        print("peerstar: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except MemoryError:
        _error("out of memory")
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"{where}{oserror_text(exc)}")
        return 1
    except Exception as exc:
        return _internal_error(args, exc)


def _error(message: str) -> None:
    print(f"peerstar: error: {printable(message)}", file=sys.stderr)


def _internal_error(args: argparse.Namespace, exc: BaseException) -> int:
    """A bug: one line, and the traceback in the log with -v."""
    logging.getLogger("peerstar").debug("internal error", exc_info=exc)
    hint = "" if args.verbose else "; run with -v for the traceback"
    _error(f"internal error in `peerstar {args.command}`: {type(exc).__name__}: {exc} "
           f"(a bug in peerstar; please report it{hint})")
    return 70
