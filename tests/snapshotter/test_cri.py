"""End to end through containerd's real CRI plugin, the way a Kubernetes node pulls: a
containerd of its own with CRI enabled and configured as peerstar/snapshotter/README.md
says (`proxy_plugins.peerstar`, CRI `snapshotter = "peerstar"`,
`disable_snapshot_annotations = false`), images pulled with the CRI
`runtime.v1.ImageService/PullImage` call (tests/support/cri), then run with
`ctr -n k8s.io run` (a pod would need CNI and a pause image; the rootfs is the same).

An eStargz image must reach the snapshotter with CRI's labels (`cri.image-ref`,
`cri.layer-digest`, the TOC digest annotation), be mounted lazily and committed as
remote snapshots, its layer blobs never in containerd's content store; a plain gzip
image takes the fallback path; RemoveImage lets containerd's garbage collector remove
the snapshots, which ends the lazy mounts; layers already mounted by `ctr-remote`
in another namespace serve a CRI pull; concurrent CRI pulls of images sharing layers
mount each layer once; and the README's IPFS flow with CRI in
place of ctr-remote: `peerstar push --estargz` into the embedded store, `peerstar
registry serve`, CRI PullImage of `127.0.0.1:PORT/ipfs/<CID>:latest`. Also: the
committed CRI stubs are what tests/support/cri/protogen.py makes of its api.proto, and
the containerd config used here is the README's (not slow)."""

from __future__ import annotations

import json
import os
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from peerstar.snapshotter._proto import snapshots_pb2 as pb
from peerstar.snapshotter._proto import snapshots_pb2_grpc
from peerstar.source.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH
from tests.snapshotter.conftest import (
    REPO,
    SnapshotterProc,
    ipfs_bridge,
    mounts_under,
    running_stack,
)
from tests.snapshotter.test_lazy_pull import PushedLayer, push_image
from tests.support.containerd import (
    CRI_NAMESPACE,
    CRI_PLUGIN,
    Containerd,
    CriOptions,
    Ctr,
    render_config,
)
from tests.support.cri import protogen
from tests.support.cri.client import CriImages, api_pb2
from tests.support.registry import DockerRegistry
from tests.support.waiting import wait_until

REMOTE_LABEL = "containerd.io/snapshot/remote"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
# CRI as peerstar/snapshotter/README.md configures it (test_harness_config_is_the_readmes).
CRI_OPTIONS = CriOptions(snapshotter="peerstar", disable_snapshot_annotations=False)


@dataclass
class CriStack:
    snapshotter: SnapshotterProc
    containerd: Containerd
    images: CriImages  # the CRI image service on containerd's socket
    ctr: Ctr  # ctr in the CRI plugin's namespace, k8s.io


@contextmanager
def running_cri_stack(config_text: str) -> Iterator[CriStack]:
    with running_stack(config_text, cri=CRI_OPTIONS) as st:
        images = CriImages(st.containerd.address, timeout=120)
        try:
            yield CriStack(st.snapshotter, st.containerd, images,
                           Ctr(st.containerd.address, CRI_NAMESPACE))
        finally:
            images.close()


@pytest.fixture(scope="module")
def cri() -> Iterator[CriStack]:
    with running_cri_stack("[remote]\nprefetch_timeout = 5.0\nbackground_fetch = false\n"
                           ) as s:
        yield s


@dataclass
class Pushed:
    ref: str
    manifest_digest: str
    layers: list[PushedLayer]


def _push(reg: DockerRegistry, repo: str, *, estargz: bool) -> Pushed:
    layers = push_image(reg.url, repo, "v1", estargz=estargz)
    res = reg.get_manifest(repo, "v1")
    assert res.status == 200, res
    return Pushed(f"{reg.host}/{repo}:v1", res.headers["docker-content-digest"], layers)


@pytest.fixture(scope="module")
def estargz_image(docker_registry: DockerRegistry) -> Pushed:
    return _push(docker_registry, "snap/cri-lazy", estargz=True)


@pytest.fixture(scope="module")
def gzip_image(docker_registry: DockerRegistry) -> Pushed:
    return _push(docker_registry, "snap/cri-plain", estargz=False)


def backend_infos(stack: CriStack) -> list[pb.Info]:
    """Every snapshot as the peerstar snapshotter itself has it (labels it received)."""
    with grpc.insecure_channel(f"unix://{stack.snapshotter.address}") as ch:
        stub = snapshots_pb2_grpc.SnapshotsStub(ch)
        return [i for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info]


