"""Image conversion: every layer to eStargz (gzip) or zstd:chunked, metadata rewritten.

Owns the policy of `peerstar convert` for whole images and single layers:
- layers (tar, tar+gzip, tar+zstd, Docker or OCI media types) go through
  `peerstar.estargz.build`; identical layers (same source digest) are converted once;
  distinct layers are converted concurrently, which cannot change the output: each
  blob depends only on its input and the options;
- a layer that is already in the requested format and whose TOC and chunks verify is
  kept byte for byte (its descriptor gains the annotations if it lacked them), unless
  prioritized files are asked for (then every layer is rebuilt in that order);
- prioritized paths are looked for in every layer; a path in no layer is an error
  unless allowed;
- configs get new `rootfs.diff_ids`; manifests and indexes are rewritten with the new
  digests and sizes, Docker media types become OCI ones; platforms and annotations of
  index entries are preserved; manifests that are not images (attestations, artifacts)
  are copied unchanged.
Reading is `peerstar.oci.source`, writing `peerstar.oci.layout`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import zstandard

from peerstar.estargz import EstargzError, Reader, build
from peerstar.oci import mediatypes as mt
from peerstar.oci.digest import HashingWriter, finish_stream
from peerstar.oci.errors import ImageFormatError, OCIError
from peerstar.oci.layout import LayoutWriter
from peerstar.oci.model import (
    CONFIG,
    INDEX,
    LAYER,
    MANIFEST,
    Descriptor,
    Document,
    dump_json,
    index_children,
    kind_of,
    manifest_children,
)
from peerstar.oci.reference import ImageRef
from peerstar.oci.source import Node, SourceImage, open_image

GZIP_TYPES = frozenset({mt.OCI_LAYER_GZIP, mt.OCI_LAYER_ND_GZIP, mt.DOCKER_LAYER_GZIP,
                        mt.DOCKER_LAYER_FOREIGN_GZIP})
ZSTD_TYPES = frozenset({mt.OCI_LAYER_ZSTD, mt.OCI_LAYER_ND_ZSTD})
# Annotations a conversion recomputes; stale copies from the source are dropped.
_FORMAT_ANNOTATIONS = (
    mt.TOC_DIGEST_ANNOTATION, mt.UNCOMPRESSED_SIZE_ANNOTATION,
    mt.ZSTD_MANIFEST_CHECKSUM_ANNOTATION, mt.ZSTD_MANIFEST_POSITION_ANNOTATION,
)  # fmt: skip


class ConvertError(OCIError):
    """A layer or image that cannot be converted (the message names which and why)."""


@dataclass(frozen=True)
class ConvertOptions:
    """Options of a conversion; the output is a function of the input and these."""

    compression: str = "gzip"  # "gzip" (eStargz) or "zstd" (zstd:chunked)
    chunk_size: int = 4 << 20
    level: int | None = None
    prioritized: tuple[str, ...] = ()
    allow_missing_prioritized: bool = False
    workers: int | None = None  # compression threads inside one layer build
    layer_jobs: int | None = None  # layers converted at the same time
    keep_estargz: bool = True  # keep layers that already are in the requested format


@dataclass
class LayerReport:
    """What happened to one layer."""

    source_digest: str | None
    source_size: int
    toc_digest: str
    diff_id: str
    uncompressed_size: int
    blob_digest: str
    blob_size: int
    media_type: str
    annotations: dict[str, str]
    kept: bool = False
    missing_prioritized: list[str] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.source_digest is not None:
            out["sourceDigest"] = self.source_digest
        out.update({
            "tocDigest": self.toc_digest,
            "diffID": self.diff_id,
            "uncompressedSize": self.uncompressed_size,
            "blobDigest": self.blob_digest,
            "blobSize": self.blob_size,
        })
        if self.source_digest is not None:
            out["mediaType"] = self.media_type
            out["kept"] = self.kept
            if self.missing_prioritized:
                out["missingPrioritized"] = self.missing_prioritized
            if self.note:
                out["note"] = self.note
        return out


@dataclass
class ImageReport:
    """The result of converting a whole image."""

    source: str
    destination: str
    tag: str | None
    top: Descriptor
    layers: list[LayerReport]  # unique layers, in the order the image lists them
    manifests: list[Descriptor]  # new image manifests (with platforms where known)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "tag": self.tag,
            "mediaType": self.top["mediaType"],
            "digest": self.top["digest"],
            "size": self.top["size"],
            "manifests": [
                {k: m[k] for k in ("mediaType", "digest", "size", "platform") if k in m}
                for m in self.manifests
            ],
            "layers": [la.to_json() for la in self.layers],
        }


class Progress(Protocol):
    """Receives progress events; called from worker threads."""

    def layer_started(self, digest: str, size: int) -> None: ...

    def layer_advanced(self, digest: str, nbytes: int) -> None: ...

    def layer_finished(self, digest: str, report: LayerReport) -> None: ...


class _NoProgress:
    def layer_started(self, digest: str, size: int) -> None:
        pass

    def layer_advanced(self, digest: str, nbytes: int) -> None:
        pass

    def layer_finished(self, digest: str, report: LayerReport) -> None:
        pass


# --- single layers -------------------------------------------------------------------


def _build_layer(src: BinaryIO, dst: BinaryIO, options: ConvertOptions,
                 advance: Callable[[int], None] | None, what: str,
                 spool_dir: Path) -> tuple[Any, str, int]:
    """Run the builder, hashing its output independently; return (result, digest, size).

    A compressed input is decompressed into `spool_dir`, beside the output, so big
    layers use the destination's disk rather than a possibly small /tmp."""
    hw = HashingWriter(dst)
    try:
        result = build(
            src, hw,  # type: ignore[arg-type]
            compression=options.compression,
            chunk_size=options.chunk_size,
            level=options.level,
            prioritized=options.prioritized,
            allow_missing_prioritized=options.allow_missing_prioritized,
            workers=options.workers,
            progress=advance,
            spool_dir=str(spool_dir),
        )
    except EstargzError as exc:
        raise ConvertError(f"{what}: {exc}") from None
    if (hw.digest, hw.size) != (result.blob_digest, result.blob_size):
        # The builder's own bookkeeping disagrees with the bytes it wrote: a bug, not
        # bad input; refuse to record wrong digests.
        raise ConvertError(
            f"{what}: internal error: builder reported {result.blob_digest} "
            f"({result.blob_size} bytes) but wrote {hw.digest} ({hw.size} bytes)"
        )
    return result, hw.digest, hw.size


