"""The loader's next files after an ELF binary: parsed from this machine's real binaries
(checked against binutils' readelf where it is installed), looked up inside a layer as
ld.so would (merged-/usr symlinks, multiarch directories), and fetched by the lazy layer
beside the binary's first read, recursively, and nothing else."""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from peerstar.estargz import Reader
from peerstar.lazyfs import elfdeps
from peerstar.lazyfs.cache import DiskCache
from peerstar.lazyfs.fetcher import BlobFetcher
from peerstar.lazyfs.layer import LazyLayer
from tests.lazyfs.blobserver import BlobServer
from tests.lazyfs.conftest import make_layer
from tests.support.tars import Entry, write_tar

LS = Path("/bin/ls")
LIBDIR = Path("/lib/x86_64-linux-gnu")
pytestmark = pytest.mark.skipif(not (LIBDIR / "libc.so.6").exists(),
                                reason="needs an x86_64 Debian userland")


def _parse_file(path: Path) -> elfdeps.ElfDeps | None:
    data = path.read_bytes()
    return elfdeps.parse(lambda off, n: data[off:off + n], len(data))


def test_parse_real_binaries_as_readelf() -> None:
    deps = _parse_file(LS)
    assert deps is not None
    assert deps.interp == "/lib64/ld-linux-x86-64.so.2"
    assert deps.multiarch == "x86_64-linux-gnu"
    assert "libc.so.6" in deps.needed
    data = LS.read_bytes()
    asked: list[int] = []

    def read(off: int, n: int) -> bytes:
        asked.append(off)
        return data[off:off + n]

    head = elfdeps.parse(read, len(data), needed=False)
    assert head is not None and head.interp == deps.interp and head.needed == ()
    assert max(asked) < 4096  # the program headers only, not the dynamic section
    lib = _parse_file(LIBDIR / "libselinux.so.1")
    assert lib is not None and lib.interp is None and "libc.so.6" in lib.needed
    if shutil.which("readelf"):
        for path, got in ((LS, deps), (LIBDIR / "libselinux.so.1", lib)):
            out = subprocess.run(["readelf", "-d", str(path)], capture_output=True,
                                 text=True, check=True).stdout
            assert got.needed == tuple(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+)\]",
                                                  out))


def test_not_dynamic_or_malformed_gives_nothing() -> None:
    ls = LS.read_bytes()
    for data in (b"", b"#!/bin/sh\n", b"\x7fELF" + b"\xff" * 60, ls[:200],
                 ls[:64] + b"\0" * 100):
        assert elfdeps.parse(lambda off, n, d=data: d[off:off + n], len(data)) is None
    if Path("/bin/busybox").exists():  # Debian's busybox-static: no interpreter
        assert _parse_file(Path("/bin/busybox")) is None
    # A program header table claiming to be far past the end is not read.
    bad = bytearray(ls[:4096])
    bad[32:40] = (1 << 40).to_bytes(8, "little")
    assert elfdeps.parse(lambda off, n: bytes(bad[off:off + n]), len(bad)) is None


