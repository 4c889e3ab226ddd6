"""Fixtures for snapshotter tests: `peerstar snapshotter serve` as a real process and a
private containerd whose proxy plugin `peerstar` points at it (`tests.support.snapshotter`,
re-exported here for the tests that import it from this module), and a registry bridge
over an embedded store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.snapshotter import (  # noqa: F401 - re-exported for the tests
    REPO,
    SnapshotterProc,
    Stack,
    mounts_under,
    running_stack,
    start_snapshotter,
    stop_snapshotter,
)


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
    from peerstar.source.sample import build_sample_image
    from tests.support.ports import free_port

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
