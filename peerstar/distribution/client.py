"""A client of the OCI distribution API, synchronous (`RegistryClient`) and asyncio/trio
(`AsyncRegistryClient`, on httpx's anyio backend), for one registry host.

Owns: where a registry is (`registry_base`: `https://HOST`, or `http://HOST` for a
plain-HTTP host -- given explicitly, or containerd's rule `is_plain_http_host`:
localhost, 127.0.0.0/8, ::1), the httpx clients every registry request goes through
(`http_client` / `async_http_client`: `RegistryAuth`, the TLS trust of
`peerstar.distribution.tls`, redirects followed, no proxy from the environment for a
loopback host), manifests (GET and HEAD accepting the OCI and Docker types; a GET is
verified against the digest asked for, or the `Docker-Content-Digest` the registry
announces), blobs (HEAD for the size; GET of the whole blob or of one byte range,
streamed), and `RegistryError`, the one error for a registry that refused, failed or
could not be reached: it carries the HTTP status and the distribution error code
(`MANIFEST_UNKNOWN`, `UNAUTHORIZED`, ...) and its message says which registry, what
was asked and what to do.

Callers: the `docker://` image source (`peerstar.source.docker`), `peerstar mount`'s
manifest resolution (`peerstar.lazyfs.image`), the lazy fetcher and resolve-ahead
(`peerstar.lazyfs.fetcher`: its multi-range reads use `http_client` and `blob_url`), and
the snapshotter (`registry_base` with its insecure hosts).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from peerstar.distribution.auth import AUTH_FAILURE, RegistryAuth
from peerstar.distribution.tls import cert_error, tls_context
from peerstar.errors import PeerstarError
from peerstar.oci.digest import sha256_digest
from peerstar.oci.mediatypes import MANIFEST_ACCEPT

USER_AGENT = "peerstar"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest larger than this is refused, not read

# Why a lazy reader asks for a range: "toc", "on_demand", "readahead", "prefetch" or
# "background". peerstar's fetcher sends it to every registry (another server ignores
# it); peerstar's bridge uses it to serve what a container waits for before bulk reads,
# and to learn which ranges a container start needs. Absent: treated as "on_demand".
READ_KIND_HEADER = "Peerstar-Read-Kind"
READ_KINDS = frozenset({"toc", "on_demand", "readahead", "prefetch", "background"})


class RegistryError(PeerstarError):
    """A registry answered with an error, refused access, or could not be reached.
    `status` is the HTTP status (None when no answer came), `code` the first
    distribution error code of the answer's body ("" when it has none)."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# -- where a registry is ------------------------------------------------------------------

def _hostname(host: str) -> str:
    """`HOST[:PORT]` (`[v6]:PORT` too) -> the bare host name or address."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_plain_http_host(host: str) -> bool:
    """containerd's rule: localhost registries speak plain HTTP, every other one HTTPS."""
    name = _hostname(host)
    return name in ("localhost", "127.0.0.1", "::1") or name.startswith("127.")


def is_loopback(host: str) -> bool:
    """`host` (`HOST[:PORT]`) is this machine: no proxy may sit between us and it."""
    hostname = urlsplit("//" + host).hostname or ""
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def registry_base(host: str, plain_http: bool | None = None) -> str:
    """`http://HOST` when `plain_http` (None: containerd's rule), else `https://HOST`."""
    plain = is_plain_http_host(host) if plain_http is None else plain_http
    return f"{'http' if plain else 'https'}://{host}"


def blob_url(host: str, repository: str, digest: str, plain_http: bool | None = None) -> str:
    return f"{registry_base(host, plain_http)}/v2/{repository}/blobs/{digest}"


def manifest_url(host: str, repository: str, reference: str,
                 plain_http: bool | None = None) -> str:
    return f"{registry_base(host, plain_http)}/v2/{repository}/manifests/{reference}"


# -- the httpx clients ---------------------------------------------------------------------

def _client_options(host: str, auth: httpx.Auth | None, ca_file: str, timeout: float,
                    user_agent: str) -> dict[str, Any]:
    return {"auth": auth or RegistryAuth(), "follow_redirects": True,
            "verify": tls_context(ca_file), "timeout": httpx.Timeout(timeout),
            "headers": {"User-Agent": user_agent},
            # A proxy from the environment must not sit between us and a local registry.
            "trust_env": not is_loopback(host)}


