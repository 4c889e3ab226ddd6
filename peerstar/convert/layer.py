"""Converting one layer: a layer tar (plain, gzip or zstd) to an eStargz (gzip) or
zstd:chunked blob through `peerstar.estargz.build`, with the options and report both the
single-layer command and whole-image conversion use.

Owns `ConvertOptions`, `LayerReport`, `build_layer` (the builder run with its output
hashed independently), `convert_layer_file` (`peerstar convert LAYER.tar BLOB`, written
atomically with `localfile.atomic_write`). What a blob's descriptor records (DiffID,
annotations, media type) comes from `peerstar.estargz`, never recomputed here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from peerstar.estargz import BuildResult, EstargzError, build
from peerstar.localfile import atomic_write
from peerstar.oci.digest import HashingWriter
from peerstar.oci.errors import OCIError


class ConvertError(OCIError):
    """A layer or image that cannot be converted (the message names which and why)."""


@dataclass(frozen=True)
class ConvertOptions:
    """Options of a conversion; the output is a function of the input and these."""

    compression: str = "gzip"  # a `peerstar.estargz.compression.WRITABLE` name
    chunk_size: int = 4 << 20
    level: int | None = None
    prioritized: tuple[str, ...] = ()
    allow_missing_prioritized: bool = False
    workers: int | None = None  # compression threads inside one layer build
    layer_jobs: int | None = None  # layers converted at the same time
    keep_estargz: bool = True  # keep layers that already are in the requested format


@dataclass
class LayerReport:
    """What happened to one layer."""

    source_digest: str | None
    source_size: int
    toc_digest: str
    diff_id: str
    uncompressed_size: int
    blob_digest: str
    blob_size: int
    media_type: str
    annotations: dict[str, str]
    kept: bool = False
    missing_prioritized: list[str] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.source_digest is not None:
            out["sourceDigest"] = self.source_digest
        out.update({
            "tocDigest": self.toc_digest,
            "diffID": self.diff_id,
            "uncompressedSize": self.uncompressed_size,
            "blobDigest": self.blob_digest,
            "blobSize": self.blob_size,
        })
        if self.source_digest is not None:
            out["mediaType"] = self.media_type
            out["kept"] = self.kept
            if self.missing_prioritized:
                out["missingPrioritized"] = self.missing_prioritized
            if self.note:
                out["note"] = self.note
        return out


def build_layer(src: BinaryIO, dst: BinaryIO, options: ConvertOptions,
                advance: Callable[[int], None] | None, what: str,
                spool_dir: Path) -> tuple[BuildResult, str, int]:
    """Run the builder, hashing its output independently; return (result, digest, size).

    A compressed input is decompressed into `spool_dir`, beside the output, so big
    layers use the destination's disk rather than a possibly small /tmp."""
    hw = HashingWriter(dst)
    try:
        result = build(
            src, hw,  # type: ignore[arg-type]  # HashingWriter is a RawIOBase; build only writes to it
            compression=options.compression,
            chunk_size=options.chunk_size,
            level=options.level,
            prioritized=options.prioritized,
            allow_missing_prioritized=options.allow_missing_prioritized,
            workers=options.workers,
            progress=advance,
            spool_dir=str(spool_dir),
        )
    except EstargzError as exc:
        raise ConvertError(f"{what}: {exc}") from None
    if (hw.digest, hw.size) != (result.blob_digest, result.blob_size):
        # The builder's own bookkeeping disagrees with the bytes it wrote: a bug, not
        # bad input; refuse to record wrong digests.
        raise ConvertError(
            f"{what}: internal error: builder reported {result.blob_digest} "
            f"({result.blob_size} bytes) but wrote {hw.digest} ({hw.size} bytes)"
        )
    return result, hw.digest, hw.size


def convert_layer_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    options: ConvertOptions = ConvertOptions(),  # noqa: B008 - frozen dataclass
    advance: Callable[[int], None] | None = None,
) -> LayerReport:
    """Convert one layer tar (plain, gzip or zstd) at `src` to a blob at `dst`, atomically.

    `dst` must not exist (an existing empty file is replaced): we never overwrite data.
    """
    src_p, dst_p = Path(src), Path(dst)
    if not src_p.exists():
        raise ConvertError(f"source layer {src_p} does not exist")
    if not src_p.is_file():
        raise ConvertError(f"source layer {src_p} is not a file (expected a layer tar)")
    if dst_p.is_dir():
        raise ConvertError(
            f"destination {dst_p} is a directory; a single layer converts to a blob file "
            "(for images write oci:DIR)"
        )
    if dst_p.exists() and dst_p.stat().st_size > 0:
        raise ConvertError(
            f"destination {dst_p} already exists: refusing to overwrite it; remove it or "
            "choose another name"
        )
    if not dst_p.parent.is_dir():
        raise ConvertError(f"destination directory {dst_p.parent} does not exist")
    try:
        with atomic_write(dst_p) as out, open(src_p, "rb") as inp:
            result, digest, size = build_layer(inp, out, options, advance, str(src_p),
                                               dst_p.parent)
    except OSError as exc:
        raise ConvertError(f"converting {src_p} to {dst_p}: {exc}") from None
    return LayerReport(
        source_digest=None, source_size=src_p.stat().st_size,
        toc_digest=result.toc_digest, diff_id=result.diff_id,
        uncompressed_size=result.uncompressed_size, blob_digest=digest, blob_size=size,
        media_type=result.media_type, annotations=dict(result.annotations),
        missing_prioritized=list(result.missing_prioritized),
    )
