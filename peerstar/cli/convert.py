"""`peerstar convert SRC DST`: a layer tar to an eStargz / zstd:chunked blob, or a whole
image (`oci:DIR[:TAG]`, `docker-archive:FILE`) to an OCI layout of converted layers.

Owns argument handling, progress display (a rich bar on a terminal, plain lines on
stderr otherwise) and the summaries (`--json` on stdout). The work is done by
`peerstar.convert`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
from pathlib import Path
from typing import Any

from peerstar.cli.progress import Bars, human
from peerstar.convert import ConvertOptions, convert, convert_layer_file
from peerstar.errors import PeerstarError
from peerstar.estargz.compression import writable
from peerstar.oci.reference import looks_like_image_ref, parse_image_ref

_SIZE_RE = re.compile(r"^(\d+)([kKmMgG]i?[bB]?|[bB])?$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a layer tar or an image to eStargz / zstd:chunked",
        description=(
            "Convert a single layer (a tar file, plain/gzip/zstd -> a blob file) or a whole "
            "image (oci:DIR[:TAG] or docker-archive:FILE -> an OCI layout oci:DIR[:TAG])."
        ),
    )
    p.add_argument("src", metavar="SRC",
                   help="layer tar file, oci:DIR[:TAG] or docker-archive:FILE")
    p.add_argument("dst", metavar="DST", help="blob file (for a layer) or oci:DIR[:TAG]")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--estargz", dest="compression", action="store_const", const="gzip",
                     help="gzip eStargz (default)")
    fmt.add_argument("--zstdchunked", dest="compression", action="store_const", const="zstd",
                     help="zstd:chunked")
    p.add_argument("--chunk-size", metavar="N", default="4MiB",
                   help="chunk size in bytes, or with a K/M/G suffix (default 4MiB)")
    p.add_argument("--level", metavar="L", type=int, default=None,
                   help="compression level (gzip 0-9, default 9; zstd 1-22, default 3)")
    pri = p.add_mutually_exclusive_group()
    pri.add_argument("--prioritize", metavar="PATH", nargs="+", action="extend", default=[],
                     help="files to put first (prefetched), in the layers that hold them")
    pri.add_argument("--prioritize-from", metavar="FILE",
                     help="read prioritized paths from FILE, one per line ('#' comments)")
    p.add_argument("--allow-missing-prioritized", action="store_true",
                   help="do not fail when a prioritized path is not in a layer")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.set_defaults(func=cmd_convert, compression="gzip")


def _parse_size(text: str) -> int:
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise PeerstarError(
            f"--chunk-size {text!r} is not a size: give bytes (4194304) or use a K/M/G "
            "suffix (4MiB)"
        )
    n = int(m.group(1)) * _UNITS[(m.group(2) or "")[:1].lower()]
    if n <= 0:
        raise PeerstarError(f"--chunk-size must be positive, not {text!r}")
    return n


def _prioritized(args: argparse.Namespace) -> tuple[str, ...]:
    if not args.prioritize_from:
        return tuple(args.prioritize)
    path = Path(args.prioritize_from)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PeerstarError(f"--prioritize-from {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PeerstarError(f"--prioritize-from {path}: cannot read: {exc}") from None
    return tuple(
        s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")
    )


def _options(args: argparse.Namespace) -> ConvertOptions:
    level = args.level
    if level is not None:
        codec = writable(args.compression)
        lo, hi = codec.levels
        if not lo <= level <= hi:
            raise PeerstarError(f"--level {level}: {codec.name} levels are {lo}..{hi}")
    return ConvertOptions(
        compression=args.compression,
        chunk_size=_parse_size(args.chunk_size),
        level=level,
        prioritized=_prioritized(args),
        allow_missing_prioritized=args.allow_missing_prioritized,
    )


class _PlainProgress:
    """One line per layer event on stderr (not a terminal: logs, CI)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def started(self, key: str, label: str, size: int | None) -> None:
        with self._lock:
            print(f"converting {label}", file=sys.stderr)

    def advanced(self, key: str, nbytes: int) -> None:
        pass

    def finished(self, key: str, label: str | None = None) -> None:
        if label:
            with self._lock:
                print(label, file=sys.stderr)

    def close(self) -> None:
        pass


def _make_progress(quiet: bool) -> _PlainProgress | Bars | None:
    if sys.stderr.isatty():
        return Bars()
    return None if quiet else _PlainProgress()


def cmd_convert(args: argparse.Namespace) -> int:
    options = _options(args)
    src_image = looks_like_image_ref(args.src)
    dst_image = looks_like_image_ref(args.dst)
    if src_image:
        src = parse_image_ref(args.src, role="SRC")
        if not dst_image:
            raise PeerstarError(
                f"DST {args.dst!r}: an image is written as an OCI layout; name it "
                f"oci:{args.dst}[:TAG]"
            )
        dst = parse_image_ref(args.dst, role="DST")
        if dst.transport != "oci":
            raise PeerstarError(
                f"DST {args.dst!r}: images are written as OCI layouts only; use oci:DIR[:TAG]"
            )
        return _convert_image(args, src, dst, options)
    if dst_image:
        parse_image_ref(args.dst, role="DST")  # an unknown transport is reported as such
        if Path(args.src).is_dir():
            raise PeerstarError(
                f"SRC {args.src!r} is a directory; for an OCI layout write oci:{args.src}"
            )
        raise PeerstarError(
            f"SRC {args.src!r} is a single layer file (or missing) and converts to a blob "
            "file, not an image; for an image write SRC as oci:DIR or docker-archive:FILE"
        )
    if Path(args.src).is_dir():
        raise PeerstarError(
            f"SRC {args.src!r} is a directory; for an OCI layout write oci:{args.src}"
        )
    return _convert_layer(args, options)


def _convert_layer(args: argparse.Namespace, options: ConvertOptions) -> int:
    progress = None
    advance = None
    if sys.stderr.isatty():
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(),
                            DownloadColumn(binary_units=True), transient=True)
        progress.start()
        task = progress.add_task(f"converting {Path(args.src).name}", total=None)

        def advance(n: int) -> None:
            progress.advance(task, n)

    try:
        report = convert_layer_file(args.src, args.dst, options, advance)
    finally:
        if progress is not None:
            progress.stop()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(f"{args.dst}: {report.blob_digest} ({human(report.blob_size)})")
        print(f"  TOC digest   {report.toc_digest}")
        print(f"  DiffID       {report.diff_id}")
        print(f"  uncompressed {report.uncompressed_size} bytes")
    for path in report.missing_prioritized:
        print(f"peerstar: note: prioritized path {path!r} is not in the layer", file=sys.stderr)
    return 0


def _convert_image(args: argparse.Namespace, src: Any, dst: Any,
                   options: ConvertOptions) -> int:
    progress = _make_progress(args.json)
    try:
        report = convert(src, dst, options, progress)
    finally:
        if progress is not None:
            progress.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    kept = sum(1 for la in report.layers if la.kept)
    tag = f" tag {report.tag}" if report.tag else ""
    kind = "image index" if report.top["mediaType"].endswith("index.v1+json") else "manifest"
    print(f"{report.destination}{tag}: {kind} {report.top['digest']}")
    print(f"  {len(report.manifests)} image manifest(s), {len(report.layers)} layer(s) "
          f"({kept} kept as already eStargz)")
    for la in report.layers:
        print(f"  {la.source_digest} -> {la.blob_digest} ({human(la.blob_size)}, "
              f"TOC {la.toc_digest})")
        if la.note:
            print(f"    note: {la.note}")
    return 0
