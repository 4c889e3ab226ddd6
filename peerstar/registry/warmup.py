"""Getting blocks into the node's IPFS daemon before they are asked for: the warm-up of an
image's layers when the registry serves its manifest, and the leaf fan-out of range
reads that span several leaves of a blob that lives on other nodes.

Why: when a blob's blocks are on another node, every read costs round trips between
the two daemons (~0.25 s each between two js-ipfs nodes), and a `cat` walks the DAG one
level per round trip: root, interior node, leaf. A snapshotter mounting the layers one
after another pays that walk for each layer's footer, TOC and prioritized files. Local
blocks answer in ~4 ms; so the time is set by the number of sequential round trips.

`WarmUp.manifest_served(digest, tree)` (the first time per manifest digest per
process; it never waits) starts, in the background, two phases. First the TOC phase,
what a pull waits for, all at once: the image's config block (the client's next
request) and, for every layer of an image manifest:
- its DAG skeleton (root and interior nodes, a level at a time, every node of a level at
  once) loaded into the registry's `SubDagLocator`, so later range reads name the leaf
  and never walk the DAG;
- its footer and TOC, read through the daemon from the leaves holding them (eStargz: the
  51-byte footer gives the TOC offset; zstd:chunked: the 40-byte footer; parsed by
  `peerstar.estargz`); a layer with no such footer gets its skeleton only. Once the
  path to the tail leaf is known, the footer read takes the whole tail leaf (the TOC
  is mostly in it: no second read), and, when the tail leaf is short (< 64 KiB), the
  leaf before it too: a TOC over two leaves then costs one round trip, not two
  (footer, then the TOC's head).
Then, once every TOC stage of the manifest has ended (or `toc_wait` seconds passed; a
later one goes on by itself), the bulk phase: each layer's prioritized range,
`[0, offset of .prefetch.landmark)` when the TOC has that landmark (the daemon is asked
for each leaf with `block_stat`, which fetches a block without shipping its bytes here),
and the jobs of `WarmUp.bulk_sources` (callables `(digest, tree) -> awaitables`, whose
upstream operations go through `WarmUp.bulk_op`). While a manifest's TOC phase runs, a
bulk read of one of its blobs (`Peerstar-Read-Kind: prefetch|background`) waits for its
end in `WarmUp.wait_toc_phase` (at most `toc_wait`): bulk bytes from other nodes would
slow the TOC reads every Prepare waits for.

With learning on (`profile`, see `profiles`), each layer's read profile is looked up
as soon as the manifest is served (a local hit, else one `want` in the directory,
bounded by `LearnOptions.lookup_timeout`), beside the TOC phase; in the bulk phase the
leaves covering the learned ranges get a `block_stat` each, all bounded by the same
semaphore.

`WarmUp.spread(ref, offset, length)` (the fan-out) is called for every range read not
served by a single leaf. js-ipfs 0.66 does fetch the leaves of one `cat` concurrently,
but only those below one node at a time, after that node: measured between two js-ipfs
nodes, 8 cold leaves across an interior-node boundary took 0.88-1.2 s with the cat
alone and ~0.57 s with a `block_stat` per leaf sent beside it; within one interior node
4-16 leaves took 0.48-0.97 s alone and 0.39-0.83 s with the stats. So when the blob is
known to be remote (one of its warm-up operations, a single block each, took at least
`slow` seconds) and the locator knows the range's leaves, each leaf not already known
to be local gets a `block_stat` beside the read's single `cat`, which still streams the
bytes in order; a leaf is known local once it was read or stat'ed. The reads' own times
are no evidence: under local load (32 concurrent 1 MiB reads) their first bytes take
over 0.1 s too, and taking them as such sent ~90 needless stats a second. Local blobs
never pay for it.

Every operation here is bounded: at most `limit` in flight (one semaphore for the
warm-up and the fan-out), each within `timeout`; the work is deduplicated per blob (and
per leaf in flight). A failure is counted (`peerstar_registry_warmup_failures`) and
logged once (a blob's warm-up at WARNING, a fan-out operation at INFO); nothing here
ever fails a request, or delays one but a bulk read during a TOC phase (bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from peerstar.estargz import TOC_DIGEST_ANNOTATION, FormatError, Reader
from peerstar.estargz.compression import parse_footer
from peerstar.estargz.footer import MAX_FOOTER_SIZE, ZSTD_FOOTER_SIZE
from peerstar.ipfs import ContentStore, IPFSError
from peerstar.registry.metrics import RegistryMetrics
from peerstar.registry.profiles import Range
from peerstar.registry.subdag import Leaf, SubDagLocator
from peerstar.registry.tree import BlobRef, ImageTree
from peerstar.registry.upstream import log_upstream

log = logging.getLogger("peerstar.registry.warmup")

T = TypeVar("T")
# (layer digest, where it is) -> the ranges learned for it ([]: none)
ProfileLookup = Callable[[str, BlobRef], Awaitable[list[Range]]]

# How many manifest digests, blob CIDs and leaf CIDs are remembered (each ~100 bytes).
_MAX_MANIFESTS = 4096
_MAX_BLOBS = 4096
_MAX_LEAVES = 1 << 16
# A TOC larger than this (compressed) is not read for the warm-up.
_MAX_TOC_BYTES = 64 << 20
# A tail leaf shorter than this has the leaf before it read with the footer: a TOC is
# usually longer (the bench's python layers: 3-183 KB, the one over two leaves 89 KB
# with a 29 KB tail leaf); when it is not, the cost is one needless leaf (<= 256 KiB).
_SHORT_TAIL_LEAF = 64 << 10


class _Recent:
    """A set remembering at most `size` members, the oldest forgotten first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._members: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._members

    def __len__(self) -> int:
        return len(self._members)

    def add(self, key: str) -> None:
        self._members[key] = None
        if len(self._members) > self.size:
            self._members.popitem(last=False)


