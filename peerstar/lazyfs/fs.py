"""The read-only FUSE filesystem (pyfuse3) of one lazy layer.

Owns: inode numbering of the TOC tree (hardlinks share an inode), attributes (mode with
the file type, uid/gid, size, mtime, nlink, rdev of char/block devices, 1 s attr and
entry timeouts as the reference), symlink targets, xattrs, overlayfs whiteouts
(`.wh.X` shown as a char device 0/0 named X; `.wh..wh..opq` hidden and turned into
`trusted.overlay.opaque=y` on its directory), and reads. Reads run in worker threads
(`trio.to_thread`) because fetching is synchronous; a chunk that fails verification or
cannot be fetched gives EIO, never bytes.

A hidden directory `/.peerstar-lazyfs/` (found by lookup, not listed) holds
`<digest>.json` with the layer's fetch statistics, like the reference's
`/.stargz-snapshotter/<digest>.json`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time

import pyfuse3
import trio

from peerstar.estargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOCEntry
from peerstar.lazyfs import metrics
from peerstar.lazyfs.fetcher import FetchError
from peerstar.lazyfs.layer import ChunkVerifyError, LazyLayer

log = logging.getLogger("peerstar.lazyfs.fs")

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = b"trusted.overlay.opaque"
STATS_DIR = ".peerstar-lazyfs"
HIDDEN_AT_ROOT = (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK)
TIMEOUT = 1.0  # attr/entry cache timeout in seconds (the reference's value)
_TYPE_BITS = {
    "dir": stat.S_IFDIR, "reg": stat.S_IFREG, "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO,
}


class _Node:
    __slots__ = ("inode", "entry", "children", "xattrs", "whiteout")

    def __init__(self, inode: int, entry: TOCEntry | None) -> None:
        self.inode = inode
        self.entry = entry
        self.children: dict[bytes, int] = {}
        self.xattrs: dict[bytes, bytes] = {}
        self.whiteout = False  # a `.wh.X` shown as char 0/0


class LayerFS(pyfuse3.Operations):
    """pyfuse3 operations over a `LazyLayer`."""

    enable_writeback_cache = False

    def __init__(self, layer: LazyLayer, *, read_threads: int = 16,
                 prefetch_deadline: float | None = None) -> None:
        super().__init__()
        self.layer = layer
        # time.monotonic() until which reads of prioritized files wait for the prefetch
        # (the containers-wait-for-prefetch rule); None: they never wait.
        self.prefetch_deadline = prefetch_deadline
        self._nodes: dict[int, _Node] = {}
        self._limiter = trio.CapacityLimiter(read_threads)
        self._build()

    # -- tree ------------------------------------------------------------------------

    def _build(self) -> None:
        r = self.layer.reader
        by_entry: dict[int, int] = {}  # id(entry) -> inode: hardlinks share their target's
        next_inode = pyfuse3.ROOT_INODE + 1
        root = _Node(pyfuse3.ROOT_INODE, r.lookup(""))
        self._nodes[root.inode] = root
        dirs = {"": root}
        for path, e in r.walk():
            parent_path, _, base = path.rpartition("/")
            parent = dirs[parent_path]
            if not parent_path and base in HIDDEN_AT_ROOT:
                continue  # format markers, not files of the image (the reference hides them)
            if base == OPAQUE_MARKER:
                parent.xattrs[OPAQUE_XATTR] = b"y"
                continue
            name = base
            whiteout = base.startswith(WHITEOUT_PREFIX) and len(base) > len(WHITEOUT_PREFIX)
            if whiteout:
                name = base[len(WHITEOUT_PREFIX):]
                if name.encode("utf-8", "surrogateescape") in parent.children:
                    continue  # the real entry wins over a stray whiteout of itself
            bname = name.encode("utf-8", "surrogateescape")
            if whiteout:
                node = _Node(next_inode, e)
                node.whiteout = True
                next_inode += 1
            elif id(e) in by_entry:
                parent.children[bname] = by_entry[id(e)]
                continue
            else:
                node = _Node(next_inode, e)
                next_inode += 1
                by_entry[id(e)] = node.inode
                node.xattrs.update({k.encode("utf-8", "surrogateescape"): v
                                    for k, v in e.xattrs.items()})
            self._nodes[node.inode] = node
            parent.children[bname] = node.inode
            if e.type == "dir" and not whiteout:
                dirs[path] = node
        stats_dir = _Node(next_inode, None)
        self._stats_dir = stats_dir.inode
        self._nodes[stats_dir.inode] = stats_dir
        stats_file = _Node(next_inode + 1, None)
        self._stats_file = stats_file.inode
        self._nodes[stats_file.inode] = stats_file
        stats_dir.children[f"{self.layer.digest}.json".encode()] = stats_file.inode
        if root.entry is not None:
            root.xattrs.update({k.encode(): v for k, v in root.entry.xattrs.items()})

    def _node(self, inode: int) -> _Node:
        node = self._nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _stats_bytes(self) -> bytes:
        return json.dumps(self.layer.stats(), indent=1).encode() + b"\n"

    # -- attributes ------------------------------------------------------------------

    def _attr(self, node: _Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_blksize = 4096
        e = node.entry
        if node.inode == self._stats_dir:
            a.st_mode = stat.S_IFDIR | 0o500
            a.st_nlink = 2
        elif node.inode == self._stats_file:
            a.st_mode = stat.S_IFREG | 0o400
            a.st_nlink = 1
            a.st_size = len(self._stats_bytes())
        elif node.whiteout:
            assert e is not None
            a.st_mode = stat.S_IFCHR  # overlayfs' whiteout: char device 0/0, no perms
            a.st_rdev = 0
            a.st_nlink = 1
            a.st_uid, a.st_gid = e.uid, e.gid
            mt = e.mtime() * 10**9
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mt
        else:
            assert e is not None
            a.st_mode = _TYPE_BITS.get(e.type, stat.S_IFREG) | (e.mode & 0o7777)
            a.st_nlink = max(1, e.num_link)
            a.st_uid, a.st_gid = e.uid, e.gid
            if e.type == "reg":
                a.st_size = e.size
            elif e.type == "symlink":
                a.st_size = len(e.link_name.encode("utf-8", "surrogateescape"))
            elif e.type == "dir":
                a.st_size = 4096
            if e.type in ("char", "block"):
                a.st_rdev = os.makedev(e.dev_major, e.dev_minor)
            mt = e.mtime() * 10**9
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mt
        a.st_blocks = (a.st_size + 511) // 512
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return self._attr(self._node(inode))

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if name == b".":
            return self._attr(parent)
        if parent_inode == pyfuse3.ROOT_INODE and name == STATS_DIR.encode():
            return self._attr(self._nodes[self._stats_dir])
        child = parent.children.get(name)
        if child is None:
            # A zero-inode answer is a cacheable negative entry (for entry_timeout).
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = TIMEOUT
            return a
        return self._attr(self._nodes[child])

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        e = self._node(inode).entry
        if e is None or e.type != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return e.link_name.encode("utf-8", "surrogateescape")

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._node(inode).xattrs.get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self._node(inode).xattrs)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (self.layer.reader.size + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self._nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directories -----------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if node.inode != self._stats_dir and (
                node.entry is None or node.entry.type != "dir" or node.whiteout):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self._node(fh)
        names = sorted(node.children)  # stable order: offsets index into it
        for i in range(start_id, len(names)):
            child = self._nodes[node.children[names[i]]]
            if not pyfuse3.readdir_reply(token, names[i], self._attr(child), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files -----------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.inode == self._stats_file:
            # A fresh snapshot per open; no kernel caching so each open sees new numbers.
            return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)
        if node.entry is None or node.entry.type != "reg" or node.whiteout:
            raise pyfuse3.FUSEError(errno.EINVAL)
        # The content never changes: let the kernel keep its page cache across opens.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._node(fh)
        if fh == self._stats_file:
            return self._stats_bytes()[off:off + size]
        e = node.entry
        assert e is not None
        t0 = time.monotonic()
        try:
            if self.prefetch_deadline is not None and self.layer.in_prefetch(e):
                # The prefetch is fetching these bytes already: wait for it rather than
                # fetch them twice (its request is one range; ours would be another).
                left = self.prefetch_deadline - t0
                if left > 0:
                    await trio.to_thread.run_sync(self.layer.prefetch_fetched.wait, left)
            return await trio.to_thread.run_sync(self.layer.read_file, e, off, size,
                                                  limiter=self._limiter)
        except ChunkVerifyError:
            raise pyfuse3.FUSEError(errno.EIO) from None
        except FetchError as exc:
            log.error("layer %s: reading %r at %d: %s (EIO)", self.layer.digest, e.name, off,
                      exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("layer %s: reading %r failed (EIO)", self.layer.digest, e.name)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            metrics.READ_LATENCY.labels(self.layer.digest[:19]).observe(time.monotonic() - t0)

    async def release(self, fh: int) -> None:
        return None

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if mode & os.W_OK:
            return False
        return True
