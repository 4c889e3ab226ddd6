"""The OCI image model: the primitives every stage of the flow shares, no stage logic.

- `mediatypes`: every media type and annotation name (the one place they are written);
- `digest`: digests (`is_digest`, `parse_digest`, `sha256_digest`) and streams that
  verify or hash;
- `reference`: `oci:DIR[:TAG]` / `docker-archive:FILE[:REF]` references and the tag rule
  (`is_tag`);
- `platform`: this machine's platform, `os/arch[/variant]`, matching index entries;
- `model`: descriptors and documents (plain dicts), checked and serialised;
- `layout`: `LayoutWriter(dir)` (add_blob/add_bytes/add_file, commit(top, tag)), the one
  way an OCI layout is written, atomically;
- `errors`: `OCIError` and its kinds.
The stages themselves: reading images `peerstar.source`, converting them
`peerstar.convert`, images in IPFS `peerstar.ipfsimage`.
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

__all__ = [
    "BlobError",
    "Descriptor",
    "Document",
    "ImageFormatError",
    "ImageRef",
    "ImageReferenceError",
    "LayoutWriteError",
    "LayoutWriter",
    "OCIError",
    "descriptor",
    "dump_json",
    "looks_like_image_ref",
    "parse_image_ref",
]
