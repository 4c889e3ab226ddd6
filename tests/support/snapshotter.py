"""`peerstar snapshotter serve` as a real process, for tests and benchmarks.

Owns: starting the snapshotter from the checkout (`python -m peerstar`) with its own root
under a short /tmp dir (unix socket paths are limited to 107 bytes), optionally behind a
command prefix -- `netns_prefix(node)` enters only a node's network namespace
(`nsenter --net`), keeping the host's mount namespace so the FUSE mounts are the ones
containerd and runc see -- and stopping it: stopping unmounts any lazy layers left under
its root, since their mount daemons run in their own sessions on purpose (restart
safety) and nothing else would end them.

Also `running_stack`: the snapshotter plus a private containerd using it as proxy plugin
`peerstar`, the pair every end-to-end test runs images on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.containerd import Containerd, CriOptions, HarnessError, start_containerd
from tests.support.netns import Node
from tests.support.waiting import process_running, stop_process

REPO = Path(__file__).resolve().parents[2]


def mounts_under(prefix: Path) -> list[str]:
    """Mount points under `prefix`, deepest first."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == str(prefix) or point.startswith(str(prefix) + "/"):
                points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


@dataclass
class SnapshotterProc:
    base: Path
    config_text: str = ""
    process: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)
    # Run it behind this command (e.g. `netns_prefix(node)`); empty: on the host.
    prefix: list[str] = field(default_factory=list)

    @property
    def address(self) -> Path:
        return self.base / "s.sock"

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def log_path(self) -> Path:
        return self.base / "snapshotter.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 30.0) -> SnapshotterProc:
        """Start (or restart: same root, socket and log) and wait until it serves."""
        offset = len(self.log())  # a restart appends: only the new run's lines count
        config = self.base / "snapshotter.toml"
        config.write_text(self.config_text)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "peerstar", "snapshotter", "serve",
                 "--address", str(self.address), "--root", str(self.root), "--config",
                 str(config), "--log-level", "info", *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, cwd=str(REPO))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HarnessError(f"snapshotter exited ({self.process.returncode}):\n"
                                   f"{self.log()[-3000:]}")
            if "serving on" in self.log()[offset:] and self.address.is_socket():
                return self
            time.sleep(0.05)
        raise HarnessError(f"snapshotter not serving after {timeout} s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.process, sig, timeout=20)
        self.process = None

    def mount_states(self) -> list[dict]:
        """The state files (pid, mountpoint, digest) of the lazy mount daemons serving
        under this root; one being replaced right now is left out."""
        states = []
        for p in (self.root / "cache" / "mounts").glob("*.json"):
            if p.name.endswith(".stats.json"):
                continue
            try:
                states.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
        return states

    def daemon_pids(self) -> list[int]:
        """Pids of the lazy mount daemons serving under this root (from their state)."""
        return [int(s["pid"]) for s in self.mount_states() if "pid" in s]

    def wait_prefetched(self, timeout: float = 20.0) -> None:
        """Wait until every lazy layer's prefetch is done (prefetch runs on after the
        mount is ready), read from each mount's live stats file."""
        deadline = time.monotonic() + timeout
        for state in self.mount_states():
            stats = Path(state["mountpoint"]) / ".peerstar-lazyfs" / f"{state['digest']}.json"
            while not json.loads(stats.read_text())["prefetchDone"]:
                assert time.monotonic() < deadline, f"prefetch of {state['digest']} not done"
                time.sleep(0.05)

    def unmount_all(self, timeout: float = 15.0) -> None:
        """Unmount every lazy layer, then wait for the daemons to exit (they write their
        last statistics on the way out, which must not land in a removed directory)."""
        pids = self.daemon_pids()
        for point in mounts_under(self.root):
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)
        deadline = time.monotonic() + timeout
        while any(process_running(pid) for pid in pids):
            if time.monotonic() > deadline:
                break  # leave the directory then; never kill what may not be ours
            time.sleep(0.05)


def start_snapshotter(config_text: str = "", prefix: Sequence[str] = ()) -> SnapshotterProc:
    """The snapshotter with `config_text` as its TOML, in a new short /tmp dir, run behind
    `prefix` (e.g. `netns_prefix(node)`; empty: on the host)."""
    base = Path(tempfile.mkdtemp(prefix="pss-", dir="/tmp"))
    return SnapshotterProc(base, config_text, prefix=list(prefix)).start()


def stop_snapshotter(proc: SnapshotterProc) -> None:
    proc.stop()
    proc.unmount_all()
    if not mounts_under(proc.base):
        shutil.rmtree(proc.base, ignore_errors=True)


def netns_prefix(node: Node) -> list[str]:
    """Enter the node's network namespace only (keep the host's mount namespace)."""
    return ["nsenter", f"--net=/run/netns/{node.netns}"]


@dataclass
class Stack:
    snapshotter: SnapshotterProc
    containerd: Containerd


@contextmanager
def running_stack(config_text: str, cri: CriOptions | None = None, *,
                  prefix: Sequence[str] = (), namespace: str | None = None,
                  containerd_prefix: Sequence[str] = ()) -> Iterator[Stack]:
    """The snapshotter (with `config_text` as its TOML, behind `prefix`) and a containerd
    using it as proxy plugin `peerstar` (in containerd namespace `namespace`, with its CRI
    plugin configured by `cri`, if given), behind `containerd_prefix` (empty: on the host;
    a CRI pull is made by the daemon itself, so it goes behind `netns_prefix(node)` for a
    node's CRI pull to reach that node's registries); both stopped and cleaned up
    afterwards, containerd first (its containers use the snapshotter's mounts). A part
    that cannot start fails the test with the reason, no traceback."""
    if os.geteuid() != 0:
        pytest.fail("snapshotter tests must run as root (overlay and FUSE mounts)",
                    pytrace=False)
    try:
        snap = start_snapshotter(config_text, prefix)
    except HarnessError as exc:
        pytest.fail(f"cannot start the snapshotter: {exc}", pytrace=False)
    try:
        daemon = start_containerd(namespace=namespace, cri=cri,
                                  proxy_plugins={"peerstar": str(snap.address)},
                                  prefix=containerd_prefix)
    except HarnessError as exc:
        stop_snapshotter(snap)
        pytest.fail(f"cannot start containerd{' with CRI' if cri else ''}: {exc}",
                    pytrace=False)
    try:
        yield Stack(snap, daemon)
    finally:
        daemon.stop()
        stop_snapshotter(snap)
