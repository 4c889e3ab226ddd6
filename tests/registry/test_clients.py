"""Real clients against the registry over both real backends (js-ipfs daemon, embedded
store): containerd pull + run, skopeo copy + inspect, ctr-remote rpull of an eStargz
image, and the eStargz reader doing its Range reads through the registry."""

from __future__ import annotations

import json
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerstar.estargz import Reader
from peerstar.source.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH, SampleImage
from tests.registry.harness import ThreadedRegistry
from tests.registry.helpers import MANIFEST_ACCEPT, request
from tests.support.containerd import Containerd, HarnessError, require_binaries
from tests.support.content import sha256_digest
from tests.support.ipfsimage import StoredImage, convert_layout_estargz, store_layout

pytestmark = pytest.mark.slow


def _need(*names: str) -> dict[str, str]:
    try:
        return require_binaries(*names)
    except HarnessError as exc:
        failure = str(exc)
    pytest.fail(failure, pytrace=False)


@pytest.fixture(scope="module")
def estargz_layout(sample_image: SampleImage, tmp_path_factory: pytest.TempPathFactory
                   ) -> Path:
    return convert_layout_estargz(sample_image.path, tmp_path_factory.mktemp("esgz") / "l")


@pytest.fixture
def images(backend_registry: ThreadedRegistry, sample_image: SampleImage,
           estargz_layout: Path) -> Iterator[tuple[ThreadedRegistry, StoredImage, StoredImage]]:
    reg = backend_registry
    plain = reg.run(store_layout(reg.store, sample_image.path))
    esgz = reg.run(store_layout(reg.store, estargz_layout))
    yield reg, plain, esgz


def _served_digest(reg: ThreadedRegistry, img: StoredImage) -> str:
    """The digest the registry answers `latest` with: the top document without its
    ipfs:// URLs (see test_http), not the one stored in IPFS."""
    r = request(reg.host, "GET", f"/v2/ipfs/{img.root_cid}/manifests/latest",
                {"Accept": MANIFEST_ACCEPT})
    assert r.status == 200 and r.headers["docker-content-digest"] == sha256_digest(r.body)
    assert sha256_digest(r.body) != img.top_digest
    return sha256_digest(r.body)


def _run_sample(ctr, ref: str) -> str:
    name = f"reg-{uuid.uuid4().hex[:8]}"
    return ctr.text("run", "--rm", ref, name, "/bin/sh", "-c",
                    f"cat {SAMPLE_TEXT_PATH}; ls /var/opaque")


def test_ctr_pull_and_run(containerd: Containerd, images) -> None:
    reg, plain, esgz = images
    ctr = containerd.ctr
    for img in (plain, esgz):
        ref = f"{reg.host}/ipfs/{img.root_cid}:latest"
        ctr.run("image", "pull", "--plain-http", ref, timeout=120)
        listing = ctr.text("images", "ls", f"name=={ref}")
        assert _served_digest(reg, img) in listing
        assert _run_sample(ctr, ref) == SAMPLE_TEXT.decode() + "new.txt\n"
        ctr.run("images", "rm", ref)


def test_skopeo_copy_and_inspect(images, tmp_path: Path) -> None:
    skopeo = _need("skopeo")["skopeo"]
    reg, plain, _esgz = images
    served = _served_digest(reg, plain)
    src = f"docker://{reg.host}/ipfs/{plain.root_cid}"
    dest = tmp_path / "copy"
    copied = subprocess.run([skopeo, "--debug", "copy", "--src-tls-verify=false", src,
                             f"oci:{dest}:latest"],
                            check=True, capture_output=True, text=True, timeout=120)
    assert "foreign layer" not in copied.stderr + copied.stdout
    info = json.loads(subprocess.run([skopeo, "inspect", f"oci:{dest}:latest"], check=True,
                                     capture_output=True, timeout=60).stdout)
    assert info["Digest"] == served
    assert info["Layers"] == plain.layer_digests
    remote = json.loads(subprocess.run([skopeo, "inspect", "--tls-verify=false", src],
                                       check=True, capture_output=True, timeout=60).stdout)
    assert remote["Digest"] == served
    # Every blob the copy references is in the layout, whole: config and every layer
    # (layers with ipfs:// URLs would count as foreign ones, which skopeo skips).
    index = json.loads((dest / "index.json").read_bytes())
    [entry] = index["manifests"]
    manifest_digest = entry["digest"]
    blobs = dest / "blobs" / "sha256"
    manifest = json.loads((blobs / manifest_digest.split(":")[1]).read_bytes())
    assert "urls" not in json.dumps(manifest)
    wanted = [manifest["config"]["digest"], *(d["digest"] for d in manifest["layers"])]
    assert wanted == [plain.config_digest, *plain.layer_digests]
    for digest in [manifest_digest, *wanted]:
        data = (blobs / digest.split(":")[1]).read_bytes()
        assert sha256_digest(data) == digest
    for digest in wanted:
        assert (blobs / digest.split(":")[1]).read_bytes() == plain.content[digest]


def test_ctr_remote_rpull_estargz(containerd: Containerd, images) -> None:
    _need("ctr-remote")
    reg, _plain, esgz = images
    ref = f"{reg.host}/ipfs/{esgz.root_cid}:latest"
    # No stargz snapshotter runs here (it comes with the snapshotter issue): rpull with
    # overlayfs exercises its resolver and fetcher against our registry end to end.
    containerd.ctr.remote("image", "rpull", "--plain-http", "--snapshotter", "overlayfs", ref,
                          timeout=120)
    assert _run_sample(containerd.ctr, ref) == SAMPLE_TEXT.decode() + "new.txt\n"
    containerd.ctr.run("images", "rm", ref)


def test_estargz_range_reads_through_registry(images) -> None:
    """What the lazy snapshotter does: footer, TOC and chunks fetched by Range."""
    reg, _plain, esgz = images
    manifest = json.loads(esgz.content[esgz.top_digest])
    layer = manifest["layers"][1]
    assert "containerd.io/snapshot/stargz/toc.digest" in layer["annotations"]
    url = f"{reg.url}/v2/ipfs/{esgz.root_cid}/blobs/{layer['digest']}"
    fetched: list[tuple[int, int]] = []

    def read_at(offset: int, length: int) -> bytes:
        req = urllib.request.Request(url, headers={
            "Range": f"bytes={offset}-{offset + length - 1}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == \
                f"bytes {offset}-{offset + length - 1}/{layer['size']}"
            body = resp.read()
        fetched.append((offset, length))
        return body

    reader = Reader.open(read_at, layer["size"],
                         toc_digest=layer["annotations"][
                             "containerd.io/snapshot/stargz/toc.digest"])
    assert reader.read(SAMPLE_TEXT_PATH.lstrip("/")) == SAMPLE_TEXT
    assert sum(n for _, n in fetched) < layer["size"]  # lazily: not the whole blob
    reader.verify_all()
