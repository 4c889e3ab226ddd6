"""End to end with real parts: eStargz layers (peerstar.estargz.build) pushed to the
Debian docker-registry, `ctr-remote image rpull --snapshotter peerstar`, containers run
under runc reading files served lazily by peerstar.lazyfs, the layer blobs never in
containerd's content store; the same image as plain gzip layers goes the fallback path;
the snapshotter killed and restarted while a container runs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from peerstar.estargz import TOC_DIGEST_ANNOTATION, Reader, build
from peerstar.snapshotter._proto import snapshots_pb2 as pb
from peerstar.snapshotter._proto import snapshots_pb2_grpc
from peerstar.source.sample import (
    SAMPLE_TEXT,
    SAMPLE_TEXT_PATH,
    build_layer_tar,
    gzip_bytes,
    sample_layer_entries,
)
from tests.snapshotter.conftest import (
    Stack,
    mounts_under,
    running_stack,
    start_snapshotter,
    stop_snapshotter,
)
from tests.support import registry
from tests.support.containerd import Ctr
from tests.support.content import sha256_digest
from tests.support.ports import free_port
from tests.support.registry import DockerRegistry, start_registry
from tests.support.waiting import process_running, wait_until

pytestmark = pytest.mark.slow

EXTRA_MIB = 8
REMOTE_LABEL = "containerd.io/snapshot/remote"


@dataclass
class PushedLayer:
    digest: str
    size: int
    diff_id: str
    toc_digest: str  # "" for a plain gzip layer


def tamper(blob: bytes, path: str) -> bytes:
    """`blob` with one byte changed inside the compressed payload of file `path`; the TOC
    (and so the TOC digest) is untouched, only that chunk's digest no longer matches."""
    reader = Reader.open(lambda off, n: blob[off:off + n], len(blob))
    entry = reader.lookup(path)
    assert entry is not None and entry.size > 0
    at = entry.offset + 4096  # past the member's gzip header, inside the file's bytes
    return blob[:at] + bytes([blob[at] ^ 0xFF]) + blob[at + 1:]


def push_image(base: str, repo: str, tag: str, *, estargz: bool,
               tampered: str = "", extra_mib: int = EXTRA_MIB) -> list[PushedLayer]:
    """The sample image's layers (busybox; text files + `extra_mib` MiB) pushed as eStargz
    (the sample text prioritized, so it comes with the prefetch) or as plain gzip.
    `tampered`: a file of the data layer whose bytes are corrupted in the pushed blob."""
    layers: list[PushedLayer] = []
    blobs: list[bytes] = []
    for i, entries in enumerate(sample_layer_entries(extra_mib=extra_mib)):
        tar = build_layer_tar(entries)
        if estargz:
            out = io.BytesIO()
            # The tampered variant prioritizes nothing: another TOC, so another DiffID and
            # chain id (with the same chain id containerd would reuse the good layer).
            res = build(io.BytesIO(tar), out, prioritized=(
                ("etc/peerstar-sample.txt",) if i == 1 and not tampered else ()))
            blob = out.getvalue()
            if tampered and i == 1:
                blob = tamper(blob, tampered)
            layer = PushedLayer(sha256_digest(blob), len(blob), res.diff_id, res.toc_digest)
        else:
            blob = gzip_bytes(tar)
            layer = PushedLayer(sha256_digest(blob), len(blob), sha256_digest(tar), "")
        blobs.append(blob)
        layers.append(layer)
    annotated = [(blob, {TOC_DIGEST_ANNOTATION: la.toc_digest} if la.toc_digest else {})
                 for blob, la in zip(blobs, layers, strict=True)]
    registry.push_image(base, repo, tag, annotated, [la.diff_id for la in layers],
                        {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]})
    return layers


def our_infos(stack: Stack) -> list[pb.Info]:
    with grpc.insecure_channel(f"unix://{stack.snapshotter.address}") as ch:
        stub = snapshots_pb2_grpc.SnapshotsStub(ch)
        return [i for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info]


