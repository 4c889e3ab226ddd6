"""Snapshot semantics without containerd: mounts, commit/usage, remove, update, list
filters, cleanup, config, label parsing, and the remote handshake with a fake mounter."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from peerstar.lazyfs import MountError
from peerstar.snapshotter.config import ConfigError, RemoteConfig, load_config, parse_config
from peerstar.snapshotter.core import Mount, Snapshotter
from peerstar.snapshotter.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from peerstar.snapshotter.filters import compile_filters, parse_filter
from peerstar.snapshotter.metadata import Kind
from peerstar.snapshotter.remote import (
    LABEL_REF,
    LABEL_REMOTE,
    LABEL_STARGZ_DIGEST,
    LABEL_STARGZ_REFERENCE,
    LABEL_TOC_DIGEST,
    NotRemote,
    RemoteLayer,
    mount_options,
    parse_image_reference,
    remote_layer_from_labels,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
TOC = "sha256:" + "a" * 64


class FakeMounter:
    """Records mounts; `fail` makes mount raise like a failed lazyfs mount."""

    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.mounted: dict[Path, RemoteLayer] = {}
        self.calls: list[tuple[str, Path]] = []
        self.ahead: list[tuple[str, list[str]]] = []

    def resolve_ahead(self, layer: RemoteLayer, digests: Iterable[str]) -> int:
        self.ahead.append((layer.digest, list(digests)))
        return len(self.ahead[-1][1])

    def mount(self, layer: RemoteLayer, mountpoint: Path) -> dict[str, Any]:
        self.calls.append(("mount", Path(mountpoint)))
        if self.fail:
            raise MountError(self.fail)
        self.mounted[Path(mountpoint)] = layer
        (Path(mountpoint) / "from-remote").write_text(layer.digest)
        return {"pid": 1, "size": 4242}

    def is_mounted(self, mountpoint: Path) -> bool:
        return Path(mountpoint) in self.mounted

    def unmount(self, mountpoint: Path) -> None:
        self.calls.append(("unmount", Path(mountpoint)))
        self.mounted.pop(Path(mountpoint), None)


@pytest.fixture
def sn(tmp_path: Path) -> Snapshotter:
    s = Snapshotter(tmp_path / "root", RemoteConfig(), mounter=FakeMounter())  # type: ignore[arg-type]
    yield s
    s.close()


def _fs(sn: Snapshotter, key: str) -> Path:
    return sn.fs_path(sn.stat(key))


def _idx(sn: Snapshotter) -> list[str]:
    return ["index=off"] if sn.index_off else []


def test_overlay_mount_semantics(sn: Snapshotter) -> None:
    # No parent: rw bind of its own dir.
    assert sn.prepare("a", "", {}) == [Mount("bind", str(_fs(sn, "a")), ("rw", "rbind"))]
    (_fs(sn, "a") / "f").write_bytes(b"x" * 10000)
    sn.commit("base", "a", {"l": "1"})
    # One parent, active: overlay with upper/work and the parent as the only lowerdir.
    m = sn.prepare("b", "base", {})
    fs_b = _fs(sn, "b")
    assert m == [Mount("overlay", "overlay", tuple(_idx(sn) + [
        f"workdir={fs_b.parent / 'work'}", f"upperdir={fs_b}",
        f"lowerdir={_fs(sn, 'base')}"]))]
    sn.commit("top", "b", {})
    # View of one parent: ro bind of the parent's dir.
    assert sn.view("v1", "base", {}) == [Mount("bind", str(_fs(sn, "base")), ("ro", "rbind"))]
    # View of two layers: overlay of lowerdirs only, nearest parent first.
    assert sn.view("v2", "top", {}) == [Mount("overlay", "overlay", tuple(_idx(sn) + [
        f"lowerdir={_fs(sn, 'top')}:{_fs(sn, 'base')}"]))]
    # View without parent: ro bind of its own (empty) dir.
    assert sn.view("v0", "", {}) == [Mount("bind", str(_fs(sn, "v0")), ("ro", "rbind"))]
    with pytest.raises(NotFound):  # committing moved the snapshot from key "b" to "top"
        sn.mounts("b")
    assert sn.stat("top").kind == Kind.COMMITTED and sn.stat("v2").kind == Kind.VIEW


def test_mounts_of_missing_key_and_commit_rules(sn: Snapshotter) -> None:
    with pytest.raises(NotFound):
        sn.mounts("nope")
    sn.prepare("a", "", {})
    with pytest.raises(AlreadyExists):
        sn.prepare("a", "", {})
    with pytest.raises(NotFound):
        sn.prepare("c", "missing-parent", {})
    with pytest.raises(FailedPrecondition):  # the parent must be committed
        sn.prepare("c", "a", {})
    sn.view("v", "", {})
    with pytest.raises(FailedPrecondition):  # only active snapshots commit
        sn.commit("x", "v", {})
    with pytest.raises(InvalidArgument):
        sn.prepare("big", "", {"k": "v" * 5000})
    with pytest.raises(InvalidArgument):
        sn.prepare("", "", {})


def test_commit_usage_and_active_usage(sn: Snapshotter) -> None:
    sn.prepare("a", "", {})
    fs = _fs(sn, "a")
    (fs / "d").mkdir()
    (fs / "d" / "f").write_bytes(os.urandom(100_000))
    os.link(fs / "d" / "f", fs / "hard")  # same inode: counted once
    size, inodes = sn.usage("a")
    blocks = os.stat(fs / "d" / "f").st_blocks * 512
    assert inodes == 3  # fs, d, f (hard shares f's inode)
    assert size == blocks + os.stat(fs).st_blocks * 512 + os.stat(fs / "d").st_blocks * 512
    sn.commit("c", "a", {})
    assert sn.usage("c") == (size, inodes)
    assert not (fs.parent / "work").exists()  # committed: no work dir left


def test_remove_children_and_cleanup(sn: Snapshotter) -> None:
    sn.prepare("a", "", {})
    sn.commit("base", "a", {})
    sn.prepare("child", "base", {})
    base_dir = _fs(sn, "base").parent
    with pytest.raises(FailedPrecondition):
        sn.remove("base")
    child_dir = _fs(sn, "child").parent
    sn.remove("child")
    assert not child_dir.exists()
    sn.remove("base")
    assert not base_dir.exists()
    with pytest.raises(NotFound):
        sn.remove("base")
    stray = sn.root / "snapshots" / "999"
    (stray / "fs").mkdir(parents=True)
    sn.prepare("keep", "", {})
    sn.cleanup()
    assert not stray.exists() and _fs(sn, "keep").is_dir()


def test_update_labels_with_and_without_mask(sn: Snapshotter) -> None:
    sn.prepare("a", "", {"x": "1", "y": "2"})
    assert sn.update("a", {"y": "20", "z": "3"}, ["labels.y"]).labels == {"x": "1", "y": "20"}
    assert sn.update("a", {}, ["labels.x"]).labels == {"y": "20"}  # empty value deletes
    assert sn.update("a", {"n": "1"}, []).labels == {"n": "1"}  # no mask: replace all
    assert sn.update("a", {"m": "2"}, ["labels"]).labels == {"m": "2"}
    with pytest.raises(InvalidArgument):
        sn.update("a", {}, ["parent"])
    assert sn.stat("a").updated >= sn.stat("a").created


def test_metadata_survives_reopen(tmp_path: Path) -> None:
    s1 = Snapshotter(tmp_path / "r", mounter=FakeMounter())  # type: ignore[arg-type]
    s1.prepare("a", "", {"k": "v"})
    s1.commit("c", "a", {"k2": "v2"})
    s1.prepare("b", "c", {})
    created = s1.stat("c").created
    s1.close()
    s2 = Snapshotter(tmp_path / "r", mounter=FakeMounter())  # type: ignore[arg-type]
    info = s2.stat("c")
    assert (info.kind, info.labels, info.created) == (Kind.COMMITTED, {"k2": "v2"}, created)
    assert s2.stat("b").parent == "c"
    assert [s.key for s in s2.list([])] == ["c", "b"]
    s2.close()


def test_filters(sn: Snapshotter) -> None:
    sn.prepare("a", "", {"containerd.io/snapshot.ref": "sha256:abc", "team": "x"})
    sn.commit("sha256:abc", "a", {"containerd.io/snapshot.ref": "sha256:abc"})
    sn.prepare("b", "sha256:abc", {"team": "y"})
    sn.view("v", "", {})

    def keys(*filters: str) -> list[str]:
        return [s.key for s in sn.list(list(filters))]

    assert keys() == ["sha256:abc", "b", "v"]
    assert keys('labels."containerd.io/snapshot.ref"==sha256:abc,parent==""') == ["sha256:abc"]
    assert keys('labels."containerd.io/snapshot.ref"==sha256:abc,parent=="x"') == []
    assert keys("kind==active", "kind==view") == ["b", "v"]
    assert keys("labels.team") == ["b"]
    assert keys("labels.team!=y") == ["sha256:abc", "v"]
    assert keys("name~=^s") == ["sha256:abc"]
    assert keys('parent=="sha256:abc"') == ["b"]
    assert parse_filter('labels."a.b"==c')[0].path == ("labels", "a.b")
    with pytest.raises(InvalidArgument):
        compile_filters(['labels."unterminated==x'])
    with pytest.raises(InvalidArgument):
        compile_filters(["name==a b"])


def test_config_file_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('root = "/srv/ps"\nmetrics_address = "127.0.0.1:9999"\n'
                 "[remote]\nprefetch_timeout = 3\nverify = false\nregion_size = 4096\n"
                 'insecure_hosts = ["reg.local:5000"]\n')
    cfg = load_config(f, address=tmp_path / "s.sock")
    assert cfg.root == Path("/srv/ps") and cfg.address == tmp_path / "s.sock"
    assert cfg.metrics_address == "127.0.0.1:9999"
    assert (cfg.remote.prefetch_timeout, cfg.remote.verify, cfg.remote.region_size) == (
        3.0, False, 4096)
    assert load_config(f, root=tmp_path).root == tmp_path  # flag wins over the file
    with pytest.raises(ConfigError, match="remote.prefetch_timout"):
        parse_config({"remote": {"prefetch_timout": 1}})
    with pytest.raises(ConfigError, match="verify"):
        parse_config({"remote": {"verify": 1}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    f.write_text("root = [")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(f)


def test_cache_bounds_default_to_a_share_of_the_disk(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    disk = st.f_blocks * st.f_frsize
    cache_dir = tmp_path / "root" / "cache"  # not there yet: its disk is tmp_path's
    opts = mount_options(RemoteConfig(), cache_dir).cache
    assert opts.region_bytes == opts.chunk_bytes == int(disk * 0.10) > 0
    cfg = parse_config({"remote": {"region_cache_bytes": 0, "chunk_cache_bytes": "2.5%"}})
    opts = mount_options(cfg.remote, cache_dir).cache
    assert (opts.region_bytes, opts.chunk_bytes) == (0, int(disk * 0.025))
    assert mount_options(parse_config({"remote": {"chunk_cache_bytes": 1 << 30}}).remote,
                         cache_dir).cache.chunk_bytes == 1 << 30
    for bad in ("10", "0%", "101%", "ten%", -1, True, 1.5):
        with pytest.raises(ConfigError, match=r"remote.chunk_cache_bytes.*10%.*got"):
            parse_config({"remote": {"chunk_cache_bytes": bad}})


def _stargz_labels(ref: str = "127.0.0.1:5000/sample/img:latest") -> dict[str, str]:
    return {LABEL_REF: "sha256:chain1", LABEL_STARGZ_REFERENCE: ref,
            LABEL_STARGZ_DIGEST: D1, LABEL_TOC_DIGEST: TOC,
            "containerd.io/snapshot/remote/stargz.prefetch": "1000"}


def test_labels_to_layer_urls() -> None:
    cfg = RemoteConfig()
    layer = remote_layer_from_labels(_stargz_labels(), cfg)
    assert layer.url == f"http://127.0.0.1:5000/v2/sample/img/blobs/{D1}"
    assert (layer.toc_digest, layer.prefetch_size) == (TOC, 1000)
    https = remote_layer_from_labels(_stargz_labels("ghcr.io/o/i:1@" + D2), cfg)
    assert https.url == f"https://ghcr.io/v2/o/i/blobs/{D1}"
    cri = remote_layer_from_labels({
        LABEL_REF: "c", "containerd.io/snapshot/cri.image-ref": "localhost:5050/ipfs/bafy:x",
        "containerd.io/snapshot/cri.layer-digest": D2, LABEL_TOC_DIGEST: TOC}, cfg)
    assert cri.url == f"http://localhost:5050/v2/ipfs/bafy/blobs/{D2}"
    assert parse_image_reference("busybox").host == "registry-1.docker.io"
    assert parse_image_reference("busybox:1").repository == "library/busybox"
    assert parse_image_reference("reg.local:5000/a/b").host == "reg.local:5000"
    insecure = RemoteConfig(insecure_hosts=["reg.local:5000"])
    assert remote_layer_from_labels(_stargz_labels("reg.local:5000/a:b"),
                                    insecure).url.startswith("http://reg.local:5000/")
    no_toc = _stargz_labels()
    del no_toc[LABEL_TOC_DIGEST]
    with pytest.raises(NotRemote, match="not eStargz"):
        remote_layer_from_labels(no_toc, cfg)
    with pytest.raises(NotRemote, match="no image reference"):
        remote_layer_from_labels({LABEL_REF: "c"}, cfg)
    with pytest.raises(NotRemote, match="disabled"):
        remote_layer_from_labels(_stargz_labels(), RemoteConfig(enable=False))


def test_remote_handshake_commits_under_ref(sn: Snapshotter) -> None:
    labels = _stargz_labels()
    with pytest.raises(AlreadyExists):
        sn.prepare("ns/1/extract-x", "", labels)
    info = sn.stat("sha256:chain1")
    assert info.kind == Kind.COMMITTED and info.parent == ""
    assert info.labels[LABEL_REMOTE] == "remote snapshot"
    assert info.labels[LABEL_REF] == "sha256:chain1"
    assert info.remote is not None and info.remote["digest"] == D1
    with pytest.raises(NotFound):  # the active key became the committed one
        sn.stat("ns/1/extract-x")
    # containerd's follow-up query finds exactly it.
    found = sn.list(['labels."containerd.io/snapshot.ref"==sha256:chain1,parent==""'])
    assert [s.key for s in found] == ["sha256:chain1"]
    assert (_fs(sn, "sha256:chain1") / "from-remote").read_text() == D1
    # A container on top: the lazy layer is a lowerdir like any other.
    m = sn.prepare("ctr", "sha256:chain1", {})
    assert m[0].options[-1] == f"lowerdir={_fs(sn, 'sha256:chain1')}"
    # The same layer again (another image): AlreadyExists without a second mount.
    mounts_before = len(sn.mounter.calls)  # type: ignore[attr-defined]
    with pytest.raises(AlreadyExists):
        sn.prepare("ns/1/extract-y", "", labels)
    assert len(sn.mounter.calls) == mounts_before  # type: ignore[attr-defined]
    # Remove unmounts the layer.
    sn.remove("ctr")
    fs = _fs(sn, "sha256:chain1")
    sn.remove("sha256:chain1")
    assert ("unmount", fs) in sn.mounter.calls  # type: ignore[attr-defined]


def test_remote_failure_falls_back_to_normal_snapshot(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    sn = Snapshotter(tmp_path / "r", mounter=FakeMounter(fail="TOC digest mismatch"))  # type: ignore[arg-type]
    with caplog.at_level("INFO", logger="peerstar.snapshotter"):
        m = sn.prepare("k", "", _stargz_labels())
        assert m == [Mount("bind", str(_fs(sn, "k")), ("rw", "rbind"))]
        assert sn.stat("k").kind == Kind.ACTIVE
        assert "TOC digest mismatch" in caplog.text and "falling back" in caplog.text
        # Not an eStargz layer: normal snapshot, and the log says why.
        labels = _stargz_labels()
        del labels[LABEL_TOC_DIGEST]
        sn.prepare("k2", "", labels)
        assert "not eStargz" in caplog.text
    assert sn.stat("k2").kind == Kind.ACTIVE
    sn.close()


def test_restore_remote_mounts_after_restart(tmp_path: Path) -> None:
    m1 = FakeMounter()
    s1 = Snapshotter(tmp_path / "r", mounter=m1)  # type: ignore[arg-type]
    with pytest.raises(AlreadyExists):
        s1.prepare("k", "", _stargz_labels())
    labels = _stargz_labels()
    labels[LABEL_REF] = "sha256:chain2"
    labels[LABEL_STARGZ_DIGEST] = D2
    with pytest.raises(AlreadyExists):
        s1.prepare("k2", "sha256:chain1", labels)
    s1.close()
    m2 = FakeMounter()
    s2 = Snapshotter(tmp_path / "r", mounter=m2)  # type: ignore[arg-type]
    # chain1's mount survived the restart (daemon alive); chain2's did not.
    m2.mounted[s2.fs_path(s2.stat("sha256:chain1"))] = m1.mounted[
        s2.fs_path(s2.stat("sha256:chain1"))]
    result = s2.restore_remote_mounts()
    assert result == {"sha256:chain1": "alive", "sha256:chain2": "remounted"}
    assert m2.mounted[s2.fs_path(s2.stat("sha256:chain2"))].digest == D2
    m2.fail = "registry down"
    m2.mounted.clear()
    assert s2.restore_remote_mounts()["sha256:chain1"] == "failed: registry down"
    s2.close()


def test_remote_layer_size_is_kept_for_mounting_again(tmp_path: Path) -> None:
    """The size the mount learnt is stored with the snapshot and handed to the next mount
    (after a reboot it then needs no request); a snapshot stored without one gets it."""
    m = FakeMounter()
    sn = Snapshotter(tmp_path / "r", mounter=m)  # type: ignore[arg-type]
    with pytest.raises(AlreadyExists):
        sn.prepare("k", "", _stargz_labels())
    snap = sn.stat("sha256:chain1")
    assert snap.remote is not None and snap.remote["size"] == 4242
    m.mounted.clear()
    assert sn.restore_remote_mounts() == {"sha256:chain1": "remounted"}
    assert m.mounted[sn.fs_path(snap)].size == 4242
    old = dict(snap.remote)
    del old["size"]  # as committed by an older snapshotter
    sn.meta.set_remote("sha256:chain1", old)
    assert RemoteLayer.from_json(old).size is None
    m.mounted.clear()
    sn.restore_remote_mounts()
    assert sn.stat("sha256:chain1").remote["size"] == 4242  # type: ignore[index]
    sn.close()


def test_unmountable_remote_parent_fails_prepare_and_view(tmp_path: Path) -> None:
    """A lazy parent layer whose mount is gone and cannot be made again: the call fails
    saying which layer (never an overlay over its empty directory), and leaves nothing."""
    m = FakeMounter()
    sn = Snapshotter(tmp_path / "r", mounter=m)  # type: ignore[arg-type]
    with pytest.raises(AlreadyExists):
        sn.prepare("k", "", _stargz_labels())
    m.mounted.clear()
    m.fail = "registry unreachable"
    for call in (sn.prepare, sn.view):
        with pytest.raises(FailedPrecondition) as exc:
            call("ctr", "sha256:chain1", {})
        assert str(exc.value) == (
            f"lazily pulled layer {D1} (snapshot sha256:chain1) is not mounted and cannot "
            "be mounted again: registry unreachable; it starts once its registry is "
            "reachable")
        assert [s.key for s in sn.list([])] == ["sha256:chain1"]
    m.fail = ""
    assert sn.prepare("ctr", "sha256:chain1", {})[0].type == "overlay"
    assert (sn.fs_path(sn.stat("sha256:chain1")) / "from-remote").read_text() == D1
    sn.close()


def test_prepare_resolves_the_images_other_layers_ahead(sn: Snapshotter) -> None:
    labels = _stargz_labels()
    labels["containerd.io/snapshot/remote/stargz.layers"] = f"{D1},{D2}"
    with pytest.raises(AlreadyExists):
        sn.prepare("ns/1/extract-x", "", labels)
    assert sn.mounter.ahead == [(D1, [D1, D2])]  # type: ignore[attr-defined]
    # A layer that does not go remote resolves nothing ahead.
    plain = {LABEL_REF: "sha256:chain9", "containerd.io/snapshot/remote/stargz.layers": D2}
    sn.prepare("ns/1/extract-y", "", plain)
    assert len(sn.mounter.ahead) == 1  # type: ignore[attr-defined]
