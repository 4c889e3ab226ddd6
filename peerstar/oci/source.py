"""Reading source images: OCI image layouts and `docker save` archives, one uniform model.

`open_image(ref)` returns a `SourceImage`: its `top_descriptor` (an index or a manifest),
`read_blob(digest)` giving a stream that verifies digest and size as it is read,
`read_document(descriptor)` for JSON blobs, `blob_range(digest)` for random access (the
eStargz reader's `read_at`), and `walk()` over every blob the image references. Reading
only: conversion lives in `peerstar.oci.convert`, writing in `peerstar.oci.layout`.

A docker archive has no manifest of its own; we synthesise the Docker schema 2 manifest
that containers/image (skopeo) reports for it -- every layer typed as
`...rootfs.diff.tar.gzip` whatever its compression, as skopeo does -- so manifest digests
match `skopeo inspect docker-archive:FILE`. Layer readers sniff the compression anyway.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from peerstar.oci import mediatypes as mt
from peerstar.oci.digest import parse_digest, sha256_digest, verifying_stream
from peerstar.oci.errors import BlobError, ImageFormatError, ImageReferenceError
from peerstar.oci.model import (
    BLOB,
    CONFIG,
    INDEX,
    LAYER,
    MANIFEST,
    Descriptor,
    Document,
    descriptor,
    dump_json,
    index_children,
    kind_of,
    manifest_children,
    parse_document,
)
from peerstar.oci.reference import DOCKER_ARCHIVE, OCI, ImageRef, parse_image_ref

ReadAt = Callable[[int, int], bytes]
# JSON documents (indexes, manifests, configs) are small; refuse absurd ones early.
MAX_DOCUMENT_BYTES = 64 << 20


@dataclass
class Node:
    """One blob reached by `SourceImage.walk()`."""

    descriptor: Descriptor
    kind: str  # model.INDEX, MANIFEST, CONFIG, LAYER or BLOB
    document: Document | None = None  # parsed JSON for indexes and manifests
    parents: list[str] = field(default_factory=list)  # digests of referencing documents


class SourceImage(ABC):
    """A readable image: a top descriptor and content-addressed blobs."""

    def __init__(self, ref: ImageRef) -> None:
        self.ref = ref
        self.top_descriptor: Descriptor = {}
        # The tag the image had in its source (ref.name, or the RepoTag's tag).
        self.tag: str | None = None
        # Blobs that exist only in memory (a synthesised manifest or index).
        self._memory: dict[str, bytes] = {}
        self._range_files: list[BinaryIO] = []

    # -- to implement ----------------------------------------------------------------

    @abstractmethod
    def _open_raw(self, digest: str) -> tuple[BinaryIO, int]:
        """An unverified stream of the stored blob and its stored size."""

    @abstractmethod
    def _range_raw(self, digest: str) -> tuple[ReadAt, int]:
        """Unverified random access to the stored blob."""

    def close(self) -> None:
        """Release files held open for `blob_range` readers."""
        while self._range_files:
            with contextlib.suppress(OSError):
                self._range_files.pop().close()

    # -- public ----------------------------------------------------------------------

    def check_blob(self, desc: Descriptor) -> None:
        """Raise `BlobError` unless the blob of `desc` is stored with the right size.

        Cheap (no hashing): lets a caller fail before long work; digests are still
        verified when the blob is read.
        """
        digest = desc["digest"]
        if digest in self._memory:
            stored = len(self._memory[digest])
        else:
            f, stored = self._open_raw(digest)
            f.close()
        if stored != desc["size"]:
            raise BlobError(
                f"{self.ref}: blob {digest} has {stored} bytes, its descriptor says "
                f"{desc['size']}: the image is truncated or corrupt"
            )

    def read_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        """A stream of the blob that raises `BlobError` at EOF if digest or size is wrong."""
        parse_digest(digest)
        if digest in self._memory:
            raw: BinaryIO = io.BytesIO(self._memory[digest])
        else:
            raw, stored = self._open_raw(digest)
            if size is not None and stored != size:
                raw.close()
                raise BlobError(
                    f"{self.ref}: blob {digest} has {stored} bytes, its descriptor says {size}: "
                    "the image is truncated or corrupt"
                )
        return verifying_stream(raw, digest, size, name=str(self.ref))

    def read_bytes(self, desc: Descriptor, *, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
        """The whole (verified) blob of `desc`; refuse blobs larger than `limit`."""
        if desc["size"] > limit:
            raise ImageFormatError(
                f"{self.ref}: {desc['mediaType']} blob {desc['digest']} claims {desc['size']} "
                f"bytes, more than the {limit} allowed for metadata: the image is corrupt"
            )
        with self.read_blob(desc["digest"], desc["size"]) as f:
            return f.read()

    def read_document(self, desc: Descriptor) -> Document:
        """Parse the JSON blob of an index, manifest or config descriptor."""
        return parse_document(
            self.read_bytes(desc), where=f"{self.ref}: {desc['mediaType']} {desc['digest']}"
        )

    def blob_range(self, digest: str) -> tuple[ReadAt, int]:
        """(read_at, size) over the stored blob, unverified: for format readers."""
        parse_digest(digest)
        if digest in self._memory:
            view = memoryview(self._memory[digest])
            return (lambda off, n: bytes(view[off : off + n])), len(view)
        return self._range_raw(digest)

    def walk(self) -> Iterator[Node]:
        """Every blob the image references, each once, documents before their children.

        Indexes and manifests come with their parsed JSON. The `subject` of a manifest
        (OCI referrers) is not followed: it points at another image.
        """
        seen: dict[str, Node] = {}

        def visit(desc: Descriptor, kind: str, parent: str | None) -> Iterator[Node]:
            digest = desc["digest"]
            if digest in seen:
                if parent:
                    seen[digest].parents.append(parent)
                return
            node = Node(desc, kind, parents=[parent] if parent else [])
            seen[digest] = node
            where = f"{self.ref}: {desc['mediaType']} {digest}"
            if kind == INDEX:
                node.document = self.read_document(desc)
                yield node
                for child in index_children(node.document, where=where):
                    yield from visit(child, _child_kind(child), digest)
            elif kind == MANIFEST:
                node.document = self.read_document(desc)
                yield node
                config, layers = manifest_children(node.document, where=where)
                yield from visit(config, CONFIG if kind_of(config["mediaType"]) == CONFIG
                                 else BLOB, digest)
                for layer in layers:
                    yield from visit(layer, LAYER if kind_of(layer["mediaType"]) == LAYER
                                     else BLOB, digest)
            else:
                yield node

        top = self.top_descriptor
        yield from visit(top, _child_kind(top), None)

    def __enter__(self) -> SourceImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _child_kind(desc: Descriptor) -> str:
    kind = kind_of(desc["mediaType"])
    return kind if kind in (INDEX, MANIFEST) else BLOB


def open_image(ref: ImageRef | str) -> SourceImage:
    """Open `oci:DIR[:TAG]` or `docker-archive:FILE[:REF]` for reading."""
    if isinstance(ref, str):
        ref = parse_image_ref(ref, role="source image")
    if ref.transport == OCI:
        return OCILayoutSource(ref)
    if ref.transport == DOCKER_ARCHIVE:
        return DockerArchiveSource(ref)
    raise ImageReferenceError(f"{ref}: unsupported transport {ref.transport!r}")


# --- OCI image layout ----------------------------------------------------------------


class OCILayoutSource(SourceImage):
    """An OCI image layout directory (`oci-layout`, `index.json`, `blobs/<algo>/<hex>`)."""

    def __init__(self, ref: ImageRef) -> None:
        super().__init__(ref)
        root = ref.path
        if not root.exists():
            raise ImageReferenceError(f"{ref}: directory {root} does not exist")
        if not root.is_dir():
            raise ImageReferenceError(
                f"{ref}: {root} is not a directory; an oci: image is an OCI image layout "
                "directory (use docker-archive:FILE for `docker save` output)"
            )
        layout_file = root / "oci-layout"
        if not layout_file.is_file():
            raise ImageReferenceError(
                f"{ref}: {root} is not an OCI image layout (no oci-layout file)"
            )
        layout = _read_json_file(layout_file, ref)
        if not isinstance(layout.get("imageLayoutVersion"), str):
            raise ImageFormatError(f"{ref}: {layout_file} has no imageLayoutVersion")
        index_path = root / "index.json"
        if not index_path.is_file():
            raise ImageFormatError(f"{ref}: {root} has no index.json: the layout is incomplete")
        raw_index = _read_file(index_path, ref)
        index = parse_document(raw_index, where=f"{ref}: index.json")
        entries = index_children(index, where=f"{ref}: index.json")
        self.top_descriptor, self.tag = self._select(entries, raw_index, index)

    def _select(
        self, entries: list[Descriptor], raw_index: bytes, index: Document
    ) -> tuple[Descriptor, str | None]:
        ref = self.ref

        def name(d: Descriptor) -> str | None:
            ann = d.get("annotations")
            return ann.get(mt.REF_NAME_ANNOTATION) if isinstance(ann, dict) else None

        names = sorted({n for d in entries if (n := name(d))})
        if ref.tag is not None:
            hits = [d for d in entries if name(d) == ref.tag]
            if not hits:
                have = ", ".join(names) if names else "none"
                raise ImageReferenceError(
                    f"{ref}: no image tagged {ref.tag!r} in {ref.path} (tags: {have})"
                )
            if len(hits) > 1:
                raise ImageFormatError(
                    f"{ref}: {len(hits)} manifests carry the tag {ref.tag!r}: the layout is "
                    "ambiguous; fix its index.json"
                )
            return hits[0], ref.tag
        if len(entries) == 1:
            return entries[0], name(entries[0])
        if not entries:
            raise ImageReferenceError(f"{ref}: the layout {ref.path} holds no image")
        if not names:
            # Several untagged manifests (a multi-platform image written straight into
            # index.json): the index.json itself is the image index.
            doc = dict(index)
            doc.setdefault("mediaType", mt.OCI_INDEX)
            data = raw_index if "mediaType" in index else dump_json(doc)
            digest = sha256_digest(data)
            self._memory[digest] = data
            return descriptor(mt.OCI_INDEX, digest, len(data)), None
        raise ImageReferenceError(
            f"{ref}: the layout {ref.path} holds {len(entries)} images; choose one with "
            f"oci:{ref.path}:TAG (tags: {', '.join(names)})"
        )

    def _path(self, digest: str) -> Path:
        algo, hexpart = parse_digest(digest)
        return self.ref.path / "blobs" / algo / hexpart

    def _open_raw(self, digest: str) -> tuple[BinaryIO, int]:
        path = self._path(digest)
        try:
            f = open(path, "rb")  # noqa: SIM115 - returned to the caller
        except FileNotFoundError:
            raise BlobError(
                f"{self.ref}: blob {digest} is missing from the layout (no {path})"
            ) from None
        except OSError as exc:
            raise BlobError(f"{self.ref}: cannot read {path}: {exc.strerror}") from None
        return f, os.fstat(f.fileno()).st_size

    def _range_raw(self, digest: str) -> tuple[ReadAt, int]:
        f, size = self._open_raw(digest)
        self._range_files.append(f)  # closed by close()
        fd = f.fileno()
        return (lambda off, n: os.pread(fd, n, off)), size


def _read_file(path: Path, ref: ImageRef) -> bytes:
    try:
        if path.stat().st_size > MAX_DOCUMENT_BYTES:
            raise ImageFormatError(f"{ref}: {path} is too large to be image metadata")
        return path.read_bytes()
    except OSError as exc:
        raise ImageReferenceError(f"{ref}: cannot read {path}: {exc.strerror}") from None


def _read_json_file(path: Path, ref: ImageRef) -> Document:
    return parse_document(_read_file(path, ref), where=f"{ref}: {path.name}")


# --- docker save archive -------------------------------------------------------------


@dataclass
class _Member:
    offset: int
    size: int


class DockerArchiveSource(SourceImage):
    """A `docker save` archive: manifest.json, a config JSON and layer tars (maybe gzip)."""

    def __init__(self, ref: ImageRef) -> None:
        super().__init__(ref)
        self._file: BinaryIO | None = None
        path = ref.path
        if not path.exists():
            raise ImageReferenceError(f"{ref}: file {path} does not exist")
        if not path.is_file():
            raise ImageReferenceError(
                f"{ref}: {path} is not a file; docker-archive: expects `docker save` output "
                "(use oci:DIR for an OCI image layout)"
            )
        try:
            self._open_archive(path)
            self._load()
        except BaseException:
            self.close()
            raise

    def _open_archive(self, path: Path) -> None:
        ref = self.ref
        try:
            f: BinaryIO = open(path, "rb")  # noqa: SIM115 - kept until close()
        except OSError as exc:
            raise ImageReferenceError(f"{ref}: cannot open {path}: {exc.strerror}") from None
        if f.read(2) == b"\x1f\x8b":
            # `docker save | gzip`: decompress once to a private temp file so layers can
            # be read by offset.
            f.seek(0)
            tmp = tempfile.TemporaryFile(prefix="peerstar-docker-archive-")
            try:
                with gzip.GzipFile(fileobj=f) as gz:
                    shutil.copyfileobj(gz, tmp, 1 << 20)
            except (OSError, EOFError, zlib.error) as exc:
                tmp.close()
                raise ImageFormatError(
                    f"{ref}: {path} is gzip-compressed but does not decompress ({exc})"
                ) from None
            finally:
                f.close()
            f = tmp  # type: ignore[assignment]
        f.seek(0)
        self._file = f
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    self._members[_clean(info.name)] = info
        except (tarfile.TarError, EOFError) as exc:
            raise ImageFormatError(
                f"{ref}: {path} is not a tar archive ({exc}); docker-archive: expects "
                "`docker save` output"
            ) from None

    def _member(self, name: str, *, what: str) -> _Member:
        """Find a regular file in the archive, following symlinks inside it (docker 25+)."""
        key = _clean(name)
        for _ in range(16):
            info = self._members.get(key)
            if info is None:
                break
            if info.issym():
                key = _clean(posixpath.join(posixpath.dirname(key), info.linkname))
                continue
            if info.islnk():
                key = _clean(info.linkname)
                continue
            if info.isfile():
                return _Member(info.offset_data, info.size)
            break
        raise ImageFormatError(
            f"{self.ref}: {what} {name!r} listed in manifest.json is not a file in the archive: "
            "the archive is incomplete or corrupt"
        )

    def _load(self) -> None:
        ref = self.ref
        if "manifest.json" not in self._members:
            raise ImageFormatError(
                f"{ref}: {ref.path} has no manifest.json: not `docker save` output"
            )
        info = self._member("manifest.json", what="manifest")
        raw = self._pread(info.offset, info.size)
        try:
            entries = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ImageFormatError(f"{ref}: manifest.json is not valid JSON ({exc})") from None
        if not isinstance(entries, list) or not entries or not all(
                isinstance(e, dict) for e in entries):
            raise ImageFormatError(f"{ref}: manifest.json is not a list of images")
        entry = self._select(entries)
        config_name = entry.get("Config")
        layer_names = entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list) or not all(
                isinstance(n, str) for n in layer_names):
            raise ImageFormatError(f"{ref}: manifest.json entry lacks Config or Layers")
        self._blobs: dict[str, _Member] = {}
        cfg = self._member(config_name, what="config")
        config_bytes = self._pread(cfg.offset, cfg.size)
        config_digest = sha256_digest(config_bytes)
        self._blobs[config_digest] = cfg
        layers: list[Descriptor] = []
        hashed: dict[tuple[int, int], str] = {}
        for name in layer_names:
            m = self._member(name, what="layer")
            key = (m.offset, m.size)
            if key not in hashed:
                hashed[key] = self._hash_member(m)
            self._blobs[hashed[key]] = m
            # containers/image types every docker-archive layer as gzip (see module doc).
            layers.append(descriptor(mt.DOCKER_LAYER_GZIP, hashed[key], m.size))
        manifest = {
            "schemaVersion": 2,
            "mediaType": mt.DOCKER_MANIFEST,
            "config": {"mediaType": mt.DOCKER_CONFIG, "size": cfg.size, "digest": config_digest},
            "layers": [{"mediaType": d["mediaType"], "size": d["size"], "digest": d["digest"]}
                       for d in layers],
        }
        data = dump_json(manifest)
        digest = sha256_digest(data)
        self._memory[digest] = data
        self.top_descriptor = descriptor(mt.DOCKER_MANIFEST, digest, len(data))

    def _select(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        ref = self.ref

        def tags(e: dict[str, Any]) -> list[str]:
            t = e.get("RepoTags")
            return [x for x in t if isinstance(x, str)] if isinstance(t, list) else []

        all_tags = [t for e in entries for t in tags(e)]
        want = ref.tag
        if want is None:
            if len(entries) > 1:
                raise ImageReferenceError(
                    f"{ref}: the archive holds {len(entries)} images; choose one with "
                    f"docker-archive:{ref.path}:NAME:TAG or :@N (tags: "
                    f"{', '.join(all_tags) or 'none'})"
                )
            entry = entries[0]
            self.tag = _tag_of(tags(entry)[0]) if tags(entry) else None
            return entry
        if want.startswith("@"):
            try:
                n = int(want[1:])
            except ValueError:
                n = -1
            if not 0 <= n < len(entries):
                raise ImageReferenceError(
                    f"{ref}: {want!r} is not an image index in the archive (0..{len(entries) - 1})"
                )
            entry = entries[n]
            self.tag = _tag_of(tags(entry)[0]) if tags(entry) else None
            return entry
        full = want if _tag_of(want) else want + ":latest"
        for e in entries:
            for t in tags(e):
                if t == full or t.endswith("/" + full):
                    self.tag = _tag_of(t)
                    return e
        raise ImageReferenceError(
            f"{ref}: no image named {want!r} in the archive (tags: {', '.join(all_tags) or 'none'})"
        )

    def _pread(self, offset: int, size: int) -> bytes:
        assert self._file is not None
        return os.pread(self._file.fileno(), size, offset)

    def _hash_member(self, m: _Member) -> str:
        h = hashlib.sha256()
        pos, end = m.offset, m.offset + m.size
        while pos < end:
            data = self._pread(pos, min(1 << 20, end - pos))
            if not data:
                raise ImageFormatError(f"{self.ref}: the archive is truncated")
            h.update(data)
            pos += len(data)
        return "sha256:" + h.hexdigest()

    def _find(self, digest: str) -> _Member:
        m = self._blobs.get(digest)
        if m is None:
            raise BlobError(f"{self.ref}: blob {digest} is not part of the archive's image")
        return m

    def _open_raw(self, digest: str) -> tuple[BinaryIO, int]:
        m = self._find(digest)
        return _RangeStream(self._pread, m.offset, m.size), m.size

    def _range_raw(self, digest: str) -> tuple[ReadAt, int]:
        m = self._find(digest)

        def read_at(off: int, n: int) -> bytes:
            if off >= m.size:
                return b""
            return self._pread(m.offset + off, min(n, m.size - off))

        return read_at, m.size

    def close(self) -> None:
        super().close()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def _clean(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


def _tag_of(repo_tag: str) -> str | None:
    """The tag of `name:tag` (a colon after the last slash), or None."""
    last = repo_tag.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else None


class _RangeStream(io.RawIOBase):
    """A sequential stream over `size` bytes at `offset` of a file read with pread."""

    def __init__(self, pread: Callable[[int, int], bytes], offset: int, size: int) -> None:
        super().__init__()
        self._pread = pread
        self._pos = offset
        self._end = offset + size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self._end - self._pos)
        if n <= 0:
            return 0
        data = self._pread(self._pos, n)
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)
