"""Errors raised by `peerstar.oci`: bad references, malformed images, digest mismatches.

Every error is a `PeerstarError`, so the CLI prints it on one line with a non-zero exit.
"""

from __future__ import annotations

from peerstar.errors import PeerstarError


class OCIError(PeerstarError):
    """Base class for image-model errors (references, layouts, archives, blobs)."""


class ImageReferenceError(OCIError):
    """An image reference (`oci:DIR[:TAG]`, `docker-archive:FILE`) that cannot be used."""


class ImageFormatError(OCIError):
    """An image whose index, manifest, config or archive layout is malformed."""


class BlobError(OCIError):
    """A blob that is missing, has the wrong size or does not match its digest."""


class LayoutWriteError(OCIError):
    """The output OCI layout cannot be written (target in the way, disk errors)."""
