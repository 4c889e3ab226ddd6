"""The upstream registries a mirror fronts (`--mirror NS=URL`): their HTTP client.

Owns: `MirrorUpstream` (namespace, base URL), parsing of `[NS=]URL`, and `Origin`, a
small httpx.AsyncClient over the distribution API of one upstream: HEAD of a manifest
or blob (tag resolution, and the mirror's access check of a caller) and GET of a
manifest or blob as a stream, each with the caller's own Authorization header
forwarded, so the upstream decides what the caller may pull. `OriginError` is an
upstream that cannot be reached or answers garbage; `OriginStatus` an HTTP answer the
mirror passes on (401 with its challenge, 403, 404).

Not `peerstar.distribution.AsyncRegistryClient`: that client holds credentials and
answers challenges itself, while a mirror must not -- each request carries its caller's
own Authorization to the upstream, and the upstream's challenge goes back to the caller.
Trust (system store, certifi) is the one of every registry client (`distribution.tls`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from peerstar.distribution.tls import tls_context
from peerstar.errors import PeerstarError
from peerstar.oci.mediatypes import MANIFEST_ACCEPT

_NS = re.compile(r"\A[A-Za-z0-9.-]+(:[0-9]{1,5})?\Z")


@dataclass(frozen=True)
class MirrorUpstream:
    """One upstream: requests with `?ns=<ns>` go to `url` (scheme://host[:port])."""

    ns: str
    url: str


def parse_mirror(text: str) -> MirrorUpstream:
    """`[NS=]URL` -> MirrorUpstream; NS defaults to the URL's host[:port]."""
    ns, sep, url = text.strip().partition("=")
    if not sep:
        ns, url = "", ns
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("",
                                                                                        "/"):
        raise PeerstarError(f"--mirror {text!r}: the upstream must be http(s)://HOST[:PORT] "
                            "(e.g. docker.io=https://registry-1.docker.io)")
    ns = ns.strip() or parts.netloc
    if not _NS.match(ns):
        raise PeerstarError(f"--mirror {text!r}: {ns!r} is not a registry host[:port]")
    return MirrorUpstream(ns=ns, url=f"{parts.scheme}://{parts.netloc}")


class OriginError(PeerstarError):
    """The upstream could not be reached, or its answer makes no sense."""


class OriginStatus(PeerstarError):
    """The upstream answered `status` (401, 403, 404...): passed on to the caller."""

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        super().__init__(f"upstream answered HTTP {status}")
        self.status = status
        self.headers = headers


@dataclass(frozen=True)
class Head:
    digest: str
    media_type: str
    size: int


class Origin:
    """HTTP access to one upstream registry (`timeout` per connect/read)."""

    def __init__(self, upstream: MirrorUpstream, *, timeout: float = 30.0,
                 ca_file: str = "") -> None:
        self.upstream = upstream
        self._client = httpx.AsyncClient(base_url=upstream.url, follow_redirects=True,
                                         timeout=httpx.Timeout(timeout), trust_env=False,
                                         verify=tls_context(ca_file))

    async def close(self) -> None:
        await self._client.aclose()

    def _headers(self, auth: str | None, accept: str | None = None) -> dict[str, str]:
        headers = {"Accept": accept or MANIFEST_ACCEPT}
        if auth:
            headers["Authorization"] = auth
        return headers

    def _check(self, resp: httpx.Response) -> None:
        if resp.status_code >= 400:
            passed = {k: v for k, v in resp.headers.items()
                      if k.lower() in ("www-authenticate", "docker-distribution-api-version")}
            if resp.status_code in (401, 403, 404, 429):
                raise OriginStatus(resp.status_code, passed)
            raise OriginError(f"{self.upstream.url} answered HTTP {resp.status_code}")

    async def head(self, kind: str, name: str, ref: str, auth: str | None) -> Head:
        """The digest, media type and size `ref` names at the upstream (kind: manifests
        or blobs; a blob's digest is its ref when the upstream does not repeat it)."""
        try:
            resp = await self._client.head(f"/v2/{name}/{kind}/{ref}",
                                           headers=self._headers(auth))
        except httpx.HTTPError as exc:
            raise OriginError(f"{self.upstream.url}: {type(exc).__name__}: {exc}") from None
        self._check(resp)
        digest = resp.headers.get("Docker-Content-Digest", "" if kind == "manifests" else ref)
        try:
            size = int(resp.headers.get("Content-Length", "-1"))
        except ValueError:
            size = -1
        if not digest or size < 0:
            raise OriginError(f"{self.upstream.url}: HEAD {name}:{ref} gave no "
                              "Docker-Content-Digest or Content-Length")
        return Head(digest, resp.headers.get("Content-Type", ""), size)

    async def get(self, kind: str, name: str, digest: str, auth: str | None
                  ) -> tuple[str, int, AsyncIterator[bytes]]:
        """Start GET /v2/<name>/<kind>/<digest> (kind: manifests or blobs): its media type,
        size (-1 when not given) and body stream (which closes the response at its end)."""
        request = self._client.build_request("GET", f"/v2/{name}/{kind}/{digest}",
                                             headers=self._headers(auth))
        try:
            resp = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise OriginError(f"{self.upstream.url}: {type(exc).__name__}: {exc}") from None
        try:
            self._check(resp)
        except PeerstarError:
            await resp.aclose()
            raise
        try:
            size = int(resp.headers.get("Content-Length", "-1"))
        except ValueError:
            size = -1

        async def body() -> AsyncIterator[bytes]:
            try:
                async for piece in resp.aiter_bytes(1 << 18):
                    yield piece
            except httpx.HTTPError as exc:
                raise OriginError(f"{self.upstream.url}: reading {digest}: "
                                  f"{type(exc).__name__}: {exc}") from None
            finally:
                await resp.aclose()

        return resp.headers.get("Content-Type", "application/octet-stream"), size, body()
