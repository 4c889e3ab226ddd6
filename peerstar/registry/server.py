"""The read-only OCI distribution server over IPFS (`peerstar registry serve`).

Owns: the aiohttp application (routes `/v2/`, `/v2/ipfs/<cid>/manifests/<ref>`,
`/v2/ipfs/<cid>/blobs/<digest>`, `/v2/ipfs/<cid>/tags/list`, and in mirror mode
`/v2/<name>/manifests|blobs/...?ns=`, resolved by `mirror.Mirror`), response headers, Range /
multi-range / If-Range handling, streaming with bounded writes, distribution-spec JSON
errors, the structured access log, Prometheus metrics, and binding (loopback unless the
caller allows otherwise).

A request costs at most one ranged read of the store (`ContentStore.cat`, the only way
content is read) of the bytes it serves: the descriptor tree is
walked once per root CID (`tree.TreeCache`), manifests are served from that cache, HEAD
never reads content. The cat names the deepest node of the blob's UnixFS DAG that holds
the whole range, once that node is known (`subdag.SubDagLocator`), which spares the
daemon the walk from the blob's root.

Serving an image manifest (the first time per digest) starts the warm-up of its layers in
the background (`warmup.WarmUp`: config, DAG skeletons, footers and TOCs first, then the
prioritized ranges into the node's daemon); a range over several leaves of a blob the
warm-up found to come over the network gets its leaves fetched at once beside its `cat`.
Neither ever fails a response, nor delays one a container waits for: only a blob GET whose
`Peerstar-Read-Kind` is `prefetch` or `background` (bulk) waits while its image's
warm-up is still reading TOCs, at most `ServerOptions.warm_up_toc_wait` (3 s), so that
it does not compete with those reads. Every upstream read is logged with its timing
(`upstream.log_upstream`).

Learning (`ServerOptions.learn`, `profiles`): the ranges containers read from the layers
of the images served here (`Peerstar-Read-Kind` on_demand / readahead, or no header)
are recorded for a window after each layer's first such read, then published once as
the layer's profile in the bridge's `directory.Directory` (one per bridge, shared with
the mirror); the warm-up of a manifest warms the profiles heard for its layers.

Headers are only sent once the first upstream bytes are in hand, so a daemon that is
down or stalled yields a 502/504 with a message, and content the store does not hold a
404; a failure after that closes the connection, and as every response carries an exact
Content-Length, a cut-off body can never pass for a complete one. A client that hangs up
(or half-closes its side, on which the event loop closes the connection) before or
while its answer is written is counted as an abort, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from peerstar.distribution.client import READ_KIND_HEADER
from peerstar.errors import PeerstarError
from peerstar.ipfs import ContentStore
from peerstar.ipfsimage.format import IPFSImageError, parse_image_cid
from peerstar.oci.digest import is_digest
from peerstar.oci.errors import OCIError
from peerstar.oci.reference import is_tag
from peerstar.registry.apierror import API_VERSION_HEADER, ApiError
from peerstar.registry.directory import PROFILE_PREFIX, Directory, Record
from peerstar.registry.metrics import RegistryMetrics
from peerstar.registry.mirror import Mirror, MirrorOptions
from peerstar.registry.profiles import (
    LEARNED_KINDS,
    LearnOptions,
    Range,
    Recorder,
    decode,
    encode,
)
from peerstar.registry.ranges import (
    ByteRange,
    RangeNotSatisfiable,
    RangeRejected,
    etag_matches,
    if_range_allows,
    multipart_layout,
    parse_range,
)
from peerstar.registry.subdag import LEAF, ROOT, SubDagLocator
from peerstar.registry.tree import BlobRef, ImageTree, TreeCache
from peerstar.registry.upstream import (
    ContentNotFound,
    ReadPolicy,
    UpstreamError,
    log_upstream,
    read_all,
    read_stream,
)
from peerstar.registry.warmup import WarmUp

log = logging.getLogger("peerstar.registry")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
access_log = logging.getLogger("peerstar.registry.access")
http_log = logging.getLogger("peerstar.registry.http")


class _OneLineBadRequests(logging.Filter):
    """aiohttp logs every request it cannot parse at ERROR with a traceback, so any
    client could fill the log with them: such a request is one WARNING line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            why = " ".join(str(exc.message).split())[:300]
            record.msg, record.args = "bad HTTP request from %s: %s", (remote, why)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


