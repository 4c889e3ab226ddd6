"""Fixtures for snapshotter tests: `peerstar snapshotter serve` as a real process and a
private containerd whose proxy plugin `peerstar` points at it (`tests.support.snapshotter`,
re-exported here for the tests that import it from this module), and a registry bridge
over an embedded store.
"""

from __future__ import annotations

import json
import os
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
        """The registry's JSON access-log lines so far (not its upstream-read lines,
        JSON too, logged when a read was slow)."""
        lines = [json.loads(line) for line in self.log_path.read_text().splitlines()
                 if line.startswith("{")]
        return [entry for entry in lines if "path" in entry]


@contextmanager
def ipfs_bridge(work: Path, extra_mib: int) -> Iterator[Bridge]:
    """The README's flow up to the registry: the sample image (with `extra_mib` MiB of
    data) pushed with `peerstar push --estargz` into an embedded store under `work`, and
    `peerstar registry serve` over it on a free loopback port, stopped on exit."""
    from peerstar.source.sample import build_sample_image
    from tests.support.cli import last_line, run_peerstar, serving_registry
    from tests.support.ports import free_port

    image = build_sample_image(work / "layout", extra_mib=extra_mib)
    store = work / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERSTAR_")}
    env["IPFS_PATH"] = "/nonexistent-peerstar-test"  # the embedded store, never a daemon
    push = run_peerstar("push", "--estargz", "--root", store, f"oci:{image.path}:latest",
                        env=env)
    assert push.returncode == 0, push.stderr
    cid = last_line(push)
    port = free_port()
    log_path = work / "registry.log"
    with serving_registry("--root", store, "--listen", f"127.0.0.1:{port}", log=log_path,
                          env=env, timeout=30):
        yield Bridge(cid, port, log_path)