def http_client(host: str, *, auth: httpx.Auth | None = None, ca_file: str = "",
                timeout: float = 30.0, user_agent: str = USER_AGENT) -> httpx.Client:
    """The synchronous httpx client for registry `host` (anonymous when `auth` is None)."""
    return httpx.Client(**_client_options(host, auth, ca_file, timeout, user_agent))


def async_http_client(host: str, *, auth: httpx.Auth | None = None, ca_file: str = "",
                      timeout: float = 30.0, user_agent: str = USER_AGENT
                      ) -> httpx.AsyncClient:
    """`http_client` for asyncio or trio code; `auth` may be shared with sync clients."""
    return httpx.AsyncClient(**_client_options(host, auth, ca_file, timeout, user_agent))


# -- answers, the same for both clients ----------------------------------------------------

@dataclass(frozen=True)
class Manifest:
    """A manifest or index as the registry served it (verified), with its media type."""

    data: bytes
    media_type: str
    digest: str


@dataclass(frozen=True)
class ManifestHead:
    """What a manifest HEAD tells: digest (None if the registry announces none), media
    type and size."""

    digest: str | None
    media_type: str
    size: int | None


def _is_digest(reference: str) -> bool:
    return reference.startswith("sha") and ":" in reference


def _media_type(resp: httpx.Response) -> str:
    return resp.headers.get("content-type", "").split(";")[0].strip()


def _length(resp: httpx.Response) -> int | None:
    value = resp.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def _error_code(resp: httpx.Response) -> tuple[str, str]:
    """(code, " CODE message") of the first distribution error in the (read) body."""
    with contextlib.suppress(Exception):
        errors = json.loads(resp.content).get("errors") or []
        if errors:
            code = str(errors[0].get("code", ""))
            return code, f": {code} {errors[0].get('message', '')}".rstrip()
    return "", ""


def error_for(resp: httpx.Response, label: str, what: str) -> RegistryError:
    """The RegistryError for an unwanted answer `resp` (its body read) to a request for
    `what` (e.g. "manifest v1"); `label` starts the message (the image or the host)."""
    status = resp.status_code
    code, detail = _error_code(resp)
    failure = resp.extensions.get(AUTH_FAILURE)
    if failure:
        return RegistryError(f"{label}: {failure}: the image is private or the credentials "
                             "are wrong", status=status, code=code)
    if status == 401:
        why = "authentication required (the image is private or the credentials are wrong)"
    elif status == 403:
        why = "access denied"
    elif status == 404:
        why = "not found"
    elif status >= 500:
        why = f"registry error (HTTP {status}); try again later"
    else:
        why = f"HTTP {status}"
    return RegistryError(f"{label}: {what}: {why}{detail}", status=status, code=code)


def transport_error(exc: httpx.TransportError, label: str, host: str, url: str
                    ) -> RegistryError:
    """The RegistryError for a request to `url` that got no answer."""
    if cert_error(exc) is not None:
        return RegistryError(f"{label}: TLS certificate of registry {host} not trusted "
                             f"({exc}); add its CA (--ca-file, [remote] ca_file or "
                             "SSL_CERT_FILE)")
    if isinstance(exc, httpx.ConnectError):
        hint = "" if url.startswith("http:") else (
            "; for a registry without TLS pass --plain-http")
        return RegistryError(f"{label}: cannot connect to registry {host} ({exc}){hint}")
    if isinstance(exc, httpx.TimeoutException):
        return RegistryError(f"{label}: registry {host} did not answer in time")
    return RegistryError(f"{label}: registry {host}: {exc}")


def _manifest_of(resp: httpx.Response, reference: str, label: str, max_bytes: int
                 ) -> Manifest:
    """The verified manifest in a (read) 200 answer to a manifest GET."""
    if resp.status_code != 200 or AUTH_FAILURE in resp.extensions:
        raise error_for(resp, label, f"manifest {reference}")
    data = resp.content
    if len(data) > max_bytes:
        raise RegistryError(f"{label}: manifest {reference} is too large ({len(data)} "
                            f"bytes; at most {max_bytes})")
    digest = sha256_digest(data)
    expected = reference if _is_digest(reference) else resp.headers.get(
        "docker-content-digest")
    if expected and expected.startswith("sha256:") and expected != digest:
        raise RegistryError(f"{label}: manifest {reference} hashes to {digest}, expected "
                            f"{expected}: the registry served corrupt content")
    media_type = _media_type(resp)
    with contextlib.suppress(ValueError, AttributeError):
        declared = json.loads(data).get("mediaType")
        if isinstance(declared, str) and declared:
            media_type = declared  # the document's word beats a generic Content-Type
    return Manifest(data, media_type, digest)


