"""The `docker://HOST/REPO:TAG` source: images read over the OCI distribution API.

Owns: parsing docker references (skopeo's `docker://` transport; a bare reference means
the same), a small synchronous registry client (manifests incl. indexes, blobs streamed,
HTTP ranges, anonymous and bearer-token auth from the `WWW-Authenticate` challenge,
HTTPS by default and `--plain-http` for local registries), and `RegistrySource`, a
`SourceImage` over it so push/convert treat a registry like any other source.

Every manifest is verified against the digest it was asked for (or the one the
registry announces in `Docker-Content-Digest`); blobs are verified by `SourceImage`'s
verifying streams. Registry failures become one-line `RegistryError`s naming the
status and what to do.
"""

from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlencode, urlsplit

import httpx

from peerstar.distribution.challenge import parse_challenge, token_of, token_params
from peerstar.oci import mediatypes as mt
from peerstar.oci.digest import parse_digest, sha256_digest
from peerstar.oci.errors import BlobError, ImageReferenceError, OCIError
from peerstar.oci.model import Descriptor, Document, descriptor, kind_of, parse_document
from peerstar.oci.reference import ImageRef, is_tag
from peerstar.source.image import MAX_DOCUMENT_BYTES, ReadAt, SourceImage

DOCKER = "docker"
DOCKER_HUB = "registry-1.docker.io"
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)"
                      r"[a-z0-9]+)*)*$")


class RegistryError(OCIError):
    """A registry answered with an error, refused access, or could not be reached."""


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


def _is_loopback(host: str) -> bool:
    hostname = urlsplit("//" + host).hostname or ""
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def parse_credentials(text: str | None) -> tuple[str, str] | None:
    """`USER:PASSWORD` (as skopeo's --creds) -> (user, password); None for None."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not user or not sep:
        raise ImageReferenceError("--creds must be USER:PASSWORD")
    return user, password


class RegistryClient:
    """A synchronous OCI distribution client for one repository."""

    def __init__(self, ref: DockerImageRef, *, plain_http: bool = False,
                 timeout: float = 30.0, credentials: tuple[str, str] | None = None) -> None:
        self.ref = ref
        scheme = "http" if plain_http else "https"
        self.base = f"{scheme}://{ref.host}/v2/{ref.repository}"
        self._credentials = credentials
        self._token: str | None = None
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout), follow_redirects=True,
            # A proxy from the environment must not sit between us and a local registry.
            trust_env=not _is_loopback(ref.host),
        )

    def close(self) -> None:
        self._client.close()

    # -- plumbing ---------------------------------------------------------------------

    def _send(self, method: str, url: str, headers: dict[str, str], *,
              stream: bool = False) -> httpx.Response:
        """One request, authenticating once on a 401 challenge."""
        for attempt in range(2):
            h = dict(headers)
            if self._token:
                h["Authorization"] = f"Bearer {self._token}"
            elif self._credentials:
                user, password = self._credentials
                h["Authorization"] = "Basic " + base64.b64encode(
                    f"{user}:{password}".encode()).decode()
            try:
                req = self._client.build_request(method, url, headers=h)
                resp = self._client.send(req, stream=stream)
            except httpx.ConnectError as exc:
                hint = "" if url.startswith("http:") else (
                    "; for a registry without TLS pass --plain-http")
                raise RegistryError(
                    f"{self.ref}: cannot connect to registry {self.ref.host} ({exc}){hint}"
                ) from None
            except httpx.TimeoutException:
                raise RegistryError(
                    f"{self.ref}: registry {self.ref.host} did not answer in time"
                ) from None
            except httpx.TransportError as exc:
                raise RegistryError(f"{self.ref}: registry {self.ref.host}: {exc}") from None
            if resp.status_code != 401 or attempt:
                return resp
            challenge = resp.headers.get("www-authenticate", "")
            resp.read()  # so that callers can still report its error body
            resp.close()
            if not self._authenticate(challenge):
                return resp  # not a token challenge: the caller reports the 401
        raise AssertionError("unreachable")

    def _authenticate(self, challenge: str) -> bool:
        """Get a bearer token for the challenge; False when it is not a Bearer challenge."""
        scheme, params = parse_challenge(challenge)
        if scheme != "bearer":
            return False
        realm = params.get("realm", "")
        if not realm.startswith(("http://", "https://")):
            raise RegistryError(f"{self.ref}: registry sent a bad auth challenge {challenge!r}")
        query = token_params(params, f"repository:{self.ref.repository}:pull")
        auth = httpx.BasicAuth(*self._credentials) if self._credentials else None
        try:
            resp = self._client.get(f"{realm}?{urlencode(query)}", auth=auth)
        except httpx.TransportError as exc:
            raise RegistryError(f"{self.ref}: token service {realm}: {exc}") from None
        if resp.status_code != 200:
            raise RegistryError(
                f"{self.ref}: token service {realm} refused access (HTTP {resp.status_code}): "
                "the image is private or the credentials are wrong"
            )
        try:
            token = token_of(resp.json())
        except ValueError:
            token = None
        if token is None:
            raise RegistryError(f"{self.ref}: token service {realm} returned no token")
        self._token = token
        return True

    def _fail(self, resp: httpx.Response, what: str) -> RegistryError:
        code = resp.status_code
        detail = ""
        with contextlib.suppress(Exception):
            errors = resp.json().get("errors") or []
            if errors:
                detail = f": {errors[0].get('code', '')} {errors[0].get('message', '')}".rstrip()
        if code == 401:
            why = "authentication required (the image is private or the credentials are wrong)"
        elif code == 403:
            why = "access denied"
        elif code == 404:
            why = "not found"
        elif code >= 500:
            why = f"registry error (HTTP {code}); try again later"
        else:
            why = f"HTTP {code}"
        return RegistryError(f"{self.ref}: {what}: {why}{detail}")

    # -- API --------------------------------------------------------------------------

    def get_manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index; verified when possible."""
        url = f"{self.base}/manifests/{reference}"
        resp = self._send("GET", url, {"Accept": mt.MANIFEST_ACCEPT})
        if resp.status_code != 200:
            raise self._fail(resp, f"manifest {reference}")
        data = resp.content
        if len(data) > MAX_DOCUMENT_BYTES:
            raise RegistryError(f"{self.ref}: manifest {reference} is too large")
        digest = sha256_digest(data)
        expected = reference if reference.startswith("sha") and ":" in reference else (
            resp.headers.get("docker-content-digest"))
        if expected and expected.startswith("sha256:") and expected != digest:
            raise BlobError(
                f"{self.ref}: manifest {reference} hashes to {digest}, expected {expected}: "
                "the registry served corrupt content"
            )
        media_type = resp.headers.get("content-type", "").split(";")[0].strip()
        with contextlib.suppress(ValueError, AttributeError):
            declared = parse_document(data, where=str(self.ref)).get("mediaType")
            if isinstance(declared, str) and declared:
                media_type = declared
        return data, media_type, digest

    def open_blob(self, digest: str, *, start: int = 0, length: int | None = None
                  ) -> tuple[BinaryIO, int]:
        """A stream of a blob (or of a byte range of it) and the blob's length."""
        headers = {}
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            headers["Range"] = f"bytes={start}-{end}"
        resp = self._send("GET", f"{self.base}/blobs/{digest}", headers, stream=True)
        if resp.status_code not in (200, 206):
            resp.read()
            resp.close()
            raise self._fail(resp, f"blob {digest}")
        if headers and resp.status_code == 200:
            resp.close()
            raise RegistryError(f"{self.ref}: registry ignores Range requests for {digest}")
        size = int(resp.headers.get("content-length", "-1"))
        # A RawIOBase, which typeshed does not count as BinaryIO; callers read and close.
        return _ResponseStream(resp, self.ref), size  # type: ignore[return-value]


