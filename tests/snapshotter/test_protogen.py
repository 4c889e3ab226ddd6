"""The committed stubs are exactly what protogen makes from Debian's containerd protos,
and carry the wire names containerd calls."""

from __future__ import annotations

from pathlib import Path

from peerstar.snapshotter import protogen
from peerstar.snapshotter._proto import snapshots_pb2

COMMITTED = Path(protogen.__file__).parent / "_proto"


def test_stubs_are_up_to_date(tmp_path: Path) -> None:
    written = protogen.generate(out_root=tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["__init__.py", "mount_pb2.py", "mount_pb2_grpc.py", "snapshots_pb2.py",
                     "snapshots_pb2_grpc.py"]
    for path in written:
        assert path.read_text() == (COMMITTED / path.name).read_text(), path.name


def test_gogoproto_stripped_and_names_kept() -> None:
    text = ('import weak "gogoproto/gogo.proto";\nenum Kind {\n'
            '\toption (gogoproto.goproto_enum_prefix) = false;\n'
            '\tUNKNOWN = 0 [(gogoproto.enumvalue_customname) = "KindUnknown"];\n}\n'
            'message Info {\n\tgoogle.protobuf.Timestamp created_at = 4 '
            '[(gogoproto.stdtime) = true, (gogoproto.nullable) = false];\n}\n')
    assert protogen.strip_gogo(text) == ('enum Kind {\n\tUNKNOWN = 0;\n}\nmessage Info {\n'
                                         '\tgoogle.protobuf.Timestamp created_at = 4;\n}\n')
    service = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert service.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert [m.name for m in service.methods] == [
        "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage",
        "Cleanup"]
    assert snapshots_pb2.PrepareSnapshotResponse.DESCRIPTOR.fields_by_name[
        "mounts"].message_type.full_name == "containerd.types.Mount"
