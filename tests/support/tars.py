"""Builders of test layer tars, made locally with Python's `tarfile` (no network).

Owns the inputs of the eStargz tests: a tar with every entry kind and the awkward
corners of the tar and TOC formats (`tar_all_kinds`), a tar of reserved and duplicate
names (`tar_reserved_names`), a realistic tree from installed Debian packages
(`tar_debian_tree`), and gzip / zstd wrappers; and for any test that needs a layer of
given contents, `write_tar` of `Entry`s or, for just directories and files,
`tar_of_files`. Every builder is deterministic: same
bytes on every call on a given machine (the Debian tree depends on what is installed).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import stat
import subprocess
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import zstandard

SMALL_CHUNK = 64 * 1024  # a chunk size that splits the multi-chunk files below

# Fixed times. Epoch 0 is omitted from TOCs; 9e9 needs a PAX mtime (> 8**11 - 1);
# the fractional one needs a PAX mtime and rounds to the nearest second in the TOC.
T0 = 1_600_000_000
T_EPOCH = 0
T_FAR = 4_102_444_800  # 2100-01-01
T_PAX = 9_000_000_000
T_FRACTION = 1_600_000_123.6
T_2024 = 1_704_067_200  # 2024-01-01, the time of `tar_of_files` entries

BINARY_XATTR = b"\x01\x00\x00\x02\xff\xfe\x00\x80"  # like security.capability: not UTF-8


def payload(seed: str, size: int, *, compressible: bool = False) -> bytes:
    """Deterministic file contents: random bytes, or repetitive text when compressible."""
    if compressible:
        line = f"{seed}: the quick brown fox jumps over the lazy dog\n".encode()
        return (line * (size // len(line) + 1))[:size]
    return random.Random(hashlib.sha256(seed.encode()).digest()).randbytes(size)


@dataclass
class Entry:
    """One tar member to write. `name` is written as given (no normalisation)."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = "root"
    gname: str = "root"
    mtime: float = T0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    pax: dict[str, str] = field(default_factory=dict)  # other PAX records, as given
    format: int = tarfile.PAX_FORMAT


