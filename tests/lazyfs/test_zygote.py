"""Mount daemons forked from a zygote (`peerstar.lazyfs.zygote`): the mounts outlive the
zygote and the process that asked for them, the zygote exits with its owner, a failing
mount reports its reason, and without a (working) zygote `mount_layer` falls back to a
fresh `python -m` daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from peerstar.distribution.auth import RegistryAuth
from peerstar.lazyfs import MountError, find_mount, mount_layer
from peerstar.lazyfs.mount import _pid_alive
from peerstar.lazyfs.options import FetchOptions, MountOptions, PrefetchOptions
from peerstar.lazyfs.state import PASSWORD_ENV, TOKEN_ENV, USERNAME_ENV
from peerstar.lazyfs.zygote import Zygote, ZygoteError
from tests.lazyfs.blobserver import BlobServer
from tests.lazyfs.conftest import BIG, PRIORITY, Layer, is_mounted
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NO_BACKGROUND = MountOptions(prefetch=PrefetchOptions(background=False))
WAIT_PREFETCH = MountOptions(prefetch=PrefetchOptions(background=False, wait=True))


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _sid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])


@pytest.fixture
def server(rich_layer: Layer):  # type: ignore[no-untyped-def]
    s = BlobServer({rich_layer.digest: rich_layer.blob}).start()
    yield s
    s.stop()


def test_forked_mount_is_fast_and_in_its_own_session(rich_layer: Layer, mnt: Path,
                                                    cache_dir: Path, server: BlobServer
                                                    ) -> None:
    with Zygote.start() as z:
        z.wait_ready()
        t0 = time.monotonic()
        m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                        rich_layer.toc_digest, mnt, cache_dir, WAIT_PREFETCH, zygote=z)
        took = time.monotonic() - t0
        try:
            assert m.prefetch_done and is_mounted(mnt)
            assert (mnt / "data/prio.txt").read_bytes() == PRIORITY
            assert (mnt / "data/big.bin").read_bytes() == BIG
            # Forked, not a fresh interpreter: neither our child nor the zygote's (double
            # fork), a session of its own, and well under a Python start-up.
            assert m.pid != z.proc.pid and _ppid(m.pid) not in (os.getpid(), z.proc.pid)
            assert _sid(m.pid) not in (os.getsid(0), _sid(z.proc.pid))
            assert took < 5.0
            cmdline = Path(f"/proc/{m.pid}/cmdline").read_bytes()
            assert b"peerstar.lazyfs.zygote" in cmdline  # it is the zygote's image
        finally:
            m.unmount()
        assert not is_mounted(mnt)
        assert wait_until(lambda: not _pid_alive(m.pid))
        assert "unmounted" in m.paths.log.read_text()
        assert z.alive


def test_mounts_survive_zygote_and_starter_death(rich_layer: Layer, mnt: Path,
                                                cache_dir: Path, server: BlobServer) -> None:
    """The starter (think: snapshotter) owns the zygote; SIGKILL both: the mount stays."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from peerstar.lazyfs import mount_layer
        from peerstar.lazyfs.options import MountOptions, PrefetchOptions
        from peerstar.lazyfs.zygote import Zygote
        z = Zygote.start()
        m = mount_layer({server.url(rich_layer.digest)!r}, {rich_layer.digest!r},
                        {rich_layer.toc_digest!r}, Path({str(mnt)!r}),
                        Path({str(cache_dir)!r}),
                        MountOptions(prefetch=PrefetchOptions(background=False)), zygote=z)
        print(m.pid, z.proc.pid, flush=True)
        time.sleep(60)
    """)
    starter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert starter.stdout is not None
        pid, zpid = map(int, starter.stdout.readline().split())
        os.kill(zpid, signal.SIGKILL)
        starter.send_signal(signal.SIGKILL)
        starter.wait(10)
        assert wait_until(lambda: not _pid_alive(zpid))
        assert _pid_alive(pid)
        assert is_mounted(mnt)
        assert (mnt / "data/big.bin").read_bytes() == BIG
        m = find_mount(mnt, cache_dir)
        assert m is not None and m.pid == pid
        m.unmount()
        assert not is_mounted(mnt)
        assert wait_until(lambda: not _pid_alive(pid))
    finally:
        if starter.poll() is None:
            starter.kill()


def test_zygote_exits_when_owner_closes_or_dies() -> None:
    z = Zygote.start()
    z.wait_ready()
    assert z.alive
    z.close()
    assert z.proc.returncode == 0  # exited by itself on EOF, not killed
    with pytest.raises(ZygoteError):
        z.spawn(["--help"], ready_fd=0, log_fd=1)
    # An owner killed outright: the zygote sees EOF and exits too.
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from peerstar.lazyfs.zygote import Zygote
        z = Zygote.start()
        z.wait_ready()
        print(z.proc.pid, flush=True)
        time.sleep(60)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert owner.stdout is not None
        zpid = int(owner.stdout.readline())
        assert _pid_alive(zpid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert wait_until(lambda: not _pid_alive(zpid))
    finally:
        if owner.poll() is None:
            owner.kill()


def test_failing_mount_reports_its_reason(rich_layer: Layer, mnt: Path, cache_dir: Path,
                                          server: BlobServer) -> None:
    with Zygote.start() as z:
        with pytest.raises(MountError, match="TOC digest"):
            mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                        "sha256:" + "0" * 64, mnt, cache_dir, NO_BACKGROUND, zygote=z)
        assert not is_mounted(mnt)
        with pytest.raises(MountError, match="404"):
            mount_layer(server.url("sha256:" + "1" * 64), "sha256:" + "1" * 64,
                        rich_layer.toc_digest, mnt, cache_dir,
                        MountOptions(fetch=FetchOptions(retries=0)), zygote=z)
        assert not is_mounted(mnt)
        # The zygote is unharmed and serves the next mount.
        m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                        rich_layer.toc_digest, mnt, cache_dir, WAIT_PREFETCH, zygote=z)
        m.unmount()


def test_fallback_without_a_working_zygote(rich_layer: Layer, mnt: Path, cache_dir: Path,
                                           server: BlobServer) -> None:
    z = Zygote.start()
    z.proc.kill()
    z.proc.wait()
    m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                    rich_layer.toc_digest, mnt, cache_dir, NO_BACKGROUND, zygote=z)
    try:
        assert (mnt / "data/prio.txt").read_bytes() == PRIORITY
        assert b"peerstar.lazyfs.mountd" in Path(f"/proc/{m.pid}/cmdline").read_bytes()
    finally:
        m.unmount()
    z.close()
    # No zygote at all: the plain start, as before.
    m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                    rich_layer.toc_digest, mnt, cache_dir, NO_BACKGROUND)
    try:
        assert b"peerstar.lazyfs.mountd" in Path(f"/proc/{m.pid}/cmdline").read_bytes()
    finally:
        m.unmount()


def test_daemon_gets_the_credentials_given_and_none_of_the_starters(
        rich_layer: Layer, mnt: Path, cache_dir: Path, server: BlobServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A `python -m` daemon's environment (readable in /proc, unlike a forked one's
    updated one) holds the `auth` given to mount_layer, and no registry secret the
    starting process happened to have in its own environment."""
    monkeypatch.setenv(PASSWORD_ENV, "starters-secret")
    monkeypatch.setenv(TOKEN_ENV, "starters-token")
    m = mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                    rich_layer.toc_digest, mnt, cache_dir, NO_BACKGROUND,
                    auth=RegistryAuth("alice", "pw-given"))
    try:
        environ = Path(f"/proc/{m.pid}/environ").read_bytes().split(b"\0")
        ours = sorted(e for e in environ if e.startswith(b"PEERSTAR_REGISTRY_"))
        assert ours == [f"{PASSWORD_ENV}=pw-given".encode(), f"{USERNAME_ENV}=alice".encode()]
    finally:
        m.unmount()


def test_zygote_lost_mid_request_does_not_start_a_second_daemon(
        rich_layer: Layer, mnt: Path, cache_dir: Path, server: BlobServer) -> None:
    """The request reached the zygote but no pid came back (here: it hangs): a daemon may
    exist, so no fallback daemon is started; the ready pipe decides (EOF: none)."""
    z = Zygote.start()
    z.wait_ready()
    os.kill(z.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(MountError, match="no answer from the zygote"):
            mount_layer(server.url(rich_layer.digest), rich_layer.digest,
                        rich_layer.toc_digest, mnt, cache_dir,
                        replace(NO_BACKGROUND, open_timeout=1.0), zygote=z)
        assert not is_mounted(mnt)
        assert not m_log_has_daemon(cache_dir)
        assert not z.alive  # broken off: a late answer must not be read as another's
        assert wait_until(lambda: z.proc.poll() is not None)
    finally:
        z.close()


def m_log_has_daemon(cache_dir: Path) -> bool:
    """Any mount daemon wrote to a log under `cache_dir` (none should have started)."""
    return any(p.read_text().strip() for p in (cache_dir / "mounts").glob("*.log"))
