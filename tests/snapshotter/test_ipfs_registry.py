"""The README's flow end to end, with no external daemon: the sample image pushed with
`peerstar push --estargz` into the embedded store, served by `peerstar registry serve`,
pulled with `ctr-remote image rpull` through the peerstar snapshotter, and a container
reading a file: the registry serves ranges only, a small part of the image's bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peerstar.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH, build_sample_image
from tests.snapshotter.conftest import REPO, running_stack
from tests.support.registry import free_port

pytestmark = pytest.mark.slow

EXTRA_MIB = 16


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERSTAR_")}
    env["IPFS_PATH"] = "/nonexistent-peerstar-test"  # the embedded store, never a daemon
    env["PYTHONPATH"] = str(REPO)
    return env


def test_push_estargz_registry_serve_rpull_run(tmp_path: Path) -> None:
    image = build_sample_image(tmp_path / "layout", extra_mib=EXTRA_MIB)
    store = tmp_path / "store"
    push = subprocess.run(
        [sys.executable, "-m", "peerstar", "push", "--estargz", "--root", str(store),
         f"oci:{image.path}:latest"], capture_output=True, text=True, env=_env(), cwd=REPO,
        timeout=300)
    assert push.returncode == 0, push.stderr
    cid = push.stdout.strip().splitlines()[-1]
    assert cid.startswith("bafkrei")  # CIDv1, raw leaf: the manifest is one small block
    port = free_port()
    log_path = tmp_path / "registry.log"
    with open(log_path, "wb") as log:
        registry = subprocess.Popen(
            [sys.executable, "-m", "peerstar", "registry", "serve", "--root", str(store),
             "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=log,
            env=_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in log_path.read_text():
            assert registry.poll() is None and time.monotonic() < deadline, \
                log_path.read_text()
            time.sleep(0.05)
        ref = f"127.0.0.1:{port}/ipfs/{cid}:latest"
        with running_stack("[remote]\nbackground_fetch = false\n") as st:
            ctr = st.containerd.ctr
            ctr.remote("image", "rpull", "--plain-http", "--snapshotter", "peerstar", ref)
            out = ctr.text("run", "--snapshotter", "peerstar", "--rm", ref, "ipfs-cat",
                           "cat", SAMPLE_TEXT_PATH)
            assert out == SAMPLE_TEXT.decode()
            assert st.snapshotter.log().count("mounted lazily from http://127.0.0.1") == 2
            content = {line.split()[0] for line in ctr.lines("content", "ls")[1:]}
        registry.send_signal(signal.SIGTERM)
        registry.wait(15)
    finally:
        if registry.poll() is None:
            registry.kill()
            registry.wait()
    entries = [json.loads(line) for line in log_path.read_text().splitlines()
               if line.startswith("{")]
    blobs = [e for e in entries if "/blobs/" in e["path"]]
    layer_reads = [e for e in blobs if e["path"].rsplit("/", 1)[1] not in content]
    assert layer_reads, entries  # the layers were read from the registry...
    assert not {e["path"].rsplit("/", 1)[1] for e in layer_reads} & content  # ...not stored
    # ...in ranges only (a GET without Range would be a full download), and in total far
    # less than the image: the EXTRA_MIB MiB of data were never read.
    assert all(e["range"] for e in layer_reads if e["method"] == "GET"), layer_reads
    served = sum(e["bytes"] for e in layer_reads)
    assert 0 < served < (EXTRA_MIB << 20) // 4, served
    print(f"served {served} bytes of layers for a {EXTRA_MIB} MiB image")
