"""Against a real containerd: proxy plugin `peerstar` backed by `peerstar snapshotter
serve` (a separate process). Images unpacked into our snapshots run under runc, and
`ctr snapshots` prepare/mounts/usage/commit/rm/label reach the plugin (REFERENCE.md
section 5: `ctr snapshots ls` is answered from containerd's own metadata, so checks go
through calls that reach us, or through our socket)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import grpc
import pytest

from peerstar.snapshotter._proto import snapshots_pb2 as pb
from peerstar.snapshotter._proto import snapshots_pb2_grpc
from peerstar.source.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH, SampleImage
from tests.snapshotter.conftest import Stack

pytestmark = pytest.mark.slow

SN = ("snapshots", "--snapshotter", "peerstar")


def chain_ids(diff_ids: list[str]) -> list[str]:
    out = [diff_ids[0]]
    for d in diff_ids[1:]:
        out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def our_snapshots(stack: Stack) -> dict[str, pb.Info]:
    """Every snapshot the plugin holds, straight from its socket, keyed by the name
    containerd's client used: containerd stores `NAMESPACE/ID/NAME` in the backend."""
    with grpc.insecure_channel(f"unix://{stack.snapshotter.address}") as ch:
        stub = snapshots_pb2_grpc.SnapshotsStub(ch)
        infos = [i for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info]
    prefix = stack.containerd.namespace + "/"
    out = {}
    for i in infos:
        assert i.name.startswith(prefix), i.name
        out[i.name.split("/", 2)[2]] = i
    return out


def name_of(backend_key: str) -> str:
    return backend_key.split("/", 2)[2] if backend_key else ""


@pytest.fixture(scope="module")
def imported(stack: Stack, sample_image: SampleImage) -> str:
    refs = stack.containerd.ctr.import_oci_layout(sample_image.path, "docker.io/peerstar/snap")
    assert refs == ["docker.io/peerstar/snap:latest"]
    # Unpack into our snapshots (ctr 1.6 has no `images unpack`; a run unpacks first).
    stack.containerd.ctr.run("run", "--snapshotter", "peerstar", "--rm", refs[0], "unpack-0",
                             "/bin/busybox", "true")
    return refs[0]


def test_run_image_unpacked_into_our_snapshots(stack: Stack, imported: str,
                                               sample_image: SampleImage) -> None:
    ctr = stack.containerd.ctr
    out = ctr.text("run", "--snapshotter", "peerstar", "--rm", imported, "echo-1",
                   "/bin/busybox", "echo", "hello")
    assert out == "hello\n"
    out = ctr.text("run", "--snapshotter", "peerstar", "--rm", imported, "cat-1",
                   "cat", SAMPLE_TEXT_PATH)
    assert out == SAMPLE_TEXT.decode()
    # The layers were unpacked into committed snapshots of ours, named by chain id, with
    # the parent chain containerd computes.
    chains = chain_ids(sample_image.diff_ids)
    ours = our_snapshots(stack)
    assert ours[chains[0]].kind == pb.COMMITTED and ours[chains[0]].parent == ""
    assert ours[chains[1]].kind == pb.COMMITTED and name_of(ours[chains[1]].parent) == chains[0]
    # Usage of the busybox layer is at least busybox's size (it is in that layer).
    size = int(re.split(r"\s+", ctr.lines(*SN, "usage", "--b", chains[0])[1])[1])
    assert size >= Path("/bin/busybox").stat().st_size


def test_ctr_snapshots_prepare_mounts_usage_rm(stack: Stack, sample_image: SampleImage,
                                               imported: str) -> None:
    ctr = stack.containerd.ctr
    top = chain_ids(sample_image.diff_ids)[-1]
    ctr.run(*SN, "prepare", "work-1", top)
    mount = ctr.text(*SN, "mounts", "/mnt/x", "work-1").strip()
    m = re.fullmatch(r"mount -t overlay overlay /mnt/x -o (.*)", mount)
    assert m, mount
    opts = dict(o.split("=", 1) for o in m.group(1).split(",") if "=" in o)
    ours = {Path(p).parent.name for p in opts["lowerdir"].split(":")}
    assert len(ours) == 2 and Path(opts["upperdir"]).parent == Path(opts["workdir"]).parent
    assert Path(opts["upperdir"]).is_relative_to(stack.snapshotter.root)
    # Write into the upper dir: Usage of an active snapshot is measured live.
    (Path(opts["upperdir"]) / "blob").write_bytes(b"\x01" * (3 << 20))
    line = ctr.lines(*SN, "usage", "--b", "work-1")[1].split()
    assert line[0] == "work-1" and int(line[1]) >= 3 << 20 and int(line[2]) == 2
    ctr.run(*SN, "commit", "done-1", "work-1")
    assert name_of(our_snapshots(stack)["done-1"].parent) == top
    # containerd passes only `containerd.io/snapshot/`-prefixed labels to a snapshotter
    # (an Update with a field mask); other labels stay in its own metadata.
    ctr.run(*SN, "label", "done-1", "containerd.io/snapshot/team=peerstar", "plain=1")
    labels = dict(our_snapshots(stack)["done-1"].labels)
    assert labels.get("containerd.io/snapshot/team") == "peerstar" and "plain" not in labels
    ctr.run(*SN, "prepare", "child-1", "done-1")
    rm = ctr.run(*SN, "rm", "done-1", check=False)
    assert rm.returncode != 0 and b"with child" in rm.stderr
    ctr.run(*SN, "rm", "child-1")
    ctr.run(*SN, "rm", "done-1")
    # `ctr snapshots view` sets no gc.root label, so containerd's GC may remove the view
    # at any moment (and containerd 1.6's GC then leaves its parent believing it still
    # has a child): view the image's top layer, which nothing removes, and take the
    # mounts from the View call itself. Go's mount.Mount has no json tags.
    view = json.loads(ctr.text(*SN, "view", "--mounts", "view-1", top))
    assert [m["Type"] for m in view] == ["overlay"]
    lower = [o for o in view[0]["Options"] if o.startswith("lowerdir=")]
    assert lower == ["lowerdir=" + opts["lowerdir"]]  # the image's two layers, top first
    assert not any(o.startswith(("upperdir=", "workdir=")) for o in view[0]["Options"])
    # Removal in the backend happens later, in containerd's garbage collector (the gRPC
    # Remove itself is checked in test_grpc.py).


def test_harness_with_block_keeps_the_daemon_it_was_given(tmp_path: Path) -> None:
    """`with start_containerd(...)` uses the daemon already started and stops it at the
    end: no second daemon, none left running (a leak here once left containerd processes
    behind after every run of the mirror's credential tests)."""
    from tests.support.containerd import start_containerd

    ctrd = start_containerd(tmp_path / "ctrd")
    first = ctrd.process
    assert first is not None and first.poll() is None
    with ctrd as same:
        assert same is ctrd and ctrd.process is first
        assert ctrd.ctr.lines("namespaces", "ls", "-q", check=False) is not None
    assert first.poll() is not None and ctrd.process is None
