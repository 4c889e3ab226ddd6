"""Fixtures for lazyfs tests: eStargz layers built with `peerstar.estargz.build`, pushed
to the session's Debian docker-registry over its HTTP API, and FUSE mount helpers.

Layers:
- `rich`: a hand-made tar with every kind of entry the filesystem must show (uid/gid,
  setuid mode, xattrs, char/block devices, fifo, symlinks, hardlink, whiteout, opaque
  dir, a multi-chunk file, a prioritized file so the blob has `.prefetch.landmark`).
- the sample image's two layers (10 MiB of extra data) for the merged-rootfs tests.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from peerstar.estargz import TOC_DIGEST_ANNOTATION, build
from peerstar.source.sample import (
    SampleImage,
    build_layer_tar,
    build_sample_image,
    pseudo_random_bytes,
    sample_layer_entries,
)
from tests.support import registry
from tests.support.content import sha256_digest
from tests.support.registry import DockerRegistry
from tests.support.tars import Entry, write_tar

MTIME = 1700000000
CHUNK = 256 << 10  # small chunks so a few MiB make many chunks
BIG = pseudo_random_bytes("lazyfs/big", 3 * CHUNK + 12345)
PRIORITY = b"prioritized contents\n" * 100


RICH_ITEMS = [
    Entry("bin/", tarfile.DIRTYPE, mode=0o755),
    Entry("bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755, uid=1000, gid=1001),
    Entry("dev/", tarfile.DIRTYPE, mode=0o755),
    Entry("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
    Entry("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0, gid=6),
    Entry("dev/pipe", tarfile.FIFOTYPE, mode=0o600),
    Entry("data/", tarfile.DIRTYPE, mode=0o750, uid=33, gid=33,
          xattrs={"user.dir": b"on a dir"}),
    Entry("data/big.bin", data=BIG, xattrs={"user.checksum": b"abc", "user.empty": b""}),
    Entry("data/empty", data=b""),
    Entry("data/prio.txt", data=PRIORITY),
    Entry("data/hard", tarfile.LNKTYPE, linkname="data/prio.txt"),
    Entry("data/rel-link", tarfile.SYMTYPE, linkname="big.bin", mode=0o777),
    Entry("data/abs-link", tarfile.SYMTYPE, linkname="/bin/tool", mode=0o777),
    Entry("data/.wh.gone", data=b""),
    Entry("opaque/", tarfile.DIRTYPE, mode=0o755),
    Entry("opaque/.wh..wh..opq", data=b""),
    Entry("opaque/kept.txt", data=b"kept\n"),
]


def rich_tar() -> bytes:
    return write_tar(replace(it, mtime=MTIME) for it in RICH_ITEMS)


@dataclass
class Layer:
    blob: bytes
    digest: str
    toc_digest: str
    tar: bytes

    @property
    def size(self) -> int:
        return len(self.blob)


def make_layer(tar: bytes, prioritized: tuple[str, ...] = (), chunk_size: int = CHUNK) -> Layer:
    out = io.BytesIO()
    res = build(io.BytesIO(tar), out, chunk_size=chunk_size, prioritized=prioritized)
    return Layer(out.getvalue(), res.blob_digest, res.toc_digest, tar)


@pytest.fixture(scope="session")
def rich_layer() -> Layer:
    return make_layer(rich_tar(), prioritized=("data/prio.txt",))


# --- registry upload (distribution HTTP API, monolithic uploads) ---------------------


def push_image(registry_url: str, repo: str, tag: str, layers: list[Layer],
               *, estargz: bool = True) -> str:
    """Push layers + config + manifest; returns the manifest digest. Without `estargz`
    the layers go without their TOC digest annotations, as a plain gzip image."""
    return registry.push_image(
        registry_url, repo, tag,
        [(lay.blob, {TOC_DIGEST_ANNOTATION: lay.toc_digest} if estargz else {})
         for lay in layers],
        [sha256_digest(lay.tar) for lay in layers])


@pytest.fixture(scope="session")
def sample_image_10(tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    return build_sample_image(tmp_path_factory.mktemp("sample10") / "layout", extra_mib=10)


@pytest.fixture(scope="session")
def sample_layers() -> list[Layer]:
    entries = sample_layer_entries(extra_mib=10)
    return [make_layer(build_layer_tar(entries[0])),
            make_layer(build_layer_tar(entries[1]), prioritized=("etc/peerstar-sample.txt",),
                       chunk_size=4 << 20)]


@pytest.fixture(scope="session")
def pushed_rich(docker_registry: DockerRegistry, rich_layer: Layer) -> str:
    """The rich layer pushed to the docker-registry; returns its blob URL."""
    push_image(docker_registry.url, "lazyfs/rich", "latest", [rich_layer])
    return f"{docker_registry.url}/v2/lazyfs/rich/blobs/{rich_layer.digest}"


# --- mounts ----------------------------------------------------------------------------


def is_mounted(path: Path) -> bool:
    target = str(Path(path).resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """An empty mountpoint; anything still mounted there at the end is unmounted."""
    d = tmp_path / "mnt"
    d.mkdir()
    yield d
    while is_mounted(d):
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"
