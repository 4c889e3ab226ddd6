"""Mirror mode of the bridge (peerstar.registry.mirror) against a real upstream: Debian's
docker-registry holding the sample image, the bridge over the embedded store (one node).

Checked: containerd's mirror protocol (`?ns=`), bad input (unknown ns, malformed names,
digests and references), tags resolved at the upstream and cached for the TTL, the last
digest used when the upstream is down, a cluster record naming wrong bytes falling back
to the upstream, and an upstream serving bytes that do not match their digest (502,
nothing kept).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerstar.ipfs import EmbeddedStore
from peerstar.registry import ReadPolicy, ServerOptions
from peerstar.registry.directory import Record
from peerstar.registry.mirror import Mirror, MirrorOptions
from peerstar.registry.origin import parse_mirror
from peerstar.source.sample import SampleImage, build_sample_image
from tests.registry.harness import ThreadedRegistry
from tests.registry.helpers import request
from tests.support.registry import (
    MANIFEST_ACCEPT,
    DockerRegistry,
    blob_path,
    push_layout,
    start_registry,
)

TTL = 1.0


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[SampleImage, SampleImage]:
    work = tmp_path_factory.mktemp("mirror-images")
    return (build_sample_image(work / "v1", extra_mib=1),
            build_sample_image(work / "v2", extra_mib=2))


@pytest.fixture
def upstream(images: tuple[SampleImage, SampleImage]) -> Iterator[DockerRegistry]:
    reg = start_registry(access_log=True)
    try:
        push_layout(reg.url, "team/app", "1", images[0].path)
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def bridge(upstream: DockerRegistry, tmp_path: Path) -> Iterator[ThreadedRegistry]:
    mirror = MirrorOptions(upstreams=(parse_mirror(upstream.url),), tag_ttl=TTL,
                           lookup_timeout=0.02, upstream_timeout=5.0)
    options = ServerOptions(policy=ReadPolicy(timeout=5.0, retries=1), warm_up=False,
                            mirror=mirror)
    with ThreadedRegistry(lambda: EmbeddedStore(tmp_path / "store"), options) as reg:
        yield reg


def _get(bridge: ThreadedRegistry, ns: str, path: str, method: str = "GET",
         headers: dict[str, str] | None = None):
    return request(bridge.host, method, f"/v2/{path}?ns={ns}",
                   {"Accept": MANIFEST_ACCEPT, **(headers or {})})


def test_bad_requests_get_distribution_errors(bridge: ThreadedRegistry,
                                              upstream: DockerRegistry,
                                              images: tuple[SampleImage, SampleImage]) -> None:
    ns = upstream.host
    r = _get(bridge, "docker.io", "team/app/manifests/1")
    assert (r.status, r.error_code()) == (404, "NAME_UNKNOWN")
    r = _get(bridge, ns, "Team/App/manifests/1")
    assert (r.status, r.error_code()) == (400, "NAME_INVALID")
    r = _get(bridge, ns, "team//app/manifests/1")
    assert (r.status, r.error_code()) == (400, "NAME_INVALID")
    r = _get(bridge, ns, "team/app/blobs/sha256:abc")
    assert (r.status, r.error_code()) == (400, "DIGEST_INVALID")
    r = _get(bridge, ns, "team/app/manifests/sha256:zz")
    assert (r.status, r.error_code()) == (400, "DIGEST_INVALID")
    r = _get(bridge, ns, "team/app/manifests/-bad-tag")
    assert (r.status, r.error_code()) == (400, "TAG_INVALID")
    r = _get(bridge, ns, "team/app/manifests/2")
    assert (r.status, r.error_code()) == (404, "MANIFEST_UNKNOWN")
    r = _get(bridge, ns, "team/other/blobs/" + images[0].layer_digests[0])
    assert (r.status, r.error_code()) == (404, "BLOB_UNKNOWN")
    # Without ns the ordinary routes answer: no such image route.
    r = request(bridge.host, "GET", "/v2/team/app/manifests/1")
    assert (r.status, r.error_code()) == (404, "NAME_UNKNOWN")


def test_pull_by_tag_then_blobs_and_ranges(bridge: ThreadedRegistry, upstream: DockerRegistry,
                                           images: tuple[SampleImage, SampleImage]) -> None:
    ns = upstream.host
    image = images[0]
    head = _get(bridge, ns, "team/app/manifests/1", "HEAD")
    assert head.status == 200
    assert head.headers["docker-content-digest"] == image.manifest_digest
    r = _get(bridge, ns, "team/app/manifests/1")
    assert r.status == 200 and hashlib.sha256(r.body).hexdigest() == \
        image.manifest_digest.split(":")[1]
    assert r.headers["content-type"] == json.loads(r.body)["mediaType"]
    layer = image.layer_digests[-1]
    data = blob_path(upstream, layer).read_bytes()
    r = _get(bridge, ns, f"team/app/blobs/{layer}")
    assert r.status == 200 and r.body == data
    r = _get(bridge, ns, f"team/app/blobs/{layer}", headers={"Range": "bytes=10-99"})
    assert r.status == 206 and r.body == data[10:100]
    r = _get(bridge, ns, f"team/app/blobs/{layer}", headers={"Range": f"bytes={len(data)}-"})
    assert r.status == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    r = _get(bridge, ns, f"team/app/blobs/{layer}", "HEAD")
    assert r.status == 200 and int(r.headers["content-length"]) == len(data)
    # The second GET is served from the node's IPFS: the upstream served the layer once.
    before = upstream.bytes_served(layer)
    assert _get(bridge, ns, f"team/app/blobs/{layer}").body == data
    assert upstream.bytes_served(layer) == before == len(data)


def test_tag_cached_for_its_ttl_then_moved(bridge: ThreadedRegistry, upstream: DockerRegistry,
                                           images: tuple[SampleImage, SampleImage]) -> None:
    ns = upstream.host
    first = _get(bridge, ns, "team/app/manifests/1", "HEAD").headers["docker-content-digest"]
    assert first == images[0].manifest_digest
    moved = push_layout(upstream.url, "team/app", "1", images[1].path)
    assert moved == images[1].manifest_digest != first
    t0 = time.monotonic()
    again = _get(bridge, ns, "team/app/manifests/1", "HEAD").headers["docker-content-digest"]
    if time.monotonic() - t0 < TTL / 2:
        assert again == first  # within the TTL the upstream is not asked
    time.sleep(TTL + 0.1)
    r = _get(bridge, ns, "team/app/manifests/1")
    assert r.headers["docker-content-digest"] == moved
    assert hashlib.sha256(r.body).hexdigest() == moved.split(":")[1]


def test_upstream_down_serves_last_digest(bridge: ThreadedRegistry, upstream: DockerRegistry,
                                          images: tuple[SampleImage, SampleImage]) -> None:
    ns = upstream.host
    image = images[0]
    assert _get(bridge, ns, "team/app/manifests/1").status == 200
    layer = image.layer_digests[0]
    data = blob_path(upstream, layer).read_bytes()
    assert _get(bridge, ns, f"team/app/blobs/{layer}").body == data
    upstream.take_down()
    time.sleep(TTL + 0.1)
    r = _get(bridge, ns, "team/app/manifests/1")
    assert r.status == 200 and r.headers["docker-content-digest"] == image.manifest_digest
    r = _get(bridge, ns, f"team/app/manifests/{image.manifest_digest}")
    assert r.status == 200
    assert _get(bridge, ns, f"team/app/blobs/{layer}").body == data
    # What the cluster never held cannot be served: a clear 502, not a hang.
    r = _get(bridge, ns, "team/app/manifests/2")
    assert (r.status, r.error_code()) == (502, "UNAVAILABLE")
    r = _get(bridge, ns, f"team/app/blobs/{image.layer_digests[1]}")
    assert (r.status, r.error_code()) == (502, "UNAVAILABLE")


def test_peer_record_with_wrong_bytes_falls_back(bridge: ThreadedRegistry,
                                                 upstream: DockerRegistry,
                                                 images: tuple[SampleImage, SampleImage]
                                                 ) -> None:
    ns = upstream.host
    layer = images[0].layer_digests[-1]
    data = blob_path(upstream, layer).read_bytes()
    wrong = bytes(len(data))
    server = bridge.server
    assert server is not None and server.mirror is not None
    mirror = server.mirror
    wrong_cid = bridge.run(bridge.store.add(wrong))
    # A peer announces a CID that does not hold the layer.
    mirror.directory._remember(Record(layer, wrong_cid, len(wrong), "application/x"))
    r = _get(bridge, ns, f"team/app/blobs/{layer}")
    assert r.status == 200 and r.body == data
    assert mirror.counts["rejected"] == 1 and mirror.counts["upstream_fetches"] == 1
    assert mirror.directory.own[layer].value != wrong_cid  # the right CID is announced now


def test_upstream_garbage_is_refused_and_not_kept(bridge: ThreadedRegistry,
                                                  upstream: DockerRegistry,
                                                  images: tuple[SampleImage, SampleImage]
                                                  ) -> None:
    ns = upstream.host
    layer = images[0].layer_digests[-1]
    path = blob_path(upstream, layer)
    good = path.read_bytes()
    path.write_bytes(bytes(len(good)))  # the upstream's storage is corrupted
    for _ in range(2):  # nothing was cached: the second request goes upstream again
        r = _get(bridge, ns, f"team/app/blobs/{layer}")
        assert (r.status, r.error_code()) == (502, "UNAVAILABLE")
    assert bridge.server is not None and bridge.server.mirror is not None
    assert bridge.server.mirror.counts["upstream_fetches"] == 2
    assert layer not in bridge.server.mirror.directory.own
    path.write_bytes(good)
    assert _get(bridge, ns, f"team/app/blobs/{layer}").body == good


def _layer_and_mirror(bridge: ThreadedRegistry, upstream: DockerRegistry,
                      images: tuple[SampleImage, SampleImage]) -> tuple[str, str, bytes, Mirror]:
    """(ns, the data layer's digest, its bytes, the bridge's mirror)."""
    layer = images[0].layer_digests[-1]
    server = bridge.server
    assert server is not None and server.mirror is not None
    return upstream.host, layer, blob_path(upstream, layer).read_bytes(), server.mirror


def _announce(bridge: ThreadedRegistry, digest: str, data: bytes) -> str:
    """`data` added to the bridge's store and announced by a "peer" as holding `digest`."""
    assert bridge.server is not None and bridge.server.mirror is not None
    cid = bridge.run(bridge.store.add(data))
    bridge.server.mirror.directory._remember(Record(digest, cid, len(data), "application/x"))
    return cid


