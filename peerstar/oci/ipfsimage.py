"""Images in IPFS in nerdctl's format: `push` a source image into a content store, `pull`
it back into an OCI image layout.

Owns the on-IPFS format (REFERENCE.md section 3, nerdctl's `push ipfs://`):
- every blob (layers, configs, other blobs) is added as a UnixFS file with kubo's
  `add --cid-version=1` layout, pinned, streamed from the source while its digest is
  verified; each descriptor that references it gets `urls: ["ipfs://<cid>"]`, replacing
  any URLs it had;
- manifests and indexes are rewritten bottom-up with those descriptors and OCI media
  types (Docker ones mapped), serialised as Go's `json.Marshal` would (descriptor field
  order, sorted maps, `<>&` escaped) and added too;
- finally the JSON of the top descriptor (index, or the manifest of a single-platform
  image) is added; its CID names the image. The top descriptor carries only
  mediaType/digest/size/urls, so the CID does not depend on a source's tag and
  re-pushing the same image gives the same CID.
`pull` resolves that descriptor, fetches every blob through its `ipfs://` URL, verifies
size and digest while streaming (a mismatching blob is rejected and its file deleted)
and writes the layout with `LayoutWriter`, which makes it visible only when complete.

Sources: `oci:DIR[:TAG]`, `docker-archive:FILE` (`peerstar.oci.source`) and
`docker://HOST/REPO:TAG` or a bare reference (`peerstar.oci.distribution`). `--estargz`
converts the (platform-selected) image with `peerstar.oci.convert` into a private
temporary layout first and pushes that.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import platform as _platform
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from peerstar.errors import PeerstarError
from peerstar.oci import mediatypes as mt
from peerstar.oci.digest import hasher_for, sha256_digest
from peerstar.oci.errors import BlobError, ImageFormatError, LayoutWriteError, OCIError
from peerstar.oci.layout import LayoutWriter
from peerstar.oci.model import (
    CONFIG,
    INDEX,
    LAYER,
    MANIFEST,
    Descriptor,
    Document,
    check_descriptor,
    index_children,
    kind_of,
    manifest_children,
    parse_document,
)
from peerstar.oci.reference import KNOWN_UNSUPPORTED, SUPPORTED_TRANSPORTS, ImageRef
from peerstar.oci.source import DockerArchiveSource, Node, ReadAt, SourceImage, open_image

# The top descriptor and every manifest/index are small JSON; refuse absurd sizes early so
# a wrong CID (a layer's) fails fast instead of being downloaded whole.
MAX_DESCRIPTOR_BYTES = 64 << 10
MAX_DOCUMENT_BYTES = 16 << 20
IPFS_SCHEME = "ipfs://"
DEFAULT_JOBS = 4

# Go's encoding/json struct field order of ocispec.Descriptor / Platform / Manifest / Index.
_DESCRIPTOR_ORDER = ("mediaType", "digest", "size", "urls", "annotations", "data", "platform",
                     "artifactType")
_PLATFORM_ORDER = ("architecture", "os", "os.version", "os.features", "variant", "features")
_DOCUMENT_ORDER = ("schemaVersion", "mediaType", "artifactType", "config", "layers",
                   "manifests", "subject", "annotations")


class IPFSImageError(OCIError):
    """An image cannot be pushed to or pulled from IPFS (the message says which part)."""


# --- Go-compatible JSON -----------------------------------------------------------------


def _ordered(obj: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    out = {k: obj[k] for k in order if k in obj}
    out.update((k, v) for k, v in obj.items() if k not in out)
    return out


def go_descriptor(desc: Descriptor) -> Descriptor:
    """`desc` with its keys in ocispec.Descriptor's field order (maps sorted)."""
    out = _ordered(desc, _DESCRIPTOR_ORDER)
    if isinstance(out.get("annotations"), dict):
        out["annotations"] = dict(sorted(out["annotations"].items()))
    if isinstance(out.get("platform"), dict):
        out["platform"] = _ordered(out["platform"], _PLATFORM_ORDER)
    return out


