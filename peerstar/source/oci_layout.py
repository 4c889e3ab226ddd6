"""The `oci:DIR[:TAG]` source: an OCI image layout directory, read in place.

The TAG selects the index entry whose `org.opencontainers.image.ref.name` it is; without
one, a layout of one image gives it, and one of several untagged manifests (a
multi-platform image written straight into `index.json`) gives `index.json` itself as
the image index.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from peerstar.oci import mediatypes as mt
from peerstar.oci.digest import parse_digest, sha256_digest
from peerstar.oci.errors import BlobError, ImageFormatError, ImageReferenceError
from peerstar.oci.model import (
    Descriptor,
    Document,
    descriptor,
    dump_json,
    index_children,
    parse_document,
)
from peerstar.oci.reference import ImageRef
from peerstar.source.image import MAX_DOCUMENT_BYTES, ReadAt, SourceImage


class OCILayoutSource(SourceImage):
    """An OCI image layout directory (`oci-layout`, `index.json`, `blobs/<algo>/<hex>`)."""

    def __init__(self, ref: ImageRef) -> None:
        super().__init__(ref)
        root = ref.path
        if not root.exists():
            raise ImageReferenceError(f"{ref}: directory {root} does not exist")
        if not root.is_dir():
            raise ImageReferenceError(
                f"{ref}: {root} is not a directory; an oci: image is an OCI image layout "
                "directory (use docker-archive:FILE for `docker save` output)"
            )
        layout_file = root / "oci-layout"
        if not layout_file.is_file():
            raise ImageReferenceError(
                f"{ref}: {root} is not an OCI image layout (no oci-layout file)"
            )
        layout = _read_json_file(layout_file, ref)
        if not isinstance(layout.get("imageLayoutVersion"), str):
            raise ImageFormatError(f"{ref}: {layout_file} has no imageLayoutVersion")
        index_path = root / "index.json"
        if not index_path.is_file():
            raise ImageFormatError(f"{ref}: {root} has no index.json: the layout is incomplete")
        raw_index = _read_file(index_path, ref)
        index = parse_document(raw_index, where=f"{ref}: index.json")
        entries = index_children(index, where=f"{ref}: index.json")
        self.top_descriptor, self.tag = self._select(entries, raw_index, index)

    def _select(
        self, entries: list[Descriptor], raw_index: bytes, index: Document
    ) -> tuple[Descriptor, str | None]:
        ref = self.ref

        def name(d: Descriptor) -> str | None:
            ann = d.get("annotations")
            return ann.get(mt.REF_NAME_ANNOTATION) if isinstance(ann, dict) else None

        names = sorted({n for d in entries if (n := name(d))})
        if ref.tag is not None:
            hits = [d for d in entries if name(d) == ref.tag]
            if not hits:
                have = ", ".join(names) if names else "none"
                raise ImageReferenceError(
                    f"{ref}: no image tagged {ref.tag!r} in {ref.path} (tags: {have})"
                )
            if len(hits) > 1:
                raise ImageFormatError(
                    f"{ref}: {len(hits)} manifests carry the tag {ref.tag!r}: the layout is "
                    "ambiguous; fix its index.json"
                )
            return hits[0], ref.tag
        if len(entries) == 1:
            return entries[0], name(entries[0])
        if not entries:
            raise ImageReferenceError(f"{ref}: the layout {ref.path} holds no image")
        if not names:
            # Several untagged manifests (a multi-platform image written straight into
            # index.json): the index.json itself is the image index.
            doc = dict(index)
            doc.setdefault("mediaType", mt.OCI_INDEX)
            data = raw_index if "mediaType" in index else dump_json(doc)
            digest = sha256_digest(data)
            self._memory[digest] = data
            return descriptor(mt.OCI_INDEX, digest, len(data)), None
        raise ImageReferenceError(
            f"{ref}: the layout {ref.path} holds {len(entries)} images; choose one with "
            f"oci:{ref.path}:TAG (tags: {', '.join(names)})"
        )

    def _path(self, digest: str) -> Path:
        algo, hexpart = parse_digest(digest)
        return self.ref.path / "blobs" / algo / hexpart

    def _open_raw(self, digest: str) -> tuple[BinaryIO, int]:
        path = self._path(digest)
        try:
            f = open(path, "rb")  # noqa: SIM115 - returned to the caller
        except FileNotFoundError:
            raise BlobError(
                f"{self.ref}: blob {digest} is missing from the layout (no {path})"
            ) from None
        except OSError as exc:
            raise BlobError(f"{self.ref}: cannot read {path}: {exc.strerror}") from None
        return f, os.fstat(f.fileno()).st_size

    def _range_raw(self, digest: str) -> tuple[ReadAt, int]:
        f, size = self._open_raw(digest)
        self._range_files.append(f)  # closed by close()
        fd = f.fileno()
        return (lambda off, n: os.pread(fd, n, off)), size


def _read_file(path: Path, ref: ImageRef) -> bytes:
    try:
        if path.stat().st_size > MAX_DOCUMENT_BYTES:
            raise ImageFormatError(f"{ref}: {path} is too large to be image metadata")
        return path.read_bytes()
    except OSError as exc:
        raise ImageReferenceError(f"{ref}: cannot read {path}: {exc.strerror}") from None


def _read_json_file(path: Path, ref: ImageRef) -> Document:
    return parse_document(_read_file(path, ref), where=f"{ref}: {path.name}")
