"""Container images: the OCI/Docker image model, reading sources, writing OCI layouts.

Owns everything about images as opposed to single layers (`peerstar.estargz`):
- `reference`: skopeo-style references `oci:DIR[:TAG]`, `docker-archive:FILE[:REF]`;
- `mediatypes`, `model`, `digest`: constants, descriptor/document helpers, verified streams;
- `source`: `open_image(ref) -> SourceImage` (top_descriptor, read_blob, read_document,
  blob_range, walk) over OCI layouts and `docker save` archives;
- `layout`: `LayoutWriter(dir)` (add_blob/add_bytes/add_file, commit(top, tag)), atomic;
- `convert`: image and layer conversion to eStargz / zstd:chunked (imports the builder,
  so it is not imported here: push/pull can use the model without it).
"""

from peerstar.oci.errors import (
    BlobError,
    ImageFormatError,
    ImageReferenceError,
    LayoutWriteError,
    OCIError,
)
from peerstar.oci.layout import LayoutWriter
from peerstar.oci.model import Descriptor, Document, descriptor, dump_json
from peerstar.oci.reference import ImageRef, looks_like_image_ref, parse_image_ref
from peerstar.oci.source import Node, SourceImage, open_image

__all__ = [
    "BlobError",
    "Descriptor",
    "Document",
    "ImageFormatError",
    "ImageRef",
    "ImageReferenceError",
    "LayoutWriteError",
    "LayoutWriter",
    "Node",
    "OCIError",
    "SourceImage",
    "descriptor",
    "dump_json",
    "looks_like_image_ref",
    "open_image",
    "parse_image_ref",
]