class _ResponseStream(io.RawIOBase):
    """A file-like view of a streamed httpx response body."""

    def __init__(self, resp: httpx.Response, ref: DockerImageRef) -> None:
        super().__init__()
        self._resp = resp
        self._ref = ref
        self._iter = resp.iter_raw(1 << 20)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._pending:
            try:
                self._pending = next(self._iter, b"")
            except httpx.HTTPError as exc:
                raise RegistryError(f"{self._ref}: blob download failed: {exc}") from None
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._resp.close()
        super().close()


class RegistrySource(SourceImage):
    """An image in a registry; manifests are fetched on demand and kept in memory."""

    def __init__(self, ref: DockerImageRef, *, plain_http: bool = False,
                 timeout: float = 30.0, credentials: tuple[str, str] | None = None) -> None:
        super().__init__(ref)
        self.client = RegistryClient(ref, plain_http=plain_http, timeout=timeout,
                                     credentials=credentials)
        try:
            data, media_type, digest = self.client.get_manifest(ref.reference)
        except BaseException:
            self.client.close()
            raise
        kind_of(media_type)  # refuses schema 1 with a clear message
        self._memory[digest] = data
        self.top_descriptor = descriptor(media_type, digest, len(data))
        self.tag = None if ref.reference.startswith("sha") else ref.reference

    def read_document(self, desc: Descriptor) -> Document:
        digest = desc["digest"]
        if digest not in self._memory and kind_of(desc["mediaType"]) in ("index", "manifest"):
            # Manifests live under /manifests/, not /blobs/.
            data, _, got = self.client.get_manifest(digest)
            if got != digest or len(data) != desc["size"]:
                raise BlobError(f"{self.ref}: manifest {digest} does not match its descriptor")
            self._memory[digest] = data
        return super().read_document(desc)

    def _open_raw(self, digest: str) -> tuple[BinaryIO, int]:
        return self.client.open_blob(digest)

    def _range_raw(self, digest: str) -> tuple[ReadAt, int]:
        head = self.client._send("HEAD", f"{self.client.base}/blobs/{digest}", {})
        head.close()
        if head.status_code != 200:
            raise self.client._fail(head, f"blob {digest}")
        size = int(head.headers.get("content-length", "0"))

        def read_at(off: int, n: int) -> bytes:
            if off >= size or n <= 0:
                return b""
            stream, _ = self.client.open_blob(digest, start=off, length=min(n, size - off))
            with stream:
                return stream.read()

        return read_at, size

    def close(self) -> None:
        super().close()
        self.client.close()

