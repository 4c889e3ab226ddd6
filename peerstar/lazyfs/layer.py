"""One lazily fetched eStargz layer: the verified TOC, verified chunk reads, prefetch,
background fetch and the per-layer stats.

Owns: `LazyLayer.open` (footer and TOC through the fetcher, TOC checked against the
expected TOC digest), `read_file` (only the chunks covering the request are fetched,
each decompressed and checked against its `chunkDigest` before any byte is returned;
verified chunks are cached on disk by digest), the read-ahead along a file (the next
`READ_AHEAD_CHUNKS` chunks of a file being read are fetched beside the reader, by their
own threads, so a sequential reader finds them in flight or done instead of paying one
round trip per chunk; for an ELF binary read from its start, the interpreter and the
libraries the loader will open from this layer, see `elfdeps`), `prefetch`
(`[0, .prefetch.landmark)`), the idle-time background fetcher (yields to on-demand
reads), and `stats()`.

Memory stays bounded whatever the TOC declares: a chunk of up to `BIG_CHUNK_BYTES` is
held whole (and the last `MEMORY_CHUNKS_BYTES` of them kept); a bigger one is
decompressed and verified as a stream into the chunk cache under a temporary name,
renamed into place only once its digest matched, and reads are served from that file
(`DiskCache.put_stream`, `read_range`), so no byte of it reaches a reader unverified.
When the cache cannot take it (over its bound, disk full, no cache; tried once per
mount), every read of it decompresses and verifies the whole chunk again, keeping only
the bytes asked for: slow, but right and bounded.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

from peerstar.estargz import Reader
from peerstar.estargz.errors import VerifyError
from peerstar.estargz.toc import TOCEntry
from peerstar.lazyfs import elfdeps, metrics
from peerstar.lazyfs.cache import DiskCache
from peerstar.lazyfs.fetcher import BlobFetcher, FetchError

_T = TypeVar("_T")

log = logging.getLogger("peerstar.lazyfs.layer")

BACKGROUND_BATCH = 1 << 20  # bytes per background request
PREFETCH_BATCH = 64 << 20  # bytes per prefetch request (one, for any usual image)
# Recently used verified chunks kept in memory: the kernel reads a file in pieces of at
# most 128 KiB, so without this every piece of a 4 MiB chunk would re-read it from disk.
MEMORY_CHUNKS_BYTES = 32 << 20
# A chunk larger than this is never held in memory whole, whatever its TOC declares: it is
# decompressed and verified as a stream into the chunk cache (published there only once
# its digest matched) and each read is served from that file; without room on disk,
# every read decompresses and verifies the whole chunk again, keeping only its window.
BIG_CHUNK_BYTES = 16 << 20
# Chunks of a file fetched ahead of the one a reader is in (4 MiB each by default), and the
# threads per layer that fetch them and a binary's libraries (`elfdeps`): bounded, and apart
# from the readers' own threads, so a read-ahead never holds up an on-demand read of
# another file.
READ_AHEAD_CHUNKS = 2
READ_AHEAD_WORKERS = 8


class ChunkVerifyError(Exception):
    """A chunk's bytes did not match the TOC: readers get EIO, never the bytes."""