def convert_layer_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    options: ConvertOptions = ConvertOptions(),  # noqa: B008 - frozen dataclass
    advance: Callable[[int], None] | None = None,
) -> LayerReport:
    """Convert one layer tar (plain, gzip or zstd) at `src` to a blob at `dst`, atomically.

    `dst` must not exist (an existing empty file is replaced): we never overwrite data.
    """
    src_p, dst_p = Path(src), Path(dst)
    if not src_p.exists():
        raise ConvertError(f"source layer {src_p} does not exist")
    if not src_p.is_file():
        raise ConvertError(f"source layer {src_p} is not a file (expected a layer tar)")
    if dst_p.is_dir():
        raise ConvertError(
            f"destination {dst_p} is a directory; a single layer converts to a blob file "
            "(for images write oci:DIR)"
        )
    if dst_p.exists() and dst_p.stat().st_size > 0:
        raise ConvertError(
            f"destination {dst_p} already exists: refusing to overwrite it; remove it or "
            "choose another name"
        )
    if not dst_p.parent.is_dir():
        raise ConvertError(f"destination directory {dst_p.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dst_p.name}.", suffix=".tmp", dir=dst_p.parent)
    except OSError as exc:
        raise ConvertError(f"cannot write in {dst_p.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out, open(src_p, "rb") as inp:
            result, digest, size = _build_layer(inp, out, options, advance, str(src_p),
                                                  dst_p.parent)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst_p)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise ConvertError(f"converting {src_p} to {dst_p}: {exc}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return LayerReport(
        source_digest=None, source_size=src_p.stat().st_size,
        toc_digest=result.toc_digest, diff_id=result.diff_id,
        uncompressed_size=result.uncompressed_size, blob_digest=digest, blob_size=size,
        media_type=result.media_type, annotations=dict(result.annotations),
        missing_prioritized=list(result.missing_prioritized),
    )


# --- whole images --------------------------------------------------------------------


def decompressed_digest(f: BinaryIO, compression: str) -> tuple[str, int]:
    """sha256 and length of the decompressed stream `f` (gzip members or zstd frames)."""
    h = hashlib.sha256()
    total = 0
    try:
        if compression == "zstd":
            reader: BinaryIO = zstandard.ZstdDecompressor().stream_reader(
                f, read_across_frames=True)  # type: ignore[assignment]
        else:
            reader = gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[assignment]
        while data := reader.read(1 << 20):
            h.update(data)
            total += len(data)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise ConvertError(f"blob does not decompress: {exc}") from None
    return "sha256:" + h.hexdigest(), total