def _tree() -> tuple[bytes, dict[str, bytes]]:
    """A merged-/usr layer: /lib and /lib64 are symlinks, the libraries real files."""
    files = {
        "usr/bin/prog": LS.read_bytes(),
        "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2":
            (LIBDIR / "ld-linux-x86-64.so.2").read_bytes(),
        "usr/lib/x86_64-linux-gnu/libc.so.6": (LIBDIR / "libc.so.6").read_bytes(),
        "usr/lib/x86_64-linux-gnu/libselinux.so.1": (LIBDIR / "libselinux.so.1").read_bytes(),
        "usr/lib/x86_64-linux-gnu/libpcre2-8.so.0.11.2":
            (LIBDIR / "libpcre2-8.so.0").resolve().read_bytes(),
        "usr/lib/x86_64-linux-gnu/libunused.so.1": (LIBDIR / "libc.so.6").read_bytes()[::-1],
    }
    items = [Entry("usr/", tarfile.DIRTYPE), Entry("usr/bin/", tarfile.DIRTYPE),
             Entry("usr/lib/", tarfile.DIRTYPE), Entry("usr/lib64/", tarfile.DIRTYPE),
             Entry("usr/lib/x86_64-linux-gnu/", tarfile.DIRTYPE),
             Entry("lib", tarfile.SYMTYPE, linkname="usr/lib"),
             Entry("lib64", tarfile.SYMTYPE, linkname="usr/lib64"),
             Entry("usr/lib64/ld-linux-x86-64.so.2", tarfile.SYMTYPE,
                   linkname="/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
             Entry("usr/lib/x86_64-linux-gnu/libpcre2-8.so.0", tarfile.SYMTYPE,
                   linkname="libpcre2-8.so.0.11.2")]
    items += [Entry(name, data=data, mode=0o755) for name, data in files.items()]
    return write_tar(items), files


def test_resolve_inside_the_layer() -> None:
    tar, _ = _tree()
    reader = Reader.from_bytes(make_layer(tar).blob)
    deps = _parse_file(LS)
    assert deps is not None
    got = [e.name for e in elfdeps.resolve(reader, "usr/bin/prog", deps)]
    assert got == ["usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                   "usr/lib/x86_64-linux-gnu/libselinux.so.1",
                   "usr/lib/x86_64-linux-gnu/libc.so.6"]
    # Symlink loops and paths leaving the layer resolve to nothing.
    assert elfdeps.lookup(reader, "/lib/x86_64-linux-gnu/libpcre2-8.so.0").name == \
        "usr/lib/x86_64-linux-gnu/libpcre2-8.so.0.11.2"
    assert elfdeps.lookup(reader, "/lib/x86_64-linux-gnu/missing.so") is None
    assert elfdeps.lookup(reader, "/usr/bin") is None  # a directory is not a library


def test_first_read_of_a_binary_fetches_the_loader_chain(tmp_path: Path) -> None:
    tar, files = _tree()
    layer = make_layer(tar)
    server = BlobServer({layer.digest: layer.blob}).start()
    try:
        lay = LazyLayer.open(BlobFetcher(server.url(layer.digest),
                                         cache=DiskCache(tmp_path / "regions")),
                             toc_digest=layer.toc_digest,
                             chunk_cache=DiskCache(tmp_path / "chunks"))
        prog = lay.reader.lookup("usr/bin/prog")
        assert prog is not None
        assert lay.read_file(prog, 0, 4096) == files["usr/bin/prog"][:4096]
        # The loader, the libraries and (through libselinux) libpcre2 arrive without
        # being read; the library nobody needs does not.
        want = ["usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "usr/lib/x86_64-linux-gnu/libc.so.6",
                "usr/lib/x86_64-linux-gnu/libselinux.so.1",
                "usr/lib/x86_64-linux-gnu/libpcre2-8.so.0.11.2"]
        keys = {n: lay._chunk_key(lay.reader.entry_chunks(lay.reader.lookup(n))[0])
                for n in want + ["usr/lib/x86_64-linux-gnu/libunused.so.1"]}
        deadline = time.monotonic() + 20
        while not all(keys[n] in lay._mem for n in want) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(keys[n] in lay._mem for n in want)
        time.sleep(0.2)
        assert keys["usr/lib/x86_64-linux-gnu/libunused.so.1"] not in lay._mem
        # What the read-ahead fetched reads back right, with no new request.
        n = len(server.ranges)
        libc = lay.reader.lookup("usr/lib/x86_64-linux-gnu/libc.so.6")
        assert lay.read_file(libc, 0, 1000) == files["usr/lib/x86_64-linux-gnu/libc.so.6"][:1000]
        assert len(server.ranges) == n
        assert threading.active_count() < 50
    finally:
        lay.stop()
        server.stop()