def _range_header(start: int, length: int | None) -> dict[str, str]:
    if not start and length is None:
        return {}
    end = "" if length is None else str(start + length - 1)
    return {"Range": f"bytes={start}-{end}"}


def _check_blob(resp: httpx.Response, digest: str, ranged: bool, label: str) -> None:
    """Raise unless `resp` (headers only) is the blob (or the range) asked for."""
    if resp.status_code not in (200, 206) or AUTH_FAILURE in resp.extensions:
        raise error_for(resp, label, f"blob {digest}")
    if ranged and resp.status_code == 200:
        raise RegistryError(f"{label}: registry ignores Range requests for {digest}",
                            status=200)


# -- the synchronous client -----------------------------------------------------------------

class BlobStream(io.RawIOBase):
    """A blob (or a range of it) being downloaded: a readable file object; `size` is the
    length of what it holds (None if the registry did not say). Close it when done."""

    def __init__(self, resp: httpx.Response, label: str) -> None:
        super().__init__()
        self.size = _length(resp)
        self.status = resp.status_code
        self._resp = resp
        self._label = label
        self._iter = resp.iter_raw(1 << 20)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if not self._pending:
            try:
                self._pending = next(self._iter, b"")
            except httpx.HTTPError as exc:
                raise RegistryError(f"{self._label}: blob download failed: {exc}") from None
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._resp.close()
        super().close()


class RegistryClient:
    """The distribution API of registry `host` (`HOST[:PORT]`), synchronously.

    `plain_http`: True/False, or None for containerd's rule (`is_plain_http_host`).
    `label` starts every error message (default: the host); `http` replaces the httpx
    client `http_client` would make (a test's mock transport), and is not closed."""

    def __init__(self, host: str, *, plain_http: bool | None = None,
                 auth: httpx.Auth | None = None, ca_file: str = "", timeout: float = 30.0,
                 label: str = "", http: httpx.Client | None = None) -> None:
        self.host = host
        self.base = registry_base(host, plain_http)
        self.label = label or host
        self._own = http is None
        self.http = http or http_client(host, auth=auth, ca_file=ca_file, timeout=timeout)

    def close(self) -> None:
        if self._own:
            self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, headers: dict[str, str], *,
              stream: bool = False) -> httpx.Response:
        url = f"{self.base}/v2/{path}"
        try:
            return self.http.send(self.http.build_request(method, url, headers=headers),
                                  stream=stream)
        except httpx.TransportError as exc:
            raise transport_error(exc, self.label, self.host, url) from None

    def get_manifest(self, repository: str, reference: str, *,
                     max_bytes: int = MAX_MANIFEST_BYTES) -> Manifest:
        """The manifest or index `reference` (tag or digest) of `repository`, verified."""
        resp = self._send("GET", f"{repository}/manifests/{reference}",
                          {"Accept": MANIFEST_ACCEPT})
        return _manifest_of(resp, reference, self.label, max_bytes)

    def head_manifest(self, repository: str, reference: str) -> ManifestHead:
        """Digest, media type and size of a manifest, without its body."""
        resp = self._send("HEAD", f"{repository}/manifests/{reference}",
                          {"Accept": MANIFEST_ACCEPT})
        if resp.status_code != 200 or AUTH_FAILURE in resp.extensions:
            raise error_for(resp, self.label, f"manifest {reference}")
        return ManifestHead(resp.headers.get("docker-content-digest"), _media_type(resp),
                            _length(resp))

    def blob_size(self, repository: str, digest: str) -> int:
        """The blob's length (a HEAD)."""
        resp = self._send("HEAD", f"{repository}/blobs/{digest}", {})
        size = _length(resp)
        if resp.status_code != 200 or AUTH_FAILURE in resp.extensions or size is None:
            raise error_for(resp, self.label, f"blob {digest}")
        return size

    def open_blob(self, repository: str, digest: str, *, start: int = 0,
                  length: int | None = None) -> BlobStream:
        """The blob, or `length` bytes of it from `start` (to its end if None), streamed;
        RegistryError if the registry will not serve the range."""
        headers = _range_header(start, length)
        resp = self._send("GET", f"{repository}/blobs/{digest}", headers, stream=True)
        try:
            if resp.status_code not in (200, 206) or AUTH_FAILURE in resp.extensions:
                # Its error body names the distribution error code; a registry answering
                # 416 may announce the blob's length and send a short text (distribution).
                with contextlib.suppress(httpx.HTTPError):
                    resp.read()
            _check_blob(resp, digest, bool(headers), self.label)
        except BaseException:
            resp.close()
            raise
        return BlobStream(resp, self.label)


