"""A readable source image: the model every source (`oci:`, `docker-archive:`, `docker://`)
implements, so conversion and push treat them alike.

`SourceImage` has a `top_descriptor` (an index or a manifest), `read_blob(digest)` giving
a stream that verifies digest and size as it is read, `read_document(descriptor)` for
JSON blobs, `blob_range(digest)` for random access (the eStargz reader's `read_at`), and
`walk()` over every blob the image references. A source implements only `_open_raw` and
`_range_raw`; blobs it synthesises (a docker archive's manifest) live in `_memory`.
"""

from __future__ import annotations

import contextlib
import io
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from peerstar.oci.digest import parse_digest, verifying_stream
from peerstar.oci.errors import BlobError, ImageFormatError
from peerstar.oci.model import (
    BLOB,
    CONFIG,
    INDEX,
    LAYER,
    MANIFEST,
    Descriptor,
    Document,
    index_children,
    kind_of,
    manifest_children,
    parse_document,
)
from peerstar.oci.reference import ImageRef

ReadAt = Callable[[int, int], bytes]
# JSON documents (indexes, manifests, configs) are small; refuse absurd ones early.
MAX_DOCUMENT_BYTES = 64 << 20


@dataclass
class Node:
    """One blob reached by `SourceImage.walk()`."""

    descriptor: Descriptor
    kind: str  # model.INDEX, MANIFEST, CONFIG, LAYER or BLOB
    document: Document | None = None  # parsed JSON for indexes and manifests
    parents: list[str] = field(default_factory=list)  # digests of referencing documents


class SourceImage(ABC):
    """A readable image: a top descriptor and content-addressed blobs."""

    def __init__(self, ref: ImageRef) -> None:
        self.ref = ref
        self.top_descriptor: Descriptor = {}
        # The tag the image had in its source (ref.name, or the RepoTag's tag).
        self.tag: str | None = None
        # Blobs that exist only in memory (a synthesised manifest or index).
        self._memory: dict[str, bytes] = {}
        self._range_files: list[BinaryIO] = []

    # -- to implement ----------------------------------------------------------------

    @abstractmethod
    def _open_raw(self, digest: str) -> tuple[BinaryIO, int]:
        """An unverified stream of the stored blob and its stored size."""

    @abstractmethod
    def _range_raw(self, digest: str) -> tuple[ReadAt, int]:
        """Unverified random access to the stored blob."""

    def close(self) -> None:
        """Release files held open for `blob_range` readers."""
        while self._range_files:
            with contextlib.suppress(OSError):
                self._range_files.pop().close()

    # -- public ----------------------------------------------------------------------

    def check_blob(self, desc: Descriptor) -> None:
        """Raise `BlobError` unless the blob of `desc` is stored with the right size.

        Cheap (no hashing): lets a caller fail before long work; digests are still
        verified when the blob is read.
        """
        digest = desc["digest"]
        if digest in self._memory:
            stored = len(self._memory[digest])
        else:
            f, stored = self._open_raw(digest)
            f.close()
        if stored != desc["size"]:
            raise BlobError(
                f"{self.ref}: blob {digest} has {stored} bytes, its descriptor says "
                f"{desc['size']}: the image is truncated or corrupt"
            )

    def read_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        """A stream of the blob that raises `BlobError` at EOF if digest or size is wrong."""
        parse_digest(digest)
        if digest in self._memory:
            raw: BinaryIO = io.BytesIO(self._memory[digest])
        else:
            raw, stored = self._open_raw(digest)
            if size is not None and stored != size:
                raw.close()
                raise BlobError(
                    f"{self.ref}: blob {digest} has {stored} bytes, its descriptor says {size}: "
                    "the image is truncated or corrupt"
                )
        return verifying_stream(raw, digest, size, name=str(self.ref))

    def read_bytes(self, desc: Descriptor, *, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
        """The whole (verified) blob of `desc`; refuse blobs larger than `limit`."""
        if desc["size"] > limit:
            raise ImageFormatError(
                f"{self.ref}: {desc['mediaType']} blob {desc['digest']} claims {desc['size']} "
                f"bytes, more than the {limit} allowed for metadata: the image is corrupt"
            )
        with self.read_blob(desc["digest"], desc["size"]) as f:
            return f.read()

    def read_document(self, desc: Descriptor) -> Document:
        """Parse the JSON blob of an index, manifest or config descriptor."""
        return parse_document(
            self.read_bytes(desc), where=f"{self.ref}: {desc['mediaType']} {desc['digest']}"
        )

    def blob_range(self, digest: str) -> tuple[ReadAt, int]:
        """(read_at, size) over the stored blob, unverified: for format readers."""
        parse_digest(digest)
        if digest in self._memory:
            view = memoryview(self._memory[digest])
            return (lambda off, n: bytes(view[off : off + n])), len(view)
        return self._range_raw(digest)

    def walk(self) -> Iterator[Node]:
        """Every blob the image references, each once, documents before their children.

        Indexes and manifests come with their parsed JSON. The `subject` of a manifest
        (OCI referrers) is not followed: it points at another image.
        """
        seen: dict[str, Node] = {}

        def visit(desc: Descriptor, kind: str, parent: str | None) -> Iterator[Node]:
            digest = desc["digest"]
            if digest in seen:
                if parent:
                    seen[digest].parents.append(parent)
                return
            node = Node(desc, kind, parents=[parent] if parent else [])
            seen[digest] = node
            where = f"{self.ref}: {desc['mediaType']} {digest}"
            if kind == INDEX:
                node.document = self.read_document(desc)
                yield node
                for child in index_children(node.document, where=where):
                    yield from visit(child, _child_kind(child), digest)
            elif kind == MANIFEST:
                node.document = self.read_document(desc)
                yield node
                config, layers = manifest_children(node.document, where=where)
                yield from visit(config, CONFIG if kind_of(config["mediaType"]) == CONFIG
                                 else BLOB, digest)
                for layer in layers:
                    yield from visit(layer, LAYER if kind_of(layer["mediaType"]) == LAYER
                                     else BLOB, digest)
            else:
                yield node

        top = self.top_descriptor
        yield from visit(top, _child_kind(top), None)

    def __enter__(self) -> SourceImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _child_kind(desc: Descriptor) -> str:
    kind = kind_of(desc["mediaType"])
    return kind if kind in (INDEX, MANIFEST) else BLOB