class LazyLayer:
    """A remote layer opened from its TOC; thread-safe reads."""

    def __init__(self, fetcher: BlobFetcher, reader: Reader, chunk_cache: DiskCache | None,
                 *, verify: bool = True) -> None:
        self.fetcher = fetcher
        self.reader = reader
        self.chunk_cache = chunk_cache
        self.verify = verify
        self.digest = fetcher.digest
        self._label = self.digest[:19]
        # The idle clock starts at mount: a layer just mounted is about to be read.
        self.last_foreground = time.monotonic()  # of the last on-demand read
        # Shared by every layer mounted with the same cache: background fetch waits
        # until no layer of the node was read lately, as the reference does.
        self.activity_file: Path | None = None
        self._activity_touched = 0.0
        self.prefetch_done = threading.Event()
        # Set once the bytes of `[0, prefetch_end)` are in the region cache (or prefetch
        # gave up): from then on a read of a prioritized file needs no network.
        self.prefetch_fetched = threading.Event()
        self.prefetch_end: int | None = None  # set by `plan_prefetch`
        self.prefetch_error: str | None = None
        self._stop = threading.Event()
        self._bg_thread: threading.Thread | None = None
        self.verify_failures = 0
        self._mem: OrderedDict[str, bytes] = OrderedDict()
        self._mem_bytes = 0
        self._mem_lock = threading.Lock()
        self._chunk_inflight: dict[str, Future[bytes]] = {}
        self._big_inflight: dict[str, Future[bool]] = {}  # key -> whether now on disk
        self._big_uncached: set[str] = set()  # big chunks the cache could not take
        # file name -> index of the last chunk handed to the read-ahead
        self._ahead_marks: dict[str, int] = {}
        self._ahead_queue: queue.Queue[Callable[[], object]] | None = None
        self._elf_seen: set[str] = set()  # files whose loader dependencies were queued

    @classmethod
    def open(cls, fetcher: BlobFetcher, *, toc_digest: str | None,
             chunk_cache: DiskCache | None = None, verify: bool = True) -> LazyLayer:
        """Read footer and TOC; with `verify`, the TOC must have digest `toc_digest`."""
        if verify and not toc_digest:
            raise VerifyError("no TOC digest to verify the layer against (pass verify=False "
                              "to mount an unverified layer)")
        reader = Reader.open(lambda off, n: fetcher.read_at(off, n, "toc"), fetcher.size,
                             toc_digest=toc_digest if verify else None)
        return cls(fetcher, reader, chunk_cache, verify=verify)

    # -- reads -----------------------------------------------------------------------

    def _chunk_key(self, chunk: TOCEntry) -> str:
        if self.verify and chunk.chunk_digest:
            return chunk.chunk_digest  # content-addressed: shared by layers holding it
        return f"{self.digest}@{chunk.offset}"

    def chunk_window(self, chunk: TOCEntry, lo: int, hi: int, kind: str = "on_demand"
                     ) -> bytes:
        """Verified bytes [lo, hi) of one chunk (chunk-relative)."""
        if chunk.chunk_size <= BIG_CHUNK_BYTES:
            return self.chunk_bytes(chunk, kind)[lo:hi]
        key = self._chunk_key(chunk)
        for _ in range(2):  # (evicted between the two: try once more, then stream)
            if self.chunk_cache is not None:
                data = self.chunk_cache.read_range(key, lo, hi - lo, chunk.chunk_size)
                if data is not None:
                    return data
            if not self._big_to_disk(chunk, key, kind):
                break
        return b"".join(self._verified_pieces(chunk, kind, lo, hi))

    def warm_chunk(self, chunk: TOCEntry, kind: str) -> None:
        """Have one chunk verified and cached (in memory, or on disk for a big one)."""
        if chunk.chunk_size <= BIG_CHUNK_BYTES:
            self.chunk_bytes(chunk, kind)
        elif self.chunk_cache is not None:
            self._big_to_disk(chunk, self._chunk_key(chunk), kind)

    def _big_to_disk(self, chunk: TOCEntry, key: str, kind: str) -> bool:
        """Stream a big chunk, verified, into the chunk cache (once, however many readers
        ask at the same time); False when the cache cannot take it."""
        cache = self.chunk_cache
        if cache is None or key in self._big_uncached:
            return False
        done = self._once(self._big_inflight, key, lambda: cache.put_stream(
            key, chunk.chunk_size, self._verified_pieces(chunk, kind)))
        if not done:
            self._big_uncached.add(key)  # (tried once per mount: no disk write per read)
            log.warning("layer %s: chunk of %d bytes at offset %d does not fit the chunk "
                        "cache: each read decompresses and verifies it whole", self.digest,
                        chunk.chunk_size, chunk.offset)
        return done

    def _verified_pieces(self, chunk: TOCEntry, kind: str, lo: int = 0,
                         hi: int | None = None) -> Iterator[bytes]:
        """`Reader.iter_chunk` through the fetcher: bytes [lo, hi) of `chunk`, trusted
        only once the iterator ended without raising (ChunkVerifyError)."""
        pieces = self.reader.iter_chunk(
            chunk, lo, hi, verify=self.verify,
            read_at=lambda off, n: self.fetcher.read_at(off, n, kind))
        try:
            yield from pieces
        except VerifyError as exc:
            raise self._verify_failed(chunk, exc) from None

    def _verify_failed(self, chunk: TOCEntry, exc: VerifyError) -> ChunkVerifyError:
        self.verify_failures += 1
        metrics.VERIFY_FAILURES.labels(self._label).inc()
        log.error("layer %s: %s -- refusing to serve these bytes (EIO)", self.digest, exc)
        # The bad bytes must not stay cached: a fixed server gets a fresh chance.
        start, end = self.reader.chunk_section(chunk)
        self.fetcher.forget(start, end - start)
        return ChunkVerifyError(str(exc))

    def chunk_bytes(self, chunk: TOCEntry, kind: str = "on_demand") -> bytes:
        """The verified uncompressed bytes of one chunk (of at most BIG_CHUNK_BYTES: a
        bigger one is read through `chunk_window`)."""
        key = self._chunk_key(chunk)

        def in_memory() -> bytes | None:
            data = self._mem.get(key)
            if data is not None:
                self._mem.move_to_end(key)
            return data

        # The kernel's readahead sends several reads into one chunk at once: one thread
        # fetches and verifies it, the others wait for that result.
        return self._once(self._chunk_inflight, key,
                          lambda: self._load_chunk(chunk, key, kind), cached=in_memory)

    def _once(self, inflight: dict[str, Future[_T]], key: str, work: Callable[[], _T], *,
              cached: Callable[[], _T | None] | None = None) -> _T:
        """`work()` run by one thread per `key` at a time; the others asking meanwhile get
        its result (or exception). `cached` is tried first, under the same lock that
        registers the work, so no thread misses a result another just kept."""
        with self._mem_lock:
            if cached is not None:
                hit = cached()
                if hit is not None:
                    return hit
            fut = inflight.get(key)
            mine = fut is None
            if mine:
                fut = inflight[key] = Future()
        assert fut is not None
        if not mine:
            return fut.result()
        try:
            result = work()
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        else:
            fut.set_result(result)
        finally:
            with self._mem_lock:
                del inflight[key]
        return result

    def _load_chunk(self, chunk: TOCEntry, key: str, kind: str) -> bytes:
        if self.chunk_cache is not None:
            data = self.chunk_cache.get(key, chunk.chunk_size)
            if data is not None:
                self._remember(key, data)
                return data
        start, end = self.reader.chunk_section(chunk)
        section = self.fetcher.read_at(start, end - start, kind)
        try:
            data = self.reader.decompress_chunk(chunk, section, verify=self.verify)
        except VerifyError as exc:
            raise self._verify_failed(chunk, exc) from None
        if self.chunk_cache is not None:
            self.chunk_cache.put(key, data)
        self._remember(key, data)
        return data

    def _remember(self, key: str, data: bytes) -> None:
        with self._mem_lock:
            if key in self._mem:
                return
            self._mem[key] = data
            self._mem_bytes += len(data)
            while self._mem_bytes > MEMORY_CHUNKS_BYTES and len(self._mem) > 1:
                _, old = self._mem.popitem(last=False)
                self._mem_bytes -= len(old)

    def read_file(self, entry: TOCEntry, offset: int, size: int) -> bytes:
        """`size` bytes of regular file `entry` at `offset` (raises ChunkVerifyError,
        FetchError)."""
        self._mark_foreground()
        # Queued before this read's own fetch, so that the next chunks and, for a binary,
        # the loader's next files travel beside it rather than one round trip later.
        self._read_ahead(entry, offset + size)
        if offset == 0:
            self._follow_elf(entry)
        data = self._read_entry(entry, offset, size, "on_demand")
        self._mark_foreground()
        return data

    def _read_entry(self, entry: TOCEntry, offset: int, size: int, kind: str) -> bytes:
        return b"".join(self.chunk_window(c, lo, hi, kind)
                        for c, lo, hi in self.reader.chunk_spans(entry, offset, size))

    def _read_ahead(self, entry: TOCEntry, end: int) -> None:
        """Queue the chunks of `entry` after the one holding file offset `end - 1` (at
        most READ_AHEAD_CHUNKS past it), each once."""
        chunks = self.reader.entry_chunks(entry)
        if len(chunks) < 2 or end >= entry.size:
            return
        i = bisect_right([c.chunk_offset for c in chunks], max(end - 1, 0)) - 1
        self._queue_chunks(entry, chunks, i + 1, min(i + READ_AHEAD_CHUNKS, len(chunks) - 1))

    def _queue_chunks(self, entry: TOCEntry, chunks: list[TOCEntry], first: int,
                      last: int) -> None:
        with self._mem_lock:
            done = self._ahead_marks.get(entry.name, -1)
            if last <= done:
                return
            self._ahead_marks[entry.name] = last
            todo = [c for c in chunks[max(first, done + 1):last + 1]
                    if self._chunk_key(c) not in self._mem]
        for c in todo:
            self._ahead(functools.partial(self.warm_chunk, c, "readahead"))

    def _follow_elf(self, entry: TOCEntry) -> None:
        """For an ELF file read from its start, fetch the interpreter and the libraries
        the loader will open next (those this layer holds), and theirs in turn."""
        with self._mem_lock:
            if entry.name in self._elf_seen or entry.size < 64:
                return
            self._elf_seen.add(entry.name)

        def read(off: int, n: int) -> bytes:
            return self._read_entry(entry, off, n, "readahead")

        def fetch(deps: elfdeps.ElfDeps) -> list[TOCEntry]:
            # Every file's chunks are queued before any of their own dependencies is
            # followed, so the workers fetch side by side instead of waiting in a parse.
            found = [d for d in elfdeps.resolve(self.reader, entry.name, deps)
                     if d.size and self.reader.entry_chunks(d)]
            for dep in found:
                chunks = self.reader.entry_chunks(dep)
                self._queue_chunks(dep, chunks, 0, min(READ_AHEAD_CHUNKS, len(chunks) - 1))
            return found

        def follow() -> None:
            # The interpreter first: the kernel opens it as soon as it has the program
            # headers, before the loader reads the dynamic section.
            head = elfdeps.parse(read, entry.size, needed=False)
            if head is None:
                return
            fetch(head)
            deps = elfdeps.parse(read, entry.size)
            if deps is not None:
                for dep in fetch(deps):
                    self._follow_elf(dep)
        self._ahead(follow)

    def _ahead(self, job: Callable[[], object]) -> None:
        with self._mem_lock:
            if self._ahead_queue is None:
                self._ahead_queue = queue.Queue()
                for n in range(READ_AHEAD_WORKERS):
                    threading.Thread(target=self._ahead_worker, daemon=True,
                                     name=f"ahead-{self._label}-{n}").start()
        self._ahead_queue.put(job)

    def _ahead_worker(self) -> None:
        assert self._ahead_queue is not None
        while not self._stop.is_set():
            job = self._ahead_queue.get()
            try:
                job()
            except (FetchError, ChunkVerifyError) as exc:  # the reader will see it itself
                log.debug("layer %s: read-ahead: %s", self.digest, exc)

    def _mark_foreground(self) -> None:
        now = time.monotonic()
        self.last_foreground = now
        if self.activity_file is not None and now - self._activity_touched > 0.5:
            self._activity_touched = now
            try:
                self.activity_file.touch()
            except OSError:
                pass

    def quiet_seconds(self) -> float:
        """Seconds since the last on-demand read of this layer or any other sharing the
        activity file."""
        quiet = time.monotonic() - self.last_foreground
        if self.activity_file is not None:
            try:
                quiet = min(quiet, time.time() - self.activity_file.stat().st_mtime)
            except OSError:
                pass
        return quiet

    # -- prefetch and background fetch ----------------------------------------------

    def prefetch_range(self, default_size: int = 0) -> int:
        """End of the prefetch range: the landmark offset, 0 with `.no.prefetch.landmark`,
        else `default_size` (the `stargz.prefetch` label of the reference)."""
        if self.reader.lookup(".no.prefetch.landmark") is not None:
            return 0
        end = self.reader.prefetch_end()
        if end is not None:
            return end
        return min(default_size, self.reader.footer.data_end)

    def prefetch(self, default_size: int = 0) -> None:
        """Fetch `[0, prefetch_range)` in one go, then decompress and verify the chunks in
        it into the chunk cache, so the prioritized files read without the network.

        Runs beside the mount, not before it: a read of a file in the range meanwhile
        waits for `prefetch_fetched` (see `in_prefetch`), then shares the chunk work."""
        t0 = time.monotonic()
        try:
            end = self.plan_prefetch(default_size)
            if end > 0:
                # In requests of at most PREFETCH_BATCH, none kept: the range is the
                # blob's to declare, the memory is not.
                f = self.fetcher
                last = (end - 1) // f.region_size
                per = max(1, PREFETCH_BATCH // f.region_size)
                for first in range(0, last + 1, per):
                    f.get_regions(range(first, min(first + per, last + 1)), "prefetch")
                self.prefetch_fetched.set()
                for e in self.reader.entries:
                    if e.is_data and e.chunk_size > 0 and e.offset < end:
                        try:
                            self.warm_chunk(e, "prefetch")
                        except ChunkVerifyError:
                            pass  # logged; reading that file gives EIO
        except FetchError as exc:
            self.prefetch_error = str(exc)
            log.warning("layer %s: prefetch failed: %s", self.digest, exc)
        finally:
            self.prefetch_fetched.set()
            metrics.PREFETCH_SECONDS.labels(self._label).observe(time.monotonic() - t0)
            self.prefetch_done.set()
        try:
            self.fetcher.scan_cached()  # regions earlier mounts left, for the stats
        except FetchError:
            pass

    def plan_prefetch(self, default_size: int = 0) -> int:
        """Fix the prefetch range before the filesystem serves reads (idempotent)."""
        if self.prefetch_end is None:
            self.prefetch_end = self.prefetch_range(default_size)
        return self.prefetch_end

    def in_prefetch(self, entry: TOCEntry) -> bool:
        """Whether reading `entry` should wait for the prefetch: its data starts in the
        prefetch range, whose bytes are still on the way."""
        end = self.prefetch_end
        return end is not None and not self.prefetch_fetched.is_set() and entry.offset < end

    def start_background(self, idle: float = 5.0, workers: int = 2) -> None:
        """Fetch the rest of the blob once no on-demand read happened for `idle` seconds."""
        if self._bg_thread is not None:
            return
        self._bg_next = 0
        self._bg_lock = threading.Lock()
        threads = [threading.Thread(target=self._background, args=(idle,), daemon=True,
                                    name=f"bg-{self._label}-{n}") for n in range(workers)]
        self._bg_thread = threads[0]
        for t in threads:
            t.start()

    def _background(self, idle: float) -> None:
        f = self.fetcher
        per = max(1, BACKGROUND_BATCH // f.region_size)
        try:
            total = f.num_regions()
        except FetchError:
            return
        while not self._stop.is_set():
            quiet = self.quiet_seconds()
            if quiet < idle:  # an on-demand read is recent: let it have the bandwidth
                self._stop.wait(idle - quiet)
                continue
            with self._bg_lock:
                first = self._bg_next
                self._bg_next += per
            if first >= total:
                return
            todo = [i for i in range(first, min(first + per, total)) if not f.is_cached(i)]
            if not todo:
                continue
            try:
                f.get_regions(todo, "background")
            except FetchError as exc:
                log.info("layer %s: background fetch paused: %s", self.digest, exc)
                with self._bg_lock:
                    self._bg_next = min(self._bg_next, first)
                self._stop.wait(idle)

    def stop(self) -> None:
        self._stop.set()

    # -- stats -----------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        f = self.fetcher
        size = f.size
        with f.lock:
            cached = sum(b - a for a, b in (f.region_span(i) for i in f.cached_regions))
        return {
            "digest": self.digest,
            "size": size,
            "fetchedSize": f.stats.fetched_bytes,
            "cachedSize": cached,
            "fetchedPercent": round(100.0 * cached / size, 2) if size else 100.0,
            "requests": f.stats.requests,
            "singleRangeMode": f.single_range,
            "prefetchDone": self.prefetch_done.is_set(),
            "prefetchError": self.prefetch_error,
            "verifyFailures": self.verify_failures,
        }