def remote_by_layer(stack: CriStack) -> dict[str, pb.Info]:
    """The snapshotter's remote snapshots, by the CRI layer digest label they came with."""
    return {i.labels[CRI_LAYER_DIGEST]: i for i in backend_infos(stack)
            if REMOTE_LABEL in i.labels}


def content_digests(stack: CriStack) -> set[str]:
    return {line.split()[0] for line in stack.ctr.lines("content", "ls")[1:]}


def containerd_snapshots(stack: CriStack) -> dict[str, dict[str, object]]:
    """containerd's own records of the peerstar snapshots in k8s.io (key -> info JSON)."""
    keys = [line.split()[0] for line in
            stack.ctr.lines("snapshots", "--snapshotter", "peerstar", "ls")[1:]]
    return {key: json.loads(stack.ctr.text("snapshots", "--snapshotter", "peerstar", "info",
                                           key)) for key in keys}


def run_cat(stack: CriStack, ref: str, name: str, path: str) -> str:
    cid = f"{name}-{os.getpid()}"  # runc state of k8s.io is machine-wide: unique ids
    return stack.ctr.text("run", "--snapshotter", "peerstar", "--rm", ref, cid, "cat", path)


@pytest.mark.slow
def test_cri_pull_mounts_estargz_layers_remotely(cri: CriStack, estargz_image: Pushed) -> None:
    img = estargz_image
    image_id = cri.images.pull(img.ref)
    # The snapshotter got CRI's labels for each layer and mounted both lazily.
    remote = remote_by_layer(cri)
    assert sorted(remote) == sorted(la.digest for la in img.layers), cri.snapshotter.log()
    for i, layer in enumerate(img.layers):
        labels = remote[layer.digest].labels
        assert remote[layer.digest].kind == pb.COMMITTED
        assert labels[REMOTE_LABEL] == "remote snapshot"
        assert labels[CRI_IMAGE_REF] == img.ref
        assert labels[CRI_MANIFEST_DIGEST] == img.manifest_digest
        # containerd lists this layer and the ones above it (what a snapshotter may prefetch).
        assert labels[CRI_IMAGE_LAYERS] == ",".join(la.digest for la in img.layers[i:])
        assert labels[TOC_DIGEST] == layer.toc_digest
        # ctr-remote's labels were not involved.
        assert not any(k.startswith("containerd.io/snapshot/remote/stargz.") for k in labels)
    fuse = mounts_under(cri.snapshotter.root)
    assert len(fuse) == 2 and all(Path(p).name == "fs" for p in fuse)
    # CRI's layer list on the first Prepare: the upper layer was resolved ahead.
    log = cri.snapshotter.log()
    assert f"layer {img.layers[1].digest} resolved ahead of its mount" in log, log[-3000:]
    # containerd records them as remote snapshots too (committed, under chain ids).
    recorded = containerd_snapshots(cri)
    remote_keys = {k for k, info in recorded.items()
                   if REMOTE_LABEL in (info.get("Labels") or {})}
    assert len(remote_keys) == 2, recorded
    assert all(recorded[k]["Kind"] == "Committed" for k in remote_keys)
    # The layer blobs never entered containerd's content store; manifest and config did.
    content = content_digests(cri)
    assert not content & {la.digest for la in img.layers}
    assert {img.manifest_digest, image_id} <= content
    # ImageStatus and ListImages report the image under its tag and digest.
    status = cri.images.status(img.ref)
    assert status.HasField("image")
    assert status.image.id == image_id
    assert list(status.image.repo_tags) == [img.ref]
    assert list(status.image.repo_digests) == [
        f"{img.ref.rsplit(':', 1)[0]}@{img.manifest_digest}"]
    assert status.image.size > 0
    assert [i.id for i in cri.images.list(img.ref)] == [image_id]
    # A container of the image reads its files through the lazy mounts.
    assert run_cat(cri, img.ref, "cri-lazy", SAMPLE_TEXT_PATH) == SAMPLE_TEXT.decode()
    assert run_cat(cri, img.ref, "cri-deep", "/opt/peerstar/tree/a/b/c/deep.txt") == \
        "deep in the tree\n"


@pytest.mark.slow
def test_cri_pull_of_plain_gzip_image_falls_back(cri: CriStack, gzip_image: Pushed) -> None:
    img = gzip_image
    before = set(remote_by_layer(cri))
    image_id = cri.images.pull(img.ref)
    assert set(remote_by_layer(cri)) == before  # nothing new went remote
    # containerd downloaded and unpacked the layers itself.
    assert {la.digest for la in img.layers} | {image_id} <= content_digests(cri)
    # The snapshotter saw CRI's layer labels and turned the layer down for the TOC digest.
    log = cri.snapshotter.log()
    for layer in img.layers:
        assert f"layer {layer.digest} has no {TOC_DIGEST} label (not eStargz)" in log
    assert cri.images.status(img.ref).image.id == image_id
    assert run_cat(cri, img.ref, "cri-plain", SAMPLE_TEXT_PATH) == SAMPLE_TEXT.decode()