def content_digests(stack: Stack) -> set[str]:
    return {line.split()[0] for line in stack.containerd.ctr.lines("content", "ls")[1:]}


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def lazy_stack() -> Iterator[Stack]:
    # No background fetch: the bytes fetched are then only what was read or prefetched.
    with running_stack(f'metrics_address = "127.0.0.1:{METRICS_PORT}"\n'
                       "[remote]\nprefetch_timeout = 5.0\nbackground_fetch = false\n") as s:
        yield s


@pytest.fixture(scope="module")
def estargz_image(docker_registry: DockerRegistry) -> tuple[str, list[PushedLayer]]:
    layers = push_image(docker_registry.url, "snap/lazy", "v1", estargz=True)
    return f"{docker_registry.host}/snap/lazy:v1", layers


@pytest.fixture(scope="module")
def gzip_image(docker_registry: DockerRegistry) -> tuple[str, list[PushedLayer]]:
    layers = push_image(docker_registry.url, "snap/plain", "v1", estargz=False)
    return f"{docker_registry.host}/snap/plain:v1", layers


def _remote_snapshots(stack: Stack) -> dict[str, pb.Info]:
    return {i.labels["containerd.io/snapshot/remote/stargz.digest"]: i
            for i in our_infos(stack) if REMOTE_LABEL in i.labels}


def test_rpull_runs_lazily_without_layer_blobs_in_content_store(
        lazy_stack: Stack, estargz_image: tuple[str, list[PushedLayer]]) -> None:
    ref, layers = estargz_image
    ctr = lazy_stack.containerd.ctr
    ctr.remote("image", "rpull", "--plain-http", "--snapshotter", "peerstar", ref)
    # Both layers were mounted remotely: committed under their chain id, labelled remote,
    # each `fs` a live FUSE mount of the mount daemon.
    remote = _remote_snapshots(lazy_stack)
    assert sorted(remote) == sorted(la.digest for la in layers)
    for info in remote.values():
        assert info.kind == pb.COMMITTED
        assert info.labels["containerd.io/snapshot/remote"] == "remote snapshot"
    fuse = mounts_under(lazy_stack.snapshotter.root)
    assert len(fuse) == 2 and all(Path(p).name == "fs" for p in fuse)
    # The first Prepare carried ctr-remote's layer list: the upper layer was resolved
    # (footer, TOC, prefetch range) beside the lower one's mount, before its own Prepare.
    log = lazy_stack.snapshotter.log()
    assert f"layer {layers[1].digest} resolved ahead of its mount" in log, log[-3000:]
    assert f"layer {layers[0].digest} resolved ahead" not in log
    # The layer blobs never entered containerd's content store (manifest/config did).
    content = content_digests(lazy_stack)
    assert not content & {la.digest for la in layers}
    out = ctr.text("run", "--snapshotter", "peerstar", "--rm", ref, "lazy-cat", "cat",
                   SAMPLE_TEXT_PATH)
    assert out == SAMPLE_TEXT.decode()
    assert ctr.text("run", "--snapshotter", "peerstar", "--rm", ref, "lazy-echo",
                    "/bin/busybox", "echo", "hello") == "hello\n"
    # Only part of the data layer was fetched: the EXTRA_MIB MiB of data was never read.
    # (Its daemon may have fetched nothing itself: the resolving ahead brought its TOC and
    # prefetch range, which the cache holds.)
    data_layer = layers[1]
    time.sleep(2.5)  # the daemon refreshes its stats file every 2 s
    stats = [json.loads(p.read_text()) for p in
             (lazy_stack.snapshotter.root / "cache" / "mounts").glob("*.stats.json")]
    mine = [s for s in stats if s.get("digest") == data_layer.digest]
    assert len(mine) == 1
    assert mine[0]["fetchedSize"] < data_layer.size // 2, mine[0]
    assert 0 < mine[0]["cachedSize"] < data_layer.size // 2, mine[0]
    # One scrape: the snapshotter's handshake counts and every layer daemon's fetches.
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'peerstar_snapshotter_remote_prepares_total{result="remote"} 2.0' in text
    metric = "peerstar_lazyfs_fetched_bytes_total"

    def fetched(layer: PushedLayer, kind: str) -> float:
        prefix = f'{metric}{{kind="{kind}",layer="{layer.digest[:19]}"}} '
        values = [float(ln[len(prefix):]) for ln in text.splitlines() if ln.startswith(prefix)]
        assert len(values) == 1, (prefix, text)
        return values[0]

    # The sample text is prioritized: its prefetch range came with the data layer's
    # resolving ahead (its daemon's own prefetch finds it cached, or joins what is still
    # on the way); running busybox read its layer on demand. Neither layer was fetched
    # whole.
    assert 'peerstar_snapshotter_layers_resolved_ahead_total{result="ok"} 1.0' in text
    ahead = [float(ln.split()[-1]) for ln in text.splitlines()
             if ln.startswith("peerstar_snapshotter_resolved_ahead_bytes_total ")]
    assert len(ahead) == 1 and 0 < ahead[0] < data_layer.size // 2
    prefetched = f'{metric}{{kind="prefetch",layer="{data_layer.digest[:19]}"}} '
    assert sum(float(ln.split()[-1]) for ln in text.splitlines()
               if ln.startswith(prefetched)) < data_layer.size // 2
    assert 0 < fetched(layers[0], "on_demand") <= layers[0].size


