"""The snapshotter's mount daemon zygote: layer daemons are forked from it, a dead zygote
is replaced (that one mount falls back to `python -m`), `zygote = false` turns it off,
closing the mounter or killing the snapshotter ends the zygote but never the mounts."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerstar.lazyfs.mount import _pid_alive
from peerstar.snapshotter.config import RemoteConfig
from peerstar.snapshotter.remote import LayerMounter, RemoteLayer
from tests.lazyfs.blobserver import BlobServer
from tests.lazyfs.conftest import PRIORITY, Layer, is_mounted, make_layer, rich_tar
from tests.snapshotter.conftest import start_snapshotter, stop_snapshotter
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.fixture(scope="module")
def layer() -> Layer:
    return make_layer(rich_tar(), prioritized=("data/prio.txt",))


@pytest.fixture
def served(layer: Layer) -> Iterator[RemoteLayer]:
    server = BlobServer({layer.digest: layer.blob}).start()
    yield RemoteLayer("127.0.0.1/test/layer:v1", layer.digest, layer.toc_digest,
                      server.url(layer.digest))
    server.stop()


def _mountpoints(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        d = tmp_path / f"m{i}"
        d.mkdir()
        out.append(d)
    return out


def test_layer_daemons_fork_from_the_zygote_and_outlive_it(tmp_path: Path,
                                                           served: RemoteLayer) -> None:
    cfg = RemoteConfig(background_fetch=False)
    mounter = LayerMounter(cfg, tmp_path / "cache")
    mps = _mountpoints(tmp_path, 3)
    try:
        mounter.start_zygote()
        z = mounter._zygote
        assert z is not None
        rep = mounter.mount(served, mps[0])
        assert b"peerstar.lazyfs.zygote" in _cmdline(rep["pid"])  # forked
        assert (mps[0] / "data/prio.txt").read_bytes() == PRIORITY
        # The zygote dies: this mount falls back to python -m, a new zygote is started
        # and the next mount forks from it.
        z.proc.kill()
        z.proc.wait()
        rep1 = mounter.mount(served, mps[1])
        assert b"peerstar.lazyfs.mountd" in _cmdline(rep1["pid"])
        assert mounter._zygote is not None and mounter._zygote is not z
        rep2 = mounter.mount(served, mps[2])
        assert b"peerstar.lazyfs.zygote" in _cmdline(rep2["pid"])
        z2 = mounter._zygote
        mounter.close()
        assert z2.proc.returncode == 0  # exited on EOF of its control socket
        for mp, r in zip(mps, (rep, rep1, rep2), strict=True):
            assert is_mounted(mp) and _pid_alive(r["pid"])
            assert (mp / "data/prio.txt").read_bytes() == PRIORITY
    finally:
        mounter.close()
        for mp in mps:
            mounter.unmount(mp)
    assert not any(is_mounted(mp) for mp in mps)


def test_zygote_off_in_config_starts_python(tmp_path: Path, served: RemoteLayer) -> None:
    mounter = LayerMounter(RemoteConfig(background_fetch=False, zygote=False),
                           tmp_path / "cache")
    (mp,) = _mountpoints(tmp_path, 1)
    try:
        mounter.start_zygote()
        assert mounter._zygote is None
        rep = mounter.mount(served, mp)
        assert b"peerstar.lazyfs.mountd" in _cmdline(rep["pid"])
    finally:
        mounter.unmount(mp)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def test_snapshotter_starts_a_zygote_that_dies_with_it() -> None:
    snap = start_snapshotter()
    try:
        assert snap.process is not None
        spid = snap.process.pid
        zygotes: list[int] = []

        def found() -> bool:
            zygotes[:] = [p for p in _children(spid)
                          if b"peerstar.lazyfs.zygote" in _cmdline(p)]
            return bool(zygotes)

        assert wait_until(found)
        os.kill(spid, signal.SIGKILL)
        snap.process.wait(10)
        assert wait_until(lambda: not _pid_alive(zygotes[0]))
    finally:
        stop_snapshotter(snap)