class _ImageConverter:
    def __init__(self, source: SourceImage, writer: LayoutWriter, options: ConvertOptions,
                 progress: Progress) -> None:
        self.source = source
        self.writer = writer
        self.options = options
        self.progress = progress
        self.nodes: dict[str, Node] = {}
        self.layers: dict[str, LayerReport] = {}
        self.new: dict[str, Descriptor] = {}  # old digest -> new descriptor
        self.image_manifests: list[Descriptor] = []

    # -- layers ----------------------------------------------------------------------

    def convert_layer(self, desc: Descriptor) -> LayerReport:
        digest, size = desc["digest"], desc["size"]
        what = f"{self.source.ref}: layer {digest}"
        self.progress.layer_started(digest, size)
        note = ""
        # With a prioritized list, every layer is rebuilt: a kept blob has its own order.
        keep = self.options.keep_estargz and not self.options.prioritized
        kept, note = self._try_keep(desc, what) if keep else (None, "")
        if kept is not None:
            self.progress.layer_advanced(digest, size)
            self.progress.layer_finished(digest, kept)
            return kept
        with self.writer.temp_file() as (path, f):
            stream = self.source.read_blob(digest, size)
            # A prioritized file lives in one layer of an image, not in every layer:
            # missing paths are collected per layer and judged over the whole image.
            per_layer = replace(self.options, allow_missing_prioritized=True)
            try:
                result, bdigest, bsize = _build_layer(
                    stream, f, per_layer,
                    lambda n: self.progress.layer_advanced(digest, n), what,
                    self.writer.staging)
                # The builder may stop at the tar's end marker: read the rest so the
                # source digest is checked over every byte.
                finish_stream(stream)
                f.flush()
                os.fsync(f.fileno())
            finally:
                stream.close()
            self.writer.add_file(path, result.media_type, digest=bdigest)
        report = LayerReport(
            source_digest=digest, source_size=size, toc_digest=result.toc_digest,
            diff_id=result.diff_id, uncompressed_size=result.uncompressed_size,
            blob_digest=bdigest, blob_size=bsize, media_type=result.media_type,
            annotations=dict(result.annotations),
            missing_prioritized=list(result.missing_prioritized), note=note,
        )
        self.progress.layer_finished(digest, report)
        return report

    def _try_keep(self, desc: Descriptor, what: str) -> tuple[LayerReport | None, str]:
        """Keep a layer already in the requested format if TOC and chunks verify."""
        media_type = desc["mediaType"]
        wanted = GZIP_TYPES if self.options.compression == "gzip" else ZSTD_TYPES
        annotations = desc.get("annotations") or {}
        claimed = annotations.get(mt.TOC_DIGEST_ANNOTATION)
        if media_type not in wanted and not (
                # docker-archive layers are all typed gzip; zstd ones can only be sniffed.
                media_type == mt.DOCKER_LAYER_GZIP and self.options.compression == "zstd"):
            return None, ""
        digest, size = desc["digest"], desc["size"]
        read_at, stored = self.source.blob_range(digest)
        try:
            probe = Reader.open(read_at, stored, toc_digest=claimed)
        except EstargzError as exc:
            if claimed:
                return None, f"annotated as eStargz but {exc}; reconverted"
            return None, ""
        if probe.compression != self.options.compression:
            return None, ""
        # Copy the blob in first (verifying its digest), then verify the copy: what we
        # check is exactly what we keep.
        with self.writer.temp_file() as (path, f):
            stream = self.source.read_blob(digest, size)
            try:
                shutil.copyfileobj(stream, f, 1 << 20)
                finish_stream(stream)
            finally:
                stream.close()
            f.flush()
            os.fsync(f.fileno())
            fd = f.fileno()
            try:
                reader = Reader.open(lambda off, n: os.pread(fd, n, off), size,
                                     toc_digest=probe.toc_digest)
                reader.verify_all()
            except EstargzError as exc:
                return None, f"TOC did not verify ({exc}); reconverted"
            f.seek(0)
            diff_id, usize = decompressed_digest(f, reader.compression)
            new_ann = {mt.TOC_DIGEST_ANNOTATION: reader.toc_digest}
            if reader.compression == "zstd":
                footer = reader.footer
                ztoc = os.pread(fd, footer.toc_size, footer.toc_offset)
                new_ann[mt.ZSTD_MANIFEST_CHECKSUM_ANNOTATION] = (
                    "sha256:" + hashlib.sha256(ztoc).hexdigest())
                new_ann[mt.ZSTD_MANIFEST_POSITION_ANNOTATION] = (
                    f"{footer.toc_offset}:{footer.toc_size}:{footer.toc_uncompressed_size}:1")
            new_ann[mt.UNCOMPRESSED_SIZE_ANNOTATION] = str(usize)
            out_type = mt.OCI_LAYER_GZIP if reader.compression == "gzip" else mt.OCI_LAYER_ZSTD
            self.writer.add_file(path, out_type, digest=digest)
        return LayerReport(
            source_digest=digest, source_size=size, toc_digest=reader.toc_digest,
            diff_id=diff_id, uncompressed_size=usize, blob_digest=digest, blob_size=size,
            media_type=out_type, annotations=new_ann, kept=True,
        ), ""

    # -- documents -------------------------------------------------------------------

    def run(self) -> Descriptor:
        order: list[Descriptor] = []
        for node in self.source.walk():
            # Fail on a missing or truncated blob before converting anything.
            self.source.check_blob(node.descriptor)
            self.nodes[node.descriptor["digest"]] = node
            if node.kind == LAYER and self._is_image_layer(node):
                order.append(node.descriptor)
        jobs = self.options.layer_jobs or min(len(order), os.cpu_count() or 1) or 1
        pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="convert")
        try:
            futures = {d["digest"]: pool.submit(self.convert_layer, d) for d in order}
            for digest, fut in futures.items():
                self.layers[digest] = fut.result()
        finally:
            # On the first failure, do not start the layers still queued.
            pool.shutdown(wait=True, cancel_futures=True)
        self._check_prioritized()
        return self.rewrite(self.source.top_descriptor)

    def _check_prioritized(self) -> None:
        if not self.options.prioritized or self.options.allow_missing_prioritized:
            return
        nowhere = [p for p in self.options.prioritized
                   if all(p in la.missing_prioritized for la in self.layers.values())]
        if nowhere:
            raise ConvertError(
                f"{self.source.ref}: prioritized path(s) {', '.join(map(repr, nowhere))} are "
                "in no layer of the image; fix the list or pass --allow-missing-prioritized"
            )

    def _is_image_layer(self, node: Node) -> bool:
        # Layers of non-image manifests (artifacts) are copied, not converted.
        for parent in node.parents:
            pnode = self.nodes.get(parent)
            if pnode is not None and pnode.kind == MANIFEST and self._is_image(pnode):
                return True
        return False

    def _is_image(self, node: Node) -> bool:
        assert node.document is not None
        config = node.document.get("config")
        return isinstance(config, dict) and kind_of(config.get("mediaType", "")) == CONFIG

    def rewrite(self, desc: Descriptor) -> Descriptor:
        digest = desc["digest"]
        if digest not in self.new:
            node = self.nodes[digest]
            if node.kind == INDEX:
                new = self._rewrite_index(node)
            elif node.kind == MANIFEST and self._is_image(node):
                new = self._rewrite_manifest(node)
            else:
                new = self._copy(desc)
            self.new[digest] = new
        return _with(desc, self.new[digest])

    def _copy(self, desc: Descriptor) -> Descriptor:
        node = self.nodes.get(desc["digest"])
        if node is not None and node.kind in (INDEX, MANIFEST) and node.document is not None:
            # A non-image manifest: copy it and everything it references unchanged.
            if node.kind == MANIFEST:
                config, layers = manifest_children(node.document, where=desc["digest"])
                for child in [config, *layers]:
                    self._copy(child)
        stream = self.source.read_blob(desc["digest"], desc["size"])
        try:
            return self.writer.add_blob(stream, desc["mediaType"],
                                        expected_digest=desc["digest"])
        finally:
            stream.close()

    def _rewrite_index(self, node: Node) -> Descriptor:
        assert node.document is not None
        doc = node.document
        where = f"{self.source.ref}: index {node.descriptor['digest']}"
        children = [self.rewrite(c) for c in index_children(doc, where=where)]
        remap = {old: new["digest"] for old, new in self.new.items()}
        for child in children:
            ann = child.get("annotations")
            ref = ann.get(mt.DOCKER_REFERENCE_DIGEST_ANNOTATION) if ann else None
            if ref in remap:
                # buildx attestation manifests name their image by digest.
                child["annotations"] = {**ann, mt.DOCKER_REFERENCE_DIGEST_ANNOTATION: remap[ref]}
        new_doc = _reheaded(doc, mt.OCI_INDEX)
        new_doc["manifests"] = children
        return self.writer.add_bytes(dump_json(new_doc), mt.OCI_INDEX)

    def _rewrite_manifest(self, node: Node) -> Descriptor:
        assert node.document is not None
        doc = node.document
        where = f"{self.source.ref}: manifest {node.descriptor['digest']}"
        config_desc, layer_descs = manifest_children(doc, where=where)
        new_layers: list[Descriptor] = []
        diff_ids: list[str] = []
        for d in layer_descs:
            report = self.layers.get(d["digest"])
            if report is None:  # not a tar layer: keep the blob as it is
                new_layers.append(self.rewrite(d))
                diff_ids.append("")
                continue
            nd = {k: v for k, v in d.items() if k != "urls"}
            nd["mediaType"] = report.media_type
            nd["digest"] = report.blob_digest
            nd["size"] = report.blob_size
            ann = {k: v for k, v in (d.get("annotations") or {}).items()
                   if k not in _FORMAT_ANNOTATIONS}
            ann.update(report.annotations)
            nd["annotations"] = ann
            new_layers.append(nd)
            diff_ids.append(report.diff_id)
        config = self.source.read_document(config_desc)
        rootfs = config.get("rootfs")
        old_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(old_ids, list) or len(old_ids) != len(layer_descs):
            raise ImageFormatError(
                f"{where}: config {config_desc['digest']} lists "
                f"{len(old_ids) if isinstance(old_ids, list) else 'no'} rootfs.diff_ids for "
                f"{len(layer_descs)} layers: the image is corrupt"
            )
        new_config = dict(config)
        new_config["rootfs"] = {
            **rootfs, "diff_ids": [n or o for n, o in zip(diff_ids, old_ids, strict=True)]}
        config_new = self.writer.add_bytes(dump_json(new_config), mt.OCI_CONFIG)
        new_doc = _reheaded(doc, mt.OCI_MANIFEST)
        new_doc["config"] = _with(config_desc, config_new)
        new_doc["layers"] = new_layers
        out = self.writer.add_bytes(dump_json(new_doc), mt.OCI_MANIFEST)
        self.image_manifests.append(_with(node.descriptor, out))
        return out


