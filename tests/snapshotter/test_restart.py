"""A node that keeps running (issue 17, items 1 and 2), with real containerd, runc, FUSE
and the Debian registry:

- the snapshotter runs as the DaemonSet runs it -- in a cgroup of its own (the pod's),
  in the host's PID namespace (`hostPID: true`), in a mount namespace of its own whose
  root is a shared mount (the Bidirectional hostPath) -- with `[remote] daemon_cgroup`
  set; the pod dies as runc kills a container (SIGKILL to every process of its cgroup);
  the running container keeps reading, a new snapshotter re-adopts the mounts;
- a node "reboot" with the registry down: cached images start, an image needing chunks
  it does not have fails with EIO within the timeout and works once the registry is back.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from peerstar.lazyfs import MountOptions, PrefetchOptions, mount_layer
from peerstar.lazyfs.cache import DiskCache
from peerstar.lazyfs.cgroup import hierarchies
from peerstar.snapshotter._proto import snapshots_pb2 as pb
from peerstar.source.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH, sample_layer_entries
from tests.snapshotter.conftest import Stack, mounts_under, running_stack
from tests.snapshotter.test_lazy_pull import (
    EXTRA_MIB,
    REMOTE_LABEL,
    _run_once_served,
    our_infos,
    push_image,
)
from tests.support.containerd import Ctr
from tests.support.registry import start_registry
from tests.support.snapshotter import SnapshotterProc
from tests.support.waiting import process_running, wait_until

pytestmark = pytest.mark.slow

CGROUP_ROOT = Path("/sys/fs/cgroup")
FAR = "/opt/peerstar/random/extra-1.bin"  # 1 MiB, not in the prefetch


def _sha256_of(path: str, extra_mib: int = EXTRA_MIB) -> str:
    data = next(e.data for e in sample_layer_entries(extra_mib=extra_mib)[1] if e.path == path)
    return hashlib.sha256(data).hexdigest()


def _cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for h in hierarchies(CGROUP_ROOT):
        try:
            pids |= {int(x) for x in (h / name / "cgroup.procs").read_text().split()}
        except OSError:
            continue
    return pids


def _kill_cgroup(name: str, timeout: float = 20.0) -> set[int]:
    """What runc does to a container: SIGKILL every process of its cgroup, until none is
    left (a process forking meanwhile is caught by the next round). Returns the killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while pids := _cgroup_pids(name):
        assert time.monotonic() < deadline, f"cgroup {name} still has {pids}"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed |= pids
        time.sleep(0.05)
    return killed


def _remove_cgroup(name: str) -> None:
    for h in hierarchies(CGROUP_ROOT):
        try:
            (h / name).rmdir()
        except OSError:
            pass


def _pod_prefix(pod_cgroup: str) -> list[str]:
    """Run the snapshotter as in the DaemonSet's pod: enter the pod's cgroup, then a mount
    namespace of its own (mounts made under the shared root reach the host's, as with a
    Bidirectional hostPath) and a cgroup namespace rooted at the pod's cgroup (as
    containerd gives a container on cgroup v2); the PID namespace is the host's
    (`hostPID: true`)."""
    enter = ("import os, sys; from peerstar.lazyfs.cgroup import enter_cgroup; "
             "enter_cgroup(sys.argv[1]); os.execvp(sys.argv[2], sys.argv[2:])")
    return [sys.executable, "-c", enter, str(CGROUP_ROOT / pod_cgroup),
            "unshare", "--mount", "--propagation", "unchanged", "--cgroup", "--"]


@contextmanager
def _pod_stack(config: str, pod_cgroup: str) -> Iterator[Stack]:
    with running_stack(config, prefix=_pod_prefix(pod_cgroup)) as st:
        yield st


def _shared_base(snap: SnapshotterProc) -> None:
    """The snapshotter's base dir as a shared mount (the DaemonSet's Bidirectional
    hostPath): a mount namespace made from it propagates its mounts back."""
    subprocess.run(["mount", "--bind", str(snap.base), str(snap.base)], check=True)
    subprocess.run(["mount", "--make-shared", str(snap.base)], check=True)


def _stop_task(ctr: Ctr, name: str) -> None:
    ctr.run("tasks", "kill", "-s", "SIGKILL", name, check=False)
    for _ in range(50):
        if ctr.run("tasks", "delete", name, check=False).returncode == 0:
            break
        time.sleep(0.1)
    ctr.run("containers", "delete", name, check=False)


def _ctr_snapshots(ctr: Ctr) -> dict[str, str]:
    """`ctr snapshots ls` (containerd's metadata): key -> kind."""
    rows = ctr.lines("snapshots", "--snapshotter", "peerstar", "ls")[1:]
    return {r.split()[0]: r.split()[-1] for r in rows if r.strip()}


