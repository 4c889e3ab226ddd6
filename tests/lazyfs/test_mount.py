"""A lazy layer mounted over FUSE from the Debian docker-registry: every attribute, link,
xattr and byte matches the source tar; whiteouts and opaque dirs are in overlayfs' form;
a small read fetches a small part of the blob; the mount ends cleanly with `umount`."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from peerstar.lazyfs import MountError, find_mount, mount_layer
from peerstar.lazyfs.options import FetchOptions, MountOptions, PrefetchOptions
from tests.lazyfs.conftest import BIG, MTIME, PRIORITY, RICH_ITEMS, Layer, is_mounted
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


def _mount(url: str, layer: Layer, mnt: Path, cache_dir: Path, *,  # type: ignore[no-untyped-def]
           wait_prefetch: bool = False):
    options = MountOptions(prefetch=PrefetchOptions(background=False, wait=wait_prefetch))
    return mount_layer(url, layer.digest, layer.toc_digest, mnt, cache_dir, options)


def test_attributes_links_xattrs_and_bytes(pushed_rich: str, rich_layer: Layer, mnt: Path,
                                           cache_dir: Path) -> None:
    m = _mount(pushed_rich, rich_layer, mnt, cache_dir, wait_prefetch=True)
    try:
        assert m.prefetch_done
        _type = {tarfile.REGTYPE: stat.S_IFREG, tarfile.DIRTYPE: stat.S_IFDIR,
                 tarfile.SYMTYPE: stat.S_IFLNK, tarfile.CHRTYPE: stat.S_IFCHR,
                 tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO}
        checked = 0
        for it in RICH_ITEMS:
            base = it.name.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith(".wh.") or it.kind == tarfile.LNKTYPE:
                continue
            p = mnt / it.name.rstrip("/")
            st = os.lstat(p)
            assert stat.S_IFMT(st.st_mode) == _type[it.kind], it.name
            if it.kind != tarfile.SYMTYPE:
                assert stat.S_IMODE(st.st_mode) == it.mode, it.name
            assert (st.st_uid, st.st_gid) == (it.uid, it.gid), it.name
            assert int(st.st_mtime) == MTIME, it.name
            if it.kind == tarfile.REGTYPE:
                assert st.st_size == len(it.data)
                assert p.read_bytes() == it.data, it.name
            if it.kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (it.devmajor,
                                                                        it.devminor)
            if it.kind == tarfile.SYMTYPE:
                assert os.readlink(p) == it.linkname
                assert st.st_size == len(it.linkname)
            for k, v in it.xattrs.items():
                assert os.getxattr(p, k, follow_symlinks=False) == v
            if it.xattrs:
                assert sorted(os.listxattr(p)) == sorted(it.xattrs)
            checked += 1
        assert checked == 14
        # Hardlink: same inode as its target, link count 2, same bytes.
        a, b = os.stat(mnt / "data/prio.txt"), os.stat(mnt / "data/hard")
        assert a.st_ino == b.st_ino and a.st_nlink == 2
        assert (mnt / "data/hard").read_bytes() == PRIORITY
        # A symlink resolves inside the mount.
        assert (mnt / "data/rel-link").read_bytes() == BIG
        # Whiteout: `.wh.gone` is shown as char device 0/0 named `gone`.
        st = os.lstat(mnt / "data/gone")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        assert not (mnt / "data/.wh.gone").exists()
        # Opaque dir: marker hidden, xattr set.
        assert sorted(os.listdir(mnt / "opaque")) == ["kept.txt"]
        assert os.getxattr(mnt / "opaque", "trusted.overlay.opaque") == b"y"
        with pytest.raises(OSError) as exc:
            os.getxattr(mnt / "data/empty", "user.none")
        assert exc.value.errno == errno.ENODATA
        assert sorted(os.listdir(mnt)) == ["bin", "data", "dev", "opaque"]  # landmark hidden
        assert sorted(os.listdir(mnt / "data")) == [
            "abs-link", "big.bin", "empty", "gone", "hard", "prio.txt", "rel-link"]
        # Read-only.
        with pytest.raises(OSError) as exc:
            open(mnt / "data/empty", "wb")
        assert exc.value.errno in (errno.EROFS, errno.EACCES)
        # Reads at odd offsets crossing chunk boundaries.
        with open(mnt / "data/big.bin", "rb") as f:
            for off, n in ((0, 1), (CHUNK_EDGE - 7, 20), (len(BIG) - 5, 100), (123457, 300000)):
                f.seek(off)
                assert f.read(n) == BIG[off:off + n]
    finally:
        m.unmount()
    assert not m.alive and not is_mounted(mnt)


CHUNK_EDGE = 256 << 10


def test_small_read_fetches_little_and_stats(docker_registry, sample_layers: list[Layer],  # type: ignore[no-untyped-def]
                                             mnt: Path, cache_dir: Path) -> None:
    from tests.lazyfs.conftest import push_image

    layer = sample_layers[1]
    push_image(docker_registry.url, "lazyfs/sample2", "latest", [layer])
    url = f"{docker_registry.url}/v2/lazyfs/sample2/blobs/{layer.digest}"
    m = _mount(url, layer, mnt, cache_dir)
    try:
        stats_path = mnt / ".peerstar-lazyfs" / f"{layer.digest}.json"
        before = json.loads(stats_path.read_text())["fetchedSize"]
        assert before < 200_000  # footer + TOC + the prioritized file
        assert (mnt / "opt/peerstar/tree/a/one.txt").read_bytes() == b"one\n"
        after = json.loads(stats_path.read_text())
        assert after["size"] == layer.size > 10 << 20
        assert after["fetchedSize"] - before <= 100_000  # one or two 50,000-byte regions
        assert after["fetchedSize"] < layer.size // 20
        assert 0 < after["fetchedPercent"] < 5
        assert ".peerstar-lazyfs" not in os.listdir(mnt)
        # A multi-MiB file reads byte-exact (several 4 MiB chunks).
        data = (mnt / "opt/peerstar/random/extra-0.bin").read_bytes()
        assert len(data) > 8 << 20
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(
            _tar_member(layer.tar, "opt/peerstar/random/extra-0.bin")).hexdigest()
        assert m.stats()["fetchedSize"] > 8 << 20
    finally:
        subprocess.run(["umount", str(mnt)], check=True)  # plain umount ends the daemon
    assert wait_until(lambda: not m.alive)
    saved = json.loads(m.paths.stats.read_text())  # final stats kept on disk
    assert saved["fetchedSize"] > 8 << 20
    assert "peerstar_lazyfs_fetched_bytes_total" in m.paths.prom.read_text()


def _tar_member(tar_bytes: bytes, name: str) -> bytes:
    import io

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as t:
        f = t.extractfile(name)
        assert f is not None
        return f.read()


def test_wrong_toc_digest_refuses_to_mount(pushed_rich: str, rich_layer: Layer, mnt: Path,
                                           cache_dir: Path) -> None:
    with pytest.raises(MountError, match="TOC digest"):
        mount_layer(pushed_rich, rich_layer.digest, "sha256:" + "0" * 64, mnt, cache_dir)
    assert not is_mounted(mnt)


def test_missing_blob_refuses_to_mount(docker_registry, rich_layer: Layer, mnt: Path,  # type: ignore[no-untyped-def]
                                       cache_dir: Path) -> None:
    url = f"{docker_registry.url}/v2/lazyfs/none/blobs/sha256:{'1' * 64}"
    with pytest.raises(MountError, match="404"):
        mount_layer(url, "sha256:" + "1" * 64, rich_layer.toc_digest, mnt, cache_dir,
                    MountOptions(fetch=FetchOptions(retries=0)))
    assert not is_mounted(mnt)


def test_find_mount_reattaches(pushed_rich: str, rich_layer: Layer, mnt: Path,
                               cache_dir: Path) -> None:
    m = _mount(pushed_rich, rich_layer, mnt, cache_dir)
    try:
        again = find_mount(mnt, cache_dir)
        assert again is not None and again.pid == m.pid and again.digest == rich_layer.digest
        again.unmount()
        assert not is_mounted(mnt)
    finally:
        if m.alive:
            m.unmount()
    assert find_mount(mnt, cache_dir) is None


def test_old_daemon_leaves_a_new_mounts_state_alone(pushed_rich: str, rich_layer: Layer,
                                                    mnt: Path, cache_dir: Path) -> None:
    """After `umount -l` a busy daemon lives on; a new daemon mounts the same path. When
    the old one finally exits it must not delete the new one's state file."""
    old = _mount(pushed_rich, rich_layer, mnt, cache_dir)
    new = None
    try:
        some_file = next(Path(d) / f for d, _, fs in os.walk(mnt) for f in fs
                         if (Path(d) / f).is_file() and not (Path(d) / f).is_symlink())
        busy = open(some_file, "rb")  # noqa: SIM115 - keeps the old FUSE session alive
        subprocess.run(["umount", "-l", str(mnt)], check=True)
        assert old.alive and not is_mounted(mnt)
        new = _mount(pushed_rich, rich_layer, mnt, cache_dir)
        busy.close()
        assert wait_until(lambda: not old.alive)
        assert old._proc is not None and old._proc.wait(5) == 0  # a clean exit, not a crash
        again = find_mount(mnt, cache_dir)
        assert again is not None and again.pid == new.pid
    finally:
        if new is not None and new.alive:
            new.unmount()
        if old.alive:
            old.unmount(lazy=True)