@pytest.mark.slow
def test_cri_status_of_missing_image_and_remove_unmounts(
        cri: CriStack, estargz_image: Pushed) -> None:
    img = estargz_image
    missing = cri.images.status(img.ref.rsplit(":", 1)[0] + ":absent")
    assert not missing.HasField("image")
    image_id = cri.images.pull(img.ref)  # a no-op if the first test pulled it
    points = {info.name: info for info in remote_by_layer(cri).values()}
    assert len(points) == 2
    fuse_before = set(mounts_under(cri.snapshotter.root))
    assert len(fuse_before) >= 2
    cri.images.remove(img.ref)
    assert not cri.images.status(img.ref).HasField("image")
    assert image_id not in {i.id for i in cri.images.list()}
    cri.images.remove(img.ref)  # idempotent
    # containerd's garbage collector removes the image's snapshots from the backend;
    # removing a remote snapshot ends its lazy mount.
    assert wait_until(lambda: not set(remote_by_layer(cri)) & {la.digest for la in img.layers},
                      30, 0.2), (backend_infos(cri), cri.snapshotter.log()[-3000:])
    fuse_after = set(mounts_under(cri.snapshotter.root))
    assert len(fuse_before - fuse_after) == 2 and not fuse_after - fuse_before


@pytest.mark.slow
def test_layers_rpulled_in_another_namespace_serve_the_cri_pull(
        estargz_image: Pushed) -> None:
    """A node where `ctr-remote image rpull` already mounted the image (namespace of the
    harness) and the kubelet then pulls it (k8s.io): the CRI pull reuses the lazy mounts
    (one per layer, no new mount), and removing it on one side keeps them for the other."""
    img = estargz_image
    with running_cri_stack("[remote]\nbackground_fetch = false\n") as st:
        st.containerd.ctr.remote("image", "rpull", "--plain-http", "--snapshotter",
                                 "peerstar", img.ref)
        fuse = mounts_under(st.snapshotter.root)
        names = sorted(i.name for i in backend_infos(st))
        assert len(fuse) == 2 and len(names) == 2
        image_id = st.images.pull(img.ref)
        assert sorted(i.name for i in backend_infos(st)) == names
        assert mounts_under(st.snapshotter.root) == fuse
        assert st.snapshotter.log().count("mounted lazily") == 2
        assert run_cat(st, img.ref, "cri-shared", SAMPLE_TEXT_PATH) == SAMPLE_TEXT.decode()
        assert not content_digests(st) & {la.digest for la in img.layers}
        st.images.remove(img.ref)
        assert image_id not in {i.id for i in st.images.list()}
        # The harness namespace still holds the image: its layers stay mounted and run.
        time.sleep(2)  # give containerd's garbage collector the time to act (it must not)
        assert sorted(i.name for i in backend_infos(st)) == names
        assert mounts_under(st.snapshotter.root) == fuse
        out = st.containerd.ctr.text("run", "--snapshotter", "peerstar", "--rm", img.ref,
                                     "rpulled", "cat", SAMPLE_TEXT_PATH)
        assert out == SAMPLE_TEXT.decode()
        st.containerd.ctr.run("images", "rm", "--sync", img.ref)
        assert wait_until(lambda: not backend_infos(st) and not mounts_under(st.snapshotter.root),
                          30, 0.2), st.snapshotter.log()[-3000:]


