"""Which platforms of a multi-platform image a push takes (`peerstar push --platform`).

Owns `select_platforms`: the source image's top index reduced to the chosen platforms'
manifests (default: this machine's; `--all-platforms` keeps all), as the in-memory
`SelectedPlatforms` source view. Platform names and matching are `peerstar.oci.platform`.
"""

from __future__ import annotations

from typing import BinaryIO

from peerstar.ipfsimage.format import IPFSImageError, emit_document
from peerstar.oci import mediatypes as mt
from peerstar.oci.digest import sha256_digest
from peerstar.oci.model import INDEX, Descriptor, Document, index_children, kind_of
from peerstar.oci.platform import host_platform, parse_platform, platform_matches, show_platform
from peerstar.source import ReadAt, SourceImage


class SelectedPlatforms(SourceImage):
    """`inner` with its top index reduced to the manifests of the chosen platforms.

    The reduced index is a new document (kept in memory); every other blob is read from
    `inner`. An image whose top is a single manifest is used as it is.
    """

    def __init__(self, inner: SourceImage, index_bytes: bytes) -> None:
        super().__init__(inner.ref)
        self.inner = inner
        self.tag = inner.tag
        digest = sha256_digest(index_bytes)
        self._memory[digest] = index_bytes
        self.top_descriptor = {"mediaType": mt.OCI_INDEX, "digest": digest,
                               "size": len(index_bytes)}

    def read_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        if digest in self._memory:
            return super().read_blob(digest, size)
        return self.inner.read_blob(digest, size)

    def read_document(self, desc: Descriptor) -> Document:
        if desc["digest"] in self._memory:
            return super().read_document(desc)
        return self.inner.read_document(desc)

    def blob_range(self, digest: str) -> tuple[ReadAt, int]:
        if digest in self._memory:
            return super().blob_range(digest)
        return self.inner.blob_range(digest)

    def _open_raw(self, digest: str) -> tuple[BinaryIO, int]:
        return self.inner._open_raw(digest)

    def _range_raw(self, digest: str) -> tuple[ReadAt, int]:
        return self.inner._range_raw(digest)

    def close(self) -> None:
        super().close()
        self.inner.close()


def select_platforms(source: SourceImage, platforms: list[str] | None = None,
                     all_platforms: bool = False) -> SourceImage:
    """Keep the manifests of `platforms` (default: this machine's) from an index top.

    As in nerdctl, `all_platforms` keeps everything. Unlike containerd's converter we
    drop the other entries instead of keeping them unconverted: an entry left without an
    `ipfs://` URL could never be pulled.
    """
    top = source.top_descriptor
    if all_platforms or kind_of(top["mediaType"]) != INDEX:
        return source
    wanted = [parse_platform(p) for p in platforms] if platforms else [host_platform()]
    doc = source.read_document(top)
    entries = index_children(doc, where=f"{source.ref}: index {top['digest']}")
    kept = [e for e in entries if any(platform_matches(e.get("platform"), w)
                                      for w in wanted)]
    if not kept:
        have = ", ".join(sorted({show_platform(e.get("platform")) for e in entries}))
        want = ", ".join("/".join(p for p in w if p) for w in wanted)
        raise IPFSImageError(
            f"{source.ref}: no manifest for platform {want} in the index (it has: {have}); "
            "choose one with --platform or push them all with --all-platforms"
        )
    if len(kept) == len(entries):
        return source
    new_doc = dict(doc)
    new_doc["mediaType"] = mt.OCI_INDEX
    new_doc["manifests"] = kept
    return SelectedPlatforms(source, emit_document(new_doc))