def test_plain_gzip_image_takes_the_fallback_path(
        lazy_stack: Stack, gzip_image: tuple[str, list[PushedLayer]]) -> None:
    ref, layers = gzip_image
    ctr = lazy_stack.containerd.ctr
    before = set(_remote_snapshots(lazy_stack))
    ctr.remote("image", "rpull", "--plain-http", "--snapshotter", "peerstar", ref)
    # No remote snapshot for these layers; containerd downloaded and unpacked them.
    assert set(_remote_snapshots(lazy_stack)) == before
    assert {la.digest for la in layers} <= content_digests(lazy_stack)
    out = ctr.text("run", "--snapshotter", "peerstar", "--rm", ref, "plain-cat", "cat",
                   SAMPLE_TEXT_PATH)
    assert out == SAMPLE_TEXT.decode()
    log = lazy_stack.snapshotter.log()
    assert f"layer {layers[0].digest} has no containerd.io/snapshot/stargz/toc.digest" in log


def test_snapshotter_restart_keeps_running_container_reading(
        lazy_stack: Stack, estargz_image: tuple[str, list[PushedLayer]]) -> None:
    ref, _ = estargz_image
    ctr = lazy_stack.containerd.ctr
    snap = lazy_stack.snapshotter
    ctr.remote("image", "rpull", "--plain-http", "--snapshotter", "peerstar", ref)
    ctr.run("run", "-d", "--snapshotter", "peerstar", ref, "lazy-long", "sleep", "600")
    try:
        snap.stop(signal.SIGKILL)  # no chance to clean up: like a crash
        snap.start()
        assert "remote snapshots at start" in snap.log() and "'alive'" in snap.log()
        out = ctr.text("tasks", "exec", "--exec-id", "e1", "lazy-long", "cat",
                       SAMPLE_TEXT_PATH)
        assert out == SAMPLE_TEXT.decode()
        # And the restarted snapshotter serves new containers (containerd reconnects).
        proc = _run_once_served(ctr, ref, "after-restart", "cat", SAMPLE_TEXT_PATH)
        assert proc.stdout.decode() == SAMPLE_TEXT.decode(), proc.stderr
    finally:
        ctr.run("tasks", "kill", "-s", "SIGKILL", "lazy-long", check=False)
        for _ in range(50):
            if ctr.run("tasks", "delete", "lazy-long", check=False).returncode == 0:
                break
            time.sleep(0.1)
        ctr.run("containers", "delete", "lazy-long", check=False)


def _run_once_served(ctr: Ctr, ref: str, name: str, *argv: str
                     ) -> subprocess.CompletedProcess[bytes]:
    """`ctr run` of `argv`, retried for up to 20 s while containerd reconnects to a
    restarted snapshotter; the last attempt's result."""
    deadline = time.monotonic() + 20
    while True:
        proc = ctr.run("run", "--snapshotter", "peerstar", "--rm", ref, name, *argv,
                       check=False)
        if proc.returncode == 0 or time.monotonic() > deadline:
            return proc
        time.sleep(0.5)


