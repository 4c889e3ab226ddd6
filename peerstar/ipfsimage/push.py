"""`peerstar push`: a source image into a content store in nerdctl's on-IPFS format.

Owns the push: every blob (layers, configs, other blobs) is added as a UnixFS file with
kubo's `add --cid-version=1` layout, pinned, streamed from the source while its digest is
verified (read one piece ahead in a thread); manifests and indexes are rewritten
bottom-up and added; finally the JSON of the top descriptor is added, and its CID names
the image. What those bytes are is `ipfsimage.format`; re-pushing the same image gives
the same CID. Each digest is pushed once however many documents reference it, up to
`jobs` blobs at a time; the first failure cancels the rest.

Sources are `peerstar.source.open_image` (`oci:`, `docker-archive:`, `docker://`);
`--platform` is `ipfsimage.platforms`; `--estargz` converts the (platform-selected)
image with `peerstar.convert` into a private temporary layout first and pushes that.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from peerstar.estargz.compression import sniff
from peerstar.ipfs import open_store
from peerstar.ipfsimage import DEFAULT_JOBS
from peerstar.ipfsimage.format import (
    IPFSImageError,
    emit_document,
    go_json,
    pushed_descriptor,
    rewrite_index,
    rewrite_manifest,
    top_descriptor,
)
from peerstar.ipfsimage.platforms import SelectedPlatforms, select_platforms
from peerstar.localfile import oserror_text
from peerstar.oci import mediatypes as mt
from peerstar.oci.digest import sha256_digest
from peerstar.oci.errors import BlobError
from peerstar.oci.layout import LayoutWriter
from peerstar.oci.model import (
    CONFIG,
    INDEX,
    LAYER,
    MANIFEST,
    Descriptor,
    Document,
    index_children,
    manifest_children,
)
from peerstar.oci.reference import ImageRef
from peerstar.progress import NoProgress, Progress
from peerstar.source import DockerArchiveSource, Node, SourceImage, open_image


@dataclass
class PushResult:
    cid: str  # of the top descriptor's JSON: the image's name in IPFS
    descriptor: Descriptor  # the top descriptor, with its ipfs:// URL
    blobs: dict[str, str] = field(default_factory=dict)  # new digest -> CID
    bytes_added: int = 0  # of blob content (configs and layers), documents excluded


# Source pieces handed to the store: 4 MiB (16 UnixFS chunks) keeps thread hops rare.
_PIECE = 1 << 20


class _Prefetcher:
    """Read a (verifying) source stream one piece ahead in a worker thread.

    The store hashes and writes piece N on the event loop while piece N+1 is read and
    digest-checked in the thread (hashlib and file I/O release the GIL), so verifying
    the source costs almost no extra time. `close()` waits for the read in flight, so
    the stream can be closed safely afterwards.
    """

    def __init__(self, stream: BinaryIO, advance: Callable[[int], None]) -> None:
        self._stream = stream
        self._advance = advance
        self._pending: asyncio.Future[bytes] | None = None
        self.count = 0

    def _read(self) -> asyncio.Future[bytes]:
        return asyncio.get_running_loop().run_in_executor(None, self._stream.read, _PIECE)

    async def pieces(self) -> AsyncGenerator[bytes, None]:
        self._pending = self._read()
        while True:
            data = await self._pending
            self._pending = None
            if not data:
                return
            self._pending = self._read()
            self.count += len(data)
            self._advance(len(data))
            yield data

    async def close(self) -> None:
        if self._pending is not None:
            with contextlib.suppress(Exception):
                await self._pending
            self._pending = None


class _Pusher:
    def __init__(self, source: SourceImage, store: Any, progress: Progress, jobs: int) -> None:
        self.source = source
        self.store = store
        self.progress = progress
        self.sem = asyncio.Semaphore(max(1, jobs))
        self.nodes: dict[str, Node] = {}
        self.tasks: dict[str, asyncio.Task[Descriptor]] = {}
        self.result = PushResult("", {})
        inner = source.inner if isinstance(source, SelectedPlatforms) else source
        self.sniff_layers = isinstance(inner, DockerArchiveSource)

    async def run(self) -> PushResult:
        # walk() reads the documents (sync, small): do it off the loop.
        nodes = await asyncio.to_thread(lambda: list(self.source.walk()))
        for node in nodes:
            self.nodes[node.descriptor["digest"]] = node
        try:
            top = await self.push(self.source.top_descriptor)
        finally:
            # On the first failure stop the other transfers (and collect their errors, so
            # none is reported a second time as "never retrieved").
            for task in self.tasks.values():
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        # nerdctl adds the JSON of containerd's image target: mediaType, digest, size (+urls).
        desc = top_descriptor(top)
        async with self.sem:
            self.result.cid = await self.store.add(go_json(desc), pin=True)
        self.result.descriptor = desc
        return self.result

    def push(self, desc: Descriptor) -> Awaitable[Descriptor]:
        """The pushed form (new digest/size/type + urls) of the blob `desc` names; each
        digest is pushed once however many documents reference it."""
        digest = desc["digest"]
        task = self.tasks.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._push_node(self.nodes[digest]))
            self.tasks[digest] = task
        return task

    async def _push_node(self, node: Node) -> Descriptor:
        if node.kind == INDEX:
            return await self._push_index(node)
        if node.kind == MANIFEST:
            return await self._push_manifest(node)
        return await self._push_blob(node)

    async def _push_blob(self, node: Node) -> Descriptor:
        desc = node.descriptor
        digest, size = desc["digest"], desc["size"]
        media_type = mt.to_oci(desc["mediaType"])
        if self.sniff_layers and desc["mediaType"] == mt.DOCKER_LAYER_GZIP:
            media_type = await asyncio.to_thread(self._sniff_layer_type, digest)
        label = f"{'layer' if node.kind == LAYER else 'config' if node.kind == CONFIG else 'blob'}"
        key = "push " + digest
        async with self.sem:
            self.progress.started(key, f"{label} {digest[7:19]}", size)
            stream = await asyncio.to_thread(self.source.read_blob, digest, size)
            reader = _Prefetcher(stream, lambda n: self.progress.advanced(key, n))
            pieces = reader.pieces()
            try:
                cid = await self.store.add(pieces, pin=True)
                if reader.count != size:  # a stream the store stopped reading early
                    raise BlobError(f"{self.source.ref}: blob {digest}: read {reader.count} "
                                    f"of {size} bytes")
            finally:
                await pieces.aclose()
                await reader.close()
                stream.close()
            self.progress.finished(key)
        self.result.blobs[digest] = cid
        self.result.bytes_added += size
        return pushed_descriptor(media_type, digest, size, cid)

    def _sniff_layer_type(self, digest: str) -> str:
        """docker-archive layers are typed gzip whatever they hold (see
        `peerstar.source.docker_archive`); OCI
        clients trust the media type, so name the compression the bytes really have."""
        read_at, size = self.source.blob_range(digest)
        codec = sniff(read_at(0, min(4, size)))
        return mt.OCI_LAYER_TAR if codec is None else codec.media_type

    async def _add_document(self, doc: Document, media_type: str) -> Descriptor:
        data = emit_document(doc)
        async with self.sem:
            cid = await self.store.add(data, pin=True)
        digest = sha256_digest(data)
        self.result.blobs[digest] = cid
        return pushed_descriptor(media_type, digest, len(data), cid)

    async def _push_index(self, node: Node) -> Descriptor:
        assert node.document is not None
        doc = node.document
        where = f"{self.source.ref}: index {node.descriptor['digest']}"
        children = index_children(doc, where=where)
        pushed = await asyncio.gather(*(self.push(c) for c in children))
        return await self._add_document(rewrite_index(doc, children, list(pushed)),
                                        mt.OCI_INDEX)

    async def _push_manifest(self, node: Node) -> Descriptor:
        assert node.document is not None
        doc = node.document
        where = f"{self.source.ref}: manifest {node.descriptor['digest']}"
        config, layers = manifest_children(doc, where=where)
        pushed = await asyncio.gather(*(self.push(d) for d in [config, *layers]))
        return await self._add_document(rewrite_manifest(doc, config, layers, list(pushed)),
                                        mt.OCI_MANIFEST)


async def push_image(source: SourceImage, store: Any, *, progress: Progress | None = None,
                     jobs: int = DEFAULT_JOBS) -> PushResult:
    """Add every blob of `source` to `store` in nerdctl's format; see the module doc."""
    return await _Pusher(source, store, progress or NoProgress(), jobs).run()


