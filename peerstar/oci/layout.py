"""Writing OCI image layouts atomically: blobs, `index.json` with a ref.name, `oci-layout`.

`LayoutWriter(dir)` stages everything in a temp dir beside the target:
- a new (or empty) target is built completely in the staging dir and renamed into place
  at `commit()`, so a failed write leaves nothing behind;
- an existing OCI layout gets its new blobs moved in at `commit()` and its `index.json`
  replaced by rename (the commit point); on failure the blobs it added are removed again.
Anything else in the way (a file, a non-empty directory that is not a layout) is refused.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from peerstar.oci import mediatypes as mt
from peerstar.oci.digest import HashingWriter, parse_digest
from peerstar.oci.errors import BlobError, LayoutWriteError
from peerstar.oci.model import Descriptor, descriptor, dump_json, parse_document


class LayoutWriter:
    """Build an OCI image layout at `target`; nothing is visible there before `commit()`."""

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = Path(target)
        self._lock = threading.Lock()
        self._blobs: dict[str, Path] = {}  # digest -> staged file
        self._done = False
        parent = self.target.parent
        if not parent.is_dir():
            raise LayoutWriteError(
                f"{self.target}: parent directory {parent} does not exist; create it first"
            )
        if self.target.is_symlink() or (self.target.exists() and not self.target.is_dir()):
            raise LayoutWriteError(
                f"{self.target} exists and is not a directory: choose a new path for the OCI "
                "layout"
            )
        self.existing = False
        if self.target.is_dir():
            try:
                empty = not any(self.target.iterdir())
            except OSError as exc:
                raise LayoutWriteError(f"{self.target}: cannot list: {exc.strerror}") from None
            if not empty:
                if not (self.target / "oci-layout").is_file():
                    raise LayoutWriteError(
                        f"{self.target} is not empty and is not an OCI image layout (no "
                        "oci-layout file): refusing to write into it; use a new or empty "
                        "directory"
                    )
                self.existing = True
        try:
            self.staging = Path(
                tempfile.mkdtemp(prefix=f".{self.target.name}.peerstar-", dir=parent)
            )
        except OSError as exc:
            raise LayoutWriteError(
                f"{self.target}: cannot create a staging directory in {parent}: {exc.strerror}"
            ) from None
        self._blob_dir = self.staging / "blobs" / "sha256"
        self._blob_dir.mkdir(parents=True)

    # -- adding blobs ------------------------------------------------------------------

    @contextlib.contextmanager
    def temp_file(self) -> Iterator[tuple[Path, BinaryIO]]:
        """A scratch file in the staging area (same filesystem: `add_file` renames it)."""
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=self.staging)
        path = Path(name)
        try:
            with os.fdopen(fd, "w+b") as f:
                yield path, f
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def add_file(
        self,
        path: Path,
        media_type: str,
        *,
        digest: str | None = None,
        annotations: dict[str, str] | None = None,
    ) -> Descriptor:
        """Move the staged file `path` in as a blob; hash it unless `digest` is given."""
        size = path.stat().st_size
        if digest is None:
            hw = HashingWriter(_NullSink())
            with open(path, "rb") as f:
                while data := f.read(1 << 20):
                    hw.write(data)
            digest = hw.digest
        _, hexpart = parse_digest(digest)
        dest = self._blob_dir / hexpart
        with self._lock:
            if digest in self._blobs:
                path.unlink()
            else:
                os.chmod(path, 0o644)
                os.replace(path, dest)
                self._blobs[digest] = dest
        return descriptor(media_type, digest, size, annotations=annotations)

    def add_blob(
        self,
        stream: BinaryIO,
        media_type: str,
        *,
        expected_digest: str | None = None,
        annotations: dict[str, str] | None = None,
    ) -> Descriptor:
        """Copy `stream` in as a blob; if `expected_digest` is given it must match."""
        with self.temp_file() as (path, f):
            hw = HashingWriter(f)
            try:
                while data := stream.read(1 << 20):
                    hw.write(data)
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                raise LayoutWriteError(f"{self.target}: cannot write a blob: {exc}") from None
            if expected_digest is not None and hw.digest != expected_digest:
                raise BlobError(
                    f"blob written as {expected_digest} hashes to {hw.digest}: corrupt input"
                )
            return self.add_file(path, media_type, digest=hw.digest, annotations=annotations)

    def add_bytes(
        self, data: bytes, media_type: str, *, annotations: dict[str, str] | None = None
    ) -> Descriptor:
        """Add a small blob (a manifest, index or config) from memory."""
        return self.add_blob(io.BytesIO(data), media_type, annotations=annotations)

    # -- finishing ---------------------------------------------------------------------

    def commit(self, top: Descriptor, tag: str | None = None) -> None:
        """Record `top` in index.json (with ref.name `tag`) and make the layout visible."""
        if self._done:
            raise LayoutWriteError(f"{self.target}: layout already committed or aborted")
        entry = dict(top)
        annotations = dict(entry.get("annotations") or {})
        annotations.pop(mt.REF_NAME_ANNOTATION, None)
        if tag:
            annotations[mt.REF_NAME_ANNOTATION] = tag
        if annotations:
            entry["annotations"] = annotations
        else:
            entry.pop("annotations", None)
        try:
            if self.existing:
                self._commit_existing(entry, tag)
            else:
                self._commit_new(entry)
        except OSError as exc:
            self.abort()
            raise LayoutWriteError(f"{self.target}: cannot write the layout: {exc}") from None
        self._done = True

    def _commit_new(self, entry: Descriptor) -> None:
        index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [entry]}
        _write_small(self.staging / "oci-layout",
                     dump_json({"imageLayoutVersion": mt.OCI_LAYOUT_VERSION}))
        _write_small(self.staging / "index.json", dump_json(index))
        for d in (self.staging, self.staging / "blobs", self._blob_dir):
            os.chmod(d, 0o755)
        # rename(2) replaces an empty directory, so an empty target works too.
        os.rename(self.staging, self.target)

    def _commit_existing(self, entry: Descriptor, tag: str | None) -> None:
        index_path = self.target / "index.json"
        index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}
        if index_path.is_file():
            index = parse_document(index_path.read_bytes(), where=f"{index_path}")
        manifests = index.get("manifests")
        if not isinstance(manifests, list):
            raise LayoutWriteError(f"{index_path} has no manifests list: fix or remove it")

        def ref_name(d: object) -> str | None:
            ann = d.get("annotations") if isinstance(d, dict) else None
            return ann.get(mt.REF_NAME_ANNOTATION) if isinstance(ann, dict) else None

        # Like skopeo: a tag names one image, so the new one replaces an older holder.
        kept = [d for d in manifests if not (tag and ref_name(d) == tag) and d != entry]
        index["manifests"] = kept + [entry]
        dest_dir = self.target / "blobs" / "sha256"
        dest_dir.mkdir(parents=True, exist_ok=True)
        moved: list[Path] = []
        try:
            for digest, staged in sorted(self._blobs.items()):
                dest = dest_dir / digest.split(":", 1)[1]
                if dest.exists():
                    continue  # content-addressed: already there
                os.replace(staged, dest)
                moved.append(dest)
            _write_small(self.staging / "index.json", dump_json(index))
            os.replace(self.staging / "index.json", index_path)  # the commit point
        except BaseException:
            for path in moved:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        shutil.rmtree(self.staging, ignore_errors=True)

    def abort(self) -> None:
        """Drop everything staged; the target is left as it was."""
        self._done = True
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> LayoutWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self._done:
            self.abort()


def _write_small(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)


class _NullSink:
    def write(self, data: bytes | bytearray | memoryview) -> int:
        return len(data)

    def flush(self) -> None:
        pass