def _with(old: Descriptor, new: Descriptor) -> Descriptor:
    """`old` (platform, annotations, ...) with the media type, digest and size of `new`."""
    out = dict(old)
    out["mediaType"] = new["mediaType"]
    out["digest"] = new["digest"]
    out["size"] = new["size"]
    if "annotations" in new:
        out["annotations"] = {**(old.get("annotations") or {}), **new["annotations"]}
    return out


def _reheaded(doc: Document, media_type: str) -> Document:
    """`doc` with schemaVersion and mediaType first and the OCI media type."""
    out: Document = {"schemaVersion": 2, "mediaType": media_type}
    for k, v in doc.items():
        if k not in out:
            out[k] = v
    return out


def convert_image(
    source: SourceImage,
    writer: LayoutWriter,
    options: ConvertOptions = ConvertOptions(),  # noqa: B008 - frozen dataclass
    progress: Progress | None = None,
) -> tuple[Descriptor, list[LayerReport], list[Descriptor]]:
    """Convert `source` into `writer` (not committed). Returns the new top descriptor,
    the per-layer reports (unique layers, image order) and the new image manifests."""
    conv = _ImageConverter(source, writer, options, progress or _NoProgress())
    top = conv.run()
    return top, list(conv.layers.values()), conv.image_manifests


