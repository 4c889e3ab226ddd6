"""`peerstar.lazyfs.cgroup.enter_cgroup` on this machine's real cgroup filesystem: a
process is moved into the named cgroup of every hierarchy (cgroup v1 and the v2 unified
one here; one cgroup2 mount on a v2 node), and a root that is no cgroup filesystem is
one clear error."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from peerstar.lazyfs.cgroup import CgroupError, enter_cgroup, hierarchies

ROOT = Path("/sys/fs/cgroup")


def test_a_process_moves_into_the_cgroup_in_every_hierarchy() -> None:
    found = hierarchies(ROOT)
    if os.geteuid() != 0 or not found:
        pytest.skip("needs root and a cgroup filesystem at /sys/fs/cgroup")
    name = f"peerstar-cgtest-{os.getpid()}"
    proc = subprocess.Popen(["sleep", "60"])
    try:
        entered = enter_cgroup(ROOT / name, proc.pid)
        assert entered == [h / name for h in found]
        for cg in entered:
            assert str(proc.pid) in (cg / "cgroup.procs").read_text().split()
        lines = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()
        assert lines and all(line.endswith(f":/{name}") for line in lines), lines
        enter_cgroup(ROOT / name, proc.pid)  # again: the cgroup exists, still fine
    finally:
        proc.kill()
        proc.wait()
        for h in found:
            try:
                (h / name).rmdir()
            except OSError:
                pass


def test_a_root_that_is_no_cgroup_filesystem_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CgroupError) as exc:
        enter_cgroup(tmp_path / "mounts")
    assert str(exc.value) == (f"daemon cgroup {tmp_path}/mounts: {tmp_path} is not a cgroup "
                              "filesystem (mount the host's /sys/fs/cgroup there)")
    assert list(tmp_path.iterdir()) == []