def test_mounts_survive_the_snapshotter_pod_being_killed(docker_registry) -> None:
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    pod, mounts_cg = f"pss-pod-{tag}", f"pss-mounts-{tag}"
    push_image(docker_registry.url, "snap/podkill", "v1", estargz=True)
    ref = f"{docker_registry.host}/snap/podkill:v1"
    config = ("[remote]\nprefetch_timeout = 5.0\nbackground_fetch = false\n"
              f'daemon_cgroup = "{CGROUP_ROOT / mounts_cg}"\n')
    # The stack starts the snapshotter before we can share its base: start it, share the
    # base, and restart it, as the DaemonSet's pod would find its hostPath.
    try:
        with _pod_stack(config, pod) as st:
            snap, ctr = st.snapshotter, st.containerd.ctr
            snap.stop()
            _shared_base(snap)
            try:
                snap.start()
                # containerd reconnects to a restarted snapshotter within a few seconds.
                assert wait_until(lambda: ctr.remote(
                    "image", "rpull", "--plain-http", "--snapshotter", "peerstar", ref,
                    check=False).returncode == 0, 30), snap.log()[-3000:]
                ctr.run("run", "-d", "--snapshotter", "peerstar", ref, "podkill-long",
                        "sleep", "600")
                try:
                    _check_pod_kill(st, ref, pod, mounts_cg)
                finally:
                    _stop_task(ctr, "podkill-long")
                ctr.run("images", "rm", "--sync", ref)
                # Nothing left mounted once the image and its containers are gone.
                assert wait_until(lambda: mounts_under(snap.root) == [], 30), \
                    mounts_under(snap.root)
                assert wait_until(lambda: _cgroup_pids(mounts_cg) == set(), 20)
            finally:
                snap.stop()
                snap.unmount_all()
                subprocess.run(["umount", "-l", str(snap.base)], check=False)
    finally:
        _kill_cgroup(pod)
        _remove_cgroup(pod)
        _remove_cgroup(mounts_cg)


def _check_pod_kill(st: Stack, ref: str, pod: str, mounts_cg: str) -> None:
    snap, ctr = st.snapshotter, st.containerd.ctr
    out = ctr.text("tasks", "exec", "--exec-id", "e0", "podkill-long", "cat",
                   SAMPLE_TEXT_PATH)
    assert out == SAMPLE_TEXT.decode()
    daemons = set(snap.daemon_pids())
    assert len(daemons) == 2
    # The daemons left the pod's cgroup for their own; the snapshotter is in the pod's.
    assert daemons <= _cgroup_pids(mounts_cg)
    assert not daemons & _cgroup_pids(pod)
    assert snap.process is not None
    pod_pids = _cgroup_pids(pod)
    assert snap.process.pid in pod_pids
    # ... from inside the pod's cgroup namespace.
    assert os.readlink(f"/proc/{snap.process.pid}/ns/cgroup") != \
        os.readlink("/proc/self/ns/cgroup")

    killed = _kill_cgroup(pod)  # the pod dies: its snapshotter and zygote with it
    assert snap.process.pid in killed and len(killed) >= 2, killed
    snap.stop()  # reaps it
    assert all(process_running(pid) for pid in daemons)
    points = mounts_under(snap.root)
    assert len(points) == 2
    # A lazy mount no snapshot owns (as a pod killed between a Remove and its unmount
    # leaves): the new snapshotter must end it.
    state = snap.mount_states()[0]
    stray = snap.root / "snapshots" / "999999" / "fs"
    stray.mkdir(parents=True)
    m = mount_layer(state["url"], state["digest"], state["toc_digest"], stray,
                    snap.root / "cache", MountOptions(prefetch=PrefetchOptions(background=False)))
    offset = len(snap.log())
    snap.start()  # the DaemonSet's new pod
    log = snap.log()[offset:]
    assert "'alive'" in log and "'remounted'" not in log, log
    assert f"lazy mount {stray} belongs to no snapshot: unmounting it" in log
    assert wait_until(lambda: not m.alive, 15)  # our child: `alive` reaps it
    assert set(snap.daemon_pids()) == daemons, "a restarted snapshotter started duplicates"
    assert mounts_under(snap.root) == points

    # The running container reads what it never read, and gets the right bytes.
    out = ctr.text("tasks", "exec", "--exec-id", "e1", "podkill-long", "sha256sum", FAR)
    assert out.split()[0] == _sha256_of(FAR)
    # A new container of the same image starts on the re-adopted mounts.
    proc = _run_once_served(ctr, ref, "podkill-new", "sha256sum",
                            "/opt/peerstar/random/extra-2.bin")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0].decode() == _sha256_of("/opt/peerstar/random/extra-2.bin")
    # containerd's view and ours agree: every snapshot containerd lists is ours (same
    # kind), the remote ones each on a live FUSE mount of its own daemon.
    ours = {i.name: i for i in our_infos(st)}
    theirs = _ctr_snapshots(ctr)
    kinds = {pb.COMMITTED: "Committed", pb.ACTIVE: "Active", pb.VIEW: "View"}
    for key, kind in theirs.items():
        match = [i for name, i in ours.items() if name == key or name.endswith("/" + key)]
        assert len(match) == 1, (key, sorted(ours))
        assert kinds[match[0].kind] == kind
    remote = [i for i in ours.values() if REMOTE_LABEL in i.labels]
    assert len(remote) == 2 == len(snap.mount_states())
    assert set(snap.daemon_pids()) == daemons