# -- the asynchronous client ----------------------------------------------------------------

class AsyncBlobStream:
    """A blob (or range) being downloaded, for `async for chunk in stream`; `size` as
    `BlobStream`'s. Close it with `await stream.aclose()` (or `async with`)."""

    def __init__(self, resp: httpx.Response, label: str) -> None:
        self.size = _length(resp)
        self.status = resp.status_code
        self._resp = resp
        self._label = label

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.aiter_raw(1 << 20):
                yield chunk
        except httpx.HTTPError as exc:
            raise RegistryError(f"{self._label}: blob download failed: {exc}") from None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        await self._resp.aclose()

    async def __aenter__(self) -> AsyncBlobStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncRegistryClient:
    """`RegistryClient` for asyncio (and trio, through httpx's anyio backend)."""

    def __init__(self, host: str, *, plain_http: bool | None = None,
                 auth: httpx.Auth | None = None, ca_file: str = "", timeout: float = 30.0,
                 label: str = "", http: httpx.AsyncClient | None = None) -> None:
        self.host = host
        self.base = registry_base(host, plain_http)
        self.label = label or host
        self._own = http is None
        self.http = http or async_http_client(host, auth=auth, ca_file=ca_file,
                                              timeout=timeout)

    async def aclose(self) -> None:
        if self._own:
            await self.http.aclose()

    async def __aenter__(self) -> AsyncRegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, headers: dict[str, str], *,
                    stream: bool = False) -> httpx.Response:
        url = f"{self.base}/v2/{path}"
        try:
            return await self.http.send(
                self.http.build_request(method, url, headers=headers), stream=stream)
        except httpx.TransportError as exc:
            raise transport_error(exc, self.label, self.host, url) from None

    async def get_manifest(self, repository: str, reference: str, *,
                           max_bytes: int = MAX_MANIFEST_BYTES) -> Manifest:
        resp = await self._send("GET", f"{repository}/manifests/{reference}",
                                {"Accept": MANIFEST_ACCEPT})
        return _manifest_of(resp, reference, self.label, max_bytes)

    async def head_manifest(self, repository: str, reference: str) -> ManifestHead:
        resp = await self._send("HEAD", f"{repository}/manifests/{reference}",
                                {"Accept": MANIFEST_ACCEPT})
        if resp.status_code != 200 or AUTH_FAILURE in resp.extensions:
            raise error_for(resp, self.label, f"manifest {reference}")
        return ManifestHead(resp.headers.get("docker-content-digest"), _media_type(resp),
                            _length(resp))

    async def blob_size(self, repository: str, digest: str) -> int:
        resp = await self._send("HEAD", f"{repository}/blobs/{digest}", {})
        size = _length(resp)
        if resp.status_code != 200 or AUTH_FAILURE in resp.extensions or size is None:
            raise error_for(resp, self.label, f"blob {digest}")
        return size

    async def open_blob(self, repository: str, digest: str, *, start: int = 0,
                        length: int | None = None) -> AsyncBlobStream:
        headers = _range_header(start, length)
        resp = await self._send("GET", f"{repository}/blobs/{digest}", headers,
                                stream=True)
        try:
            if resp.status_code not in (200, 206) or AUTH_FAILURE in resp.extensions:
                with contextlib.suppress(httpx.HTTPError):
                    await resp.aread()
            _check_blob(resp, digest, bool(headers), self.label)
        except BaseException:
            await resp.aclose()
            raise
        return AsyncBlobStream(resp, self.label)