@pytest.mark.slow
def test_concurrent_cri_pulls_of_images_sharing_layers(docker_registry: DockerRegistry) -> None:
    """The kubelet with parallel image pulls: three images with the same layers pulled at
    once through CRI: one lazy mount per layer, no mount left over, every image runs."""
    imgs = [_push(docker_registry, f"snap/cri-shared{i}", estargz=True) for i in range(3)]
    assert len({tuple(la.digest for la in im.layers) for im in imgs}) == 1
    with running_cri_stack("[remote]\nbackground_fetch = false\n") as st:
        results: dict[str, str | BaseException] = {}

        def pull(ref: str) -> None:
            try:
                results[ref] = st.images.pull(ref)
            except BaseException as exc:  # reported by the assertion below
                results[ref] = exc

        threads = [threading.Thread(target=pull, args=(im.ref,)) for im in imgs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert len({str(v) for v in results.values()}) == 1, results  # one image id
        assert str(results[imgs[0].ref]).startswith("sha256:"), results
        assert sorted(remote_by_layer(st)) == sorted(la.digest for la in imgs[0].layers)
        assert len(backend_infos(st)) == 2  # no leftover active snapshot
        assert len(mounts_under(st.snapshotter.root)) == 2
        for k, im in enumerate(imgs):
            assert run_cat(st, im.ref, f"cri-shared{k}", SAMPLE_TEXT_PATH) == \
                SAMPLE_TEXT.decode()


@pytest.mark.slow
def test_cri_pull_from_the_ipfs_registry_bridge(cri: CriStack, tmp_path: Path) -> None:
    extra_mib = 8
    with ipfs_bridge(tmp_path, extra_mib) as bridge:
        cid, port, ref = bridge.cid, bridge.port, bridge.ref
        before = set(remote_by_layer(cri))
        image_id = cri.images.pull(ref)
        new = {d: i for d, i in remote_by_layer(cri).items() if d not in before}
        assert len(new) == 2, cri.snapshotter.log()[-3000:]
        assert all(i.labels[CRI_IMAGE_REF] == ref for i in new.values())
        # The bridge serves the manifest without nerdctl's `urls: ["ipfs://<cid>"]` (they
        # would make containers/image skip the layers as foreign), and CRI passes no URL
        # labels anyway: the blob is located by reference + digest.
        manifest = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/ipfs/{cid}/manifests/latest",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}),
            timeout=10).read())
        assert {la["digest"] for la in manifest["layers"]} == set(new)
        assert not any("urls" in la for la in manifest["layers"])
        assert not [k for i in new.values() for k in i.labels
                    if k.startswith("containerd.io/snapshot/remote/")]
        assert cri.images.status(ref).image.id == image_id
        assert run_cat(cri, ref, "cri-ipfs", SAMPLE_TEXT_PATH) == SAMPLE_TEXT.decode()
        content = content_digests(cri)
        assert not content & set(new)
    # The bridge served the layers in ranges only, far less than the image.
    entries = bridge.access_log()
    layer_reads = [e for e in entries if e["path"].rsplit("/", 1)[1] in new]
    assert layer_reads, entries
    assert all(e["range"] for e in layer_reads if e["method"] == "GET"), layer_reads
    served = sum(e["bytes"] for e in layer_reads)
    assert 0 < served < (extra_mib << 20) // 4, served


def test_cri_stubs_are_up_to_date(tmp_path: Path) -> None:
    written = protogen.generate(out_root=tmp_path)
    assert [p.name for p in written] == ["api_pb2.py", "api_pb2_grpc.py"]
    committed = Path(protogen.__file__).parent
    for path in written:
        assert path.read_bytes() == (committed / path.name).read_bytes(), path.name
    # The names on the wire are the kubelet's: method paths and message fields by number.
    service = api_pb2.DESCRIPTOR.services_by_name["ImageService"]
    assert service.full_name == "runtime.v1.ImageService"
    assert [m.name for m in service.methods] == [
        "ListImages", "ImageStatus", "PullImage", "RemoveImage"]
    fields = {f.name: f.number for f in api_pb2.Image.DESCRIPTOR.fields}
    assert fields == {"id": 1, "repo_tags": 2, "repo_digests": 3, "size": 4, "uid": 5,
                      "username": 6, "spec": 7}
    assert {f.name: f.number for f in api_pb2.PullImageRequest.DESCRIPTOR.fields} == {
        "image": 1, "auth": 2}


def test_harness_config_is_the_readmes() -> None:
    """The containerd configuration these tests run with is the README's snippet."""
    text = (REPO / "peerstar" / "snapshotter" / "README.md").read_text()
    section = text.split("## containerd `config.toml`", 1)[1]
    readme = tomllib.loads(section.split("```toml\n", 1)[1].split("```", 1)[0])
    socket = readme["proxy_plugins"]["peerstar"]["address"]
    ours = tomllib.loads(render_config(Path("/tmp/x"), proxy_plugins={"peerstar": socket},
                                       cri=CRI_OPTIONS))
    assert ours["version"] == readme["version"] == 2
    assert ours["proxy_plugins"] == readme["proxy_plugins"]
    assert ours["plugins"][CRI_PLUGIN]["containerd"] == \
        readme["plugins"][CRI_PLUGIN]["containerd"] == {
            "snapshotter": "peerstar", "disable_snapshot_annotations": False}
    assert CRI_PLUGIN not in ours.get("disabled_plugins", [])
