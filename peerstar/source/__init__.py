"""Source images, the first stage of the flow (source -> convert -> IPFS -> registry ->
fetcher -> FUSE -> containerd): reading an image from where it is, and making the sample.

- `open_image(ref)` -> `SourceImage` (`image`): one reader for every transport:
  `oci:DIR[:TAG]` (`oci_layout`), `docker-archive:FILE[:REF]` (`docker_archive`),
  `docker://HOST/REPO[:TAG|@DIGEST]` or a bare registry reference (`docker`);
- `sample`: the small deterministic sample image (tests, benchmarks, `peerstar demo`),
  written as an OCI layout or a `docker save` archive.
Reading only: conversion is `peerstar.convert`, pushing `peerstar.ipfsimage`, writing
layouts `peerstar.oci.layout`.
"""

from __future__ import annotations

from pathlib import Path

from peerstar.oci.errors import ImageReferenceError
from peerstar.oci.reference import (
    DOCKER_ARCHIVE,
    KNOWN_UNSUPPORTED,
    OCI,
    SUPPORTED_TRANSPORTS,
    ImageRef,
    parse_image_ref,
)
from peerstar.source.docker_archive import DockerArchiveSource
from peerstar.source.image import Node, ReadAt, SourceImage
from peerstar.source.oci_layout import OCILayoutSource

__all__ = ["DockerArchiveSource", "Node", "OCILayoutSource", "ReadAt", "SourceImage",
           "open_image"]


def open_image(ref: ImageRef | str, *, plain_http: bool = False, timeout: float = 30.0,
               credentials: tuple[str, str] | None = None) -> SourceImage:
    """Open a source image for reading: `oci:DIR[:TAG]`, `docker-archive:FILE[:REF]`,
    `docker://HOST/REPO:TAG` or a bare registry reference (which means `docker://`).

    `plain_http`, `timeout` and `credentials` apply to registries only.
    """
    if isinstance(ref, str):
        text = ref
        transport, sep, _ = text.partition(":")
        if text.startswith("docker:") or not sep or (
                transport not in SUPPORTED_TRANSPORTS and transport not in KNOWN_UNSUPPORTED):
            # Imported here: the HTTP client is only needed for registries.
            from peerstar.source.docker import RegistrySource, parse_docker_ref

            if not text.startswith("docker:") and Path(text).exists():
                kind = "oci:" if Path(text).is_dir() else "docker-archive:"
                raise ImageReferenceError(
                    f"source {text!r} is a local path, not a registry reference: write "
                    f"{kind}{text}")
            return RegistrySource(parse_docker_ref(text), plain_http=plain_http,
                                  timeout=timeout, credentials=credentials)
        ref = parse_image_ref(text, role="source image")
    if ref.transport == OCI:
        return OCILayoutSource(ref)
    if ref.transport == DOCKER_ARCHIVE:
        return DockerArchiveSource(ref)
    raise ImageReferenceError(f"{ref}: unsupported transport {ref.transport!r}")