def write_tar(entries: Iterable[Entry]) -> bytes:
    """Serialise entries with tarfile; each entry may choose PAX, GNU or USTAR format."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = e.kind
            ti.mode = e.mode
            ti.uid, ti.gid, ti.uname, ti.gname = e.uid, e.gid, e.uname, e.gname
            ti.mtime = e.mtime
            ti.linkname = e.linkname
            ti.devmajor, ti.devminor = e.devmajor, e.devminor
            # tarfile carries PAX values as str; non-UTF-8 bytes survive through
            # surrogateescape and tarfile then marks the header hdrcharset=BINARY.
            ti.pax_headers = {**e.pax, **{
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                for k, v in e.xattrs.items()
            }}
            ti.size = len(e.data) if e.kind == tarfile.REGTYPE else 0
            # The archive's format is consulted per member, so switching it between
            # members gives a tar mixing PAX and GNU long-name encodings, as real
            # layers built by different tools do.
            tf.format = e.format
            tf.addfile(ti, io.BytesIO(e.data) if ti.size else None)
    return buf.getvalue()


def tar_of_files(files: Mapping[str, bytes] | Iterable[tuple[str, bytes]], *,
                 dirs: Iterable[str] = (), mtime: float = T_2024) -> bytes:
    """A plain layer tar: `dirs` (mode 0755), then the regular files (0644) in the order
    given, all owned by 0:0 with no owner names and modified at `mtime`."""
    items = files.items() if isinstance(files, Mapping) else files
    plain = dict(uname="", gname="", mtime=mtime)
    return write_tar([*(Entry(d, tarfile.DIRTYPE, mode=0o755, **plain) for d in dirs),
                      *(Entry(name, data=data, **plain) for name, data in items)])


def all_kinds_entries() -> list[Entry]:
    """The members of `tar_all_kinds`, for tests that want to know what went in."""
    d, sym, lnk = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
    ch = SMALL_CHUNK
    long_pax = "long/" + "a" * 120 + "/file-with-a-long-name.txt"
    long_gnu = "gnu/" + "b" * 150 + ".txt"
    long_target = "/usr/share/" + "t" * 140 + "/target"
    alice = dict(uid=1000, gid=1000, uname="alice", gname="alice")
    # bob's primary group has no user of the same id: a reader that takes a missing
    # groupName from the *user* name table (estargz v0.12.0 does) gets "" here.
    bob = dict(uid=1001, gid=100, uname="bob", gname="users")
    big = dict(uid=3_000_000, gid=3_000_001, uname="bigu", gname="bigg")
    return [
        Entry("./", d, mode=0o755),
        Entry("./etc/", d, mode=0o755, mtime=T_FAR),
        Entry("./etc/hostname", data=b"peerstar\n"),
        Entry("etc/empty", data=b""),  # same tree, no "./" prefix
        Entry("./etc/passwd", data=payload("passwd", 700, compressible=True), **alice),
        Entry("bin/", d, mode=0o755, mtime=T_EPOCH),
        # Sizes around the small chunk size: exact multiple, one under, one over, odd.
        Entry("bin/big-exact", data=payload("exact", 2 * ch), mode=0o755),
        Entry("bin/big-odd", data=payload("odd", 3 * ch + 12345), mode=0o755, **bob),
        Entry("bin/just-under", data=payload("under", ch - 1)),
        Entry("bin/one-chunk", data=payload("one", ch)),  # chunkSize on a single chunk
        Entry("bin/just-over", data=payload("over", ch + 1, compressible=True)),
        Entry("bin/text-many", data=payload("text", 5 * ch + 3, compressible=True), **bob),
        Entry("bin/tiny-setuid", data=b"x", mode=0o4755),
        Entry("bin/setgid", data=b"#!/bin/sh\n", mode=0o2755, **bob),
        Entry("bin/no-perms", data=b"secret", mode=0o000, **alice),
        Entry("bin/sh", sym, linkname="busybox", mode=0o777),
        Entry("bin/dangling", sym, linkname="../nowhere/at/all", mode=0o777),
        Entry("etc/mtab", sym, linkname="/proc/self/mounts", mode=0o777),
        Entry("bin/long-symlink", sym, linkname=long_target, mode=0o777),
        # Hardlinks: to a multi-chunk file, to a hardlink, and with "./" spellings.
        Entry("bin/big-link", lnk, linkname="bin/big-odd", mode=0o755, **bob),
        Entry("./bin/big-link2", lnk, linkname="bin/big-link", mode=0o755, **bob),
        Entry("etc/hostname.hl", lnk, linkname="./etc/hostname"),
        Entry("dev/", d, mode=0o755),
        Entry("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        Entry("dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, gname="disk",
              devmajor=8, devminor=0),
        Entry("dev/big-dev", tarfile.CHRTYPE, mode=0o600, devmajor=4095, devminor=1048575),
        Entry("run/fifo", tarfile.FIFOTYPE, mode=0o600, mtime=T_EPOCH),  # parent implicit
        # xattrs (PAX SCHILY.xattr.*): binary values, several keys, on a dir and a file.
        Entry("bin/ping", data=payload("ping", 3000), mode=0o755,
              xattrs={"security.capability": BINARY_XATTR}),
        Entry("etc/xattr-dir/", d, mode=0o750,
              xattrs={"user.comment": "hello <world> & ☃".encode(),
                      "trusted.overlay.opaque": b"y", "user.empty": b""}),
        Entry("etc/xattr-dir/f", data=b"f\n", xattrs={"user.a": b"1", "user.b": b"2"}),
        # Overlay whiteouts.
        Entry("var/", d, mode=0o755),
        Entry("var/.wh.removed", data=b"", mode=0o000, mtime=T_EPOCH),
        Entry("opaque/", d, mode=0o755),
        Entry("opaque/.wh..wh..opq", data=b"", mode=0o000, mtime=T_EPOCH),
        Entry("opaque/kept", data=b"kept\n"),
        # Long names: PAX path/linkpath records and GNU ././@LongLink members.
        Entry(long_pax, data=payload("longpax", 5000)),
        Entry(long_gnu, data=payload("longgnu", 4000), format=tarfile.GNU_FORMAT),
        Entry("gnu/hardlink-long", lnk, linkname=long_gnu, format=tarfile.GNU_FORMAT),
        Entry("gnu/bigid", data=b"gnu base-256 ids\n", format=tarfile.GNU_FORMAT, **big),
        Entry("ustar/plain", data=b"ustar\n", format=tarfile.USTAR_FORMAT, **alice),
        # Owners: large ids need PAX uid/gid records; 65534 has no names at all.
        Entry("owners/", d, mode=0o755, **alice),
        Entry("owners/big", data=b"big ids\n", **big),
        Entry("owners/bob", data=b"bob\n", **bob),
        Entry("owners/bob-again", data=b"bob again\n", **bob),
        Entry("owners/nobody", data=b"nobody\n", uid=65534, gid=65534, uname="", gname=""),
        Entry("owners/alice", data=b"alice\n", **alice),
        # Times: epoch 0 (omitted), far future, PAX-only, fractional (rounds up).
        Entry("times/", d, mode=0o755),
        Entry("times/epoch", data=b"0\n", mtime=T_EPOCH),
        Entry("times/far", data=b"2100\n", mtime=T_FAR),
        Entry("times/pax", data=b"2255\n", mtime=T_PAX),
        Entry("times/fraction", data=b"frac\n", mtime=T_FRACTION),
        # Names that stress JSON escaping: HTML-escaped chars, non-ASCII, U+2028,
        # quotes, backslashes, control characters.
        Entry("odd/", d, mode=0o755),
        Entry("odd/<a&b>.txt", data=b"html\n"),
        Entry("odd/é ü ☃.txt", data=b"utf8\n"),
        Entry("odd/line\u2028sep\u2029", data=b"ls\n"),
        Entry('odd/q"b\\s', data=b"quote\n"),
        Entry("odd/ctl\x01\x08\x0c\x1b\x7f", data=b"ctl\n"),
        Entry("odd/tab\tnl\ncr\r", data=b"ws\n"),
        # A directory entry after its own children, and a sticky world-writable dir.
        Entry("late/child.txt", data=b"child\n"),
        Entry("late/", d, mode=0o700, mtime=T_FAR, **alice),
        Entry("tmp/", d, mode=0o1777),
        Entry("usr/lib/implicit/deep/file", data=payload("deep", 100)),  # no parent dirs

    ]


def tar_all_kinds() -> bytes:
    """A tar with every entry kind and many corner cases (~1 MiB).

    Multi-chunk files are sized around `SMALL_CHUNK`. Every non-empty uname/gname is a
    function of its id, except uid 65534 which has none.
    """
    return write_tar(all_kinds_entries())


def tar_reserved_names() -> bytes:
    """Names a builder must treat specially: an existing TOC member, existing landmarks,
    and a path written twice (estargz.Build keeps the last, at the last position)."""
    return write_tar([
        Entry("a/", tarfile.DIRTYPE, mode=0o755),
        Entry("a/dup", data=b"first version\n"),
        Entry("stargz.index.json", data=b'{"version":1,"entries":[]}'),
        Entry("./.prefetch.landmark", data=b"\x0f"),
        Entry(".no.prefetch.landmark", data=b"\x0f"),
        Entry("a/other", data=b"other\n"),
        Entry("./a/dup", data=b"second version, longer\n", mode=0o600),
        Entry("b", data=b"b\n"),
    ])


UNCLEAN_NAMES = ("/abs/file", "../up/file", "tmp/./x/../y", "tmp//double")


def tar_unclean_names() -> bytes:
    """Names the reference accepts and readers normalise with clean("/"+name):
    absolute, escaping with "..", with "." and ".." inside, and "//"."""
    return write_tar([
        Entry("tmp/", tarfile.DIRTYPE, mode=0o1777),
        *(Entry(n, data=n.encode() + b"\n") for n in UNCLEAN_NAMES),
    ])


def tar_empty() -> bytes:
    """A tar with no members at all (just the end-of-archive blocks)."""
    return write_tar([])


def tar_small_tree() -> bytes:
    """A few plain files and dirs: for fast tests that need any valid layer."""
    return write_tar([
        Entry("etc/", tarfile.DIRTYPE, mode=0o755),
        Entry("etc/os-release", data=b"ID=peerstar\n"),
        Entry("bin/", tarfile.DIRTYPE, mode=0o755),
        Entry("bin/tool", data=payload("tool", 150_000), mode=0o755),
        Entry("bin/tool-link", tarfile.SYMTYPE, linkname="tool", mode=0o777),
    ])


DEBIAN_PACKAGES = (
    "coreutils", "busybox-static", "zstd", "libzstd1", "bash", "tar", "grep", "sed",
    "perl-base",
)


def _dpkg_paths(packages: Iterable[str]) -> list[str]:
    paths: set[str] = set()
    for pkg in packages:
        proc = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True)
        if proc.returncode != 0:
            continue  # not installed here: the tree is just smaller
        paths.update(line for line in proc.stdout.splitlines() if line.startswith("/"))
    return sorted(paths)


def tar_debian_tree(
    max_bytes: int = 32 << 20, packages: Iterable[str] = DEBIAN_PACKAGES
) -> bytes:
    """A realistic layer from files of installed Debian packages (dpkg -L).

    Directories, regular files, symlinks and hardlinks (same inode) in sorted path
    order, with the real modes and a fixed owner and mtime so the bytes do not depend
    on when the packages were installed. Regular files stop being added once their
    total size would exceed `max_bytes`. Paths through usr-merge symlinks (/bin ->
    usr/bin) are resolved so no member sits below a symlink.
    """
    seen: set[str] = set()
    inodes: dict[tuple[int, int], str] = {}
    total = 0
    entries: list[Entry] = []
    for listed in _dpkg_paths(packages):
        if listed == "/.":
            continue
        parent = os.path.realpath(os.path.dirname(listed))
        path = os.path.join(parent, os.path.basename(listed))
        name = path.lstrip("/")
        if not name or name in seen:
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue  # listed but excluded from this install (e.g. docs)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            entries.append(Entry(name + "/", tarfile.DIRTYPE, mode=mode))
        elif stat.S_ISLNK(st.st_mode):
            entries.append(Entry(name, tarfile.SYMTYPE, linkname=os.readlink(path),
                                 mode=0o777))
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in inodes:
                entries.append(Entry(name, tarfile.LNKTYPE, linkname=inodes[key], mode=mode))
            else:
                if total + st.st_size > max_bytes:
                    continue
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                total += len(data)
                inodes[key] = name
                entries.append(Entry(name, data=data, mode=mode))
        else:
            continue
        seen.add(name)
    return write_tar(entries)


def gzip_tar(data: bytes, level: int = 6) -> bytes:
    """gzip-compress a tar deterministically (no name, mtime 0 in the gzip header)."""
    return gzip.compress(data, compresslevel=level, mtime=0)


def zstd_tar(data: bytes, level: int = 3) -> bytes:
    """zstd-compress a tar as one frame (with content size, like most tools write)."""
    return zstandard.ZstdCompressor(level=level).compress(data)