def test_remote_layer_remounted_after_its_daemon_died(
        lazy_stack: Stack, estargz_image: tuple[str, list[PushedLayer]]) -> None:
    """A node reboot or a killed mount daemon: the snapshotter mounts the layers again
    from its database at start, and new containers read them."""
    ref, layers = estargz_image
    ctr = lazy_stack.containerd.ctr
    snap = lazy_stack.snapshotter
    ctr.remote("image", "rpull", "--plain-http", "--snapshotter", "peerstar", ref)
    snap.stop()
    daemons = snap.daemon_pids()
    assert len(daemons) >= 2
    for point in mounts_under(snap.root):  # the daemons exit on umount
        assert subprocess.run(["umount", "-l", point]).returncode == 0
    assert mounts_under(snap.root) == []
    # like a reboot: the old daemons are gone for good
    assert wait_until(lambda: not any(process_running(pid) for pid in daemons), 20), \
        "mount daemons did not exit after umount"
    snap.start()
    assert len(mounts_under(snap.root)) == 2
    assert snap.log().count("'remounted'") >= 2
    proc = _run_once_served(ctr, ref, "remounted", "cat", SAMPLE_TEXT_PATH)
    assert proc.stdout.decode() == SAMPLE_TEXT.decode(), proc.stderr


def test_tampered_chunk_is_eio_in_the_container(lazy_stack: Stack,
                                                docker_registry: DockerRegistry) -> None:
    bad = "opt/peerstar/random/extra-0.bin"
    push_image(docker_registry.url, "snap/tampered", "v1", estargz=True, tampered=bad)
    ref = f"{docker_registry.host}/snap/tampered:v1"
    ctr = lazy_stack.containerd.ctr
    ctr.remote("image", "rpull", "--plain-http", "--snapshotter", "peerstar", ref)
    proc = ctr.run("run", "--snapshotter", "peerstar", "--rm", ref, "tampered-cat",
                   "cat", "/" + bad, check=False)
    assert proc.returncode != 0
    assert proc.stdout == b""  # not one byte of the tampered chunk reached the reader
    assert proc.stderr == b"cat: read error: Input/output error\n", proc.stderr
    # The rest of the layer, and the node, are fine.
    out = ctr.text("run", "--snapshotter", "peerstar", "--rm", ref, "tampered-ok", "cat",
                   SAMPLE_TEXT_PATH, "/opt/peerstar/tree/a/one.txt")
    assert out == SAMPLE_TEXT.decode() + "one\n"


def test_cri_labels_mount_remotely_and_remove_unmounts(
        estargz_image: tuple[str, list[PushedLayer]]) -> None:
    """The labels CRI sends (`cri.image-ref`, `cri.layer-digest`, the TOC annotation),
    straight over the socket of a snapshotter of its own (one shared with containerd
    would see its snapshots garbage-collected: containerd removes backend snapshots it
    does not know): remote mount, reads through it, Remove ends the mount."""
    ref, layers = estargz_image
    data = layers[1]
    target = "sha256:" + "c" * 64
    labels = {"containerd.io/snapshot.ref": target,
              "containerd.io/snapshot/cri.image-ref": ref,
              "containerd.io/snapshot/cri.layer-digest": data.digest,
              "containerd.io/snapshot/cri.image-layers": ",".join(la.digest for la in layers),
              "containerd.io/snapshot/stargz/toc.digest": data.toc_digest}
    proc = start_snapshotter("[remote]\nbackground_fetch = false\n")
    try:
        root = proc.root
        with grpc.insecure_channel(f"unix://{proc.address}") as ch:
            stub = snapshots_pb2_grpc.SnapshotsStub(ch)
            with pytest.raises(grpc.RpcError) as exc:
                stub.Prepare(pb.PrepareSnapshotRequest(key="cri/extract-1", labels=labels))
            assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS, proc.log()
            info = stub.Stat(pb.StatSnapshotRequest(key=target)).info
            assert info.kind == pb.COMMITTED and info.labels[REMOTE_LABEL] == "remote snapshot"
            view = stub.View(pb.ViewSnapshotRequest(key="cri/view", parent=target)).mounts
            assert [(m.type, list(m.options)) for m in view] == [("bind", ["ro", "rbind"])]
            fs = Path(view[0].source)
            assert mounts_under(root) == [str(fs)]
            # Reads through the lazy mount itself.
            assert (fs / SAMPLE_TEXT_PATH.lstrip("/")).read_bytes() == SAMPLE_TEXT
            assert (fs / "opt/peerstar/tree/a/b/c/deep.txt").read_bytes() == \
                b"deep in the tree\n"
            stub.Remove(pb.RemoveSnapshotRequest(key="cri/view"))
            stub.Remove(pb.RemoveSnapshotRequest(key=target))
        assert mounts_under(root) == [] and not fs.exists()
    finally:
        stop_snapshotter(proc)