def test_node_reboot_without_the_registry() -> None:
    """Item 2: the node reboots while the registry is down. Images whose layers are all
    cached start; one that needs chunks it lacks fails with EIO within the fetch timeout
    (and a log line says why), one whose layer cannot even be mounted (TOC evicted) does
    not start and says which layer; both run once the registry is back."""
    reg = start_registry()
    try:
        push_image(reg.url, "snap/cached", "v1", estargz=True)
        push_image(reg.url, "snap/partial", "v1", estargz=True, extra_mib=3)
        gone_layer = push_image(reg.url, "snap/gone", "v1", estargz=True, extra_mib=2)[1]
        cached, partial = f"{reg.host}/snap/cached:v1", f"{reg.host}/snap/partial:v1"
        gone = f"{reg.host}/snap/gone:v1"
        config = ("[remote]\nprefetch_timeout = 5.0\nbackground_fetch = false\n"
                  "retries = 1\nrequest_timeout = 5.0\nmount_timeout = 30.0\n")
        with running_stack(config) as st:
            snap, daemon, ctr = st.snapshotter, st.containerd, st.containerd.ctr

            def run(ref: str, name: str, *argv: str) -> subprocess.CompletedProcess[bytes]:
                return ctr.run("run", "--snapshotter", "peerstar", "--rm", ref, name, *argv,
                               check=False, timeout=120)

            for ref in (cached, partial, gone):
                ctr.remote("image", "rpull", "--plain-http", "--snapshotter", "peerstar",
                           ref)
            # Every file of `cached` read once: all its chunks are in the cache.
            warm = run(cached, "warm", "sh", "-c",
                       "find / -xdev -type f -exec cat {} + >/dev/null")
            assert warm.returncode == 0, warm.stderr
            snap.wait_prefetched()

            # The reboot: containers gone, containerd and the snapshotter stopped, the
            # FUSE mounts gone with their daemons; the registry stays down.
            daemon.remove_base = False  # its metadata survives a reboot
            daemon.stop()
            snap.stop()
            reg.take_down()
            pids = snap.daemon_pids()
            snap.unmount_all()
            assert mounts_under(snap.root) == []
            assert wait_until(lambda: not any(process_running(pid) for pid in pids), 20), \
                [pid for pid in pids if process_running(pid)]
            # `gone`'s data layer lost every cached byte, its TOC too (as cache eviction
            # can do): it cannot be mounted until the registry is back.
            regions = DiskCache(snap.root / "cache" / "regions")
            for i in range(-(-gone_layer.size // 50_000)):
                regions.discard(f"{gone_layer.digest}/50000/{i}")
            offset = len(snap.log())
            snap.start()
            daemon.start()
            daemon.remove_base = True
            log = snap.log()[offset:]
            assert "remote snapshots at start" in log, log
            assert log.count("cannot mount again") == 1 and gone_layer.digest in log, log
            assert len(mounts_under(snap.root)) == 3  # busybox shared, two data layers

            ok = run(cached, "offline", "sh", "-c", f"cat {SAMPLE_TEXT_PATH}; sha256sum {FAR}")
            assert ok.returncode == 0, ok.stderr
            assert ok.stdout.startswith(SAMPLE_TEXT)
            assert ok.stdout[len(SAMPLE_TEXT):].split()[0].decode() == _sha256_of(FAR)

            t0 = time.monotonic()
            bad = run(partial, "needs-net", "sha256sum", FAR)
            elapsed = time.monotonic() - t0
            assert bad.returncode != 0 and bad.stdout == b""
            assert b"Input/output error" in bad.stderr, bad.stderr
            assert elapsed < 2 * 5.0 + 20, elapsed  # retries x request_timeout, + ctr run
            mount_logs = "".join(p.read_text(errors="replace") for p in
                                 (snap.root / "cache" / "mounts").glob("*.log"))
            # One line says which file, which registry, and why.
            assert (f"reading '{FAR.lstrip('/')}' at 0: http://{reg.host}/v2/snap/partial/"
                    "blobs/" in mount_logs and "Connection refused (EIO)" in mount_logs), \
                mount_logs[-3000:]

            # A layer that cannot be mounted: the container does not start (never on an
            # empty layer), with a message naming the layer, within the timeouts.
            t0 = time.monotonic()
            no = run(gone, "no-toc", "cat", SAMPLE_TEXT_PATH)
            assert time.monotonic() - t0 < 2 * 5.0 + 20
            assert no.returncode != 0 and no.stdout == b""
            assert (f"lazily pulled layer {gone_layer.digest}".encode() in no.stderr
                    and b"cannot be mounted again" in no.stderr), no.stderr

            reg.bring_back()
            back = run(partial, "back", "sha256sum", FAR)
            assert back.returncode == 0, back.stderr
            assert back.stdout.split()[0].decode() == _sha256_of(FAR, extra_mib=3)
            back = run(gone, "back-gone", "sha256sum", FAR)
            assert back.returncode == 0, back.stderr
            assert back.stdout.split()[0].decode() == _sha256_of(FAR, extra_mib=2)
    finally:
        reg.stop()
