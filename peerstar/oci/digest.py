"""Digests: parse/validate `algo:hex`, hash bytes, and streams that verify or hash.

Digests name files (`blobs/<algo>/<hex>`), so they are validated strictly before use:
a digest is never allowed to smuggle a path component into a file name.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import BinaryIO, Protocol

from peerstar.oci.errors import BlobError, ImageFormatError

_HEX_LEN = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")


def is_digest(text: object) -> bool:
    """True for a well-formed `sha256:<64 hex>` / `sha512:<128 hex>` digest."""
    m = _DIGEST_RE.match(text) if isinstance(text, str) else None
    return m is not None and len(m.group(2)) == _HEX_LEN[m.group(1)]


def parse_digest(digest: object, *, what: str = "digest") -> tuple[str, str]:
    """Split a digest into (algorithm, hex); raise `ImageFormatError` if it is malformed."""
    if not is_digest(digest):
        raise ImageFormatError(
            f"{what} {digest!r} is not a valid digest (expected sha256:<64 hex> or "
            "sha512:<128 hex>): the image metadata is corrupt"
        )
    algo, _, hexpart = str(digest).partition(":")
    return algo, hexpart


def sha256_digest(data: bytes) -> str:
    """The `sha256:<hex>` digest of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hasher_for(digest: str) -> hashlib._Hash:
    """A fresh hash object of the algorithm `digest` uses."""
    algo, _ = parse_digest(digest)
    return hashlib.new(algo)


class VerifyingReader(io.RawIOBase):
    """Read a blob stream while hashing it; at EOF the digest and size must match.

    A mismatch raises `BlobError` from the read that reaches EOF, so a consumer that
    reads to the end cannot use a tampered blob unknowingly. Consumers that may stop
    early call `finish()`, which drains the rest and checks.
    """

    def __init__(self, raw: BinaryIO, digest: str, size: int | None, *, name: str) -> None:
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._size = size
        self._name = name
        self._hash = hasher_for(digest)
        self._count = 0
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]  # RawIOBase takes any writable buffer; io only passes these
        if self._checked:
            return 0
        want = len(buf)
        if self._size is not None:
            # Never read past the declared size: a blob that is too long fails at once
            # instead of streaming an unbounded amount of data.
            want = min(want, self._size - self._count + 1)
        data = self._raw.read(want) if want else b""
        if not data:
            self._check()
            return 0
        n = len(data)
        buf[:n] = data
        self._hash.update(data)
        self._count += n
        if self._size is not None and self._count > self._size:
            raise BlobError(
                f"{self._name}: blob {self._digest} is longer than its descriptor's size "
                f"{self._size}: the image is corrupt"
            )
        return n

    def _check(self) -> None:
        if self._checked:
            return
        if self._size is not None and self._count != self._size:
            raise BlobError(
                f"{self._name}: blob {self._digest} has {self._count} bytes, its descriptor "
                f"says {self._size}: the image is truncated or corrupt"
            )
        algo = self._digest.split(":", 1)[0]
        actual = f"{algo}:{self._hash.hexdigest()}"
        if actual != self._digest:
            raise BlobError(
                f"{self._name}: blob content hashes to {actual}, expected {self._digest}: "
                "the image is corrupt or was modified"
            )
        self._checked = True

    def finish(self) -> None:
        """Read whatever is left and verify digest and size."""
        while self.read(1 << 20):
            pass
        self._check()

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


def verifying_stream(
    raw: BinaryIO, digest: str, size: int | None, *, name: str
) -> io.BufferedReader:
    """Wrap `raw` in a buffered `VerifyingReader` (buffered: it supports `peek`).

    Call `finish_stream(stream)` to drain and verify when the consumer may stop early.
    """
    return io.BufferedReader(VerifyingReader(raw, digest, size, name=name), 1 << 20)


def finish_stream(stream: BinaryIO) -> None:
    """Drain a stream from `verifying_stream` and check its digest and size."""
    raw = getattr(stream, "raw", None)
    while stream.read(1 << 20):
        pass
    if isinstance(raw, VerifyingReader):
        raw.finish()


class Sink(Protocol):
    """Where a HashingWriter passes its bytes: a binary file or anything that writes."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...

    def flush(self) -> None: ...


class HashingWriter(io.RawIOBase):
    """Pass writes through to `dst`, counting bytes and computing their sha256."""

    def __init__(self, dst: Sink) -> None:
        super().__init__()
        self._dst = dst
        self._hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]  # RawIOBase takes any buffer; our writers pass these
        n = self._dst.write(data)
        view = memoryview(data)[: n if n is not None else len(data)]
        self._hash.update(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self._dst.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()