http_log.addFilter(_OneLineBadRequests())

_CID_PATTERN = r"[A-Za-z0-9]{1,200}"
# Reads no container start waits for (the lazy fetcher's `READ_KIND_HEADER`): they wait
# for the TOC phase of their image's warm-up; toc, on_demand, readahead and reads
# without the header never wait.
_BULK_READ_KINDS = frozenset({"prefetch", "background"})
# Loose on purpose: a malformed ref or digest gets its specific error from the handler.
_REF_PATTERN = r"[^/]{1,300}"


@dataclass(frozen=True)
class ServerOptions:
    """Tunables of one server; defaults suit production."""

    policy: ReadPolicy = ReadPolicy()
    cache_bytes: int = 64 << 20
    # A client that accepts no bytes for this long is dropped (slow readers hold a task).
    write_timeout: float = 60.0
    # A connection that does not complete a request's headers in this time is closed
    # (slowloris); aiohttp applies its keep-alive timer from the connection's start.
    header_timeout: float = 30.0
    # Read a range from the deepest DAG node holding all of it (`subdag.SubDagLocator`);
    # off (`--no-subdag`) always reads from the blob's own CID.
    subdag: bool = True
    # Warm an image's layers (skeleton, footer, TOC, prioritized range) in the daemon in
    # the background when its manifest is served (`warmup.WarmUp`).
    warm_up: bool = True
    # Warm-up and leaf fan-out operations in flight at most (one bound for both).
    warm_up_limit: int = 16
    # A manifest warm-up's bulk (prioritized and learned ranges) starts when every layer's TOC
    # stage has ended or after this many seconds; a bulk read (`Peerstar-Read-Kind: prefetch
    # | background`) waits at most this long for that.
    warm_up_toc_wait: float = 3.0
    # Fetch the leaves of a multi-leaf range at once beside its cat, for blobs the warm-up
    # found remote.
    fan_out: bool = True
    # An upstream operation taking at least this long (seconds) needed the network: it is
    # logged at INFO, and a warm-up operation this slow marks its blob remote (a local
    # block answers in a few ms).
    slow_read: float = 0.1
    # Mirror mode (`mirror.Mirror`): the upstreams answered for `?ns=` requests.
    mirror: MirrorOptions | None = None
    # Learn the ranges a container start reads from each layer and share them with the
    # cluster, warm those heard for the images served here (`profiles`); None: off.
    learn: LearnOptions | None = LearnOptions()


@dataclass
class _RequestState:
    """What the middleware needs to know about a response a handler streamed."""

    sent: int = 0
    status: int = 0
    response: web.StreamResponse | None = None


_STATE = web.RequestKey("peerstar_registry_state", _RequestState)


@dataclass
class _Read:
    """Where one range is read from: `cid` (the blob's or a node of its DAG) at `start`;
    `node` is ROOT, "interior" or "leaf"."""

    cid: str
    start: int
    node: str
    t0: float = 0.0  # time.monotonic() when it was located


