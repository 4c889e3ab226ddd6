"""The `docker://HOST/REPO:TAG` source: images read over the OCI distribution API.

Owns: parsing docker references (skopeo's `docker://` transport; a bare reference means
the same), `--creds`, and `RegistrySource`, a `SourceImage` over the distribution client
(`peerstar.distribution.client.RegistryClient`: HTTPS by default and `--plain-http` for
local registries, anonymous, basic and bearer-token auth) so push/convert treat a
registry like any other source.

Every manifest is verified against the digest it was asked for (or the one the
registry announces in `Docker-Content-Digest`); blobs are verified by `SourceImage`'s
verifying streams. Registry failures are the client's one-line `RegistryError`s
naming the image, the status and what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from peerstar.distribution.auth import RegistryAuth
from peerstar.distribution.client import RegistryClient
from peerstar.oci.digest import parse_digest
from peerstar.oci.errors import BlobError, ImageReferenceError
from peerstar.oci.model import Descriptor, Document, descriptor, kind_of
from peerstar.oci.reference import ImageRef, is_tag
from peerstar.source.image import MAX_DOCUMENT_BYTES, ReadAt, SourceImage

DOCKER = "docker"
DOCKER_HUB = "registry-1.docker.io"
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)"
                      r"[a-z0-9]+)*)*$")


@dataclass(frozen=True)
class DockerImageRef(ImageRef):
    """`docker://HOST/REPO:TAG` or `...@sha256:...`, split into its parts."""

    host: str = ""
    repository: str = ""
    reference: str = "latest"  # a tag or a digest

    def __str__(self) -> str:
        sep = "@" if self.reference.startswith("sha") and ":" in self.reference else ":"
        return f"docker://{self.host}/{self.repository}{sep}{self.reference}"


def parse_docker_ref(text: str) -> DockerImageRef:
    """Parse `docker://HOST/REPO[:TAG|@DIGEST]` (or the same without `docker://`)."""
    rest = text[len("docker://"):] if text.startswith("docker://") else text
    rest = rest.removeprefix("docker:")  # skopeo also accepts `docker:` + reference
    if not rest:
        raise ImageReferenceError(f"image {text!r}: empty docker reference")
    name, at, digest = rest.partition("@")
    reference = "latest"
    if at:
        parse_digest(digest, what=f"image {text!r}: digest")
        reference = digest
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
        if not is_tag(tag):
            raise ImageReferenceError(f"image {text!r}: {tag!r} is not a valid tag")
        if not at:
            reference = tag
    first, slash, remainder = name.partition("/")
    # As in Docker: the first component is a registry host when it looks like one.
    if slash and ("." in first or ":" in first or first == "localhost"):
        host, repository = first, remainder
    else:
        host, repository = DOCKER_HUB, name
    if host in ("docker.io", "index.docker.io"):
        host = DOCKER_HUB  # Docker Hub's API host
    if host == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"  # official images
    if not _REPO_RE.match(repository):
        raise ImageReferenceError(
            f"image {text!r}: {repository!r} is not a valid repository name (lower-case "
            "letters, digits, separators . _ -, components split by /)"
        )
    return DockerImageRef(DOCKER, Path(f"{host}/{repository}"), None, host=host,
                          repository=repository, reference=reference)


def parse_credentials(text: str | None) -> tuple[str, str] | None:
    """`USER:PASSWORD` (as skopeo's --creds) -> (user, password); None for None."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not user or not sep:
        raise ImageReferenceError("--creds must be USER:PASSWORD")
    return user, password


class RegistrySource(SourceImage):
    """An image in a registry; manifests are fetched on demand and kept in memory."""

    def __init__(self, ref: DockerImageRef, *, plain_http: bool = False,
                 timeout: float = 30.0, credentials: tuple[str, str] | None = None) -> None:
        super().__init__(ref)
        self.repository = ref.repository
        self.client = RegistryClient(ref.host, plain_http=plain_http, timeout=timeout,
                                     auth=RegistryAuth(*(credentials or (None, None))),
                                     label=str(ref))
        try:
            manifest = self.client.get_manifest(ref.repository, ref.reference,
                                                max_bytes=MAX_DOCUMENT_BYTES)
        except BaseException:
            self.client.close()
            raise
        kind_of(manifest.media_type)  # refuses schema 1 with a clear message
        self._memory[manifest.digest] = manifest.data
        self.top_descriptor = descriptor(manifest.media_type, manifest.digest,
                                         len(manifest.data))
        self.tag = None if ref.reference.startswith("sha") else ref.reference

    def read_document(self, desc: Descriptor) -> Document:
        digest = desc["digest"]
        if digest not in self._memory and kind_of(desc["mediaType"]) in ("index", "manifest"):
            # Manifests live under /manifests/, not /blobs/.
            manifest = self.client.get_manifest(self.repository, digest,
                                                max_bytes=MAX_DOCUMENT_BYTES)
            if manifest.digest != digest or len(manifest.data) != desc["size"]:
                raise BlobError(f"{self.ref}: manifest {digest} does not match its descriptor")
            self._memory[digest] = manifest.data
        return super().read_document(desc)

    def _open_raw(self, digest: str) -> tuple[BinaryIO, int]:
        stream = self.client.open_blob(self.repository, digest)
        # A RawIOBase, which typeshed does not count as BinaryIO; callers read and close.
        return stream, -1 if stream.size is None else stream.size  # type: ignore[return-value]  # see above

    def _range_raw(self, digest: str) -> tuple[ReadAt, int]:
        size = self.client.blob_size(self.repository, digest)

        def read_at(off: int, n: int) -> bytes:
            if off >= size or n <= 0:
                return b""
            with self.client.open_blob(self.repository, digest, start=off,
                                       length=min(n, size - off)) as stream:
                return stream.read()

        return read_at, size

    def close(self) -> None:
        super().close()
        self.client.close()
