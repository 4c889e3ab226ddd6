"""Media types and annotation names of OCI and Docker images, and the Docker -> OCI mapping.

The one place these names are written: every other module (the eStargz builder, sources,
conversion, push/pull, the registry, the mount) imports them from here. Only names, no I/O.
"""

from __future__ import annotations

# OCI image spec v1.
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
OCI_LAYOUT_VERSION = "1.0.0"

# Docker image manifest v2 schema 2.
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
# Schema 1 is signed JSON with a different structure; we refuse it with a clear message.
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
# Layers that hold a (possibly compressed) tar and so can be converted to eStargz.
LAYER_TYPES = frozenset({
    OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD,
    OCI_LAYER_ND_TAR, OCI_LAYER_ND_GZIP, OCI_LAYER_ND_ZSTD,
    DOCKER_LAYER_TAR, DOCKER_LAYER_GZIP, DOCKER_LAYER_FOREIGN_GZIP,
})

# What a client that reads any image we can handle sends as the manifest `Accept` header.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])

DOCKER_TO_OCI = {
    DOCKER_MANIFEST_LIST: OCI_INDEX,
    DOCKER_MANIFEST: OCI_MANIFEST,
    DOCKER_CONFIG: OCI_CONFIG,
    DOCKER_LAYER_TAR: OCI_LAYER_TAR,
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_LAYER_FOREIGN_GZIP: OCI_LAYER_ND_GZIP,
}

# Annotations. The eStargz / zstd:chunked ones are written by `peerstar.estargz.build` on
# each converted layer (REFERENCE.md section 1); containerd hands layer annotations under
# `containerd.io/snapshot/` to a remote snapshotter as labels of the same name.
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
ZSTD_MANIFEST_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"
# buildx attestation manifests point at their image with this index annotation.
DOCKER_REFERENCE_DIGEST_ANNOTATION = "vnd.docker.reference.digest"


def to_oci(media_type: str) -> str:
    """Return the OCI media type for a Docker one; other media types are returned unchanged."""
    return DOCKER_TO_OCI.get(media_type, media_type)