class _Failed(Exception):
    """A warm-up stage failed (`stage`: skeleton, footer, toc or prefetch)."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {_why(cause)}")
        self.stage = stage


@dataclass
class _TocStage:
    """What a layer's critical stage found: `kind` (estargz, plain, skeleton), the end
    of its prioritized range (0: none) and the stages that failed."""

    started: float
    kind: str = "skeleton"
    prefetch_end: int = 0
    failures: list[_Failed] = field(default_factory=list)


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


class WarmUp:
    """The warm-up and fan-out of one registry server (see the module docstring).

    `store`: the registry's store: `block_get` (skeleton nodes, through the locator),
    `block_stat`, and its ranged read (`cat`) for the footer and TOC bytes; `locator`:
    the server's SubDagLocator, or None (then only the footer and TOC are read, from the
    blob's own CID). `manifests`: False leaves only the fan-out on. `profile`: the
    lookup of a layer's learned ranges (None: learning off).
    """

    def __init__(self, store: ContentStore, locator: SubDagLocator | None,
                 metrics: RegistryMetrics, *, limit: int = 16, timeout: float = 30.0,
                 slow: float = 0.1, manifests: bool = True, fan_out: bool = True,
                 toc_wait: float = 3.0, profile: ProfileLookup | None = None) -> None:
        self._store = store
        self._profile = profile
        self._locator = locator
        self._metrics = metrics
        self._limit = asyncio.Semaphore(max(1, limit))
        self.limit = max(1, limit)
        self.timeout = timeout
        self.slow = slow
        self.manifests = manifests
        self.fan_out = fan_out and locator is not None and hasattr(store, "block_stat")
        self.in_flight = 0
        self.max_in_flight = 0
        self._seen_manifests = _Recent(_MAX_MANIFESTS)
        self._seen_blobs = _Recent(_MAX_BLOBS)
        self._remote = _Recent(_MAX_BLOBS)
        self._local = _Recent(_MAX_LEAVES)
        self._stat_pending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.toc_wait = toc_wait
        # blob CID -> the TOC phase of the manifest warm-up it belongs to, while it runs
        self._toc_phases: dict[str, asyncio.Event] = {}
        # The bulk sources: each is called once per manifest warm-up after its TOC phase
        # (`source(manifest digest, tree)`) and returns the jobs (awaitables) to run
        # then, beside the layers' prioritized ranges; a job's upstream operations go
        # through `bulk_op` (the warm-up's bound and timeout); a failure is counted
        # (stage=bulk) and logged, never a request's.
        self.bulk_sources: list[Callable[[str, ImageTree], Iterable[Awaitable[None]]]] = []

    # -- what the server calls ------------------------------------------------------------

    def manifest_served(self, digest: str, tree: ImageTree) -> None:
        """The registry is answering for manifest `digest` of `tree`: the first time,
        start warming its layers. Returns at once; never raises."""
        if not self.manifests or self._closed or digest in self._seen_manifests:
            return
        self._seen_manifests.add(digest)
        self._spawn(self._warm_manifest(digest, tree))

    def spread(self, ref: BlobRef, offset: int, length: int) -> None:
        """A read of `length` bytes from `offset` of blob `ref` is starting: if the blob
        is remote, get the daemon fetching every leaf of the range it may lack at once.
        Never waits, never raises."""
        if ref.cid not in self._remote or not self.fan_out or self._closed:
            return
        assert self._locator is not None
        try:
            leaves = self._locator.known_leaves(ref.cid, offset, length, ref.size)
        except Exception as exc:  # a malformed CID in a node: nothing to fan out to
            log.info("no leaf fan-out for %s: %s", ref.cid, _why(exc))
            return
        if leaves is None or len(leaves) < 2:
            return
        for leaf in leaves:
            if leaf.cid in self._local or leaf.cid in self._stat_pending:
                continue
            self._stat_pending.add(leaf.cid)
            self._spawn(self._fan_out_stat(ref, leaf))

    def leaf_read(self, ref: BlobRef, cid: str) -> None:
        """A range read of blob `ref` from its leaf `cid` got bytes: the leaf is local."""
        if ref.cid in self._remote:
            self._local.add(cid)

    def is_remote(self, blob_cid: str) -> bool:
        return blob_cid in self._remote

    def toc_phase_running(self, blob_cid: str) -> bool:
        """Whether the TOC phase of a manifest warm-up holding blob `blob_cid` runs."""
        return blob_cid in self._toc_phases

    async def wait_toc_phase(self, blob_cid: str) -> None:
        """Until the TOC phase of the manifest warm-up holding blob `blob_cid` has ended,
        at most `toc_wait` seconds (a bulk read waits here so that it does not compete
        with the reads a pull waits for). Returns at once when none runs; never raises."""
        phase = self._toc_phases.get(blob_cid)
        if phase is None:
            return
        try:
            async with asyncio.timeout(self.toc_wait):
                await phase.wait()
            self._metrics.bulk_deferred.labels("phase_ended").inc()
        except TimeoutError:
            self._metrics.bulk_deferred.labels("bound").inc()

    async def bulk_op(self, blob_cid: str, cid: str, call: Callable[[], Awaitable[T]]) -> T:
        """One upstream operation of a bulk job for blob `blob_cid` on block or node
        `cid`: within the warm-up's bound and timeout, counted and logged."""
        return await self._op("warm-bulk", blob_cid, cid, call)

    async def settle(self) -> None:
        """Until every warm-up and fan-out started so far has finished (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    # -- machinery ------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            coro)  # type: ignore[arg-type]  # an Awaitable that is a coroutine
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _op(self, kind: str, blob: str, cid: str, call: Callable[[], Awaitable[T]]
                  ) -> T:
        """One upstream operation: waits for a slot of the semaphore, then runs within
        the timeout; counted, logged (`log_upstream`), and a slow one marks `blob`
        remote."""
        async with self._limit:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._metrics.warmup_in_flight.inc()
            self._metrics.warmup_ops.labels(kind).inc()
            started = time.monotonic()
            ok = False
            try:
                async with asyncio.timeout(self.timeout):
                    result = await call()
                ok = True
                return result
            finally:
                self.in_flight -= 1
                self._metrics.warmup_in_flight.dec()
                seconds = time.monotonic() - started
                if seconds >= self.slow:
                    self._remote.add(blob)
                log_upstream(kind, cid, started, seconds, self.slow, blob=blob, ok=ok)

    def _get_block_for(self, blob: str) -> Callable[[str], Awaitable[bytes]]:
        async def get_block(cid: str) -> bytes:
            return await self._op("warm-node", blob, cid, lambda: self._store.block_get(cid))
        return get_block

    async def _warm_manifest(self, digest: str, tree: ImageTree) -> None:
        try:
            doc = json.loads(tree.manifests[digest])
            layers = doc.get("layers") if isinstance(doc, dict) else None
            if not isinstance(layers, list):
                return  # an index: its manifests are warmed when they are asked for
            learned: list[tuple[str, BlobRef]] = []  # (layer digest, where it is)
            config = doc.get("config")
            cref = tree.blobs.get(str(config.get("digest"))) if isinstance(config, dict) else None
            if cref is not None and cref.cid not in self._seen_blobs:
                self._seen_blobs.add(cref.cid)
            else:
                cref = None
            blobs: list[tuple[BlobRef, str | None]] = []
            for layer in layers:
                ref = tree.blobs.get(str(layer.get("digest"))) if isinstance(layer, dict) else None
                if ref is None or ref.cid in self._seen_blobs:
                    continue
                self._seen_blobs.add(ref.cid)
                if self._profile is not None:
                    learned.append((str(layer.get("digest")), ref))
                ann = layer.get("annotations")
                toc_digest = ann.get(TOC_DIGEST_ANNOTATION) if isinstance(ann, dict) else None
                blobs.append((ref, toc_digest if isinstance(toc_digest, str) else None))
        except Exception as exc:  # a manifest the tree walk accepted: should not happen
            log.info("no warm-up for manifest %s: %s", digest, _why(exc))
            self._metrics.warmup_failures.labels("manifest").inc()
            return
        phase = asyncio.Event()
        for ref, _ in blobs:
            self._toc_phases.setdefault(ref.cid, phase)
        try:
            async with asyncio.TaskGroup() as group:
                # The layers' read profiles are looked up beside the TOC phase...
                lookups = [(ref, group.create_task(self._lookup(layer_digest, ref)))
                           for layer_digest, ref in learned]
                # The critical stage: what a pull waits for (config, skeletons, footers,
                # TOCs), all at once...
                tocs = [group.create_task(self._toc_stage(ref, toc_digest))
                        for ref, toc_digest in blobs]
                critical: list[asyncio.Task[Any]] = [*tocs]
                if cref is not None:
                    critical.append(group.create_task(self._warm_config(cref)))
                if critical:
                    await asyncio.wait(critical, timeout=self.toc_wait)
                self._end_toc_phase(phase)
                # ...then the bulk: each layer's prioritized range once its TOC is read
                # (at once, or when a TOC stage outlasting `toc_wait` ends), the learned
                # ranges, and the jobs of the bulk sources.
                for (ref, _), toc in zip(blobs, tocs, strict=True):
                    group.create_task(self._bulk_stage(ref, toc))
                for ref, lookup in lookups:
                    group.create_task(self._warm_learned(ref, lookup))
                for job in self._bulk_jobs(digest, tree):
                    group.create_task(self._bulk_job(digest, job))
        finally:
            self._end_toc_phase(phase)

    def _end_toc_phase(self, phase: asyncio.Event) -> None:
        if phase.is_set():
            return
        phase.set()
        for cid in [c for c, p in self._toc_phases.items() if p is phase]:
            del self._toc_phases[cid]

    def _bulk_jobs(self, digest: str, tree: ImageTree) -> list[Awaitable[None]]:
        jobs: list[Awaitable[None]] = []
        for source in self.bulk_sources:
            try:
                jobs.extend(source(digest, tree))
            except Exception as exc:
                self._metrics.warmup_failures.labels("bulk").inc()
                log.info("bulk warm-up source %r failed for manifest %s: %s", source, digest,
                         _why(exc))
        return jobs

    async def _bulk_job(self, digest: str, job: Awaitable[None]) -> None:
        try:
            await job
        except Exception as exc:
            self._metrics.warmup_failures.labels("bulk").inc()
            log.info("bulk warm-up job of manifest %s failed (reads are not affected): %s",
                     digest, _why(exc))

    async def _lookup(self, digest: str, ref: BlobRef) -> list[Range]:
        """The ranges learned for layer `digest` ([] if none, or if the lookup failed)."""
        assert self._profile is not None
        try:
            return await self._profile(digest, ref)
        except Exception as exc:  # a lookup is a hint: without it the reads fetch
            log.info("no read profile for %s: %s", digest, _why(exc))
            return []

    async def _warm_learned(self, ref: BlobRef, lookup: Awaitable[list[Range]]) -> None:
        """The layer's learned ranges (`lookup`, started with the TOC phase) into the
        daemon: a `block_stat` of every leaf covering them. Never raises."""
        ranges = await lookup
        if not ranges:
            return
        started = time.monotonic()
        try:
            leaves: dict[str, Leaf] = {}
            for start, end in ranges:
                for leaf in await self._leaves(ref, start, end - start) or ():
                    leaves[leaf.cid] = leaf
            warmed = await self._stat_leaves(ref, list(leaves.values()), "learn-stat")
        except Exception as exc:
            self._metrics.warmup_failures.labels("learned").inc()
            log.warning("warming the learned ranges of %s failed (reads are not affected): %s",
                        ref.cid, _why(exc))
            return
        self._metrics.profiles.labels("applied").inc()
        self._metrics.profile_bytes.inc(warmed)
        log.info("warmed %d learned ranges of %s (%d leaves, %d bytes fetched) in %.0f ms",
                 len(ranges), ref.cid, len(leaves), warmed,
                 (time.monotonic() - started) * 1000)

    async def _warm_config(self, ref: BlobRef) -> None:
        if not hasattr(self._store, "block_stat"):
            return
        try:
            await self._op("warm-config", ref.cid, ref.cid,
                           lambda: self._store.block_stat(ref.cid))
        except Exception as exc:
            self._metrics.warmup_failures.labels("config").inc()
            log.info("warm-up of config %s failed (its request reads it): %s", ref.cid,
                     _why(exc))

    async def _toc_stage(self, ref: BlobRef, toc_digest: str | None) -> _TocStage:
        """A layer's critical stage: its footer and TOC beside its skeleton."""
        started = time.monotonic()
        stages: list[Awaitable[tuple[str, int]]] = [self._estargz(ref, toc_digest)]
        if self._locator is not None:
            stages.append(self._skeleton(ref))
        results = await asyncio.gather(*stages, return_exceptions=True)
        out = _TocStage(started)
        for res in results:
            if isinstance(res, asyncio.CancelledError):
                raise res
            if isinstance(res, _Failed):
                out.failures.append(res)
            elif isinstance(res, BaseException):  # a bug here: still never a request's
                out.failures.append(_Failed("internal", res))
        first = results[0]
        if not isinstance(first, BaseException):
            out.kind, out.prefetch_end = first
        return out

    async def _bulk_stage(self, ref: BlobRef, toc: asyncio.Task[_TocStage]) -> None:
        """A layer's prioritized range (once its TOC is read), then its outcome counted."""
        stage = await toc
        if stage.prefetch_end:
            try:
                await self._prefetch(ref, 0, min(stage.prefetch_end, ref.size))
            except Exception as exc:
                stage.failures.append(_Failed("prefetch", exc))
        ms = (time.monotonic() - stage.started) * 1000
        if stage.failures:
            for failure in stage.failures:
                self._metrics.warmup_failures.labels(failure.stage).inc()
            self._metrics.warmups.labels("failed").inc()
            log.warning("warm-up of blob %s incomplete after %.0f ms (reads are not affected): "
                        "%s", ref.cid, ms, "; ".join(str(f) for f in stage.failures))
            return
        self._metrics.warmups.labels(stage.kind).inc()
        log.debug("warmed blob %s (%s) in %.0f ms", ref.cid, stage.kind, ms)

    async def _skeleton(self, ref: BlobRef) -> tuple[str, int]:
        assert self._locator is not None
        try:
            await self._locator.load_skeleton(ref.cid, get_block=self._get_block_for(ref.cid))
        except Exception as exc:
            raise _Failed("skeleton", exc) from None
        return "skeleton", 0

    def _footer_read_start(self, ref: BlobRef, tail_at: int) -> int:
        """Where the footer read starts: at the tail leaf's start (the daemon fetches
        the whole leaf anyway, and a TOC is mostly in it: then it needs no second cat),
        or at the start of the leaf before it when the tail leaf is short
        (`_SHORT_TAIL_LEAF`) -- a TOC longer than the tail leaf then costs one round trip,
        not two (footer, then the TOC's head). `tail_at` when the locator does not know
        those leaves yet."""
        if self._locator is None or tail_at == 0:
            return tail_at
        known = self._locator.known_leaves(ref.cid, tail_at, ref.size - tail_at, ref.size)
        if not known:
            return tail_at
        tail = known[0]
        if tail.start == 0 or tail.size >= _SHORT_TAIL_LEAF:
            return tail.start
        before = self._locator.known_leaves(ref.cid, tail.start - 1, 1, ref.size)
        return before[0].start if before else tail.start

    async def _estargz(self, ref: BlobRef, toc_digest: str | None) -> tuple[str, int]:
        """Footer and TOC: ("estargz", the prioritized range's end or 0) when read,
        ("plain", 0) when the blob has no eStargz / zstd:chunked footer."""
        size = ref.size
        if size < ZSTD_FOOTER_SIZE:
            return "plain", 0
        tail_at = size - min(size, MAX_FOOTER_SIZE)
        try:
            if self._locator is not None:  # the path to the tail leaf, for its neighbour
                await self._leaves(ref, tail_at, size - tail_at)
            base = self._footer_read_start(ref, tail_at)
            data = await self._read(ref, base, size - base)
        except Exception as exc:
            raise _Failed("footer", exc) from None
        try:
            footer = parse_footer(data[tail_at - base:], size)
        except FormatError:
            return "plain", 0
        try:
            if footer.toc_offset < base:
                if base - footer.toc_offset > _MAX_TOC_BYTES:
                    raise FormatError(f"TOC of {base - footer.toc_offset} bytes: too large")
                data = await self._read(ref, footer.toc_offset, base - footer.toc_offset) + data
                base = footer.toc_offset
            view = memoryview(data)
            reader = await asyncio.to_thread(
                Reader.open, lambda off, n: bytes(view[off - base:off - base + n]), size,
                toc_digest=toc_digest)
            end = reader.prefetch_end()
        except Exception as exc:
            raise _Failed("toc", exc) from None
        return "estargz", end or 0

    async def _leaves(self, ref: BlobRef, offset: int, length: int) -> list[Leaf] | None:
        if self._locator is None:
            return None
        return await self._locator.leaves(ref.cid, offset, length, ref.size,
                                          get_block=self._get_block_for(ref.cid))

    async def _read(self, ref: BlobRef, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of the blob through the daemon: from each leaf
        holding them, all at once (from the blob's CID without a locator)."""
        leaves = await self._leaves(ref, offset, length)
        if leaves is None:
            return await self._op("warm-read", ref.cid, ref.cid,
                                  lambda: self._cat(ref.cid, offset, length))
        end = offset + length

        async def piece(leaf: Leaf) -> bytes:
            lo, hi = max(offset, leaf.start), min(end, leaf.start + leaf.size)
            data = await self._op("warm-read", ref.cid, leaf.cid,
                                  lambda: self._cat(leaf.cid, lo - leaf.start, hi - lo))
            self._local.add(leaf.cid)
            return data

        return b"".join(await asyncio.gather(*(piece(leaf) for leaf in leaves)))

    async def _cat(self, cid: str, offset: int, length: int) -> bytes:
        parts = []
        # every store's cat is an async generator; the interface promises only AsyncIterator
        async with contextlib.aclosing(self._store.cat(cid, offset, length)) as stream:  # type: ignore[type-var]
            async for part in stream:
                parts.append(part)
        data = b"".join(parts)[:length]
        if len(data) != length:
            raise IPFSError(f"cat {cid} at {offset} gave {len(data)} of {length} bytes")
        return data

    async def _prefetch(self, ref: BlobRef, offset: int, length: int) -> None:
        """Every leaf of the range into the daemon, all at once, without their bytes."""
        if not hasattr(self._store, "block_stat"):
            return
        leaves = await self._leaves(ref, offset, length)
        if leaves is None:
            return  # no leaf CIDs without a locator: left to the reads
        await self._stat_leaves(ref, leaves, "warm-stat")

    async def _stat_leaves(self, ref: BlobRef, leaves: list[Leaf], kind: str) -> int:
        """A `block_stat` of each leaf not known local, all at once (bounded by the
        semaphore); the bytes of the leaves stat'ed."""
        if not hasattr(self._store, "block_stat"):
            return 0
        fetched = 0

        async def stat(leaf: Leaf) -> None:
            nonlocal fetched
            if leaf.cid in self._local:
                return
            await self._op(kind, ref.cid, leaf.cid, lambda: self._store.block_stat(leaf.cid))
            self._local.add(leaf.cid)
            fetched += leaf.size

        await _all(stat(leaf) for leaf in leaves)
        return fetched

    async def _fan_out_stat(self, ref: BlobRef, leaf: Leaf) -> None:
        try:
            await self._op("fanout-stat", ref.cid, leaf.cid,
                           lambda: self._store.block_stat(leaf.cid))
            self._local.add(leaf.cid)
        except Exception as exc:
            self._metrics.warmup_failures.labels("fanout").inc()
            log.info("leaf fan-out of %s (blob %s) failed (the read goes on): %s", leaf.cid,
                     ref.cid, _why(exc))
        finally:
            self._stat_pending.discard(leaf.cid)


async def _all(aws: Iterable[Awaitable[None]]) -> None:
    results = await asyncio.gather(*aws, return_exceptions=True)
    for res in results:
        if isinstance(res, BaseException):
            raise res