def go_json(obj: Any) -> bytes:
    """Compact JSON as Go's json.Marshal writes it: no spaces, `<>&` and U+2028/9 escaped.

    Only strings can hold those characters, so replacing them in the text is exact.
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text.encode()


def ipfs_url(cid: str) -> str:
    return IPFS_SCHEME + cid


def cid_of(desc: Descriptor, *, where: str) -> str:
    """The CID of the first `ipfs://` URL of `desc`, or a clear error."""
    from peerstar.ipfs.cid import normalize_cid

    urls = desc.get("urls")
    for url in urls if isinstance(urls, list) else []:
        if isinstance(url, str) and url.startswith(IPFS_SCHEME):
            return normalize_cid(url[len(IPFS_SCHEME):])
    shown = f" (urls: {urls})" if urls else ""
    raise IPFSImageError(
        f"{where}: {desc.get('mediaType')} {desc.get('digest')} has no ipfs:// URL{shown}: "
        "the image was not pushed into IPFS with `peerstar push` or `nerdctl push ipfs://`"
    )


# --- sources ----------------------------------------------------------------------------


def open_source(text: str, *, plain_http: bool = False, timeout: float = 30.0,
                credentials: tuple[str, str] | None = None) -> SourceImage:
    """Open `oci:DIR[:TAG]`, `docker-archive:FILE`, `docker://HOST/REPO:TAG` or a bare
    registry reference (which means `docker://`)."""
    transport, sep, _ = text.partition(":")
    if text.startswith("docker:") or not sep or (
            transport not in SUPPORTED_TRANSPORTS and transport not in KNOWN_UNSUPPORTED):
        from peerstar.oci.distribution import RegistrySource, parse_docker_ref

        if not text.startswith("docker:") and Path(text).exists():
            kind = "oci:" if Path(text).is_dir() else "docker-archive:"
            raise IPFSImageError(
                f"source {text!r} is a local path, not a registry reference: write "
                f"{kind}{text}")
        return RegistrySource(parse_docker_ref(text), plain_http=plain_http, timeout=timeout,
                              credentials=credentials)
    return open_image(text)


def host_platform() -> tuple[str, str, str | None]:
    """(os, architecture, variant) of this machine in OCI terms."""
    machine = _platform.machine().lower()
    arch, variant = {
        "x86_64": ("amd64", None), "amd64": ("amd64", None), "aarch64": ("arm64", "v8"),
        "arm64": ("arm64", "v8"), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
        "i386": ("386", None), "i686": ("386", None), "ppc64le": ("ppc64le", None),
        "s390x": ("s390x", None), "riscv64": ("riscv64", None),
    }.get(machine, (machine, None))
    return "linux", arch, variant


def parse_platform(text: str) -> tuple[str, str, str | None]:
    """`os/arch[/variant]` (containerd's syntax) -> (os, arch, variant)."""
    parts = text.strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise IPFSImageError(
            f"--platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm/v7"
        )
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(parts[1], parts[1])
    return parts[0], arch, parts[2] if len(parts) == 3 else None


def _platform_matches(plat: object, want: tuple[str, str, str | None]) -> bool:
    if not isinstance(plat, dict):
        return False
    os_, arch, variant = want
    if plat.get("os") != os_ or plat.get("architecture") != arch:
        return False
    have = plat.get("variant")
    # arm64 images usually omit "v8"; otherwise a requested variant must be there.
    return variant is None or have == variant or (arch == "arm64" and have in (None, "v8")
                                                  and variant == "v8")


def _show_platform(plat: object) -> str:
    if not isinstance(plat, dict):
        return "unknown"
    parts = [str(plat.get("os", "?")), str(plat.get("architecture", "?"))]
    if plat.get("variant"):
        parts.append(str(plat["variant"]))
    return "/".join(parts)


class SelectedPlatforms(SourceImage):
    """`inner` with its top index reduced to the manifests of the chosen platforms.

    The reduced index is a new document (kept in memory); every other blob is read from
    `inner`. An image whose top is a single manifest is used as it is.
    """

    def __init__(self, inner: SourceImage, index_bytes: bytes) -> None:
        super().__init__(inner.ref)
        self.inner = inner
        self.tag = inner.tag
        digest = sha256_digest(index_bytes)
        self._memory[digest] = index_bytes
        self.top_descriptor = {"mediaType": mt.OCI_INDEX, "digest": digest,
                               "size": len(index_bytes)}

    def read_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        if digest in self._memory:
            return super().read_blob(digest, size)
        return self.inner.read_blob(digest, size)

    def read_document(self, desc: Descriptor) -> Document:
        if desc["digest"] in self._memory:
            return super().read_document(desc)
        return self.inner.read_document(desc)

    def blob_range(self, digest: str) -> tuple[ReadAt, int]:
        if digest in self._memory:
            return super().blob_range(digest)
        return self.inner.blob_range(digest)

    def _open_raw(self, digest: str) -> tuple[BinaryIO, int]:
        return self.inner._open_raw(digest)

    def _range_raw(self, digest: str) -> tuple[ReadAt, int]:
        return self.inner._range_raw(digest)

    def close(self) -> None:
        super().close()
        self.inner.close()


def select_platforms(source: SourceImage, platforms: list[str] | None = None,
                     all_platforms: bool = False) -> SourceImage:
    """Keep the manifests of `platforms` (default: this machine's) from an index top.

    As in nerdctl, `all_platforms` keeps everything. Unlike containerd's converter we
    drop the other entries instead of keeping them unconverted: an entry left without an
    `ipfs://` URL could never be pulled.
    """
    top = source.top_descriptor
    if all_platforms or kind_of(top["mediaType"]) != INDEX:
        return source
    wanted = [parse_platform(p) for p in platforms] if platforms else [host_platform()]
    doc = source.read_document(top)
    entries = index_children(doc, where=f"{source.ref}: index {top['digest']}")
    kept = [e for e in entries if any(_platform_matches(e.get("platform"), w)
                                      for w in wanted)]
    if not kept:
        have = ", ".join(sorted({_show_platform(e.get("platform")) for e in entries}))
        want = ", ".join("/".join(p for p in w if p) for w in wanted)
        raise IPFSImageError(
            f"{source.ref}: no manifest for platform {want} in the index (it has: {have}); "
            "choose one with --platform or push them all with --all-platforms"
        )
    if len(kept) == len(entries):
        return source
    new_doc = dict(doc)
    new_doc["mediaType"] = mt.OCI_INDEX
    new_doc["manifests"] = kept
    return SelectedPlatforms(source, go_json(_ordered(new_doc, _DOCUMENT_ORDER)))


# --- progress ---------------------------------------------------------------------------


class Progress(Protocol):
    """Per-blob progress of a push or pull; called on the event loop thread (and, for the
    eStargz conversion, from worker threads through `converting`)."""

    def blob_started(self, key: str, label: str, size: int) -> None: ...

    def blob_advanced(self, key: str, nbytes: int) -> None: ...

    def blob_finished(self, key: str) -> None: ...


class NoProgress:
    def blob_started(self, key: str, label: str, size: int) -> None:
        pass

    def blob_advanced(self, key: str, nbytes: int) -> None:
        pass

    def blob_finished(self, key: str) -> None:
        pass


class _ConvertProgress:
    """Adapts `peerstar.oci.convert.Progress` events to ours."""

    def __init__(self, progress: Progress) -> None:
        self.p = progress

    def layer_started(self, digest: str, size: int) -> None:
        self.p.blob_started("convert " + digest, f"estargz {digest[7:19]}", size)

    def layer_advanced(self, digest: str, nbytes: int) -> None:
        self.p.blob_advanced("convert " + digest, nbytes)

    def layer_finished(self, digest: str, report: object) -> None:
        self.p.blob_finished("convert " + digest)


# --- push -------------------------------------------------------------------------------


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

    async def pieces(self) -> AsyncIterator[bytes]:
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
        desc = {k: top[k] for k in ("mediaType", "digest", "size", "urls")}
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
            self.progress.blob_started(key, f"{label} {digest[7:19]}", size)
            stream = await asyncio.to_thread(self.source.read_blob, digest, size)
            reader = _Prefetcher(stream, lambda n: self.progress.blob_advanced(key, n))
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
            self.progress.blob_finished(key)
        self.result.blobs[digest] = cid
        self.result.bytes_added += size
        return {"mediaType": media_type, "digest": digest, "size": size,
                "urls": [ipfs_url(cid)]}

    def _sniff_layer_type(self, digest: str) -> str:
        """docker-archive layers are typed gzip whatever they hold (see source.py); OCI
        clients trust the media type, so name the compression the bytes really have."""
        read_at, size = self.source.blob_range(digest)
        head = read_at(0, min(4, size))
        if head[:2] == b"\x1f\x8b":
            return mt.OCI_LAYER_GZIP
        if head == b"\x28\xb5\x2f\xfd":
            return mt.OCI_LAYER_ZSTD
        return mt.OCI_LAYER_TAR

    async def _add_document(self, doc: Document, media_type: str) -> Descriptor:
        data = go_json(_ordered(doc, _DOCUMENT_ORDER))
        async with self.sem:
            cid = await self.store.add(data, pin=True)
        digest = sha256_digest(data)
        self.result.blobs[digest] = cid
        return {"mediaType": media_type, "digest": digest, "size": len(data),
                "urls": [ipfs_url(cid)]}

    async def _push_index(self, node: Node) -> Descriptor:
        assert node.document is not None
        doc = node.document
        where = f"{self.source.ref}: index {node.descriptor['digest']}"
        children = index_children(doc, where=where)
        pushed = await asyncio.gather(*(self.push(c) for c in children))
        remap = {c["digest"]: p["digest"] for c, p in zip(children, pushed, strict=True)}
        new_children = []
        for child, new in zip(children, pushed, strict=True):
            entry = _with_pushed(child, new)
            ann = entry.get("annotations")
            ref = ann.get(mt.DOCKER_REFERENCE_DIGEST_ANNOTATION) if ann else None
            if ref in remap:  # buildx attestation manifests name their image by digest
                entry["annotations"] = {**ann, mt.DOCKER_REFERENCE_DIGEST_ANNOTATION: remap[ref]}
            new_children.append(go_descriptor(entry))
        new_doc = dict(doc, schemaVersion=2, mediaType=mt.OCI_INDEX, manifests=new_children)
        return await self._add_document(new_doc, mt.OCI_INDEX)

    async def _push_manifest(self, node: Node) -> Descriptor:
        assert node.document is not None
        doc = node.document
        where = f"{self.source.ref}: manifest {node.descriptor['digest']}"
        config, layers = manifest_children(doc, where=where)
        pushed = await asyncio.gather(*(self.push(d) for d in [config, *layers]))
        new_doc = dict(doc, schemaVersion=2, mediaType=mt.OCI_MANIFEST)
        new_doc["config"] = go_descriptor(_with_pushed(config, pushed[0]))
        new_doc["layers"] = [go_descriptor(_with_pushed(d, p))
                             for d, p in zip(layers, pushed[1:], strict=True)]
        return await self._add_document(new_doc, mt.OCI_MANIFEST)


def _with_pushed(old: Descriptor, new: Descriptor) -> Descriptor:
    """`old` (annotations, platform, ...) with the pushed type, digest, size and urls."""
    out = dict(old)
    out.update(mediaType=new["mediaType"], digest=new["digest"], size=new["size"],
               urls=list(new["urls"]))
    return out


async def push_image(source: SourceImage, store: Any, *, progress: Progress | None = None,
                     jobs: int = DEFAULT_JOBS) -> PushResult:
    """Add every blob of `source` to `store` in nerdctl's format; see the module doc."""
    return await _Pusher(source, store, progress or NoProgress(), jobs).run()


@contextlib.contextmanager
def estargz_source(source: SourceImage, progress: Progress | None = None,
                   tmp_dir: str | None = None) -> Iterator[SourceImage]:
    """`source` converted to eStargz (level 9, 4 MiB chunks) in a private temporary layout."""
    from peerstar.oci.convert import ConvertOptions, convert_image

    with tempfile.TemporaryDirectory(prefix="peerstar-push-", dir=tmp_dir) as tmp:
        target = Path(tmp) / "layout"
        with LayoutWriter(target) as writer:
            try:
                top, _, _ = convert_image(source, writer, ConvertOptions(compression="gzip"),
                                          _ConvertProgress(progress or NoProgress()))
            except OSError as exc:
                raise IPFSImageError(f"{source.ref}: converting to eStargz in {tmp}: "
                                     f"{_oserror(exc)}") from None
            writer.commit(top, "converted")
        with open_image(ImageRef("oci", target, "converted")) as converted:
            yield converted


def _oserror(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "disk full"
    return exc.strerror or str(exc)


def _open_store(ipfs_address: str | None, root: Path | None, timeout: float,
                retries: int) -> Any:
    from peerstar.ipfs import open_store

    return open_store(ipfs_address, root, timeout=timeout, retries=retries)


def push(source_text: str, *, estargz: bool = False, platforms: list[str] | None = None,
         all_platforms: bool = False, ipfs_address: str | None = None,
         root: Path | None = None, plain_http: bool = False, timeout: float = 30.0,
         retries: int = 3, progress: Progress | None = None,
         jobs: int = DEFAULT_JOBS, credentials: tuple[str, str] | None = None) -> PushResult:
    """`peerstar push`: open the source, select platforms, convert if asked, push.

    The store is asked for its identity first, so an unreachable daemon is reported
    before any source is read or converted."""

    async def run() -> PushResult:
        store = _open_store(ipfs_address, root, timeout, retries)
        try:
            await store.id()
            with contextlib.ExitStack() as stack:
                source = stack.enter_context(await asyncio.to_thread(
                    open_source, source_text, plain_http=plain_http, timeout=timeout,
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


# --- pull -------------------------------------------------------------------------------


def parse_image_cid(text: str) -> str:
    """`ipfs://CID`, `/ipfs/CID` or a bare CID -> CIDv1 base32; a clear error otherwise."""
    from peerstar.ipfs.cid import normalize_cid

    value = text.strip()
    if "://" in value and not value.startswith(IPFS_SCHEME):
        raise IPFSImageError(f"{text!r} is not an IPFS image: give ipfs://CID or a bare CID")
    try:
        return normalize_cid(value)
    except PeerstarError as exc:
        raise IPFSImageError(f"{text!r} is not an IPFS image reference: {exc}") from None


def parse_top_descriptor(data: bytes, *, where: str) -> Descriptor:
    """Check that `data` is the JSON of an image descriptor as `push` writes it."""
    hint = ("is not an image descriptor (expected the JSON descriptor whose CID "
            "`peerstar push` / `nerdctl push ipfs://` prints)")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise IPFSImageError(f"{where} {hint}: its content is not JSON") from None
    if not isinstance(obj, dict) or not {"mediaType", "digest", "size"} <= obj.keys():
        what = "a manifest or index, not its descriptor" if isinstance(obj, dict) and (
            "manifests" in obj or "layers" in obj) else "JSON without mediaType/digest/size"
        raise IPFSImageError(f"{where} {hint}: it is {what}")
    try:
        desc = check_descriptor(obj, where=where)
        kind = kind_of(desc["mediaType"])
    except ImageFormatError as exc:
        raise IPFSImageError(f"{where} {hint}: {exc}") from None
    if kind not in (INDEX, MANIFEST):
        raise IPFSImageError(f"{where} describes a {desc['mediaType']}, not an image manifest "
                             "or index")
    return desc


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
        from peerstar.ipfs.errors import IPFSError

        try:
            return await coro
        except IPFSError as exc:
            raise IPFSImageError(f"{self.name}: {what}: {exc}") from None

    async def resolve(self, cid: str) -> Descriptor:
        where = f"{IPFS_SCHEME}{cid}"
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
            doc = parse_document(data, where=f"{self.name}: {what}")
            if kind == INDEX:
                children = [c for c in index_children(doc, where=f"{self.name}: {what}")
                            if not self._skippable(c)]
            else:
                config, layers = manifest_children(doc, where=f"{self.name}: {what}")
                children = [config, *layers]
            await asyncio.gather(*(self.fetch(c, f"{self.name}: {what}") for c in children))
        else:
            await self._download(desc, cid, what, show=True)

    def _skippable(self, entry: Descriptor) -> bool:
        """An index entry of another platform that is not in IPFS: nerdctl pushes only
        the selected platforms and leaves the other entries unconverted, without URLs.
        Like `ctr export --platform`, the layout then keeps the entry but not its blobs;
        ctr import and skopeo use the host's platform. The host's own entry must be
        there."""
        urls = entry.get("urls")
        if isinstance(urls, list) and any(isinstance(u, str) and u.startswith(IPFS_SCHEME)
                                          for u in urls):
            return False
        plat = entry.get("platform")
        if not isinstance(plat, dict) or _platform_matches(plat, host_platform()):
            return False
        self.skipped.append(_show_platform(plat))
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
                self.progress.blob_started(key, f"{kind} {digest[7:19]}", size)
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
                            self.progress.blob_advanced(key, len(part))
                    f.flush()
                    os.fsync(f.fileno())
                except OSError as exc:
                    raise LayoutWriteError(f"{self.writer.target}: writing {what}: "
                                           f"{_oserror(exc)}; nothing was written") from None
                except PeerstarError as exc:
                    raise IPFSImageError(f"{self.name}: fetching {what} from "
                                         f"{IPFS_SCHEME}{cid}: {exc}") from None
                algo = digest.split(":", 1)[0]
                actual = f"{algo}:{hasher.hexdigest()}"
                if got != size or actual != digest:
                    why = (f"has {'more than ' if got > size else ''}{min(got, size + 1)} "
                           f"bytes, its descriptor says {size}" if got != size
                           else f"hashes to {actual}")
                    raise BlobError(
                        f"{self.name}: {what} fetched from {IPFS_SCHEME}{cid} {why}: rejected "
                        "(the content in IPFS does not match the image: tampered with, or a "
                        "wrong descriptor)")
                try:
                    self.writer.add_file(path, desc["mediaType"], digest=digest)
                except OSError as exc:
                    raise LayoutWriteError(f"{self.writer.target}: storing {what}: "
                                           f"{_oserror(exc)}; nothing was written") from None
            if show:
                self.progress.blob_finished(key)
        self.bytes += size
        return b"".join(kept) if kept is not None else None


async def pull_image(store: Any, cid: str, writer: LayoutWriter, *,
                     progress: Progress | None = None,
                     jobs: int = DEFAULT_JOBS) -> tuple[Descriptor, int, list[str]]:
    """Fetch the image named by `cid` from `store` into `writer` (not committed); return
    the top descriptor, the number of blob bytes fetched and the platforms left out
    (index entries of other platforms that were not pushed into IPFS)."""
    name = IPFS_SCHEME + cid
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
    from peerstar.oci.reference import parse_image_ref

    cid = parse_image_cid(image)
    out = parse_image_ref(output, role="--output")
    if out.transport != "oci":
        raise IPFSImageError(f"--output {output!r}: images are written as OCI layouts: use "
                             "oci:DIR[:TAG]")
    tag = out.tag or "latest"
    with LayoutWriter(out.path) as writer:

        async def run() -> tuple[Descriptor, int, list[str]]:
            store = _open_store(ipfs_address, root, timeout, retries)
            try:
                return await pull_image(store, cid, writer, progress=progress, jobs=jobs)
            finally:
                await store.close()

        top, fetched, skipped = asyncio.run(run())
        # index.json is not content-addressed: the entry needs no fetch hints.
        entry = {k: v for k, v in top.items() if k != "urls"}
        writer.commit(entry, tag)
    return PullResult(cid, top, out.path, tag, fetched, skipped)