def convert(
    src: ImageRef | str,
    dst: ImageRef,
    options: ConvertOptions = ConvertOptions(),  # noqa: B008 - frozen dataclass
    progress: Progress | None = None,
) -> ImageReport:
    """Convert the image `src` into the OCI layout `dst` (`oci:DIR[:TAG]`), atomically.

    The output tag is `dst`'s tag, else the source's tag, else none.
    """
    if dst.transport != "oci":
        raise ConvertError(f"destination {dst}: images are written as OCI layouts: use oci:DIR")
    with open_image(src) as source:
        tag = dst.tag or source.tag
        if (source.ref.transport == "oci" and dst.path.exists()
                and source.ref.path.resolve() == dst.path.resolve()
                and (tag is None or tag == source.tag)):
            # Writing back under the source's own name would silently replace it.
            raise ConvertError(
                f"destination {dst} is the source layout and would replace the source image; "
                f"give DST another tag (oci:{dst.path}:NEWTAG) or another directory"
            )
        with LayoutWriter(dst.path) as writer:
            try:
                top, layers, manifests = convert_image(source, writer, options, progress)
            except OSError as exc:
                raise ConvertError(f"writing {dst}: {exc}") from None
            writer.commit(top, tag)
        top_out = dict(top)
        return ImageReport(str(src), str(dst), tag, top_out, layers, manifests)


__all__ = [
    "ConvertError", "ConvertOptions", "ImageReport", "LayerReport", "Progress",
    "convert", "convert_image", "convert_layer_file", "decompressed_digest",
]  # fmt: skip