class _Abort(Exception):
    """Headers were sent and the body cannot be completed: close the connection.

    `reason`: "upstream" (IPFS failed after the retries), "client_slow" (accepted no
    bytes within the write timeout) or "client_gone" (hung up).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _route_of(request: web.Request) -> str:
    route = request.match_info.route
    name = getattr(route, "name", None)
    return name or "other"


class RegistryServer:
    """One registry over one content store. `app()` for tests, `start()` to bind."""

    def __init__(self, store: ContentStore, options: ServerOptions | None = None) -> None:
        self.store = store
        self.options = options or ServerOptions()
        get_block = getattr(store, "block_get", None)
        self._subdag = (SubDagLocator(get_block, timeout=self.options.policy.timeout)
                        if self.options.subdag and get_block is not None else None)
        self.metrics = RegistryMetrics()
        opts = self.options
        mirror = opts.mirror if opts.mirror is not None and opts.mirror.upstreams else None
        # One directory per bridge: the mirror's records and the layers' read profiles
        # (a store without pubsub shares no profiles: they are still recorded, counted).
        pubsub = hasattr(store, "pubsub_publish") and hasattr(store, "pubsub_subscribe")
        self.directory = (Directory(store, timeout=mirror.lookup_timeout if mirror else 0.05,
                                    on_have=self._heard)
                          if mirror is not None or (opts.learn is not None and pubsub)
                          else None)
        self.recorder = Recorder(opts.learn) if opts.learn is not None else None
        self.warmup = (WarmUp(store, self._subdag, self.metrics,
                             limit=opts.warm_up_limit, timeout=opts.policy.timeout,
                             slow=opts.slow_read, manifests=opts.warm_up, fan_out=opts.fan_out,
                             toc_wait=opts.warm_up_toc_wait,
                             profile=self._profile if opts.learn is not None else None)
                      if opts.warm_up or opts.fan_out else None)
        self.trees = TreeCache(self._read_small, max_bytes=self.options.cache_bytes)
        self.mirror = (Mirror(store, mirror, opts.policy, self.directory)
                       if mirror is not None else None)
        self._publishing: dict[str, asyncio.TimerHandle] = {}  # digest -> its publication
        self._directory_start: asyncio.Task[None] | None = None
        self._runners: list[web.AppRunner] = []
        self.addresses: list[tuple[str, int]] = []
        self.metrics_addresses: list[tuple[str, int]] = []

    # -- upstream -------------------------------------------------------------------------

    def _on_upstream_failure(self, kind: str) -> None:
        self.metrics.upstream_errors.labels(kind).inc()

    async def _read_small(self, cid: str, max_bytes: int) -> bytes:
        self.metrics.tree_walks.inc()
        data = await read_all(self.store, cid, max_bytes, self.options.policy,
                              on_failure=self._on_upstream_failure)
        self.metrics.upstream_bytes.inc(len(data))
        return data

    async def _tree(self, cid_text: str, missing: str) -> tuple[str, ImageTree]:
        """The descriptor tree of image `cid_text`; `missing` is the error code when the
        store does not hold it (MANIFEST_UNKNOWN, BLOB_UNKNOWN or NAME_UNKNOWN)."""
        try:
            cid = parse_image_cid(cid_text)
        except IPFSImageError as exc:
            raise ApiError(400, "NAME_INVALID", "invalid repository name",
                           str(exc)) from None
        try:
            tree = await self.trees.get(cid)
        except OCIError as exc:
            raise ApiError(404, "NAME_UNKNOWN", f"ipfs/{cid} is not an image",
                           str(exc)) from None
        except UpstreamError as exc:
            raise _upstream_error(exc, missing) from None
        finally:
            self.metrics.tree_cache_images.set(len(self.trees))
        return cid, tree

    # -- learning (profiles) -------------------------------------------------------------

    def _record(self, request: web.Request, digest: str, ranges: list[ByteRange]) -> None:
        """A GET of `ranges` of blob `digest`: recorded if a container waits for it."""
        if self.recorder is None or request.method != "GET":
            return
        if request.headers.get(READ_KIND_HEADER, "") not in LEARNED_KINDS:
            return
        if self.recorder.add(digest, [(r.start, r.end + 1) for r in ranges],
                             time.monotonic()):
            self._publishing[digest] = asyncio.get_running_loop().call_later(
                self.recorder.options.window, self._publish_profile, digest)

    def _publish_profile(self, digest: str) -> None:
        assert self.recorder is not None
        self._publishing.pop(digest, None)
        ranges, size = self.recorder.take(digest)
        if not ranges:
            return
        self.metrics.profiles.labels("recorded").inc()
        if self.directory is None:
            return
        text = encode(ranges)
        self.directory.verified(Record(PROFILE_PREFIX + digest, text, size, at=time.time()))
        self.metrics.profiles.labels("published").inc()
        log.info("published the read profile of %s: %d ranges, %d bytes", digest,
                 len(ranges), sum(e - s for s, e in ranges))

    def _heard(self, record: Record) -> None:
        if record.key.startswith(PROFILE_PREFIX):
            self.metrics.profiles.labels("heard").inc()

    async def _profile(self, digest: str, ref: BlobRef) -> list[Range]:
        """The ranges learned for layer `digest` (`ref`), from this node's directory or
        the first answer of another within the lookup timeout; [] if none is usable."""
        if self.directory is None or self.options.learn is None:
            return []
        rec = await self.directory.lookup(PROFILE_PREFIX + digest,
                                          self.options.learn.lookup_timeout)
        if rec is None:
            return []
        ranges = decode(rec.value, ref.size, self.options.learn) if rec.size in (
            0, ref.size) else []
        if not ranges:
            self.metrics.profiles.labels("dropped").inc()
            log.info("dropped the read profile heard for %s: nothing usable for a blob of "
                     "%d bytes", digest, ref.size)
        return ranges

    # -- application ----------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application serving the registry API."""
        app = web.Application(middlewares=[self._middleware], client_max_size=1024)
        # add_get also answers HEAD with the same handler (aiohttp omits the body)
        app.router.add_get("/v2/", self._base, name="base")
        base = "/v2/ipfs/{cid:" + _CID_PATTERN + "}"
        manifest: _Handler = self._manifest
        blob: _Handler = self._blob
        if self.mirror is not None:
            # A mirror request (`?ns=`) for an upstream repository named ipfs/<x>.
            manifest = self._or_mirror(self._manifest, self._mirror_manifest)
            blob = self._or_mirror(self._blob, self._mirror_blob)
        app.router.add_get(base + "/manifests/{ref:" + _REF_PATTERN + "}", manifest,
                           name="manifest")
        app.router.add_get(base + "/blobs/{digest:" + _REF_PATTERN + "}", blob,
                           name="blob")
        app.router.add_get(base + "/tags/list", self._tags, name="tags")
        if self.mirror is not None:
            name = "/v2/{name:[^?#]{1,300}?}"
            app.router.add_get(name + "/manifests/{ref:" + _REF_PATTERN + "}",
                               self._or_fallback(self._mirror_manifest), name="mirror_manifest")
            app.router.add_get(name + "/blobs/{digest:" + _REF_PATTERN + "}",
                               self._or_fallback(self._mirror_blob), name="mirror_blob")
        app.router.add_route("*", "/{tail:.*}", self._fallback, name="other")
        return app

    def metrics_app(self) -> web.Application:
        """A separate application exposing `/metrics` (Prometheus text format)."""
        app = web.Application()

        async def metrics(_request: web.Request) -> web.Response:
            body = generate_latest(self.metrics.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app.router.add_get("/metrics", metrics)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        start = time.monotonic()
        state = request[_STATE] = _RequestState()
        status = 0
        error_code = None
        aborted: str | None = None
        try:
            if request.method not in ("GET", "HEAD"):
                raise ApiError(405, "UNSUPPORTED",
                               "this registry is read-only: only GET and HEAD are allowed",
                               {"method": request.method}, {"Allow": "GET, HEAD"})
            resp = await handler(request)
            status = resp.status
            return resp
        except ApiError as exc:
            status, error_code = exc.status, exc.code
            return exc.response()
        except _Abort as exc:
            aborted = exc.reason
            status = state.status
            self.metrics.aborted.labels(exc.reason).inc()
            if request.transport is not None:
                request.transport.abort()
            # aiohttp needs a response object; the transport is gone, nothing is sent.
            return state.response or web.Response(status=500)
        finally:
            route = _route_of(request)
            elapsed = time.monotonic() - start
            self.metrics.request_done(request.method, route, status, elapsed, state.sent)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(json.dumps({
                    "ts": round(time.time(), 3),
                    "remote": request.remote,
                    "method": request.method,
                    "path": request.path[:300],
                    "status": status,
                    "bytes": state.sent,
                    "ms": round(elapsed * 1000, 2),
                    "range": request.headers.get("Range", "")[:200] or None,
                    "error": error_code,
                    "aborted": aborted,
                    "ua": request.headers.get("User-Agent", "")[:200] or None,
                }, separators=(",", ":")))

    # -- handlers -------------------------------------------------------------------------

    async def _base(self, request: web.Request) -> web.Response:
        return web.json_response({}, headers=dict([API_VERSION_HEADER]))

    async def _fallback(self, request: web.Request) -> web.Response:
        raise ApiError(404, "NAME_UNKNOWN", "no such route in this registry",
                       "routes: /v2/, /v2/ipfs/<cid>/manifests/<ref>, "
                       "/v2/ipfs/<cid>/blobs/<digest>, /v2/ipfs/<cid>/tags/list")

    # -- mirror mode ----------------------------------------------------------------------

    def _or_mirror(self, handler: _Handler, mirror: _Handler) -> _Handler:
        async def dispatch(request: web.Request) -> web.StreamResponse:
            if "ns" in request.query:
                return await mirror(request)
            return await handler(request)
        return dispatch

    def _or_fallback(self, mirror: _Handler) -> _Handler:
        async def dispatch(request: web.Request) -> web.StreamResponse:
            if "ns" not in request.query:
                return await self._fallback(request)
            return await mirror(request)
        return dispatch

    async def _mirror_manifest(self, request: web.Request) -> web.StreamResponse:
        assert self.mirror is not None
        digest, info, data = await self.mirror.manifest(
            request.query["ns"], _mirror_name(request), request.match_info["ref"],
            request.headers.get("Authorization"))
        return await self._serve(request, digest, info, data)

    async def _mirror_blob(self, request: web.Request) -> web.StreamResponse:
        assert self.mirror is not None
        digest = request.match_info["digest"]
        info = await self.mirror.blob(
            request.query["ns"], _mirror_name(request), digest,
            request.headers.get("Authorization"), fetch=request.method == "GET",
            ranged="Range" in request.headers)
        return await self._serve(request, digest, info, None)

    async def _tags(self, request: web.Request) -> web.Response:
        cid, tree = await self._tree(request.match_info["cid"], "NAME_UNKNOWN")
        tags = sorted({"latest", *tree.tags})
        return web.json_response({"name": f"ipfs/{cid}", "tags": tags},
                                 headers=dict([API_VERSION_HEADER]))

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        ref = request.match_info["ref"]
        if not is_digest(ref) and not is_tag(ref):
            raise ApiError(404, "MANIFEST_UNKNOWN", "manifest unknown",
                           f"{ref[:100]!r} is neither a tag nor a digest")
        _cid, tree = await self._tree(request.match_info["cid"], "MANIFEST_UNKNOWN")
        digest = tree.resolve_manifest(ref)
        if digest is None:
            raise ApiError(404, "MANIFEST_UNKNOWN", "manifest unknown",
                           f"{ref} names no manifest or index of this image")
        ref_info = tree.blobs[digest]
        if self.recorder is not None:
            for layer_digest, layer in _layers(tree, digest):
                self.recorder.expect(layer_digest, layer.size)
        if self.warmup is not None:
            self.warmup.manifest_served(digest, tree)  # in the background; never waits
        return await self._serve(request, digest, ref_info, tree.manifests[digest])

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        if not is_digest(digest):
            raise ApiError(400, "DIGEST_INVALID", "provided digest is invalid",
                           f"{digest[:100]!r} is not sha256:<64 hex> or sha512:<128 hex>")
        _cid, tree = await self._tree(request.match_info["cid"], "BLOB_UNKNOWN")
        ref_info = tree.blobs.get(digest)
        if ref_info is None:
            raise ApiError(404, "BLOB_UNKNOWN", "blob unknown to registry",
                           f"{digest} is not part of this image")
        if (self.warmup is not None and request.method == "GET"
                and request.headers.get(READ_KIND_HEADER) in _BULK_READ_KINDS):
            await self.warmup.wait_toc_phase(ref_info.cid)  # bounded; never raises
        return await self._serve(request, digest, ref_info, tree.manifests.get(digest))

    # -- responses ------------------------------------------------------------------------

    async def _serve(self, request: web.Request, digest: str, info: BlobRef,
                     cached: bytes | None) -> web.StreamResponse:
        size = info.size
        etag = f'"{digest}"'
        headers = {
            "Content-Type": info.media_type,
            "Docker-Content-Digest": digest,
            "ETag": etag,
            "Accept-Ranges": "bytes",
            # Content under a digest never changes.
            "Cache-Control": "public, max-age=31536000, immutable",
            API_VERSION_HEADER[0]: API_VERSION_HEADER[1],
        }
        if etag_matches(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers={
                k: v for k, v in headers.items() if k != "Content-Type"})
        ranges: list[ByteRange] | None = None
        if if_range_allows(request.headers.get("If-Range"), etag):
            try:
                ranges = parse_range(request.headers.get("Range"), size)
            except RangeNotSatisfiable as exc:
                raise ApiError(416, "RANGE_INVALID", "requested range not satisfiable",
                               str(exc), {"Content-Range": f"bytes */{size}"}) from None
            except RangeRejected as exc:
                raise ApiError(416, "RANGE_INVALID", "range request rejected",
                               str(exc), {"Content-Range": f"bytes */{size}"}) from None
            if ranges:
                self._record(request, digest, ranges)
        if ranges is None:
            return await self._send(request, 200, headers, [ByteRange(0, size - 1)]
                                    if size else [], size, info, cached, None)
        if len(ranges) == 1:
            headers["Content-Range"] = ranges[0].content_range(size)
            return await self._send(request, 206, headers, ranges, size, info, cached, None)
        layout = multipart_layout(ranges, size, info.media_type, secrets.token_hex(16))
        headers["Content-Type"] = layout.content_type
        return await self._send(request, 206, headers, ranges, size, info, cached, layout)

    async def _send(self, request: web.Request, status: int, headers: dict[str, str],
                    ranges: list[ByteRange], size: int, info: BlobRef, cached: bytes | None,
                    layout) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers=headers)
        if layout is None:
            resp.content_length = sum(r.length for r in ranges)
        else:
            resp.content_length = layout.content_length(ranges)
        state = request[_STATE]
        state.status = status
        state.response = resp
        if request.method == "HEAD":
            with self._client_side(request):
                await resp.prepare(request)
                await resp.write_eof()
            return resp
        await self._send_ranges(request, resp, ranges, info, cached, layout)
        return resp

    def _locate(self, info: BlobRef, r: ByteRange) -> _Read:
        """Where range `r` of the blob is read from (the deepest DAG node holding it)."""
        cid, start, node = info.cid, r.start, ROOT
        if self._subdag is not None:
            cid, start, node = self._subdag.locate(cid, start, r.length)
            if node != LEAF and self.warmup is not None:
                self.warmup.spread(info, r.start, r.length)  # only for remote blobs
        return _Read(cid, start, node, time.monotonic())

    async def _send_ranges(self, request: web.Request, resp: web.StreamResponse,
                           ranges: list[ByteRange], info: BlobRef, cached: bytes | None,
                           layout) -> None:
        prepared = False
        for i, r in enumerate(ranges):
            pieces = self._pieces(info, cached, r)
            head = layout.heads[i] if layout is not None else b""
            try:
                async with contextlib.aclosing(pieces):
                    async for chunk in pieces:
                        if not prepared:
                            with self._client_side(request):
                                await resp.prepare(request)
                            prepared = True
                            if request.transport is not None:
                                # a 256 KiB piece goes out without waiting for a drain
                                request.transport.set_write_buffer_limits(high=1 << 20)
                        if head:
                            await self._write(request, resp, head)
                            head = b""
                        await self._write(request, resp, chunk)
            except UpstreamError as exc:
                if not prepared:
                    raise _upstream_error(exc, "BLOB_UNKNOWN") from None
                log.warning("aborting %s %s mid-stream: %s", request.method, request.path, exc)
                raise _Abort("upstream") from None
        with self._client_side(request):
            if not prepared:
                await resp.prepare(request)
            if layout is not None:
                await self._write(request, resp, layout.tail)
            await resp.write_eof()

    async def _pieces(self, info: BlobRef, cached: bytes | None, r: ByteRange
                      ) -> AsyncGenerator[bytes, None]:
        if cached is not None:
            yield cached[r.start:r.end + 1]
            return
        read = self._locate(info, r)
        self.metrics.upstream_read(read.node)
        first: float | None = None
        pieces = read_stream(self.store, read.cid, read.start, r.length,
                             self.options.policy, on_failure=self._on_upstream_failure)
        try:
            async with contextlib.aclosing(pieces):
                async for chunk in pieces:
                    if first is None:
                        first = time.monotonic() - read.t0
                        if self.warmup is not None and read.node == LEAF:
                            self.warmup.leaf_read(info, read.cid)
                    self.metrics.upstream_bytes.inc(len(chunk))
                    yield chunk
        finally:
            log_upstream("read", read.cid, read.t0, time.monotonic() - read.t0,
                         self.options.slow_read, blob=info.cid, node=read.node,
                         offset=read.start, length=r.length,
                         first_ms=None if first is None else round(first * 1000, 1))

    async def _write(self, request: web.Request, resp: web.StreamResponse,
                     data: bytes) -> None:
        with self._client_side(request):
            async with asyncio.timeout(self.options.write_timeout):
                await resp.write(data)
        request[_STATE].sent += len(data)

    @contextlib.contextmanager
    def _client_side(self, request: web.Request) -> Iterator[None]:
        """Turn a write timeout into `_Abort("client_slow")` (logged) and the errors of
        a vanished client into `_Abort("client_gone")`: stop reading upstream. A client
        gone shows as aiohttp's ClientConnectionResetError (a ConnectionResetError) or a
        RuntimeError on a closed transport."""
        try:
            yield
        except TimeoutError:
            log.warning("client %s accepted no data for %g s; dropping it", request.remote,
                        self.options.write_timeout)
            raise _Abort("client_slow") from None
        except (ConnectionError, RuntimeError):
            raise _Abort("client_gone") from None

    # -- binding --------------------------------------------------------------------------

    async def start(self, host: str = "localhost", port: int = 5050, *,
                    allow_remote: bool = False, metrics_host: str | None = None,
                    metrics_port: int | None = None) -> None:
        """Bind the registry (and the metrics endpoint if asked) and start serving."""
        check_bind_address(host, allow_remote)
        if metrics_host is not None:
            check_bind_address(metrics_host, allow_remote)
        runner = web.AppRunner(self.app(), access_log=None, logger=http_log,
                               keepalive_timeout=self.options.header_timeout,
                               shutdown_timeout=5)
        await runner.setup()
        self._runners.append(runner)
        if self.directory is not None and self.mirror is not None:
            await self.directory.start()
        elif self.directory is not None:  # learning alone never holds up the bridge's start
            self._directory_start = asyncio.create_task(self.directory.start())
        if self.mirror is not None:
            await self.mirror.start()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise PeerstarError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                                ) from None
        self.addresses = [a[:2] for a in runner.addresses]
        if metrics_host is not None and metrics_port is not None:
            mrunner = web.AppRunner(self.metrics_app(), access_log=None)
            await mrunner.setup()
            self._runners.append(mrunner)
            try:
                await web.TCPSite(mrunner, metrics_host, metrics_port,
                                  reuse_address=True).start()
            except OSError as exc:
                await self.stop()
                raise PeerstarError(f"cannot listen on {metrics_host}:{metrics_port} for "
                                    f"metrics: {exc.strerror or exc}") from None
            self.metrics_addresses = [a[:2] for a in mrunner.addresses]

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and finish (or cut) in-flight responses."""
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        for handle in self._publishing.values():
            handle.cancel()
        self._publishing.clear()
        if self.warmup is not None:
            await self.warmup.close()
        if self.mirror is not None:
            await self.mirror.close()
        if self._directory_start is not None:
            self._directory_start.cancel()
            with contextlib.suppress(BaseException):
                await self._directory_start
        if self.directory is not None:
            await self.directory.close()
        if self._subdag is not None:
            await self._subdag.close()


def _layers(tree: ImageTree, digest: str) -> list[tuple[str, BlobRef]]:
    """(digest, where it is) of each layer of image manifest `digest` ([] for an index)."""
    try:
        doc = json.loads(tree.manifests[digest])
    except (KeyError, ValueError):
        return []
    layers = doc.get("layers") if isinstance(doc, dict) else None
    out: list[tuple[str, BlobRef]] = []
    for layer in layers if isinstance(layers, list) else ():
        d = layer.get("digest") if isinstance(layer, dict) else None
        ref = tree.blobs.get(d) if isinstance(d, str) else None
        if isinstance(d, str) and ref is not None:
            out.append((d, ref))
    return out


def _mirror_name(request: web.Request) -> str:
    """The repository of a mirror request (an upstream's `ipfs/<x>` came by the ipfs route)."""
    info = request.match_info
    return info["name"] if "name" in info else "ipfs/" + info["cid"]


def _upstream_error(exc: UpstreamError, missing: str) -> ApiError:
    """The answer to a failed upstream read; `missing`: the error code when the store
    does not hold the content (the client asked for something that is not there)."""
    if isinstance(exc, ContentNotFound):
        what = {"MANIFEST_UNKNOWN": "manifest unknown", "BLOB_UNKNOWN":
                "blob unknown to registry"}.get(missing, "repository name not known to registry")
        return ApiError(404, missing, what, str(exc))
    if exc.timed_out:
        return ApiError(504, "UNAVAILABLE", "timed out reading from IPFS", str(exc))
    return ApiError(502, "UNAVAILABLE", "reading from IPFS failed", str(exc))


def check_bind_address(host: str, allow_remote: bool) -> None:
    """Refuse to bind anything but loopback unless `allow_remote` (an explicit --listen).

    An empty host would make aiohttp listen on every interface; that must be spelled
    out as 0.0.0.0 or :: by the user, so it is refused here in any case.
    """
    if not host:
        raise PeerstarError("listen address has no host: write localhost:PORT, or 0.0.0.0:PORT "
                            "to listen on every interface")
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise PeerstarError(f"cannot resolve listen host {host!r}: {exc.strerror}") from None
    addrs = {str(info[4][0]) for info in infos}
    remote = sorted(a for a in addrs if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if remote and not allow_remote:
        raise PeerstarError(
            f"refusing to listen on non-loopback address {host} ({', '.join(remote)}): the "
            "registry has no authentication; pass --listen HOST:PORT explicitly to expose it")
