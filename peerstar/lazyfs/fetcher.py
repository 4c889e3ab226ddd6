"""Fetch byte ranges of one remote blob over HTTP Range, region by region, with caching.

Owns: `BlobFetcher` -- size discovery (`HEAD`, following redirects; then `GET Range:
bytes=0-1` for a registry whose HEAD gives no length: a HEAD costs our bridge no IPFS
read, where two bytes of a blob on another node cost a round trip), reads rounded out to
fixed-size regions (default 50,000 bytes, as the stargz snapshotter does), the missing
regions of one read merged into one multi-range GET (206 single part, 206
`multipart/byteranges`, or 200 with the whole blob are all understood; a 400/416 to a
multi-range request switches the fetcher to one range per request for good), identical
in-flight region fetches shared between threads (singleflight), retries with exponential
backoff, and a per-request timeout.

Everything is synchronous and thread-safe: `read_at(offset, length)` is what
`peerstar.estargz.Reader.open` wants, and the FUSE filesystem calls it from worker
threads (`trio.to_thread`), so one slow fetch never blocks other reads.

URLs (`peerstar.distribution.client.blob_url` builds them), the HTTP client (auth,
TLS trust with the extra CA file `FetchOptions.ca_file`, redirects) are the
distribution client's (`peerstar.distribution.client.http_client`); the region and
multi-range logic above is the fetcher's own. A certificate the trust refuses, a 401, a
403 and a token service's refusal (`AUTH_FAILURE`) are not retried: each fails the read
at once with a sentence saying which host and what to do.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import httpx

from peerstar.distribution.auth import AUTH_FAILURE
from peerstar.distribution.client import READ_KIND_HEADER, http_client
from peerstar.distribution.tls import cert_error
from peerstar.errors import PeerstarError
from peerstar.lazyfs import metrics
from peerstar.lazyfs.cache import DiskCache
from peerstar.lazyfs.options import DEFAULT_REGION_SIZE

_T = TypeVar("_T")

log = logging.getLogger("peerstar.lazyfs.fetcher")

# Ranges per request: servers (ours included, see peerstar.registry.ranges.MAX_RANGES)
# refuse absurd Range headers; a read rarely has more gaps than this anyway.
MAX_RANGES_PER_REQUEST = 32


class FetchError(PeerstarError):
    """The blob bytes could not be fetched (after retries); `retryable` is False for 4xx."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class FetchStats:
    requests: int = 0
    fetched_bytes: int = 0  # payload bytes received from the server


def _parse_content_range(value: str) -> tuple[int, int, int | None]:
    """`bytes 10-19/100` -> (10, 20, 100): an exclusive end; total None when `*`."""
    unit, _, rest = value.strip().partition(" ")
    span, _, total = rest.partition("/")
    a, _, b = span.partition("-")
    if unit != "bytes" or not a.isdigit() or not b.isdigit():
        raise FetchError(f"malformed Content-Range {value!r}", retryable=False)
    return int(a), int(b) + 1, (int(total) if total.isdigit() else None)


def _parse_multipart(body: bytes, content_type: str) -> list[tuple[int, bytes]]:
    """Parts of a `multipart/byteranges` body as (start offset, bytes)."""
    boundary = ""
    for param in content_type.split(";")[1:]:
        k, _, v = param.strip().partition("=")
        if k.lower() == "boundary":
            boundary = v.strip().strip('"')
    if not boundary:
        raise FetchError("multipart/byteranges response without a boundary", retryable=False)
    delim = b"--" + boundary.encode()
    parts: list[tuple[int, bytes]] = []
    pos = 0
    while True:
        i = body.find(delim, pos)
        if i < 0:
            break
        pos = i + len(delim)
        if body[pos:pos + 2] == b"--":
            break  # closing delimiter
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise FetchError("truncated multipart/byteranges part", retryable=False)
        crange = None
        for line in body[pos:head_end].split(b"\r\n"):
            k, _, v = line.decode("latin-1").partition(":")
            if k.strip().lower() == "content-range":
                crange = v
        if crange is None:
            raise FetchError("multipart part without Content-Range", retryable=False)
        start, end, _ = _parse_content_range(crange)
        # Take exactly the part's length: the payload may contain the boundary bytes.
        data = body[head_end + 4: head_end + 4 + (end - start)]
        if len(data) != end - start:
            raise FetchError("truncated multipart/byteranges part", retryable=False)
        parts.append((start, data))
        pos = head_end + 4 + (end - start)
    return parts