@contextlib.contextmanager
def estargz_source(source: SourceImage, progress: Progress | None = None,
                   tmp_dir: str | None = None) -> Iterator[SourceImage]:
    """`source` converted to eStargz (level 9, 4 MiB chunks) in a private temporary layout."""
    from peerstar.convert import ConvertOptions, convert_image

    with tempfile.TemporaryDirectory(prefix="peerstar-push-", dir=tmp_dir) as tmp:
        target = Path(tmp) / "layout"
        with LayoutWriter(target) as writer:
            try:
                top, _, _ = convert_image(source, writer, ConvertOptions(compression="gzip"),
                                          progress)
            except OSError as exc:
                raise IPFSImageError(f"{source.ref}: converting to eStargz in {tmp}: "
                                     f"{oserror_text(exc)}") from None
            writer.commit(top, "converted")
        with open_image(ImageRef("oci", target, "converted")) as converted:
            yield converted


def push(source_text: str, *, estargz: bool = False, platforms: list[str] | None = None,
         all_platforms: bool = False, ipfs_address: str | None = None,
         root: Path | None = None, plain_http: bool = False, timeout: float = 30.0,
         retries: int = 3, progress: Progress | None = None,
         jobs: int = DEFAULT_JOBS, credentials: tuple[str, str] | None = None) -> PushResult:
    """`peerstar push`: open the source, select platforms, convert if asked, push.

    The store is asked for its identity first, so an unreachable daemon is reported
    before any source is read or converted."""

    async def run() -> PushResult:
        store = open_store(ipfs_address, root, timeout=timeout, retries=retries)
        try:
            await store.id()
            with contextlib.ExitStack() as stack:
                source = stack.enter_context(await asyncio.to_thread(
                    open_image, source_text, plain_http=plain_http, timeout=timeout,
                    credentials=credentials))
                selected = await asyncio.to_thread(select_platforms, source, platforms,
                                                   all_platforms)
                if selected is not source:
                    stack.callback(selected.close)  # closes `source` too (again: harmless)
                if estargz:
                    selected = await asyncio.to_thread(
                        stack.enter_context, estargz_source(selected, progress))
                return await push_image(selected, store, progress=progress, jobs=jobs)
        finally:
            await store.close()

    return asyncio.run(run())