def test_ranged_reads_come_from_the_cluster_at_once_and_the_whole_is_checked_after(
        bridge: ThreadedRegistry, upstream: DockerRegistry,
        images: tuple[SampleImage, SampleImage]) -> None:
    ns, layer, data, mirror = _layer_and_mirror(bridge, upstream, images)
    # A peer announces the right CID: a lazy reader's range is served from it directly.
    cid = _announce(bridge, layer, data)
    r = _get(bridge, ns, f"team/app/blobs/{layer}", headers={"Range": "bytes=100-199"})
    assert r.status == 206 and r.body == data[100:200]
    assert mirror.counts["ranged_cluster"] == 1 and mirror.counts["upstream_fetches"] == 0
    deadline = time.monotonic() + 20
    while layer not in mirror.directory.own and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mirror.directory.own[layer].value == cid  # checked whole, kept and announced
    assert mirror.counts["cluster_hits"] == 1 and mirror.counts["rejected"] == 0


def test_a_lying_record_behind_a_ranged_read_is_dropped(
        bridge: ThreadedRegistry, upstream: DockerRegistry,
        images: tuple[SampleImage, SampleImage]) -> None:
    ns, layer, data, mirror = _layer_and_mirror(bridge, upstream, images)
    _announce(bridge, layer, bytes(len(data)))  # a record naming the wrong bytes
    r = _get(bridge, ns, f"team/app/blobs/{layer}", headers={"Range": "bytes=0-99"})
    assert r.status == 206  # the reader checks chunks against its TOC; the bridge, after
    deadline = time.monotonic() + 20
    while mirror.counts["rejected"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mirror.counts["rejected"] == 1 and layer not in mirror.directory.own
    r = _get(bridge, ns, f"team/app/blobs/{layer}", headers={"Range": "bytes=0-99"})
    assert r.status == 206 and r.body == data[:100]  # the next read: from the upstream
    assert mirror.counts["upstream_fetches"] == 1
