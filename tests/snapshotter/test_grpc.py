"""The gRPC surface, called with the generated client stub over the unix socket of an
in-process server: every method, and the status codes containerd maps back to errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from peerstar.snapshotter._proto import snapshots_pb2 as pb
from peerstar.snapshotter._proto import snapshots_pb2_grpc
from peerstar.snapshotter.config import SnapshotterConfig
from peerstar.snapshotter.service import start_server
from tests.snapshotter.test_core import FakeMounter, _stargz_labels


@pytest.fixture
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[snapshots_pb2_grpc.SnapshotsStub]:
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="pss-grpc-", dir="/tmp"))
    cfg = SnapshotterConfig(address=base / "s.sock", root=base / "root")
    from peerstar.snapshotter.core import Snapshotter

    core = Snapshotter(cfg.root, cfg.remote, mounter=FakeMounter())  # type: ignore[arg-type]
    server, _ = start_server(cfg, core)
    channel = grpc.insecure_channel(f"unix://{cfg.address}")
    try:
        yield snapshots_pb2_grpc.SnapshotsStub(channel)
    finally:
        channel.close()
        server.stop(None).wait()
        core.close()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def _code(fn, *args) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as exc:
        fn(*args)
    return exc.value.code()


def test_lifecycle_over_grpc(stub: snapshots_pb2_grpc.SnapshotsStub) -> None:
    r = stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="peerstar", key="a",
                                               labels={"x": "1"}))
    assert [(m.type, list(m.options)) for m in r.mounts] == [("bind", ["rw", "rbind"])]
    assert r.mounts[0].source.endswith("/snapshots/1/fs")
    Path(r.mounts[0].source, "file").write_bytes(b"z" * 8192)
    stub.Commit(pb.CommitSnapshotRequest(name="base", key="a", labels={"y": "2"}))
    info = stub.Stat(pb.StatSnapshotRequest(key="base")).info
    assert (info.name, info.parent, info.kind, dict(info.labels)) == (
        "base", "", pb.COMMITTED, {"y": "2"})
    assert info.created_at.ToNanoseconds() > 0
    assert info.updated_at.ToNanoseconds() >= info.created_at.ToNanoseconds()
    usage = stub.Usage(pb.UsageRequest(key="base"))
    assert usage.size >= 8192 and usage.inodes == 2
    v = stub.View(pb.ViewSnapshotRequest(key="v", parent="base"))
    assert [(m.type, m.source, list(m.options)) for m in v.mounts] == [
        ("bind", r.mounts[0].source, ["ro", "rbind"])]
    p = stub.Prepare(pb.PrepareSnapshotRequest(key="b", parent="base"))
    assert p.mounts[0].type == "overlay"
    assert f"lowerdir={r.mounts[0].source}" in p.mounts[0].options
    assert stub.Mounts(pb.MountsRequest(key="b")).mounts == p.mounts
    upd = stub.Update(pb.UpdateSnapshotRequest(
        info=pb.Info(name="b", labels={"k": "v", "other": "o"}),
        update_mask=field_mask_pb2.FieldMask(paths=["labels.k"])))
    assert dict(upd.info.labels) == {"k": "v"}
    listed = [i for resp in stub.List(pb.ListSnapshotsRequest(filters=["kind==active"]))
              for i in resp.info]
    assert [(i.name, i.parent, i.kind) for i in listed] == [("b", "base", pb.ACTIVE)]
    all_names = [i.name for resp in stub.List(pb.ListSnapshotsRequest()) for i in resp.info]
    assert all_names == ["base", "v", "b"]
    assert _code(stub.Remove, pb.RemoveSnapshotRequest(key="base")) == \
        grpc.StatusCode.FAILED_PRECONDITION
    stub.Remove(pb.RemoveSnapshotRequest(key="b"))
    stub.Remove(pb.RemoveSnapshotRequest(key="v"))
    stub.Remove(pb.RemoveSnapshotRequest(key="base"))
    stub.Cleanup(pb.CleanupRequest())
    assert _code(stub.Stat, pb.StatSnapshotRequest(key="base")) == grpc.StatusCode.NOT_FOUND


def test_error_codes(stub: snapshots_pb2_grpc.SnapshotsStub) -> None:
    stub.Prepare(pb.PrepareSnapshotRequest(key="a"))
    assert _code(stub.Prepare, pb.PrepareSnapshotRequest(key="a")) == \
        grpc.StatusCode.ALREADY_EXISTS
    assert _code(stub.Mounts, pb.MountsRequest(key="zz")) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda r: list(stub.List(r)), pb.ListSnapshotsRequest(filters=['name=="x'])) \
        == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert _code(stub.Update, pb.UpdateSnapshotRequest(
        info=pb.Info(name="a"), update_mask=field_mask_pb2.FieldMask(paths=["kind"]))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert _code(stub.Prepare, pb.PrepareSnapshotRequest(key="c", parent="a")) == \
        grpc.StatusCode.FAILED_PRECONDITION


def test_remote_prepare_answers_already_exists(stub: snapshots_pb2_grpc.SnapshotsStub) -> None:
    labels = _stargz_labels()
    assert _code(stub.Prepare, pb.PrepareSnapshotRequest(key="ns/extract", labels=labels)) \
        == grpc.StatusCode.ALREADY_EXISTS
    # What containerd's metadata layer asks next, verbatim.
    flt = 'labels."containerd.io/snapshot.ref"==sha256:chain1,parent==""'
    infos = [i for r in stub.List(pb.ListSnapshotsRequest(filters=[flt])) for i in r.info]
    assert [(i.name, i.kind, i.labels["containerd.io/snapshot/remote"]) for i in infos] == [
        ("sha256:chain1", pb.COMMITTED, "remote snapshot")]