class BlobFetcher:
    """Range reads of one blob at `url`, cached per region in `cache` (if given)."""

    def __init__(
        self,
        url: str,
        *,
        digest: str = "",
        size: int | None = None,
        region_size: int = DEFAULT_REGION_SIZE,
        cache: DiskCache | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
        auth: httpx.Auth | None = None,
        ca_file: str = "",
        max_ranges: int = MAX_RANGES_PER_REQUEST,
        client: httpx.Client | None = None,
    ) -> None:
        if region_size <= 0:
            raise ValueError("region_size must be positive")
        self.url = url
        self.digest = digest or url.rstrip("/").rsplit("/", 1)[-1]
        self.region_size = region_size
        self.cache = cache
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_ranges = max(1, max_ranges)
        self.single_range = False  # set for good once a server refuses multi-range
        self.stats = FetchStats()
        self._own_client = client is None
        self._client = client or http_client(urlsplit(url).netloc, auth=auth,
                                             ca_file=ca_file, timeout=timeout,
                                             user_agent="peerstar-lazyfs")
        self._lock = threading.Lock()
        # Regions known to be in the cache (fetched or hit by this process, or found by
        # `scan_cached`): the stats' percentage without a disk scan per request.
        self.cached_regions: set[int] = set()
        self._inflight: dict[int, Future[bytes]] = {}
        self._size = size
        self._label = self.digest[:19]

    # -- size ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        if self._size is None:
            self._size = self._with_retries(self._discover_size)
        return self._size

    def _discover_size(self) -> int:
        resp = self._client.head(self.url)
        self._check_auth(resp)
        length = resp.headers.get("Content-Length", "")
        if resp.status_code == 200 and length.isdigit():
            return int(length)
        if resp.status_code in (401, 403, 404):
            self._raise_for(resp)
        with self._client.stream("GET", self.url, headers={"Range": "bytes=0-1"}) as resp:
            self._check_auth(resp)
            if resp.status_code == 206:
                n = len(resp.read())  # two bytes, counted like every fetched byte
                with self._lock:
                    self.stats.requests += 1
                    self.stats.fetched_bytes += n
                _, _, total = _parse_content_range(resp.headers.get("Content-Range", ""))
                if total is not None:
                    return total
            elif resp.status_code == 200 and resp.headers.get("Content-Length", "").isdigit():
                return int(resp.headers["Content-Length"])  # body left unread
            else:
                self._raise_for(resp)
        raise FetchError(f"{self.url}: cannot learn the blob size (no Content-Length, no "
                         "Content-Range)", retryable=False)

    # -- regions ---------------------------------------------------------------------

    def _key(self, index: int) -> str:
        return f"{self.digest}/{self.region_size}/{index}"

    def region_span(self, index: int) -> tuple[int, int]:
        start = index * self.region_size
        return start, min(start + self.region_size, self.size)

    def num_regions(self) -> int:
        return (self.size + self.region_size - 1) // self.region_size

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    def is_cached(self, index: int) -> bool:
        return self.cache is not None and self._key(index) in self.cache

    def scan_cached(self) -> None:
        """Note every region already in the cache (left by an earlier mount)."""
        if self.cache is None:
            return
        found = {i for i in range(self.num_regions()) if self.is_cached(i)}
        with self._lock:
            self.cached_regions |= found

    def forget(self, offset: int, length: int) -> None:
        """Drop cached regions covering a byte range (bytes that failed verification)."""
        if self.cache is None or length <= 0:
            return
        for i in range(offset // self.region_size, (offset + length - 1) // self.region_size + 1):
            self.cache.discard(self._key(i))

    def read_at(self, offset: int, length: int, kind: str = "on_demand") -> bytes:
        """`length` bytes at `offset` (fewer only at the end of the blob)."""
        end = min(offset + length, self.size)
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if offset >= end:
            return b""
        first, last = offset // self.region_size, (end - 1) // self.region_size
        regions = self.get_regions(range(first, last + 1), kind)
        data = b"".join(regions[i] for i in range(first, last + 1))
        base = first * self.region_size
        return data[offset - base: end - base]

    def get_regions(self, indices: Iterable[int], kind: str = "on_demand") -> dict[int, bytes]:
        """The bytes of each region, from the cache or fetched (shared with other callers)."""
        result: dict[int, bytes] = {}
        missing = []
        for i in indices:
            a, b = self.region_span(i)
            data = self.cache.get(self._key(i), b - a) if self.cache is not None else None
            if data is None:
                missing.append(i)
            else:
                result[i] = data
                with self._lock:
                    self.cached_regions.add(i)
        if not missing:
            return result
        mine: list[int] = []
        waits: dict[int, Future[bytes]] = {}
        with self._lock:
            for i in missing:
                fut = self._inflight.get(i)
                if fut is None:
                    self._inflight[i] = Future()
                    mine.append(i)
                else:
                    waits[i] = fut
        if mine:
            try:
                got = self._fetch_regions(mine, kind)
            except BaseException as exc:
                with self._lock:
                    for i in mine:
                        self._inflight.pop(i).set_exception(exc)
                raise
            with self._lock:
                for i in mine:
                    self._inflight.pop(i).set_result(got[i])
            result.update(got)
        for i, fut in waits.items():
            result[i] = fut.result()
        return result

    def _fetch_regions(self, indices: list[int], kind: str) -> dict[int, bytes]:
        spans: list[list[int]] = []  # [first region, last region] runs of adjacent ones
        for i in sorted(indices):
            if spans and spans[-1][1] == i - 1:
                spans[-1][1] = i
            else:
                spans.append([i, i])
        out: dict[int, bytes] = {}
        for k in range(0, len(spans), self.max_ranges):
            batch = spans[k:k + self.max_ranges]
            byte_spans = [(self.region_span(a)[0], self.region_span(b)[1]) for a, b in batch]
            datas = self._with_retries(functools.partial(self._request, byte_spans, kind))
            for (a, b), data in zip(batch, datas, strict=True):
                for i in range(a, b + 1):
                    s, e = self.region_span(i)
                    base = self.region_span(a)[0]
                    piece = data[s - base: e - base]
                    out[i] = piece
                    if self.cache is not None:
                        self.cache.put(self._key(i), piece)
                        with self._lock:
                            self.cached_regions.add(i)
        return out

    # -- HTTP ------------------------------------------------------------------------

    def _with_retries(self, fn: Callable[[], _T]) -> _T:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except (httpx.TransportError, FetchError) as exc:
                cert = cert_error(exc)
                if cert is not None:
                    # Retrying cannot make an untrusted certificate trusted: fail now, so
                    # the snapshotter falls back at once instead of after the retries.
                    host = urlsplit(self.url).netloc
                    advice = ("it was issued for another name or address" if "mismatch" in
                              cert.lower() else
                              "add its CA to [remote] ca_file or SSL_CERT_FILE")
                    raise FetchError(
                        f"{self.url}: TLS certificate of {host} not trusted ({cert}); "
                        f"{advice}", retryable=False) from None
                retryable = not isinstance(exc, FetchError) or exc.retryable
                if not retryable or attempt == self.retries:
                    if isinstance(exc, FetchError):
                        raise
                    raise FetchError(f"{self.url}: {type(exc).__name__}: {exc}") from None
                log.info("%s: attempt %d failed (%s); retrying in %.2fs", self.url,
                         attempt + 1, exc, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _check_auth(self, resp: httpx.Response) -> None:
        """Fail at once when `resp` is a token service's refusal (`AUTH_FAILURE`), not
        the registry's answer: its status or body must not be taken for the blob's."""
        failure = resp.extensions.get(AUTH_FAILURE)
        if failure:
            host = urlsplit(self.url).netloc
            raise FetchError(f"{self.url}: {failure}: credentials missing or rejected for "
                             f"registry {host}", retryable=False)

    def _raise_for(self, resp: httpx.Response) -> None:
        if resp.status_code < 300:
            return
        if resp.status_code in (401, 403):
            host = urlsplit(self.url).netloc
            what = ("Unauthorized: credentials missing or rejected" if resp.status_code == 401
                    else "Forbidden: these credentials may not read it")
            raise FetchError(f"{self.url}: HTTP {resp.status_code} {what} by registry {host}",
                             retryable=False)
        retryable = resp.status_code >= 500 or resp.status_code in (408, 429)
        raise FetchError(f"{self.url}: HTTP {resp.status_code}", retryable=retryable)

    def _get(self, range_header: str, kind: str) -> httpx.Response:
        t0 = time.monotonic()
        resp = self._client.get(self.url, headers={"Range": range_header,
                                                   READ_KIND_HEADER: kind})
        self._check_auth(resp)
        metrics.FETCH_LATENCY.labels(self._label).observe(time.monotonic() - t0)
        n = len(resp.content)
        with self._lock:
            self.stats.requests += 1
            self.stats.fetched_bytes += n
        metrics.FETCHED_BYTES.labels(self._label, kind).inc(n)
        if kind == "on_demand":
            metrics.ON_DEMAND_FETCHES.labels(self._label).inc()
        return resp

    def _request(self, spans: list[tuple[int, int]], kind: str) -> list[bytes]:
        """The bytes of each [start, end) span, in as few requests as the server allows."""
        if len(spans) > 1 and self.single_range:
            return [self._request([s], kind)[0] for s in spans]
        header = "bytes=" + ",".join(f"{a}-{b - 1}" for a, b in spans)
        resp = self._get(header, kind)
        if resp.status_code in (400, 416) and len(spans) > 1:
            log.info("%s: multi-range request refused (HTTP %d): one range per request from "
                     "now on", self.url, resp.status_code)
            self.single_range = True
            return [self._request([s], kind)[0] for s in spans]
        self._raise_for(resp)
        parts: list[tuple[int, bytes]]
        if resp.status_code == 200:
            parts = [(0, resp.content)]
            if len(resp.content) != self.size:
                raise FetchError(f"{self.url}: 200 with {len(resp.content)} bytes, blob has "
                                 f"{self.size}")
        elif resp.status_code == 206:
            ctype = resp.headers.get("Content-Type", "")
            if ctype.lower().startswith("multipart/byteranges"):
                parts = _parse_multipart(resp.content, ctype)
            else:
                start, end, _ = _parse_content_range(resp.headers.get("Content-Range", ""))
                if len(resp.content) != end - start:
                    raise FetchError(f"{self.url}: short 206 body ({len(resp.content)} of "
                                     f"{end - start} bytes)")
                parts = [(start, resp.content)]
        else:
            raise FetchError(f"{self.url}: unexpected HTTP {resp.status_code}")
        out = []
        for a, b in spans:
            for start, data in parts:  # a server may coalesce or reorder ranges
                if start <= a and b <= start + len(data):
                    out.append(data[a - start: b - start])
                    break
            else:
                if len(spans) == 1:
                    raise FetchError(f"{self.url}: response does not cover bytes {a}-{b - 1}")
                # A server that answers only part of a multi-range: fetch the rest alone.
                out.append(self._request([(a, b)], kind)[0])
        return out

    def close(self) -> None:
        if self._own_client:
            self._client.close()
