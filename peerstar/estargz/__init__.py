"""eStargz and zstd:chunked layers: build, read by range, verify.

Hand-written: no maintained Python library covers the eStargz format, so this
package implements it from the facts of containerd/stargz-snapshotter's `estargz/`
(v0.12.0). Everything here is pure format logic: bytes and streams in, values out;
reading goes through a caller-supplied `read_at(offset, length) -> bytes`, so the same
reader serves a local file, a bytes object or an HTTP Range fetcher.

Public API:
- `build(src, dst, ...) -> BuildResult`: a layer tar (plain, gzip or zstd) in, a blob
  written to the binary stream `dst`; it refuses what a reader would reject.
- `Reader.open(read_at, size, toc_digest=None)` / `Reader.from_bytes(blob)`: parse the
  footer and TOC; `lookup`, `listdir`, `walk`, `read`, `iter_chunk`, `verify`.
- `r.describe() -> LayerInfo`: what a layer descriptor records about an existing blob
  (DiffID, uncompressed size, media type, annotations), as `build` reports them.
- `EstargzError` and its subclasses for every malformed or lying input.

Modules: `compression` (gzip, legacy stargz and zstd:chunked behind one interface: member
(de)compression, footer parsing, TOC framing, annotations, media types, lookup by name
or by stream magic -- nothing else branches on the names), `footer` (footer bytes),
`toc` (entries, JSON, limits), `tree` (the tree a TOC describes), `tarfmt` (tar
headers), `decompress` (bounded streaming inflate), `reader`, `build` (the writer).
Memory and time stay bounded whatever an input declares (see `toc.TOC_MEMORY_LIMIT`).
"""

from peerstar.estargz.build import BuildResult, build
from peerstar.estargz.compression import Compression, LayerInfo
from peerstar.estargz.errors import EstargzError, FormatError, VerifyError
from peerstar.estargz.reader import Reader
from peerstar.estargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME, TOCEntry
from peerstar.oci.mediatypes import (
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    ZSTD_MANIFEST_CHECKSUM_ANNOTATION,
    ZSTD_MANIFEST_POSITION_ANNOTATION,
)

__all__ = [
    "BuildResult",
    "Compression",
    "EstargzError",
    "FormatError",
    "LayerInfo",
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "Reader",
    "TOCEntry",
    "TOC_DIGEST_ANNOTATION",
    "TOC_TAR_NAME",
    "UNCOMPRESSED_SIZE_ANNOTATION",
    "VerifyError",
    "ZSTD_MANIFEST_CHECKSUM_ANNOTATION",
    "ZSTD_MANIFEST_POSITION_ANNOTATION",
    "build",
]
