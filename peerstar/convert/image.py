"""Whole-image conversion: every layer to eStargz (gzip) or zstd:chunked, metadata rewritten.

Owns the policy of `peerstar convert` for whole images:
- layers (tar, tar+gzip, tar+zstd, Docker or OCI media types) go through
  `convert.layer.build_layer`; identical layers (same source digest) are converted once;
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
Each layer reports to a `peerstar.progress.Progress` (key: its source digest).
Reading is `peerstar.source`, writing `peerstar.oci.layout`.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from peerstar.convert.layer import (
    ConvertError,
    ConvertOptions,
    LayerReport,
    build_layer,
)
from peerstar.estargz import EstargzError, Reader
from peerstar.estargz.compression import FORMAT_ANNOTATIONS, WRITABLE, by_media_type
from peerstar.oci import mediatypes as mt
from peerstar.oci.digest import finish_stream
from peerstar.oci.errors import ImageFormatError
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
    remap_reference,
)
from peerstar.oci.reference import ImageRef
from peerstar.progress import NoProgress, Progress
from peerstar.source import Node, SourceImage, open_image


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
        label = f"layer {digest[7:19]}"
        self.progress.started(digest, label, None)  # advances count decompressed bytes
        note = ""
        # With a prioritized list, every layer is rebuilt: a kept blob has its own order.
        keep = self.options.keep_estargz and not self.options.prioritized
        kept, note = self._try_keep(desc, what) if keep else (None, "")
        if kept is not None:
            self.progress.advanced(digest, size)
            self.progress.finished(digest, f"{label} kept")
            return kept
        with self.writer.temp_file() as (path, f):
            stream = self.source.read_blob(digest, size)
            # A prioritized file lives in one layer of an image, not in every layer:
            # missing paths are collected per layer and judged over the whole image.
            per_layer = replace(self.options, allow_missing_prioritized=True)
            try:
                result, bdigest, bsize = build_layer(
                    stream, f, per_layer,
                    lambda n: self.progress.advanced(digest, n), what,
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
        self.progress.finished(digest, f"{label} done")
        return report

    def _try_keep(self, desc: Descriptor, what: str) -> tuple[LayerReport | None, str]:
        """Keep a layer already in the requested format if TOC and chunks verify."""
        media_type = desc["mediaType"]
        codec = WRITABLE.get(self.options.compression)  # (an unknown one: build says so)
        annotations = desc.get("annotations") or {}
        claimed = annotations.get(mt.TOC_DIGEST_ANNOTATION)
        # docker-archive layers are all typed gzip; zstd ones can only be sniffed.
        if codec is None or (by_media_type(media_type) is not codec
                             and media_type != mt.DOCKER_LAYER_GZIP):
            return None, ""
        digest, size = desc["digest"], desc["size"]
        read_at, stored = self.source.blob_range(digest)
        try:
            probe = Reader.open(read_at, stored, toc_digest=claimed)
        except EstargzError as exc:
            if claimed:
                return None, f"annotated as eStargz but {exc}; reconverted"
            return None, ""
        if probe.codec is not codec:
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
                reader.verify()  # what `peerstar estargz verify` checks
            except EstargzError as exc:
                return None, f"TOC did not verify ({exc}); reconverted"
            try:
                info = reader.describe()  # DiffID and annotations, as a build reports them
            except EstargzError as exc:
                raise ConvertError(f"{what}: {exc}") from None
            self.writer.add_file(path, info.media_type, digest=digest)
        return LayerReport(
            source_digest=digest, source_size=size, toc_digest=info.toc_digest,
            diff_id=info.diff_id, uncompressed_size=info.uncompressed_size,
            blob_digest=digest, blob_size=size, media_type=info.media_type,
            annotations=info.annotations, kept=True,
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
            remap_reference(child, remap)
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
                   if k not in FORMAT_ANNOTATIONS}
            ann.update(report.annotations)
            nd["annotations"] = ann
            new_layers.append(nd)
            diff_ids.append(report.diff_id)
        config = self.source.read_document(config_desc)
        rootfs = config.get("rootfs")
        if not isinstance(rootfs, dict):
            rootfs = {}
        old_ids = rootfs.get("diff_ids")
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
    conv = _ImageConverter(source, writer, options, progress or NoProgress())
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

