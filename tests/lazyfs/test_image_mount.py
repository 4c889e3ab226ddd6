"""`peerstar mount REF DIR` on the Debian docker-registry: the merged root filesystem of
the sample image (two lazy eStargz layers overlaid) equals the sample's expected view,
whiteouts and opaque dirs hide lower files, `umount DIR` tears everything down, and a
non-eStargz image is refused with a clear error."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from peerstar.lazyfs.image import (
    ImageMountError,
    image_stats,
    parse_remote_ref,
    resolve_layers,
    work_dir_for,
)
from peerstar.source.sample import SampleImage
from tests.lazyfs.conftest import Layer, is_mounted, push_image
from tests.support.cli import run_peerstar
from tests.support.content import sha256_digest
from tests.support.registry import DockerRegistry
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pushed_sample(docker_registry: DockerRegistry, sample_layers: list[Layer]) -> str:
    push_image(docker_registry.url, "lazyfs/sample", "v1", sample_layers)
    return f"{docker_registry.host}/lazyfs/sample:v1"


def test_parse_remote_ref() -> None:
    r = parse_remote_ref("localhost:5050/ipfs/bafyabc")
    assert (r.host, r.repository, r.reference) == ("localhost:5050", "ipfs/bafyabc", "latest")
    d = "sha256:" + "a" * 64
    r = parse_remote_ref(f"127.0.0.1:5000/a/b:t@{d}")
    assert (r.host, r.repository, r.reference) == ("127.0.0.1:5000", "a/b", d)
    with pytest.raises(ImageMountError, match="HOST/REPOSITORY"):
        parse_remote_ref("justaname")


def test_mount_merged_rootfs(pushed_sample: str, sample_image_10: SampleImage,
                             sample_layers: list[Layer], tmp_path: Path) -> None:
    target = tmp_path / "rootfs"
    target.mkdir()
    work_root, cache = tmp_path / "work", tmp_path / "cache"
    res = run_peerstar("mount", pushed_sample, str(target), "--work-root", str(work_root),
                       "--cache-dir", str(cache), "--no-background", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert [lay["digest"] for lay in summary["layers"]] == [lay.digest for lay in sample_layers]
    work = work_dir_for(target, work_root)
    try:
        assert is_mounted(target)
        assert (target / "etc/peerstar-sample.txt").read_bytes() == \
            sample_image_10.files["/etc/peerstar-sample.txt"]
        stats = image_stats(target, work_root)
        total = sum(lay.size for lay in sample_layers)
        assert stats["size"] == total
        assert stats["fetchedSize"] < total // 10  # TOCs, a prioritized file, a small read
        for path, data in sample_image_10.files.items():
            assert (target / path.lstrip("/")).read_bytes() == data, path
        for path, link in sample_image_10.symlinks.items():
            assert os.readlink(target / path.lstrip("/")) == link
        busybox = (target / "bin/busybox").read_bytes()
        assert sha256_digest(busybox) == sample_image_10.busybox_sha256
        for path in sample_image_10.removed:
            assert not os.path.lexists(target / path.lstrip("/")), path
        assert sorted(os.listdir(target / "var/opaque")) == ["new.txt"]
        assert not os.path.lexists(target / ".prefetch.landmark")
        assert not os.path.lexists(target / ".no.prefetch.landmark")
        with pytest.raises(OSError):
            (target / "etc/new-file").write_text("x")  # read-only
    finally:
        subprocess.run(["umount", str(target)], check=True)  # plain umount ends it all
    assert wait_until(lambda: not work.exists(), 15)
    assert not is_mounted(target)
    with open("/proc/self/mountinfo") as f:
        assert str(work) not in f.read()


def test_peerstar_unmount(pushed_sample: str, tmp_path: Path) -> None:
    target = tmp_path / "rootfs"
    target.mkdir()
    work_root = tmp_path / "work"
    res = run_peerstar("mount", pushed_sample, str(target), "--work-root", str(work_root),
                       "--cache-dir", str(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr
    assert "2 lazy layers" in res.stdout
    assert (target / "etc/hostname").read_bytes() == b"peerstar-sample\n"
    res = run_peerstar("unmount", str(target), "--work-root", str(work_root))
    assert res.returncode == 0, res.stderr
    assert not is_mounted(target)
    assert not work_dir_for(target, work_root).exists()
    res = run_peerstar("unmount", str(target), "--work-root", str(work_root))
    assert res.returncode == 1 and "not mounted by peerstar" in res.stderr


def test_non_estargz_image_is_refused(docker_registry: DockerRegistry,
                                      sample_layers: list[Layer], tmp_path: Path) -> None:
    push_image(docker_registry.url, "lazyfs/plain", "v1", sample_layers, estargz=False)
    target = tmp_path / "rootfs"
    target.mkdir()
    res = run_peerstar("mount", f"{docker_registry.host}/lazyfs/plain:v1", str(target),
                       "--work-root", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "c"))
    assert res.returncode == 1
    assert "is not eStargz" in res.stderr and "Traceback" not in res.stderr
    assert not is_mounted(target)


def test_unusable_ca_file_is_refused(pushed_sample: str, tmp_path: Path) -> None:
    target = tmp_path / "rootfs"
    target.mkdir()
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    for ca, why in ((tmp_path / "none.pem", "does not exist"),
                    (bad, "holds no usable PEM certificate")):
        res = run_peerstar("mount", pushed_sample, str(target), "--ca-file", str(ca),
                           "--work-root", str(tmp_path / "work"), "--cache-dir",
                           str(tmp_path / "c"))
        assert res.returncode == 1, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr  # one line, no traceback
        assert lines[0].startswith(f"peerstar: error: CA file {ca} {why}"), res.stderr
        assert not is_mounted(target) and not (tmp_path / "work").exists()


def test_index_picks_host_platform(docker_registry: DockerRegistry, pushed_sample: str,
                                   sample_layers: list[Layer], rich_layer: Layer) -> None:
    import urllib.request

    from peerstar.lazyfs.image import host_arch

    def size_of(tag: str) -> int:
        return len(urllib.request.urlopen(urllib.request.Request(
            f"{docker_registry.url}/v2/lazyfs/multi/manifests/{tag}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})).read())

    manifest_digest = push_image(docker_registry.url, "lazyfs/multi", "m", sample_layers)
    size = size_of("m")
    # The other platform's manifest comes first, so picking the first would be wrong.
    other_digest = push_image(docker_registry.url, "lazyfs/multi", "o", [rich_layer])
    other_size = size_of("o")
    other = "arm64" if host_arch() != "arm64" else "amd64"
    index = json.dumps({"schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [
                            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                             "digest": other_digest, "size": other_size,
                             "platform": {"os": "linux", "architecture": other}},
                            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                             "digest": manifest_digest, "size": size,
                             "platform": {"os": "linux", "architecture": host_arch()}}]})
    req = urllib.request.Request(
        f"{docker_registry.url}/v2/lazyfs/multi/manifests/idx", data=index.encode(),
        method="PUT", headers={"Content-Type": "application/vnd.oci.image.index.v1+json"})
    assert urllib.request.urlopen(req).status == 201
    layers = resolve_layers(parse_remote_ref(f"{docker_registry.host}/lazyfs/multi:idx"))
    assert [lay.digest for lay in layers] == [lay.digest for lay in sample_layers]
    assert [lay.toc_digest for lay in layers] == [lay.toc_digest for lay in sample_layers]
    assert layers[0].url.startswith(f"http://{docker_registry.host}/v2/lazyfs/multi/blobs/")
