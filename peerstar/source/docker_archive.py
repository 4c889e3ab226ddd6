"""The `docker-archive:FILE[:REF]` source: a `docker save` archive (tar, maybe gzipped).

A docker archive has no manifest of its own; we synthesise the Docker schema 2 manifest
that containers/image (skopeo) reports for it -- every layer typed as
`...rootfs.diff.tar.gzip` whatever its compression, as skopeo does -- so manifest digests
match `skopeo inspect docker-archive:FILE`. Layer readers sniff the compression anyway.
REF picks one image of several: `name:tag` from RepoTags, or `@N` for the N-th.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from peerstar.oci import mediatypes as mt
from peerstar.oci.digest import sha256_digest
from peerstar.oci.errors import BlobError, ImageFormatError, ImageReferenceError
from peerstar.oci.model import Descriptor, descriptor, dump_json
from peerstar.oci.reference import ImageRef
from peerstar.source.image import ReadAt, SourceImage


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
            tmp: BinaryIO = tempfile.TemporaryFile(prefix="peerstar-docker-archive-")
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
            f = tmp
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
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # (deep nesting)
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
        # A RawIOBase, which typeshed does not count as BinaryIO; callers read and close.
        return _RangeStream(self._pread, m.offset, m.size), m.size  # type: ignore[return-value]  # see above

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

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]  # RawIOBase takes any writable buffer; io only passes these
        n = min(len(buf), self._end - self._pos)
        if n <= 0:
            return 0
        data = self._pread(self._pos, n)
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)
