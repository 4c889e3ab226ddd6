"""Moving a mount daemon into a cgroup of its own, outside the one of whoever started it.

Owns `enter_cgroup(path)`, which a mount daemon calls first thing when it is given
`--cgroup PATH` (`MountOptions.cgroup`, the snapshotter's `[remote] daemon_cgroup`).

Why: a container dies by every process of its cgroup being killed at once (runc's
SIGKILL to all of the cgroup's tasks; cgroup v2's `cgroup.kill`). A snapshotter in a
pod starts its layers' daemons inside the pod's cgroup, so a restart of its container
would end the FUSE mounts under every running container of the node. A daemon that
moved itself to a sibling cgroup is not among the processes killed. (It must also be
outside the pod's PID namespace -- `hostPID: true` -- or the namespace's init dying
would take it along; see docs/kubernetes.md.)

`PATH` is `ROOT/NAME`, where ROOT is the host's cgroup filesystem as mounted in this
mount namespace (in a pod, a hostPath of `/sys/fs/cgroup`): on cgroup v2, ROOT is the
cgroup2 mount and the daemon goes to `ROOT/NAME`; on cgroup v1 (or hybrid), ROOT holds
one mount per hierarchy and the daemon goes to `ROOT/<hierarchy>/NAME` in each. A
missing cgroup is created (cpuset's `cpus`/`mems` copied from its parent, or v1 would
refuse tasks). If this process is in another cgroup namespace than PID 1 (a pod's
container on cgroup v2), it first joins PID 1's: with `nsdelegate` the kernel refuses
a move to a cgroup outside the mover's namespace.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from peerstar.errors import PeerstarError
from peerstar.lazyfs.state import mount_fstype

CLONE_NEWCGROUP = 0x02000000


class CgroupError(PeerstarError):
    """The daemon could not move into its cgroup; the message says which and why."""


def hierarchies(root: Path) -> list[Path]:
    """The cgroup hierarchies mounted at `root` (v2) or right under it (v1, hybrid)."""
    root = Path(root)
    if mount_fstype(root) == "cgroup2":
        return [root]
    try:
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []
    return [p for p in subdirs if mount_fstype(p) in ("cgroup", "cgroup2")]


def _join_host_cgroup_namespace() -> None:
    try:
        if os.stat("/proc/self/ns/cgroup").st_ino == os.stat("/proc/1/ns/cgroup").st_ino:
            return
        fd = os.open("/proc/1/ns/cgroup", os.O_RDONLY)
    except OSError:
        return  # no way to tell or to join: the move below says whether it works
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWCGROUP) != 0:
            err = ctypes.get_errno()
            raise CgroupError(f"cannot join the host's cgroup namespace: {os.strerror(err)} "
                              "(the pod needs hostPID: true and privileges)")
    finally:
        os.close(fd)


def _make(cgroup: Path, parent: Path) -> None:
    cgroup.mkdir(exist_ok=True)
    for knob in ("cpuset.cpus", "cpuset.mems"):  # v1 cpuset: empty means no tasks allowed
        own = cgroup / knob
        if own.exists() and not own.read_text().strip():
            own.write_text((parent / knob).read_text())


def enter_cgroup(path: str | Path, pid: int = 0) -> list[Path]:
    """Move process `pid` (0: this one) into cgroup `path` (`ROOT/NAME`, see the module
    docstring) in every hierarchy mounted at ROOT; returns the cgroups entered."""
    path = Path(path)
    root, name = path.parent, path.name
    found = hierarchies(root)
    if not name or not found:
        raise CgroupError(f"daemon cgroup {path}: {root} is not a cgroup filesystem "
                          "(mount the host's /sys/fs/cgroup there)")
    _join_host_cgroup_namespace()
    entered = []
    for h in found:
        cgroup = h / name
        try:
            _make(cgroup, h)
            (cgroup / "cgroup.procs").write_text(str(pid or os.getpid()))
        except OSError as exc:
            raise CgroupError(f"cannot move the mount daemon into cgroup {cgroup}: "
                              f"{exc.strerror or exc}") from None
        entered.append(cgroup)
    return entered
