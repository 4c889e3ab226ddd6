"""Mirror mode of the registry bridge: ordinary image names, content from the cluster.

Owns: `MirrorOptions`, and `Mirror`, which answers containerd's registry-mirror protocol
(`/v2/<name>/manifests/<ref>?ns=<registry>` and `/v2/<name>/blobs/<digest>?ns=...`) for
the upstreams configured with `--mirror [NS=]URL` (docs/mirror.md). It resolves a request
to a `BlobRef` in the node's IPFS (and, for a manifest, its verified bytes); the server
then answers it as any other blob (headers, Range, streaming).

- A tag is resolved at its upstream with a HEAD carrying the caller's Authorization, and
  cached for `tag_ttl`; every resolution is announced to the cluster (`directory`). When
  the upstream cannot be reached the newest resolution heard in the cluster is used.
- Content by digest comes, in this order, from a CID this node verified before, from a
  CID the cluster announces (`directory.Directory.lookup`, bounded by `lookup_timeout`),
  then from the upstream. A CID from the cluster is read whole and hashed before anything
  is served from it; bytes from the upstream are hashed on their way into IPFS. A
  mismatch, or content the swarm cannot deliver, drops that source (nothing is recorded
  or pinned) and the next one is tried. What passes is pinned in the node's IPFS and
  announced, so the next node gets it from peers. Afterwards the content is served from
  its CID, which IPFS verifies block by block. The pins are bounded (`pin_bytes`,
  `pins.PinLedger`): past the bound the least recently served content is unpinned,
  forgotten here and its record withdrawn, so kubo's GC may reclaim it and a later
  request fetches and verifies it again.
- Private images stay private: before serving a manifest or blob by digest, from any
  source, the caller's Authorization is checked at the upstream for that repository and
  that digest (a HEAD of /v2/<name>/blobs|manifests/<digest>); a grant is cached for
  `access_ttl` per (credential hash, ns, repository, digest), and the upstream's
  401 (with its challenge) / 403 / 404 is passed on. When the upstream cannot be reached,
  only content known to be public (the directory record's `public` flag, set by the bridge
  that verified it after an anonymous HEAD) or granted to this credential within
  `offline_grace` is served; anything else held in the cluster gets 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from peerstar.errors import PeerstarError
from peerstar.ipfs import ContentStore
from peerstar.oci.digest import is_digest
from peerstar.oci.reference import is_tag
from peerstar.registry.apierror import ApiError
from peerstar.registry.directory import Directory, Record, tag_key
from peerstar.registry.origin import (
    Head,
    MirrorUpstream,
    Origin,
    OriginError,
    OriginStatus,
)
from peerstar.registry.pins import PinLedger
from peerstar.registry.tree import BlobRef
from peerstar.registry.upstream import (
    ReadPolicy,
    UpstreamError,
    log_upstream,
    read_all,
    read_stream,
)

log = logging.getLogger("peerstar.registry.mirror")

# The distribution spec's repository name grammar.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*"
_NAME = re.compile(rf"\A{_COMPONENT}(?:/{_COMPONENT})*\Z")
_MANIFESTS_KEPT = 512
_GRANTS_KEPT = 100_000
DEFAULT_PIN_BYTES = 20 << 30  # 40 % of the manifests' default kubo StorageMax (50GB)


@dataclass(frozen=True)
class MirrorOptions:
    """The upstreams a bridge mirrors and its tunables (seconds)."""

    upstreams: tuple[MirrorUpstream, ...] = ()
    # How long a tag resolved at the upstream is used without asking again.
    tag_ttl: float = 30.0
    # How long a digest lookup in the cluster waits for an answer before the upstream.
    lookup_timeout: float = 0.05
    # Connect/read timeout towards an upstream.
    upstream_timeout: float = 30.0
    # How long a bridge waits for another that claimed a blob to fetch it (seconds).
    claim_wait: float = 120.0
    # How long the upstream's "yes, this credential may pull this digest from this
    # repository" is reused without asking again, and how long it is still honoured while
    # the upstream cannot be reached.
    access_ttl: float = 30.0
    offline_grace: float = 600.0
    # An extra PEM CA bundle trusted for the upstreams ("" for the system's trust only).
    ca_file: str = ""
    max_manifest: int = 4 << 20
    # Bound of what this mirror keeps pinned (0 = unbounded): past it, the least recently
    # served mirrored content is unpinned (`pins.PinLedger`), and the ledger's file
    # ("" = none: pins made before a restart are forgotten, the operator's to unpin).
    pin_bytes: int = DEFAULT_PIN_BYTES
    pin_state: str = ""
    upstream_by_ns: dict[str, MirrorUpstream] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "upstream_by_ns", {u.ns: u for u in self.upstreams})


def _hasher(digest: str) -> hashlib._Hash:
    return hashlib.new(digest.split(":", 1)[0])


def _matches(digest: str, h: hashlib._Hash) -> bool:
    return f"{digest.split(':', 1)[0]}:{h.hexdigest()}" == digest


def _media_type(data: bytes, fallback: str) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        media = json.loads(data).get("mediaType")
        if isinstance(media, str) and media:
            return media
    return fallback or "application/vnd.oci.image.manifest.v1+json"


def _passed_on(exc: OriginStatus, missing: str) -> ApiError:
    if exc.status == 404:
        return ApiError(404, missing, "unknown to the upstream registry")
    if exc.status == 401:
        return ApiError(401, "UNAUTHORIZED", "authentication required by the upstream",
                        headers=exc.headers)
    if exc.status == 403:
        return ApiError(403, "DENIED", "the upstream denied access", headers=exc.headers)
    return ApiError(429, "TOOMANYREQUESTS", "the upstream throttled the request")


def _credential(auth: str | None) -> str:
    """The key of a caller's credentials in the grant cache (never the credentials)."""
    return hashlib.sha256(auth.encode()).hexdigest() if auth else ""


