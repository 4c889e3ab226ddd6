"""`peerstar pull`: an image in nerdctl's on-IPFS format back into an OCI image layout.

Owns the pull: the image CID's top descriptor is resolved (bounded in size, so a wrong
CID fails fast), every blob is fetched through its `ipfs://` URL with up to `jobs` at a
time, its size and digest verified while it streams into the layout's staging area (a
mismatching blob is rejected and its file deleted), and the layout is written with
`LayoutWriter`, which makes it visible only when complete. Index entries of other
platforms that were not pushed are left out (as `ctr export --platform` does). What the
bytes mean is `ipfsimage.format`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peerstar.errors import PeerstarError
from peerstar.ipfs import open_store
from peerstar.ipfs.errors import IPFSError
from peerstar.ipfsimage import DEFAULT_JOBS
from peerstar.ipfsimage.format import (
    MAX_DESCRIPTOR_BYTES,
    MAX_DOCUMENT_BYTES,
    IPFSImageError,
    cid_of,
    content_error,
    document_children,
    has_ipfs_url,
    ipfs_url,
    parse_image_cid,
    parse_top_descriptor,
)
from peerstar.localfile import oserror_text
from peerstar.oci.digest import hasher_for
from peerstar.oci.errors import LayoutWriteError
from peerstar.oci.layout import LayoutWriter
from peerstar.oci.model import INDEX, MANIFEST, Descriptor, check_descriptor, kind_of
from peerstar.oci.platform import host_platform, platform_matches, show_platform
from peerstar.oci.reference import parse_image_ref
from peerstar.progress import NoProgress, Progress


class _Puller:
    def __init__(self, store: Any, writer: LayoutWriter, name: str, progress: Progress,
                 jobs: int) -> None:
        self.store = store
        self.writer = writer
        self.name = name
        self.progress = progress
        self.sem = asyncio.Semaphore(max(1, jobs))
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.bytes = 0
        self.skipped: list[str] = []  # platforms of index entries not in IPFS

    async def _store_call(self, what: str, coro: Awaitable[Any]) -> Any:
        try:
            return await coro
        except IPFSError as exc:
            raise IPFSImageError(f"{self.name}: {what}: {exc}") from None

    async def resolve(self, cid: str) -> Descriptor:
        where = ipfs_url(cid)
        size = await self._store_call("cannot read the image descriptor",
                                      self.store.stat_size(cid))
        if size > MAX_DESCRIPTOR_BYTES:
            raise IPFSImageError(
                f"{where} is {size} bytes: too large to be an image descriptor (expected the "
                "JSON descriptor whose CID `peerstar push` prints)")
        data = await self._store_call("cannot read the image descriptor",
                                      self.store.cat_bytes(cid))
        return parse_top_descriptor(data, where=where)

    def fetch(self, desc: Descriptor, where: str) -> Awaitable[None]:
        digest = desc["digest"]
        task = self.tasks.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._fetch(desc, where))
            self.tasks[digest] = task
        return task

    async def _fetch(self, desc: Descriptor, where: str) -> None:
        desc = check_descriptor(desc, where=where)
        kind = kind_of(desc["mediaType"])
        cid = cid_of(desc, where=where)
        what = f"{desc['mediaType']} {desc['digest']}"
        if kind in (INDEX, MANIFEST):
            if desc["size"] > MAX_DOCUMENT_BYTES:
                raise IPFSImageError(f"{self.name}: {what} claims {desc['size']} bytes: too "
                                     "large for a manifest")
            data = await self._download(desc, cid, what, show=False)
            assert data is not None
            _, children = document_children(desc, data, where=f"{self.name}: {what}")
            if kind == INDEX:
                children = [c for c in children if not self._skippable(c)]
            await asyncio.gather(*(self.fetch(c, f"{self.name}: {what}") for c in children))
        else:
            await self._download(desc, cid, what, show=True)

    def _skippable(self, entry: Descriptor) -> bool:
        """An index entry of another platform that is not in IPFS: nerdctl pushes only
        the selected platforms and leaves the other entries unconverted, without URLs.
        Like `ctr export --platform`, the layout then keeps the entry but not its blobs;
        ctr import and skopeo use the host's platform. The host's own entry must be
        there."""
        if has_ipfs_url(entry):
            return False
        plat = entry.get("platform")
        if not isinstance(plat, dict) or platform_matches(plat, host_platform()):
            return False
        self.skipped.append(show_platform(plat))
        return True

    async def _download(self, desc: Descriptor, cid: str, what: str, *,
                        show: bool) -> bytes | None:
        """Stream the blob into the staging area, verifying size and digest as it comes;
        return its bytes when it is a document (`show` False)."""
        digest, size = desc["digest"], desc["size"]
        hasher = hasher_for(digest)
        key = "pull " + digest
        kept: list[bytes] | None = None if show else []
        async with self.sem:
            if show:
                kind = kind_of(desc["mediaType"])
                self.progress.started(key, f"{kind} {digest[7:19]}", size)
            with self.writer.temp_file() as (path, f):
                got = 0
                try:
                    # One byte more than expected: a longer blob is caught without
                    # downloading all of it.
                    async for part in self.store.cat(cid, 0, size + 1):
                        got += len(part)
                        if got > size:
                            break
                        hasher.update(part)
                        f.write(part)
                        if kept is not None:
                            kept.append(part)
                        if show:
                            self.progress.advanced(key, len(part))
                    f.flush()
                    os.fsync(f.fileno())
                except OSError as exc:
                    raise LayoutWriteError(f"{self.writer.target}: writing {what}: "
                                           f"{oserror_text(exc)}; nothing was written") from None
                except PeerstarError as exc:
                    raise IPFSImageError(f"{self.name}: fetching {what} from "
                                         f"{ipfs_url(cid)}: {exc}") from None
                algo = digest.split(":", 1)[0]
                error = content_error(desc, cid, got, f"{algo}:{hasher.hexdigest()}",
                                      where=self.name)
                if error is not None:
                    raise error
                try:
                    self.writer.add_file(path, desc["mediaType"], digest=digest)
                except OSError as exc:
                    raise LayoutWriteError(f"{self.writer.target}: storing {what}: "
                                           f"{oserror_text(exc)}; nothing was written") from None
            if show:
                self.progress.finished(key)
        self.bytes += size
        return b"".join(kept) if kept is not None else None


async def pull_image(store: Any, cid: str, writer: LayoutWriter, *,
                     progress: Progress | None = None,
                     jobs: int = DEFAULT_JOBS) -> tuple[Descriptor, int, list[str]]:
    """Fetch the image named by `cid` from `store` into `writer` (not committed); return
    the top descriptor, the number of blob bytes fetched and the platforms left out
    (index entries of other platforms that were not pushed into IPFS)."""
    name = ipfs_url(cid)
    puller = _Puller(store, writer, name, progress or NoProgress(), jobs)
    top = await puller.resolve(cid)
    try:
        await puller.fetch(top, name)
    finally:
        # On the first failure stop the other downloads before the writer is aborted.
        for task in puller.tasks.values():
            task.cancel()
        await asyncio.gather(*puller.tasks.values(), return_exceptions=True)
    return top, puller.bytes, puller.skipped


@dataclass
class PullResult:
    cid: str
    descriptor: Descriptor
    output: Path
    tag: str | None
    bytes_fetched: int
    skipped_platforms: list[str] = field(default_factory=list)


def pull(image: str, output: str, *, ipfs_address: str | None = None,
         root: Path | None = None, timeout: float = 30.0, retries: int = 3,
         progress: Progress | None = None, jobs: int = DEFAULT_JOBS) -> PullResult:
    """`peerstar pull`: write the image `image` (ipfs://CID or CID) to `output`
    (`oci:DIR[:TAG]`, tag default `latest`) atomically."""
    cid = parse_image_cid(image)
    out = parse_image_ref(output, role="--output")
    if out.transport != "oci":
        raise IPFSImageError(f"--output {output!r}: images are written as OCI layouts: use "
                             "oci:DIR[:TAG]")
    tag = out.tag or "latest"
    with LayoutWriter(out.path) as writer:

        async def run() -> tuple[Descriptor, int, list[str]]:
            store = open_store(ipfs_address, root, timeout=timeout, retries=retries)
            try:
                return await pull_image(store, cid, writer, progress=progress, jobs=jobs)
            finally:
                await store.close()

        top, fetched, skipped = asyncio.run(run())
        # index.json is not content-addressed: the entry needs no fetch hints.
        entry = {k: v for k, v in top.items() if k != "urls"}
        writer.commit(entry, tag)
    return PullResult(cid, top, out.path, tag, fetched, skipped)
