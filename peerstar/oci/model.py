"""The image model: descriptors, manifests, indexes and configs as plain dicts.

JSON documents stay plain `dict`s (so unknown fields survive a round trip); these
helpers classify and check them and serialise new ones deterministically.
"""

from __future__ import annotations

import json
from typing import Any

from peerstar.oci import mediatypes as mt
from peerstar.oci.digest import parse_digest
from peerstar.oci.errors import ImageFormatError

Descriptor = dict[str, Any]
Document = dict[str, Any]

INDEX = "index"
MANIFEST = "manifest"
CONFIG = "config"
LAYER = "layer"
BLOB = "blob"  # anything else a manifest references (artifacts, attestations)


def descriptor(
    media_type: str,
    digest: str,
    size: int,
    *,
    annotations: dict[str, str] | None = None,
    platform: dict[str, Any] | None = None,
) -> Descriptor:
    """A new descriptor in the field order the OCI spec and containers/image use."""
    d: Descriptor = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        d["annotations"] = dict(annotations)
    if platform:
        d["platform"] = dict(platform)
    return d


def check_descriptor(d: object, *, where: str) -> Descriptor:
    """Check that `d` is a usable descriptor (mediaType, valid digest, size >= 0)."""
    if not isinstance(d, dict):
        raise ImageFormatError(f"{where}: descriptor is not a JSON object: the image is corrupt")
    if not isinstance(d.get("mediaType"), str) or not d["mediaType"]:
        raise ImageFormatError(f"{where}: descriptor has no mediaType: the image is corrupt")
    parse_digest(d.get("digest"), what=f"{where}: digest")
    size = d.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageFormatError(
            f"{where}: descriptor size {size!r} is not a non-negative integer: the image is "
            "corrupt"
        )
    annotations = d.get("annotations")
    if annotations is not None and not (isinstance(annotations, dict) and all(
            isinstance(v, str) for v in annotations.values())):
        raise ImageFormatError(
            f"{where}: descriptor annotations are not a map of strings: the image is corrupt")
    if d.get("platform") is not None and not isinstance(d["platform"], dict):
        raise ImageFormatError(f"{where}: descriptor platform is not an object: the image is "
                               "corrupt")
    return d


def parse_document(data: bytes, *, where: str) -> Document:
    """Parse a JSON object (index, manifest or config) or raise `ImageFormatError`."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # (deep nesting)
        raise ImageFormatError(f"{where}: not valid JSON ({exc}): the image is corrupt") from None
    if not isinstance(doc, dict):
        raise ImageFormatError(f"{where}: expected a JSON object: the image is corrupt")
    return doc


def kind_of(media_type: str) -> str:
    """Classify a descriptor's media type: INDEX, MANIFEST, CONFIG, LAYER or BLOB."""
    if media_type in mt.INDEX_TYPES:
        return INDEX
    if media_type in mt.MANIFEST_TYPES:
        return MANIFEST
    if media_type in mt.CONFIG_TYPES:
        return CONFIG
    if media_type in mt.LAYER_TYPES:
        return LAYER
    if media_type in (mt.DOCKER_MANIFEST_V1, mt.DOCKER_MANIFEST_V1_SIGNED):
        raise ImageFormatError(
            f"Docker schema 1 manifests ({media_type}) are not supported: convert the image "
            "to schema 2 or OCI first (e.g. `skopeo copy` with a current skopeo)"
        )
    return BLOB


def manifest_children(doc: Document, *, where: str) -> tuple[Descriptor, list[Descriptor]]:
    """The config descriptor and layer descriptors of an image manifest, checked."""
    config = check_descriptor(doc.get("config"), where=f"{where} config")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ImageFormatError(f"{where}: manifest has no layers list: the image is corrupt")
    return config, [check_descriptor(d, where=f"{where} layer {i}") for i, d in enumerate(layers)]


def index_children(doc: Document, *, where: str) -> list[Descriptor]:
    """The manifest descriptors of an image index, checked."""
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise ImageFormatError(f"{where}: index has no manifests list: the image is corrupt")
    return [check_descriptor(d, where=f"{where} entry {i}") for i, d in enumerate(manifests)]


def remap_reference(entry: Descriptor, remap: dict[str, str]) -> None:
    """Re-point an index entry's `vnd.docker.reference.digest` annotation (buildx's
    attestation manifests name their image by digest) at the image's new digest, when
    `remap` (old -> new) rewrote it."""
    ann = entry.get("annotations")
    ref = ann.get(mt.DOCKER_REFERENCE_DIGEST_ANNOTATION) if ann else None
    if ref in remap:
        entry["annotations"] = {**(ann or {}), mt.DOCKER_REFERENCE_DIGEST_ANNOTATION: remap[ref]}


def dump_json(doc: Any) -> bytes:
    """Serialise a document compactly (as Go's json.Marshal does), deterministically."""
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate escape in the source stays escaped
        return json.dumps(doc, separators=(",", ":")).encode()
