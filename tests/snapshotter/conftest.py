"""Fixtures for snapshotter tests: `peerstar snapshotter serve` as a real process, and a
private containerd whose proxy plugin `peerstar` points at it.

The snapshotter runs from the checkout (`python -m peerstar`), with its own root under a
short /tmp dir (unix socket paths are limited to 107 bytes). Stopping it unmounts any lazy
layers left under its root: their mount daemons run in their own sessions on purpose
(restart safety), so nothing else would end them.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.containerd import Containerd, CriOptions, HarnessError, start_containerd

REPO = Path(__file__).resolve().parent.parent.parent


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
                [sys.executable, "-m", "peerstar", "snapshotter", "serve", "--address",
                 str(self.address), "--root", str(self.root), "--config", str(config),
                 "--log-level", "info", *self.extra_args],
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
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
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
        while any(Path(f"/proc/{pid}").exists() for pid in pids):
            if time.monotonic() > deadline:
                break  # leave the directory then; never kill what may not be ours
            time.sleep(0.05)


def start_snapshotter(config_text: str = "") -> SnapshotterProc:
    base = Path(tempfile.mkdtemp(prefix="pss-", dir="/tmp"))
    return SnapshotterProc(base, config_text).start()


def stop_snapshotter(proc: SnapshotterProc) -> None:
    proc.stop()
    proc.unmount_all()
    if not mounts_under(proc.base):
        shutil.rmtree(proc.base, ignore_errors=True)


@dataclass
class Stack:
    snapshotter: SnapshotterProc
    containerd: Containerd


@contextmanager
def running_stack(config_text: str, cri: CriOptions | None = None) -> Iterator[Stack]:
    """The snapshotter (with `config_text` as its TOML) and a containerd using it as
    proxy plugin `peerstar` (with its CRI plugin configured by `cri`, if given); both
    stopped and cleaned up afterwards."""
    if os.geteuid() != 0:
        pytest.fail("snapshotter tests must run as root (overlay and FUSE mounts)",
                    pytrace=False)
    try:
        snap = start_snapshotter(config_text)
    except HarnessError as exc:
        pytest.fail(f"cannot start the snapshotter: {exc}", pytrace=False)
    try:
        daemon = start_containerd(proxy_plugins={"peerstar": str(snap.address)}, cri=cri)
    except HarnessError as exc:
        stop_snapshotter(snap)
        pytest.fail(f"cannot start containerd{' with CRI' if cri else ''}: {exc}",
                    pytrace=False)
    try:
        yield Stack(snap, daemon)
    finally:
        daemon.stop()
        stop_snapshotter(snap)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack("[remote]\nprefetch_timeout = 5.0\n") as s:
        yield s


@dataclass
class Bridge:
    """`peerstar registry serve` over an embedded store holding one pushed image."""

    cid: str
    port: int
    log_path: Path

    @property
    def ref(self) -> str:
        return f"127.0.0.1:{self.port}/ipfs/{self.cid}:latest"

    def access_log(self) -> list[dict]:
        """The registry's JSON access-log lines so far."""
        return [json.loads(line) for line in self.log_path.read_text().splitlines()
                if line.startswith("{")]


@contextmanager
def ipfs_bridge(work: Path, extra_mib: int) -> Iterator[Bridge]:
    """The README's flow up to the registry: the sample image (with `extra_mib` MiB of
    data) pushed with `peerstar push --estargz` into an embedded store under `work`, and
    `peerstar registry serve` over it on a free loopback port, stopped on exit."""
    from peerstar.sample import build_sample_image
    from tests.support.registry import free_port

    image = build_sample_image(work / "layout", extra_mib=extra_mib)
    store = work / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERSTAR_")}
    # the embedded store, never a daemon
    env.update(IPFS_PATH="/nonexistent-peerstar-test", PYTHONPATH=str(REPO))
    push = subprocess.run(
        [sys.executable, "-m", "peerstar", "push", "--estargz", "--root", str(store),
         f"oci:{image.path}:latest"], capture_output=True, text=True, env=env, cwd=REPO,
        timeout=300)
    assert push.returncode == 0, push.stderr
    cid = push.stdout.strip().splitlines()[-1]
    port = free_port()
    log_path = work / "registry.log"
    with open(log_path, "wb") as log:
        registry = subprocess.Popen(
            [sys.executable, "-m", "peerstar", "registry", "serve", "--root", str(store),
             "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=log,
            env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in log_path.read_text():
            assert registry.poll() is None and time.monotonic() < deadline, \
                log_path.read_text()
            time.sleep(0.05)
        yield Bridge(cid, port, log_path)
        registry.send_signal(signal.SIGTERM)
        registry.wait(15)
    finally:
        if registry.poll() is None:
            registry.kill()
            registry.wait()