def test_registry_outage_after_prefetch() -> None:
    """Registry gone after the pull: prefetched and already-read files still read,
    others fail with EIO; once the registry is back they read correctly."""
    far = "/opt/peerstar/random/extra-1.bin"  # 1 MiB, far from the prefetched start
    expected = next(e.data for e in sample_layer_entries(extra_mib=EXTRA_MIB)[1]
                    if e.path == far)
    reg = start_registry()
    try:
        push_image(reg.url, "snap/outage", "v1", estargz=True)
        ref = f"{reg.host}/snap/outage:v1"
        config = "[remote]\nbackground_fetch = false\nretries = 1\nrequest_timeout = 5.0\n"
        with running_stack(config) as st:
            ctr = st.containerd.ctr

            def run(name: str, *argv: str) -> subprocess.CompletedProcess[bytes]:
                return ctr.run("run", "--snapshotter", "peerstar", "--rm", ref, name, *argv,
                               check=False, timeout=120)

            ctr.remote("image", "rpull", "--plain-http", "--snapshotter", "peerstar", ref)
            # Read all of busybox once, so every later command runs from the cache.
            assert run("warm", "sha256sum", "/bin/busybox").returncode == 0
            st.snapshotter.wait_prefetched()
            reg.take_down()
            ok = run("cached", "cat", SAMPLE_TEXT_PATH)
            assert (ok.returncode, ok.stdout) == (0, SAMPLE_TEXT), ok.stderr
            bad = run("uncached", "cat", far)
            assert bad.returncode != 0 and bad.stdout == b""
            assert bad.stderr == b"cat: read error: Input/output error\n"
            reg.bring_back()
            back = run("back", "sha256sum", far)
            assert back.returncode == 0, back.stderr
            assert back.stdout.split()[0].decode() == hashlib.sha256(expected).hexdigest()
    finally:
        reg.stop()


def test_crashed_mount_daemon_is_replaced_for_new_containers(
        lazy_stack: Stack, estargz_image: tuple[str, list[PushedLayer]]) -> None:
    ref, layers = estargz_image
    ctr = lazy_stack.containerd.ctr
    snap = lazy_stack.snapshotter
    ctr.remote("image", "rpull", "--plain-http", "--snapshotter", "peerstar", ref)
    victim = next(s for s in snap.mount_states() if s["digest"] == layers[1].digest)
    os.kill(victim["pid"], signal.SIGKILL)
    # the FUSE mount is dead (stat fails) once its server is gone
    assert wait_until(lambda: not os.path.exists(victim["mountpoint"])), \
        "mount still answers after its daemon died"
    out = ctr.text("run", "--snapshotter", "peerstar", "--rm", ref, "after-crash", "cat",
                   SAMPLE_TEXT_PATH)
    assert out == SAMPLE_TEXT.decode()
    assert "its mount was gone; mounted again" in snap.log()
    assert Path(victim["mountpoint"], SAMPLE_TEXT_PATH.lstrip("/")).read_bytes() == SAMPLE_TEXT
