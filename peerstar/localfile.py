"""Local files at the I/O edge: range reads for the format readers, atomic writes.

`RangeFile` gives the pure readers their `read_at(offset, length)` over a local file;
`atomic_write` is the one way peerstar replaces a file: it writes to a temporary name
beside the target and renames on success, so a failed or interrupted write leaves nothing
half-written behind (a crash may leave a dot-named `.tmp` file, never a partial target).
`oserror_text` words an OSError for a one-line message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from peerstar.errors import PeerstarError


class RangeFile:
    """A read-only local file read by offset (thread-safe: pread)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise PeerstarError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise PeerstarError(f"{self.path}: is a directory, expected a file") from None
        except OSError as exc:
            raise PeerstarError(f"{self.path}: cannot open: {exc.strerror}") from None
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RangeFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: int = 0o644, *,
                 fsync: bool = True) -> Iterator[BinaryIO]:
    """Yield a file to write; it appears at `path` (with `mode`) only if the block finishes.

    `fsync=False` skips the flush to disk before the rename, for data that is cheap to
    lose in a crash (content-addressed blocks that are verified on read) and written
    often. Errors of the file system propagate as `OSError`.
    """
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        raise PeerstarError(f"{target}: directory {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def oserror_text(exc: OSError) -> str:
    """What went wrong, in words fit for a one-line error ("disk full", "Permission denied")."""
    if exc.errno == errno.ENOSPC:
        return "disk full"
    return exc.strerror or str(exc)