@dataclass(frozen=True)
class _Caller:
    """A request's upstream, repository and Authorization: what the access check needs."""

    origin: Origin
    name: str
    auth: str | None


class Mirror:
    """Resolves mirror requests for one bridge; `start()` joins the cluster's directory."""

    def __init__(self, store: ContentStore, options: MirrorOptions,
                 policy: ReadPolicy | None = None, directory: Directory | None = None
                 ) -> None:
        """`directory`: the bridge's, shared with its learning (started and closed by
        its owner); None: the mirror's own."""
        self.store = store
        self.options = options
        self.policy = policy or ReadPolicy()
        self._own_directory = directory is None
        self.directory = directory or Directory(store, timeout=options.lookup_timeout)
        self.pins = PinLedger(store, options.pin_bytes,
                              Path(options.pin_state) if options.pin_state else None)
        self.origins = {u.ns: Origin(u, timeout=options.upstream_timeout,
                                     ca_file=options.ca_file)
                        for u in options.upstreams}
        self._tags: dict[str, tuple[Head, float]] = {}
        self._blobs: dict[str, BlobRef] = {}  # digest -> CID verified on this node
        self._manifests: OrderedDict[str, bytes] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._checking: dict[str, asyncio.Task[None]] = {}  # ranged reads' whole checks
        # (credential hash, ns, repository, digest) -> when the upstream granted it
        self._grants: OrderedDict[tuple[str, str, str, str], float] = OrderedDict()
        # What each source delivered (the tests and the bench read these).
        self.counts = {"upstream_bytes": 0, "cluster_hits": 0, "upstream_fetches": 0,
                       "rejected": 0, "ranged_cluster": 0,
                       "access_checks": 0, "access_refused": 0, "offline_served": 0}

    async def start(self) -> None:
        if self._own_directory:
            await self.directory.start()

    async def close(self) -> None:
        for task in self._checking.values():
            task.cancel()
        if self._own_directory:
            await self.directory.close()
        for origin in self.origins.values():
            await origin.close()
        self.pins.close()

    # -- requests -------------------------------------------------------------------------
    def _origin(self, ns: str, name: str) -> Origin:
        origin = self.origins.get(ns)
        if origin is None:
            raise ApiError(404, "NAME_UNKNOWN", "registry not mirrored here",
                           f"ns={ns[:100]!r} is not one of this bridge's --mirror "
                           f"upstreams ({', '.join(sorted(self.origins)) or 'none'})")
        if len(name) > 255 or not _NAME.match(name):
            raise ApiError(400, "NAME_INVALID", "invalid repository name",
                           f"{name[:100]!r} does not match the distribution spec's grammar")
        return origin

    async def manifest(self, ns: str, name: str, ref: str, auth: str | None
                       ) -> tuple[str, BlobRef, bytes]:
        """(digest, where its bytes are, the bytes) of manifest `ref` of `ns`/`name`."""
        origin = self._origin(ns, name)
        caller = _Caller(origin, name, auth)
        if is_digest(ref):
            digest = ref
        elif is_tag(ref) and ":" not in ref:
            digest = (await self._resolve_tag(origin, name, ref, auth)).digest
        else:
            raise ApiError(400, "DIGEST_INVALID" if ":" in ref else "TAG_INVALID",
                           "invalid manifest reference",
                           f"{ref[:100]!r} is neither a tag nor a digest")
        await self._authorize(caller, "manifests", digest)
        async with self._lock(digest):
            return await self._manifest(caller, digest)

    async def blob(self, ns: str, name: str, digest: str, auth: str | None, *,
                   fetch: bool = True, ranged: bool = False) -> BlobRef:
        """Where blob `digest` is in this node's IPFS (fetched into it first). Without
        `fetch` (a HEAD), an announced record or the upstream's HEAD is enough. With
        `ranged` (a GET with Range: a lazy reader), a blob the cluster announces is
        served from its CID at once while its whole is checked in the background."""
        origin = self._origin(ns, name)
        if not is_digest(digest):
            raise ApiError(400, "DIGEST_INVALID", "provided digest is invalid",
                           f"{digest[:100]!r} is not sha256:<64 hex> or sha512:<128 hex>")
        caller = _Caller(origin, name, auth)
        checked = await self._authorize(caller, "blobs", digest)
        if not fetch:
            known = self._blobs.get(digest)
            if known is not None:
                self.pins.touch(digest)
                return known
            rec = await self.directory.lookup(digest)
            if rec is not None and rec.size > 0:
                return BlobRef(rec.value, rec.size, rec.media_type or
                               "application/octet-stream")
            head = checked or await self._head(origin, "blobs", name, digest, auth,
                                               "BLOB_UNKNOWN")
            return BlobRef("", head.size, head.media_type or "application/octet-stream")
        if ranged and digest not in self._blobs:
            rec = await self.directory.lookup(digest)
            if rec is not None and rec.size > 0:
                return await self._ranged_from_cluster(caller, digest, rec)
        async with self._lock(digest):
            return await self._blob(caller, digest)

    async def _ranged_from_cluster(self, caller: _Caller, digest: str, rec: Record
                                   ) -> BlobRef:
        """A lazy reader's ranges come from the holder's CID without waiting for the whole
        blob: checking it first would fetch the whole layer across the swarm before the
        first chunk, which is what lazy pulling avoids. The reader verifies what it gets
        (the peerstar and Go snapshotters check every chunk against the TOC, whose digest
        is in the manifest this mirror verified); the whole is checked here meanwhile and
        the record dropped if it lies, so the next request falls back to the upstream."""
        started = time.monotonic()
        await self._connect(rec.peers)
        log_upstream("mirror-ranged", rec.value, started, time.monotonic() - started, 0.0,
                     digest=digest)
        if digest not in self._checking:
            async def check() -> None:
                try:
                    async with self._lock(digest):
                        if digest not in self._blobs:
                            await self._from_cluster(caller, digest, rec)
                finally:
                    self._checking.pop(digest, None)

            self._checking[digest] = asyncio.create_task(check(), name=f"check {digest}")
        self.counts["ranged_cluster"] += 1
        return BlobRef(rec.value, rec.size, rec.media_type or "application/octet-stream")

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
            if len(self._locks) > 10_000:
                for k in [k for k, v in self._locks.items() if not v.locked()][:5_000]:
                    del self._locks[k]
                self._locks[key] = lock
        return lock

    # -- access -------------------------------------------------------------------------------
    def _grant_key(self, caller: _Caller, digest: str) -> tuple[str, str, str, str]:
        return (_credential(caller.auth), caller.origin.upstream.ns, caller.name, digest)

    def _grant(self, caller: _Caller, digest: str) -> None:
        key = self._grant_key(caller, digest)
        self._grants[key] = time.monotonic()
        self._grants.move_to_end(key)
        while len(self._grants) > _GRANTS_KEPT:
            self._grants.popitem(last=False)

    async def _authorize(self, caller: _Caller, kind: str, digest: str) -> Head | None:
        """Return if the upstream lets `caller` pull `digest` from its repository (per
        digest: a grant for repository X says nothing about a digest of Y) -- with the
        upstream's HEAD when it was just asked, None when a grant answered; else raise
        the upstream's 401 (with its challenge) / 403 / 404. When the upstream cannot be
        reached: content known to be public, or granted to this credential within
        `offline_grace`, passes; content the cluster holds otherwise gets 503; content
        nobody holds gets 502 (it could not be fetched anyway)."""
        key = self._grant_key(caller, digest)
        granted = self._grants.get(key)
        age = time.monotonic() - granted if granted is not None else float("inf")
        if age < self.options.access_ttl:
            return None
        self.counts["access_checks"] += 1
        try:
            head = await caller.origin.head(kind, caller.name, digest, caller.auth)
        except OriginStatus as exc:
            self._grants.pop(key, None)
            self.counts["access_refused"] += 1
            raise _passed_on(exc, "BLOB_UNKNOWN" if kind == "blobs" else
                             "MANIFEST_UNKNOWN") from None
        except OriginError as exc:
            if age < self.options.offline_grace:
                self.counts["offline_served"] += 1
                return None
            records = [r for r in (self.directory.own.get(digest),
                                   self.directory.heard.get(digest)) if r is not None]
            if not records and digest not in self._blobs:
                rec = await self.directory.lookup(digest)
                records = [rec] if rec is not None else []
            if any(r.public for r in records):
                self.counts["offline_served"] += 1
                return None
            if not records and digest not in self._blobs:
                raise ApiError(502, "UNAVAILABLE", f"{kind[:-1]} not in the cluster and "
                               "the upstream registry cannot be reached",
                               str(exc)) from None
            self.counts["access_refused"] += 1
            raise ApiError(503, "UNAVAILABLE", "the upstream registry cannot be reached "
                           "to check this request's access, and this content is not "
                           "known to be public", f"{caller.name}@{digest}: {exc}"
                           ) from None
        self._grant(caller, digest)
        return head

    async def _public(self, caller: _Caller, kind: str, digest: str,
                      rec: Record | None = None) -> bool:
        """Whether the upstream gives `digest` to anyone (a record's `public` flag): a
        record that says so, an anonymous caller that passed `_authorize`, else one
        anonymous HEAD (once per digest verified on this node)."""
        if (rec is not None and rec.public) or not caller.auth:
            return True
        try:
            await caller.origin.head(kind, caller.name, digest, None)
        except (OriginStatus, OriginError):
            return False
        return True

    # -- tags -----------------------------------------------------------------------------
    async def _head(self, origin: Origin, kind: str, name: str, ref: str,
                    auth: str | None, missing: str) -> Head:
        try:
            return await origin.head(kind, name, ref, auth)
        except OriginStatus as exc:
            raise _passed_on(exc, missing) from None
        except OriginError as exc:
            raise ApiError(502, "UNAVAILABLE", "the upstream registry cannot be reached",
                           str(exc)) from None

    async def _resolve_tag(self, origin: Origin, name: str, tag: str,
                           auth: str | None) -> Head:
        ns = origin.upstream.ns
        key = tag_key(ns, name, tag)
        loop = asyncio.get_running_loop()
        cached = self._tags.get(key)
        if cached is not None and loop.time() - cached[1] < self.options.tag_ttl:
            return cached[0]
        try:
            head = await origin.head("manifests", name, tag, auth)
        except OriginStatus as exc:
            if exc.status in (401, 403):
                self.counts["access_refused"] += 1
            raise _passed_on(exc, "MANIFEST_UNKNOWN") from None
        except OriginError as exc:
            rec = await self.directory.lookup(key)
            if rec is None or not is_digest(rec.value):
                raise ApiError(502, "UNAVAILABLE", "the upstream registry cannot be "
                               "reached and no node of the cluster knows this tag",
                               str(exc)) from None
            log.warning("%s unreachable (%s): %s:%s -> %s, as last seen in the cluster",
                        origin.upstream.url, exc, name, tag, rec.value)
            return Head(rec.value, rec.media_type, rec.size)
        if not is_digest(head.digest):
            raise ApiError(502, "UNAVAILABLE", "the upstream sent a malformed digest",
                           head.digest[:100])
        self._tags[key] = (head, loop.time())
        self._grant(_Caller(origin, name, auth), head.digest)  # the HEAD just said so
        self.directory.verified(Record(key, head.digest, head.size, head.media_type,
                                       at=time.time()))
        return head

    # -- manifests ------------------------------------------------------------------------
    async def _manifest(self, caller: _Caller, digest: str) -> tuple[str, BlobRef, bytes]:
        origin, name, auth = caller.origin, caller.name, caller.auth
        started = time.monotonic()
        data = self._manifests.get(digest)
        ref = self._blobs.get(digest)
        if data is not None and ref is not None:
            self._manifests.move_to_end(digest)
            self.pins.touch(digest)
            return digest, ref, data
        rec = await self.directory.lookup(digest)
        if rec is not None:
            try:
                data = await read_all(self.store, rec.value, self.options.max_manifest + 1,
                                      self.policy)
            except UpstreamError as exc:
                log.warning("manifest %s: CID %s from the cluster unreadable: %s", digest,
                            rec.value, exc)
                data = None
            if data is not None:
                h = _hasher(digest)
                h.update(data)
                if _matches(digest, h):
                    self.counts["cluster_hits"] += 1
                    ref = BlobRef(rec.value, len(data), _media_type(data, rec.media_type))
                    await self._keep(digest, ref, data, "cluster", started,
                                     await self._public(caller, "manifests", digest, rec))
                    return digest, ref, data
                self._reject(digest, rec)
        try:
            media, _size, body = await origin.get("manifests", name, digest, auth)
        except OriginStatus as exc:
            raise _passed_on(exc, "MANIFEST_UNKNOWN") from None
        except OriginError as exc:
            raise ApiError(502, "UNAVAILABLE", "manifest not in the cluster and the "
                           "upstream registry cannot be reached", str(exc)) from None
        h = _hasher(digest)
        parts: list[bytes] = []
        got = 0
        try:
            async for piece in body:
                got += len(piece)
                if got > self.options.max_manifest:
                    raise ApiError(502, "UNAVAILABLE", "the upstream sent a manifest "
                                   f"over {self.options.max_manifest} bytes")
                h.update(piece)
                parts.append(piece)
        except OriginError as exc:
            raise ApiError(502, "UNAVAILABLE", "reading from the upstream failed",
                           str(exc)) from None
        finally:
            await body.aclose()  # type: ignore[attr-defined]
        data = b"".join(parts)
        self.counts["upstream_bytes"] += len(data)
        if not _matches(digest, h):
            self.counts["rejected"] += 1
            raise ApiError(502, "UNAVAILABLE", "the upstream sent a manifest that does "
                           "not match its digest", digest)
        cid = await self.store.add(data, pin=False)  # `_keep` pins it
        ref = BlobRef(cid, len(data), _media_type(data, media))
        await self._keep(digest, ref, data, "upstream", started,
                         await self._public(caller, "manifests", digest))
        return digest, ref, data

    async def _keep(self, digest: str, ref: BlobRef, data: bytes | None, source: str,
                    started: float, public: bool) -> None:
        """`ref` holds `digest`, verified here (from `source`, since `started`,
        time.monotonic(); `public`: the upstream gives it to anyone): pin it (within the
        pin bound: what that unpins is forgotten here), remember it, announce it, log it."""
        log_upstream("mirror", ref.cid, started, time.monotonic() - started, 0.0,
                     digest=digest, source=source, bytes=ref.size)
        for old, cid in await self.pins.keep(digest, ref.cid, ref.size):
            # No longer served from this node without a fresh check: the next request
            # verifies it again from the cluster or the upstream (and pins it again). Its
            # record is withdrawn here; nodes that heard it drop it when it fails them.
            self._blobs.pop(old, None)
            self._manifests.pop(old, None)
            self.directory.forget(old, cid)
        self._blobs[digest] = ref
        if data is not None:
            self._manifests[digest] = data
            while len(self._manifests) > _MANIFESTS_KEPT:
                self._manifests.popitem(last=False)
        self.directory.verified(Record(digest, ref.cid, ref.size, ref.media_type,
                                       public=public))

    def _reject(self, digest: str, rec: Record) -> None:
        self.counts["rejected"] += 1
        log.warning("%s: the cluster's CID %s does not hold it (hash mismatch); trying the "
                    "next source", digest, rec.value)
        self.directory.forget(digest, rec.value)

    # -- blobs ----------------------------------------------------------------------------
    async def _blob(self, caller: _Caller, digest: str) -> BlobRef:
        known = self._blobs.get(digest)
        if known is not None:
            self.pins.touch(digest)
            return known
        ref = await self._from_cluster(caller, digest, await self.directory.lookup(digest))
        if ref is None and not await self.directory.claim(digest):
            # Another bridge is fetching it from the upstream: take it from that one.
            waited = time.monotonic()
            rec = await self.directory.wait_for(digest, self.options.claim_wait)
            log_upstream("mirror-wait", rec.value if rec else "", waited,
                         time.monotonic() - waited, 0.0, digest=digest, heard=rec is not None)
            ref = await self._from_cluster(caller, digest, rec)
        if ref is not None:
            return ref
        try:
            return await self._from_upstream(caller, digest)
        except ApiError:
            self.directory.drop(digest)
            raise

    async def _from_cluster(self, caller: _Caller, digest: str, rec: Record | None
                            ) -> BlobRef | None:
        """The blob of a cluster record once its CID proved to hold `digest`, else None."""
        started = time.monotonic()
        if rec is None or rec.size <= 0:
            return None
        await self._connect(rec.peers)
        if not await self._verify_cid(digest, rec.value, rec.size):
            self._reject(digest, rec)
            return None
        self.counts["cluster_hits"] += 1
        ref = BlobRef(rec.value, rec.size, rec.media_type or "application/octet-stream")
        await self._keep(digest, ref, None, "cluster", started,
                         await self._public(caller, "blobs", digest, rec))
        return ref

    async def _connect(self, addrs: tuple[str, ...]) -> None:
        """Connect the node's daemon to the holder of a record (a no-op when connected): a
        daemon without content routing fetches blocks from connected peers only."""
        connect = getattr(self.store, "swarm_connect", None)
        if connect is None:
            return
        for addr in addrs:
            if addr in self.directory.addresses:
                return  # this node holds it
            try:
                async with asyncio.timeout(5):
                    await connect(addr)
                return
            except (PeerstarError, TimeoutError) as exc:
                log.info("swarm/connect %s failed: %s", addr, exc)

    async def _verify_cid(self, digest: str, cid: str, size: int) -> bool:
        """Read `cid` whole (which brings its blocks to this node) and hash it."""
        h = _hasher(digest)
        pieces = read_stream(self.store, cid, 0, size, self.policy)
        try:
            async with contextlib.aclosing(pieces):
                async for piece in pieces:
                    h.update(piece)
        except (UpstreamError, PeerstarError) as exc:
            log.warning("%s: CID %s from the cluster unreadable: %s", digest, cid, exc)
            return False
        return _matches(digest, h)

    async def _from_upstream(self, caller: _Caller, digest: str) -> BlobRef:
        try:
            media, size, body = await caller.origin.get("blobs", caller.name, digest,
                                                        caller.auth)
        except OriginStatus as exc:
            raise _passed_on(exc, "BLOB_UNKNOWN") from None
        except OriginError as exc:
            raise ApiError(502, "UNAVAILABLE", "blob not in the cluster and the upstream "
                           "registry cannot be reached", str(exc)) from None
        self.counts["upstream_fetches"] += 1
        started = time.monotonic()
        h = _hasher(digest)
        got = [0]

        async def hashed() -> AsyncIterator[bytes]:
            async for piece in body:
                h.update(piece)
                got[0] += len(piece)
                yield piece

        try:
            # Unpinned until verified: a mismatch leaves nothing kept (GC collects it).
            cid = await self.store.add(hashed(), pin=False)
        except OriginError as exc:
            raise ApiError(502, "UNAVAILABLE", "reading from the upstream failed",
                           str(exc)) from None
        finally:
            await body.aclose()  # type: ignore[attr-defined]
        self.counts["upstream_bytes"] += got[0]
        if not _matches(digest, h) or (size >= 0 and got[0] != size):
            self.counts["rejected"] += 1
            raise ApiError(502, "UNAVAILABLE", "the upstream sent a blob that does not "
                           "match its digest; nothing was kept", digest)
        ref = BlobRef(cid, got[0], "application/octet-stream" if not media else media)
        await self._keep(digest, ref, None, "upstream", started,
                         await self._public(caller, "blobs", digest))
        return ref
