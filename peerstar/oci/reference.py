"""Image references in skopeo's transport syntax (`oci:DIR[:TAG]`, `docker-archive:FILE[:REF]`)
and the rules for tags.

As in containers/image, the part after the transport is split at its first colon: what
comes before is the path, what comes after is the tag (oci) or the image inside the
archive (docker-archive: `name:tag` from RepoTags, or `@N` for the N-th image).

Tags: `is_tag` is the distribution spec's rule, the one every tag a registry serves,
a `docker://` reference names or the sample image gets must follow. The `TAG` of
`oci:DIR:TAG` is an OCI layout's `org.opencontainers.image.ref.name` annotation, which
the image spec lets hold more (`:`, `/`, `@`, `+`, as in `name:with:colons`):
`is_ref_name`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from peerstar.oci.errors import ImageReferenceError

OCI = "oci"
DOCKER_ARCHIVE = "docker-archive"
SUPPORTED_TRANSPORTS = (OCI, DOCKER_ARCHIVE)
# Transports skopeo knows that we do not read; naming them gives a precise error.
KNOWN_UNSUPPORTED = (
    "docker", "dir", "oci-archive", "containers-storage", "docker-daemon", "ostree",
    "sif", "tarball",
)  # fmt: skip
_TRANSPORT_RE = re.compile(r"^[a-z][a-z0-9-]*$")
# The distribution spec's tag: [A-Za-z0-9_][A-Za-z0-9._-]{0,127}.
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
# OCI image-spec annotations: ref.name is a tag-ish string; keep it printable, no slashes
# at the ends, and nothing that could be confused with a path component.
_REF_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:/@+-]*$")


def is_tag(text: str) -> bool:
    """True for a tag as the distribution spec allows it (at most 128 characters)."""
    return _TAG_RE.match(text) is not None


def is_ref_name(text: str) -> bool:
    """True for a usable `org.opencontainers.image.ref.name` (the TAG of `oci:DIR:TAG`)."""
    return _REF_NAME_RE.match(text) is not None


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference."""

    transport: str  # "oci" or "docker-archive"
    path: Path
    tag: str | None = None  # oci: the ref.name; docker-archive: "name:tag" or "@N"

    def __str__(self) -> str:
        tail = f":{self.tag}" if self.tag else ""
        return f"{self.transport}:{self.path}{tail}"


def looks_like_image_ref(text: str) -> bool:
    """True when `text` starts with a transport name (`word:`) and is not an existing file.

    A plain path that happens to contain a colon (`./a:b`) is a file, not a reference;
    an existing file wins so that single-layer inputs with colons keep working.
    """
    transport, sep, _ = text.partition(":")
    if not sep or not _TRANSPORT_RE.match(transport):
        return False
    return not Path(text).exists()


def parse_image_ref(text: str, *, role: str = "image") -> ImageRef:
    """Parse `oci:DIR[:TAG]` or `docker-archive:FILE[:REF]`; raise `ImageReferenceError`."""
    transport, sep, rest = text.partition(":")
    if not sep:
        raise ImageReferenceError(
            f"{role} {text!r} has no transport: write oci:DIR[:TAG] or docker-archive:FILE"
        )
    if transport not in SUPPORTED_TRANSPORTS:
        known = " (a skopeo transport peerstar does not read)" if (
            transport in KNOWN_UNSUPPORTED) else ""
        raise ImageReferenceError(
            f"{role} {text!r}: unknown transport {transport!r}{known}; use oci:DIR[:TAG] "
            "(OCI image layout) or docker-archive:FILE (`docker save` output)"
        )
    path, _, tag = rest.partition(":")
    if not path:
        raise ImageReferenceError(f"{role} {text!r}: the path after {transport}: is empty")
    if tag == "":
        tag_opt = None
    else:
        tag_opt = tag
        if transport == OCI and not is_ref_name(tag):
            raise ImageReferenceError(
                f"{role} {text!r}: {tag!r} is not a valid tag (letters, digits, '._-:/@+', "
                "not starting with a separator)"
            )
    return ImageRef(transport, Path(path), tag_opt)
