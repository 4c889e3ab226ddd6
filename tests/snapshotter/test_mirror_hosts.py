"""Lazy pulls through a registry mirror named in containerd's hosts.toml, with real parts:
an eStargz image by its ordinary name on an "upstream" docker-registry, a second
docker-registry holding the same blobs as the mirror host, `ctr-remote image rpull
--hosts-dir` through containerd and the peerstar snapshotter (`[remote] hosts_dir`).
The registries' access logs show where the snapshotter's layer reads went: to the mirror,
with `?ns=<upstream>`, and to the upstream once the mirror is down."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from peerstar.source.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH
from tests.snapshotter.conftest import running_stack
from tests.snapshotter.test_lazy_pull import PushedLayer, push_image
from tests.support import registry
from tests.support.containerd import CRI_NAMESPACE, CriOptions, Ctr
from tests.support.cri.client import CriImages
from tests.support.registry import DockerRegistry, start_registry

pytestmark = pytest.mark.slow

REPO = "snap/mirrored"
# `GET /v2/... HTTP/1.1" STATUS` in the combined log format docker-registry writes
_REQUEST = re.compile(r'"(GET|HEAD) (\S+) HTTP/[\d.]+" (\d{3})')


def requests(reg: DockerRegistry) -> list[tuple[str, str, int]]:
    """(method, path with query, status) of every request the registry logged."""
    return [(m, p, int(s)) for m, p, s in _REQUEST.findall(reg.log_path.read_text())]


def copy_image(src: DockerRegistry, dest: DockerRegistry, repo: str, tag: str) -> None:
    """The image `repo:tag` of `src` into `dest`, byte for byte (same digests)."""
    man = src.get_manifest(repo, tag)
    assert man.status == 200, man
    doc = json.loads(man.body)
    for desc in [doc["config"], *doc["layers"]]:
        blob = src.request("GET", f"/v2/{repo}/blobs/{desc['digest']}")
        assert registry.upload_blob(dest.url, repo, blob.body) == desc["digest"]
    registry.put_manifest(dest.url, repo, tag, man.body, man.headers["content-type"])


@pytest.fixture(scope="module")
def upstream() -> Iterator[DockerRegistry]:
    reg = start_registry(access_log=True)
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def mirror() -> Iterator[DockerRegistry]:
    reg = start_registry(access_log=True)
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def image(upstream: DockerRegistry, mirror: DockerRegistry) -> tuple[str, list[PushedLayer]]:
    layers = push_image(upstream.url, REPO, "v1", estargz=True)
    copy_image(upstream, mirror, REPO, "v1")
    assert mirror.get_manifest(REPO, "v1").body == upstream.get_manifest(REPO, "v1").body
    return f"{upstream.host}/{REPO}:v1", layers


@pytest.fixture
def hosts_dir(upstream: DockerRegistry, mirror: DockerRegistry) -> Iterator[Path]:
    """containerd's config_path: the upstream's hosts.toml names the mirror first."""
    d = Path(tempfile.mkdtemp(prefix="pss-hosts-"))
    (d / upstream.host).mkdir()
    (d / upstream.host / "hosts.toml").write_text(
        f'server = "http://{upstream.host}"\n\n'
        f'[host."http://{mirror.host}"]\n  capabilities = ["pull", "resolve"]\n')
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _layer_reads(reg: DockerRegistry, layers: list[PushedLayer], since: int
                 ) -> list[tuple[str, str, int]]:
    digests = {la.digest for la in layers}
    return [r for r in requests(reg)[since:]
            if r[1].split("?")[0].rsplit("/", 1)[-1] in digests and "/blobs/" in r[1]]


def _rpull_and_run(hosts: Path, ref: str) -> str:
    with running_stack(f'[remote]\nhosts_dir = "{hosts}"\nbackground_fetch = false\n') as st:
        ctr = st.containerd.ctr
        ctr.remote("image", "rpull", "--plain-http", "--hosts-dir", str(hosts),
                   "--snapshotter", "peerstar", ref, timeout=120)
        out = ctr.text("run", "--snapshotter", "peerstar", "--rm", ref,
                       f"mirror-{uuid.uuid4().hex[:8]}", "cat", SAMPLE_TEXT_PATH)
        assert out == SAMPLE_TEXT.decode()
        return st.snapshotter.log()


def test_layers_read_lazily_from_the_mirror_with_ns(
        upstream: DockerRegistry, mirror: DockerRegistry, hosts_dir: Path,
        image: tuple[str, list[PushedLayer]]) -> None:
    ref, layers = image
    up0, mirror0 = len(requests(upstream)), len(requests(mirror))
    log = _rpull_and_run(hosts_dir, ref)
    ns = "?ns=" + quote(upstream.host, safe="")
    for la in layers:  # both layers mounted lazily, from the mirror
        assert (f"layer {la.digest} mounted lazily from {mirror.url}/v2/{REPO}/blobs/"
                f"{la.digest}{ns}") in log, log[-3000:]
    reads = _layer_reads(mirror, layers, mirror0)
    # ranges of both layers, every one with ns=<upstream> (containerd's mirror protocol)
    assert {p.split("?")[0].rsplit("/", 1)[-1] for _, p, _ in reads} == \
        {la.digest for la in layers}
    assert all(p.endswith(ns) for _, p, _ in reads), reads
    assert any(m == "GET" and s == 206 for m, _, s in reads), reads
    # ...and none of the layer bytes from the upstream
    assert _layer_reads(upstream, layers, up0) == []


def test_mirror_down_layers_come_from_the_upstream(
        upstream: DockerRegistry, mirror: DockerRegistry, hosts_dir: Path,
        image: tuple[str, list[PushedLayer]]) -> None:
    ref, layers = image
    up0 = len(requests(upstream))
    mirror.take_down()
    try:
        log = _rpull_and_run(hosts_dir, ref)
    finally:
        mirror.bring_back()
    for la in layers:
        assert (f"layer {la.digest} mounted lazily from {upstream.url}/v2/{REPO}/blobs/"
                f"{la.digest} as") in log, log[-3000:]
    reads = _layer_reads(upstream, layers, up0)
    assert {p.rsplit("/", 1)[-1] for _, p, _ in reads} == {la.digest for la in layers}
    assert all("ns=" not in p for _, p, _ in reads)  # the registry itself: no ns
    assert any(m == "GET" and s == 206 for m, _, s in reads), reads



def test_cri_pull_reads_layers_from_the_mirror(
        upstream: DockerRegistry, mirror: DockerRegistry, hosts_dir: Path,
        image: tuple[str, list[PushedLayer]]) -> None:
    ref, layers = image
    up0, mirror0 = len(requests(upstream)), len(requests(mirror))
    cri = CriOptions(snapshotter="peerstar", config_path=str(hosts_dir))
    with running_stack(f'[remote]\nhosts_dir = "{hosts_dir}"\nbackground_fetch = false\n',
                       cri=cri) as st:
        images = CriImages(st.containerd.address, timeout=120)
        try:
            images.pull(ref)
        finally:
            images.close()
        ctr = Ctr(st.containerd.address, CRI_NAMESPACE)
        out = ctr.text("run", "--snapshotter", "peerstar", "--rm", ref,
                       f"mirror-cri-{uuid.uuid4().hex[:8]}", "cat", SAMPLE_TEXT_PATH)
        assert out == SAMPLE_TEXT.decode()
        log = st.snapshotter.log()
    ns = "?ns=" + quote(upstream.host, safe="")
    for la in layers:
        assert (f"layer {la.digest} mounted lazily from {mirror.url}/v2/{REPO}/blobs/"
                f"{la.digest}{ns}") in log, log[-3000:]
    reads = _layer_reads(mirror, layers, mirror0)
    assert reads and all(p.endswith(ns) for _, p, _ in reads), reads
    # CRI resolved and fetched the manifest and config through the mirror as well:
    # the upstream saw nothing of this pull.
    assert requests(upstream)[up0:] == []
