"""Tests of peerstar.source.sample: layout validity, determinism, and that real tools accept it
(skopeo for OCI layouts and docker archives, containerd import + run)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from peerstar.errors import PeerstarError
from peerstar.oci import mediatypes as mt
from peerstar.oci.platform import host_platform
from peerstar.source.sample import (
    SAMPLE_TEXT,
    SAMPLE_TEXT_PATH,
    LayerEntry,
    SampleImage,
    build_layer_tar,
    build_sample_docker_archive,
    build_sample_image,
    write_oci_archive,
)
from tests.support.containerd import Containerd, HarnessError, require_binaries
from tests.support.content import sha256_digest


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def _tar_names(tar_bytes: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return tar.getnames()


def _need(*names: str) -> dict[str, str]:
    try:
        return require_binaries(*names)
    except HarnessError as exc:
        failure = str(exc)
    pytest.fail(failure, pytrace=False)  # outside except: no chained traceback


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_layout_is_valid_oci(sample_image: SampleImage) -> None:
    layout = sample_image.path
    assert json.loads((layout / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_bytes())
    assert index["schemaVersion"] == 2
    [entry] = index["manifests"]
    assert entry["annotations"] == {mt.REF_NAME_ANNOTATION: "latest"}
    assert entry["digest"] == sample_image.manifest_digest
    assert entry["size"] == sample_image.manifest_size
    _os, arch, _variant = host_platform()
    assert entry["platform"]["architecture"] == arch == sample_image.architecture
    assert entry["platform"]["os"] == "linux"

    # Every blob is stored under its own digest.
    blobs = sorted((layout / "blobs" / "sha256").iterdir())
    assert len(blobs) == 4  # manifest, config, two layers
    for blob in blobs:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name

    manifest = json.loads(_blob(layout, sample_image.manifest_digest))
    assert manifest["mediaType"] == mt.OCI_MANIFEST
    assert manifest["config"]["mediaType"] == mt.OCI_CONFIG
    assert manifest["config"]["digest"] == sample_image.config_digest
    assert [la["digest"] for la in manifest["layers"]] == sample_image.layer_digests
    assert {la["mediaType"] for la in manifest["layers"]} == {mt.OCI_LAYER_GZIP}

    config = json.loads(_blob(layout, sample_image.config_digest))
    assert config["rootfs"] == {"type": "layers", "diff_ids": sample_image.diff_ids}
    assert config["config"]["Cmd"] == ["/bin/sh"]
    assert config["architecture"] == arch and config["os"] == "linux"
    for i, layer in enumerate(manifest["layers"]):
        blob = _blob(layout, layer["digest"])
        assert len(blob) == layer["size"]
        tar = gzip.decompress(blob)
        assert sha256_digest(tar) == config["rootfs"]["diff_ids"][i]
        assert tar == sample_image.layer_tar(i)


def test_layer_contents(sample_image: SampleImage) -> None:
    names1 = _tar_names(sample_image.layer_tar(0))
    names2 = _tar_names(sample_image.layer_tar(1))
    assert "bin/busybox" in names1 and "bin/sh" in names1 and "tmp" in names1
    assert names1 == sorted(names1)  # deterministic order
    with tarfile.open(fileobj=io.BytesIO(sample_image.layer_tar(0))) as tar:
        tmp = tar.getmember("tmp")
        assert tmp.isdir() and tmp.mode == 0o1777
        sh = tar.getmember("bin/sh")
        assert sh.issym() and sh.linkname == "busybox"
        busybox = tar.extractfile("bin/busybox").read()
        assert sha256_digest(busybox) == sample_image.busybox_sha256 == sha256_digest(
            Path("/bin/busybox").read_bytes())
    with tarfile.open(fileobj=io.BytesIO(sample_image.layer_tar(1))) as tar:
        assert tar.extractfile(SAMPLE_TEXT_PATH.lstrip("/")).read() == SAMPLE_TEXT
        link = tar.getmember("etc/peerstar-sample-hardlink.txt")
        assert link.islnk() and link.linkname == "etc/peerstar-sample.txt"
    # The hardlink follows its target although it sorts first by name.
    assert names2.index("etc/peerstar-sample.txt") < names2.index(
        "etc/peerstar-sample-hardlink.txt")
    assert sample_image.files[SAMPLE_TEXT_PATH] == SAMPLE_TEXT
    assert sample_image.removed == {"/etc/peerstar-removed.txt", "/var/opaque/old.txt"}
    assert "/var/opaque/new.txt" in sample_image.files


def test_build_is_deterministic(tmp_path: Path, sample_image: SampleImage) -> None:
    again = build_sample_image(tmp_path / "again")
    assert again.manifest_digest == sample_image.manifest_digest
    assert again.layer_digests == sample_image.layer_digests
    assert again.diff_ids == sample_image.diff_ids
    assert _tree_bytes(tmp_path / "again") == _tree_bytes(sample_image.path)
    arch1 = write_oci_archive(tmp_path / "again", tmp_path / "a1.tar").read_bytes()
    arch2 = write_oci_archive(sample_image.path, tmp_path / "a2.tar").read_bytes()
    assert arch1 == arch2


def test_extra_mib_grows_only_layer_two(tmp_path: Path, sample_image: SampleImage) -> None:
    big = build_sample_image(tmp_path / "big", extra_mib=5)
    assert big.layer_digests[0] == sample_image.layer_digests[0]
    assert big.layer_digests[1] != sample_image.layer_digests[1]
    extra = {p: d for p, d in big.files.items() if p.startswith("/opt/peerstar/random/")}
    assert sum(len(d) for d in extra.values()) == 5 << 20
    assert max(len(d) for d in extra.values()) > 4 << 20  # spans more than one chunk
    # Pseudo-random: gzip cannot shrink it.
    assert big.layers[1].size > 5 << 20
    assert build_sample_image(tmp_path / "big2", extra_mib=5).manifest_digest == \
        big.manifest_digest


def test_tags_share_a_layout(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    first = build_sample_image(layout, tag="v1")
    second = build_sample_image(layout, tag="v2", extra_mib=1)
    build_sample_image(layout, tag="v1")  # replaces v1, does not duplicate it
    index = json.loads((layout / "index.json").read_bytes())
    by_tag = {m["annotations"][mt.REF_NAME_ANNOTATION]: m["digest"] for m in index["manifests"]}
    assert by_tag == {"v1": first.manifest_digest, "v2": second.manifest_digest}
    assert not [p for p in layout.rglob(".*")]  # no temp files left behind


def test_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a layout")
    with pytest.raises(PeerstarError, match="not an OCI image layout"):
        build_sample_image(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(PeerstarError, match="invalid image tag"):
        build_sample_image(tmp_path / "new", tag="-bad")
    archive = tmp_path / "d.tar"
    archive.write_bytes(b"x")
    with pytest.raises(PeerstarError, match="already exists"):
        build_sample_docker_archive(archive)


def test_build_layer_tar_rejects_dangling_hardlink() -> None:
    with pytest.raises(PeerstarError, match="hardlinks"):
        build_layer_tar([LayerEntry("/a", "hardlink", link="/missing")])


@pytest.mark.slow
def test_skopeo_reads_oci_layout(sample_image: SampleImage) -> None:
    skopeo = _need("skopeo")["skopeo"]
    out = subprocess.run([skopeo, "inspect", f"oci:{sample_image.path}:latest"],
                         capture_output=True, check=True, timeout=60)
    info = json.loads(out.stdout)
    assert info["Digest"] == sample_image.manifest_digest
    assert info["Layers"] == sample_image.layer_digests
    assert info["Architecture"] == sample_image.architecture


@pytest.mark.slow
def test_skopeo_reads_docker_archive(tmp_path: Path) -> None:
    skopeo = _need("skopeo")["skopeo"]
    image = build_sample_docker_archive(tmp_path / "sample-docker.tar")
    with tarfile.open(image.path) as tar:
        [entry] = json.load(tar.extractfile("manifest.json"))
        assert entry["RepoTags"] == ["peerstar/sample:latest"]
        assert tar.extractfile(entry["Layers"][1]).read() == image.layer_tar(1)
    out = subprocess.run([skopeo, "inspect", f"docker-archive:{image.path}"],
                         capture_output=True, check=True, timeout=60)
    info = json.loads(out.stdout)
    assert info["Layers"] == image.diff_ids
    assert info["Digest"] == image.manifest_digest
    raw = subprocess.run([skopeo, "inspect", "--config", "--raw",
                          f"docker-archive:{image.path}"],
                         capture_output=True, check=True, timeout=60)
    assert sha256_digest(raw.stdout) == image.config_digest


@pytest.mark.slow
def test_containerd_imports_and_runs(containerd: Containerd, sample_image: SampleImage) -> None:
    ctr = containerd.ctr
    base = f"docker.io/peerstar/sample-run-{uuid.uuid4().hex[:8]}"
    assert ctr.import_oci_layout(sample_image.path, base) == [f"{base}:latest"]
    ref = f"{base}:latest"
    listing = ctr.text("images", "ls", f"name=={ref}")
    assert sample_image.manifest_digest in listing

    cid = f"hello-{uuid.uuid4().hex[:8]}"
    out = ctr.run("run", "--rm", ref, cid, "/bin/busybox", "echo", "hello")
    assert out.stdout == b"hello\n"

    script = (
        f"cat {SAMPLE_TEXT_PATH}; "
        "stat -c %h /etc/peerstar-sample-hardlink.txt; "
        "ls /var/opaque; "
        "test -e /etc/peerstar-removed.txt && echo removed-file-present; "
        "sha256sum /bin/busybox /opt/peerstar/small-random.bin; "
        "/opt/peerstar/exec.sh; "
        "stat -c %a /tmp"
    )
    cid = f"check-{uuid.uuid4().hex[:8]}"
    out = ctr.text("run", "--rm", ref, cid, "/bin/sh", "-c", script)
    small = hashlib.sha256(sample_image.files["/opt/peerstar/small-random.bin"]).hexdigest()
    assert out.splitlines() == [
        SAMPLE_TEXT.decode().rstrip("\n"),
        "2",
        "new.txt",
        f"{sample_image.busybox_sha256.split(':')[1]}  /bin/busybox",
        f"{small}  /opt/peerstar/small-random.bin",
        "sample script ran",
        "1777",
    ]
