"""The registry's HTTP behaviour over an in-memory store: routes, headers, Range semantics
(byte-exact, property-based), errors, cost per request, faults (stalls, a store dying
mid-stream), slow clients, metrics and the access log."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerstar.errors import PeerstarError
from peerstar.registry import check_bind_address
from peerstar.source.sample import SampleImage
from tests.registry.harness import ThreadedRegistry
from tests.registry.helpers import MANIFEST_ACCEPT, parse_multipart, request, without_urls
from tests.registry.memstore import Fault, MemoryStore, raw_cid
from tests.support.content import sha256_digest
from tests.support.ipfsimage import StoredImage, store_blob_image, store_layout
from tests.support.waiting import wait_until

BIG = 3 << 20  # a blob spanning many store chunks


@pytest.fixture
def image(mem_registry: ThreadedRegistry, sample_image: SampleImage) -> StoredImage:
    return mem_registry.run(store_layout(mem_registry.store, sample_image.path))


@pytest.fixture
def big_blob(mem_registry: ThreadedRegistry) -> tuple[str, str, bytes]:
    """(root cid, digest, bytes) of an image whose single layer is BIG random bytes."""
    data = os.urandom(BIG)
    img = mem_registry.run(store_blob_image(mem_registry.store, data))
    return img.root_cid, img.layer_digests[0], data


def _blob_path(root: str, digest: str) -> str:
    return f"/v2/ipfs/{root}/blobs/{digest}"


# -- routes and headers ----------------------------------------------------------------

def test_base(mem_registry: ThreadedRegistry) -> None:
    r = request(mem_registry.host, "GET", "/v2/")
    assert r.status == 200 and r.json() == {}
    assert r.headers["docker-distribution-api-version"] == "registry/2.0"


def test_manifest_by_latest_tag_and_digest(mem_registry: ThreadedRegistry,
                                           image: StoredImage) -> None:
    stored = image.content[image.top_digest]
    # the manifest in IPFS names every blob with an ipfs:// url (nerdctl's format)
    doc = json.loads(stored)
    assert doc["layers"][0]["urls"][0] == f"ipfs://{image.cids[image.layer_digests[0]]}"
    # By tag, it is served without them (containers/image would skip such layers as
    # foreign), under the digest of what is served; by its own digest, as stored.
    served = None
    for ref in ("latest", "v1.2", image.top_digest):
        r = request(mem_registry.host, "GET", f"/v2/ipfs/{image.root_cid}/manifests/{ref}",
                    {"Accept": MANIFEST_ACCEPT})
        assert r.status == 200, ref
        if ref == image.top_digest:
            assert r.body == stored
        else:
            assert json.loads(r.body) == without_urls(doc)
            served = served or r.body
            assert r.body == served
        assert r.headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"
        assert r.headers["docker-content-digest"] == sha256_digest(r.body)
        assert int(r.headers["content-length"]) == len(r.body)
        assert r.headers["accept-ranges"] == "bytes"
    assert served is not None
    r = request(mem_registry.host, "GET",
                f"/v2/ipfs/{image.root_cid}/manifests/{sha256_digest(served)}")
    assert r.status == 200 and r.body == served
    # a layer digest is not a manifest
    r = request(mem_registry.host, "GET",
                f"/v2/ipfs/{image.root_cid}/manifests/{image.layer_digests[0]}")
    assert r.status == 404 and r.error_code() == "MANIFEST_UNKNOWN"
    r = request(mem_registry.host, "GET", f"/v2/ipfs/{image.root_cid}/manifests/"
                "sha256:" + "0" * 64)
    assert r.status == 404 and r.error_code() == "MANIFEST_UNKNOWN"
    r = request(mem_registry.host, "GET", f"/v2/ipfs/{image.root_cid}/manifests/-bad")
    assert r.status == 404 and r.error_code() == "MANIFEST_UNKNOWN"


def test_index_root_and_annotated_tags(mem_registry: ThreadedRegistry, tmp_path: Path,
                                       sample_image: SampleImage) -> None:
    from peerstar.source.sample import build_sample_image

    layout = tmp_path / "layout"
    build_sample_image(layout, tag="v1")
    build_sample_image(layout, tag="v2", extra_mib=1)
    img = mem_registry.run(store_layout(mem_registry.store, layout, top="index"))
    assert img.index_digest == img.top_digest and len(img.manifest_digests) == 2
    base = f"/v2/ipfs/{img.root_cid}"
    latest = request(mem_registry.host, "GET", base + "/manifests/latest")
    assert latest.headers["content-type"] == "application/vnd.oci.image.index.v1+json"
    assert latest.headers["docker-content-digest"] == sha256_digest(latest.body)
    index = json.loads(latest.body)
    stored = json.loads(img.content[img.index_digest])
    # the index as served points at the manifests as served (no ipfs:// URLs anywhere)
    assert "urls" not in latest.body.decode()
    v1 = request(mem_registry.host, "GET", base + "/manifests/v1")
    v2 = request(mem_registry.host, "GET", base + "/manifests/v2")
    for entry, old, tagged, digest in zip(index["manifests"], stored["manifests"], (v1, v2),
                                          img.manifest_digests, strict=True):
        assert old["digest"] == digest
        assert tagged.headers["docker-content-digest"] == entry["digest"] != digest
        assert sha256_digest(tagged.body) == entry["digest"]
        assert entry["size"] == len(tagged.body)
        assert json.loads(tagged.body) == without_urls(json.loads(img.content[digest]))
        assert entry == {**without_urls(old), "digest": entry["digest"],  # type: ignore[dict-item]
                         "size": entry["size"]}
        r = request(mem_registry.host, "GET", f"{base}/manifests/{entry['digest']}")
        assert r.status == 200 and r.body == tagged.body
    # the documents as stored keep answering under their own digests
    for d in [img.index_digest, *img.manifest_digests]:
        r = request(mem_registry.host, "GET", f"{base}/manifests/{d}")
        assert r.status == 200 and r.body == img.content[d]
    tags = request(mem_registry.host, "GET", base + "/tags/list").json()
    assert tags == {"name": f"ipfs/{img.root_cid}", "tags": ["latest", "v1", "v2"]}


def test_blobs_and_head_reads_nothing(mem_registry: ThreadedRegistry,
                                      image: StoredImage) -> None:
    store: MemoryStore = mem_registry.store
    for digest in [image.config_digest, *image.layer_digests]:
        r = request(mem_registry.host, "GET", _blob_path(image.root_cid, digest))
        assert r.status == 200 and r.body == image.content[digest]
        assert r.headers["docker-content-digest"] == digest
        assert r.headers["content-type"] == image.media_types[digest]
        assert r.headers["etag"] == f'"{digest}"'
    before = (len(store.cats), store.bytes_read)
    layer = image.layer_digests[1]
    h = request(mem_registry.host, "HEAD", _blob_path(image.root_cid, layer))
    assert h.status == 200 and h.body == b""
    assert int(h.headers["content-length"]) == len(image.content[layer])
    assert h.headers["docker-content-digest"] == layer
    hm = request(mem_registry.host, "HEAD", f"/v2/ipfs/{image.root_cid}/manifests/"
                 + image.top_digest)
    assert hm.status == 200 and hm.headers["docker-content-digest"] == image.top_digest
    hr = request(mem_registry.host, "HEAD", _blob_path(image.root_cid, layer),
                 {"Range": "bytes=10-19"})
    assert hr.status == 206 and hr.headers["content-length"] == "10"
    assert (len(store.cats), store.bytes_read) == before  # HEAD read no content


def test_one_cat_per_request(mem_registry: ThreadedRegistry, image: StoredImage) -> None:
    store: MemoryStore = mem_registry.store
    request(mem_registry.host, "GET", "/v2/ipfs/" + image.root_cid + "/manifests/latest")
    walked = list(store.cats)
    # the walk read the root, then the manifest: nothing else
    assert [c for c, _, _ in walked] == [image.root_cid, image.cids[image.top_digest]]
    layer = image.layer_digests[1]
    r = request(mem_registry.host, "GET", _blob_path(image.root_cid, layer),
                {"Range": "bytes=100-199"})
    assert r.status == 206 and r.body == image.content[layer][100:200]
    assert store.cats[len(walked):] == [(image.cids[layer], 100, 100)]
    request(mem_registry.host, "GET", "/v2/ipfs/" + image.root_cid + "/manifests/latest")
    request(mem_registry.host, "GET", _blob_path(image.root_cid, image.top_digest))
    assert len(store.cats) == len(walked) + 1  # manifests come from the walked tree
    assert mem_registry.server.trees.misses == 1


# -- Range semantics ---------------------------------------------------------------------

def test_range_forms(mem_registry: ThreadedRegistry, big_blob) -> None:
    root, digest, data = big_blob
    path = _blob_path(root, digest)
    size = len(data)
    r = request(mem_registry.host, "GET", path, {"Range": f"bytes={size - 5}-"})
    assert r.status == 206 and r.body == data[-5:]
    assert r.headers["content-range"] == f"bytes {size - 5}-{size - 1}/{size}"
    r = request(mem_registry.host, "GET", path, {"Range": "bytes=-7"})
    assert r.body == data[-7:]
    r = request(mem_registry.host, "GET", path, {"Range": f"bytes={size}-"})
    assert r.status == 416 and r.headers["content-range"] == f"bytes */{size}"
    assert r.error_code() == "RANGE_INVALID"
    r = request(mem_registry.host, "GET", path, {"Range": "bytes=oops"})
    assert r.status == 200 and r.body == data  # malformed Range is ignored
    r = request(mem_registry.host, "GET", path,
                {"Range": "bytes=" + ",".join(f"{i}-{i}" for i in range(65))})
    assert r.status == 416
    r = request(mem_registry.host, "GET", path, {"Range": "bytes=0-1," + " " * 5000 + "2-3"})
    assert r.status == 416
    # aiohttp's own limit on a header line (8190): a 400, never a crash
    r = request(mem_registry.host, "GET", path, {"Range": "bytes=" + "1" * 9000 + "-"})
    assert r.status == 400


def test_if_range_and_if_none_match(mem_registry: ThreadedRegistry, big_blob) -> None:
    root, digest, data = big_blob
    path = _blob_path(root, digest)
    r = request(mem_registry.host, "GET", path,
                {"Range": "bytes=0-3", "If-Range": f'"{digest}"'})
    assert r.status == 206 and r.body == data[:4]
    r = request(mem_registry.host, "GET", path,
                {"Range": "bytes=0-3", "If-Range": '"sha256:other"'})
    assert r.status == 200 and r.body == data
    r = request(mem_registry.host, "GET", path,
                {"Range": "bytes=0-3", "If-Range": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert r.status == 200 and len(r.body) == len(data)
    r = request(mem_registry.host, "GET", path, {"If-None-Match": f'"{digest}"'})
    assert r.status == 304 and r.body == b""


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_ranges_byte_exact(mem_registry: ThreadedRegistry, big_blob, data) -> None:
    root, digest, blob = big_blob
    size = len(blob)
    n = data.draw(st.integers(1, 6))
    specs = []
    for _ in range(n):
        a = data.draw(st.integers(0, size - 1))
        b = data.draw(st.integers(a, min(size - 1, a + data.draw(st.sampled_from(
            [0, 1, 100, 65535, 65536, 300_000])))))
        specs.append((a, b))
    r = request(mem_registry.host, "GET", _blob_path(root, digest),
                {"Range": "bytes=" + ",".join(f"{a}-{b}" for a, b in specs)})
    assert r.status == 206
    assert int(r.headers["content-length"]) == len(r.body)
    if n == 1:
        (a, b), = specs
        assert r.body == blob[a:b + 1]
        assert r.headers["content-range"] == f"bytes {a}-{b}/{size}"
        return
    parts = parse_multipart(r.headers["content-type"], r.body)
    assert len(parts) == n
    for (ctype, crange, payload), (a, b) in zip(parts, specs, strict=True):
        assert ctype == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert crange == f"bytes {a}-{b}/{size}"
        assert payload == blob[a:b + 1]


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("cid", [
    "notacid", "bafy", "Qm" + "1" * 44,
    "bafkreie5h6phiqop2q7eove3ndreudbym4s7d7lqltiymljruhqr4st6nb",  # bad padding bits
    "z" * 199, "bafyreigh2akiscaildc6pxeixmc4xd5vdnrt4tzdxcm3cbkbnpbjhikjve",  # dag-cbor
])
def test_malformed_cids(mem_registry: ThreadedRegistry, cid: str) -> None:
    r = request(mem_registry.host, "GET", f"/v2/ipfs/{cid}/manifests/latest")
    assert r.status == 400 and r.error_code() == "NAME_INVALID"


def test_unknown_and_invalid(mem_registry: ThreadedRegistry, image: StoredImage) -> None:
    host = mem_registry.host
    base = f"/v2/ipfs/{image.root_cid}"
    r = request(host, "GET", f"{base}/blobs/sha256:" + "a" * 64)
    assert r.status == 404 and r.error_code() == "BLOB_UNKNOWN"
    r = request(host, "HEAD", f"{base}/blobs/sha256:" + "a" * 64)
    assert r.status == 404 and r.body == b""
    for bad in ("sha256:xyz", "md5:" + "a" * 32, "sha256:" + "A" * 64, "latest"):
        r = request(host, "GET", f"{base}/blobs/{bad}")
        assert r.status == 400 and r.error_code() == "DIGEST_INVALID", bad
    # a digest of another image's blob is unknown here
    other = mem_registry.run(mem_registry.store.add(b"not an image"))
    r = request(host, "GET", f"/v2/ipfs/{other}/manifests/latest")
    assert r.status == 404 and r.error_code() == "NAME_UNKNOWN"
    # valid CID, content absent from the store: unknown here (test_bad_requests.py has
    # the real stores)
    r = request(host, "GET", f"/v2/ipfs/{raw_cid(b'absent')}/manifests/latest")
    assert r.status == 404 and r.error_code() == "MANIFEST_UNKNOWN"


@pytest.mark.parametrize("path", [
    "/v2/ipfs/{cid}/../../etc/passwd",
    "/v2/ipfs/{cid}/blobs/..%2F..%2Fetc%2Fpasswd",
    "/v2/ipfs/{cid}%2Fmanifests%2Flatest",
    "/v2/ipfs/{cid}/manifests/latest%2F..%2F..",
    "/v2/ipfs%2F{cid}/manifests/latest",
    "/v2/ipfs/..%2F{cid}/manifests/latest",
    "/v2/ipfs/{cid}/manifests/..",
    "/v2/ipfs/{cid}/blobs/%2e%2e",
    "/v2/../v2/ipfs/{cid}/manifests/sha256:{hex}/../latest",
    "/v2/other/{cid}/manifests/latest",
    "/v2/ipfs/{cid}/manifests/latest/extra",
])
def test_path_tricks(mem_registry: ThreadedRegistry, image: StoredImage, path: str) -> None:
    url = path.format(cid=image.root_cid, hex="0" * 64)
    r = request(mem_registry.host, "GET", url)
    assert r.status in (400, 404), (url, r.status)
    assert r.error_code() in ("NAME_UNKNOWN", "NAME_INVALID", "MANIFEST_UNKNOWN",
                              "BLOB_UNKNOWN", "DIGEST_INVALID")


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_writes_are_refused(mem_registry: ThreadedRegistry, image: StoredImage,
                            method: str) -> None:
    for path in ("/v2/", f"/v2/ipfs/{image.root_cid}/manifests/latest",
                 f"/v2/ipfs/{image.root_cid}/blobs/uploads/"):
        r = request(mem_registry.host, method, path)
        assert r.status == 405 and r.error_code() == "UNSUPPORTED"
        assert r.headers["allow"] == "GET, HEAD"


# -- upstream faults -----------------------------------------------------------------------

def test_stall_before_first_byte_is_504(mem_registry: ThreadedRegistry, big_blob) -> None:
    root, digest, _data = big_blob
    store: MemoryStore = mem_registry.store
    request(mem_registry.host, "HEAD", _blob_path(root, digest))  # walk the tree first
    cid = mem_registry.server.trees._trees[root].blobs[digest].cid
    store.faults[cid] = Fault(at=0, kind="stall")
    t0 = time.monotonic()
    r = request(mem_registry.host, "GET", _blob_path(root, digest))
    elapsed = time.monotonic() - t0
    assert r.status == 504 and r.error_code() == "UNAVAILABLE"
    assert "2 attempts" in r.json()["errors"][0]["detail"]
    # timeout 1 s, 1 retry: two stalled reads plus a short backoff, never a hang
    assert 2.0 <= elapsed < 4.0
    metrics = request(mem_registry.metrics_url.split("/", 3)[2], "GET", "/metrics").body
    assert b'peerstar_registry_upstream_errors_total{kind="timeout"} 2.0' in metrics


def test_transient_stall_is_retried(mem_registry: ThreadedRegistry, big_blob) -> None:
    root, digest, data = big_blob
    request(mem_registry.host, "HEAD", _blob_path(root, digest))
    cid = mem_registry.server.trees._trees[root].blobs[digest].cid
    mem_registry.store.faults[cid] = Fault(at=1 << 20, kind="stall", times=1)
    r = request(mem_registry.host, "GET", _blob_path(root, digest))
    assert r.status == 200 and r.body == data  # resumed at byte 1 MiB, exact bytes


@pytest.mark.parametrize("kind", ["stall", "fail"])
def test_death_mid_stream_closes_connection(mem_registry: ThreadedRegistry, big_blob,
                                            kind: str) -> None:
    import http.client

    root, digest, _data = big_blob
    request(mem_registry.host, "HEAD", _blob_path(root, digest))
    cid = mem_registry.server.trees._trees[root].blobs[digest].cid
    mem_registry.store.faults[cid] = Fault(at=1 << 20, kind=kind)
    conn = http.client.HTTPConnection("127.0.0.1", mem_registry.port, timeout=20)
    conn.request("GET", _blob_path(root, digest))
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == BIG
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    assert len(info.value.partial) == 1 << 20  # what arrived before the daemon died
    conn.close()
    metrics = request(mem_registry.metrics_url.split("/", 3)[2], "GET", "/metrics").body
    assert b'peerstar_registry_aborted_responses_total{reason="upstream"} 1.0' in metrics


def test_multirange_death_mid_stream(mem_registry: ThreadedRegistry, big_blob) -> None:
    import http.client

    root, digest, data = big_blob
    request(mem_registry.host, "HEAD", _blob_path(root, digest))
    cid = mem_registry.server.trees._trees[root].blobs[digest].cid
    # the first part (0-9) is served, the second part's read (100-199) fails
    mem_registry.store.faults[cid] = Fault(at=50, kind="fail")
    conn = http.client.HTTPConnection("127.0.0.1", mem_registry.port, timeout=20)
    conn.request("GET", _blob_path(root, digest), headers={"Range": "bytes=0-9,100-199"})
    resp = conn.getresponse()
    assert resp.status == 206
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    assert info.value.partial.endswith(b"\r\n\r\n" + data[:10])
    conn.close()
    # failing before any byte: an honest 502, not a 206
    mem_registry.store.faults[cid] = Fault(at=0, kind="fail")
    r = request(mem_registry.host, "GET", _blob_path(root, digest),
                {"Range": "bytes=0-9,100-199"})
    assert r.status == 502 and r.error_code() == "UNAVAILABLE"


# -- slow clients ----------------------------------------------------------------------------

def test_slowloris_is_cut(mem_registry: ThreadedRegistry) -> None:
    s = socket.create_connection(("127.0.0.1", mem_registry.port), timeout=10)
    s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    closed_at = None
    try:
        for _ in range(40):  # one header byte every 0.25 s, never finishing
            s.sendall(b"X")
            time.sleep(0.25)
            s.setblocking(False)
            try:
                if s.recv(1024) == b"":
                    closed_at = time.monotonic() - t0
                    break
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
    except (BrokenPipeError, ConnectionResetError):
        closed_at = time.monotonic() - t0
    finally:
        s.close()
    # header_timeout is 3 s in this fixture
    assert closed_at is not None and closed_at < 6.0
    assert request(mem_registry.host, "GET", "/v2/").status == 200


def test_slow_reader_is_dropped(mem_registry: ThreadedRegistry) -> None:
    # bigger than every buffer between us (kernel socket buffers, the transport's 1 MiB)
    img = mem_registry.run(store_blob_image(mem_registry.store, os.urandom(32 << 20)))
    root, digest = img.root_cid, img.layer_digests[0]
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", mem_registry.port))
    s.sendall(f"GET {_blob_path(root, digest)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    metrics_host = mem_registry.metrics_url.split("/", 3)[2]
    try:  # write_timeout is 3 s in this fixture
        assert wait_until(lambda: b'aborted_responses_total{reason="client_slow"} 1.0'
                          in request(metrics_host, "GET", "/metrics").body, 10, 0.25), \
            "a client that reads nothing was never dropped"
    finally:
        s.close()


# -- observability and binding ---------------------------------------------------------------

def test_metrics_and_access_log(mem_registry: ThreadedRegistry, image: StoredImage,
                                caplog: pytest.LogCaptureFixture) -> None:
    layer = image.layer_digests[0]
    with caplog.at_level(logging.INFO, logger="peerstar.registry.access"):
        request(mem_registry.host, "GET", _blob_path(image.root_cid, layer),
                {"Range": "bytes=0-99", "User-Agent": "test-agent"})
        request(mem_registry.host, "GET", f"/v2/ipfs/{image.root_cid}/blobs/sha256:" + "b" * 64)
    records = [json.loads(r.getMessage()) for r in caplog.records
               if r.name == "peerstar.registry.access"]
    assert records[0]["status"] == 206 and records[0]["bytes"] == 100
    assert records[0]["range"] == "bytes=0-99" and records[0]["ua"] == "test-agent"
    assert records[0]["path"] == _blob_path(image.root_cid, layer)
    assert records[1]["status"] == 404 and records[1]["error"] == "BLOB_UNKNOWN"
    body = request(mem_registry.metrics_url.split("/", 3)[2], "GET", "/metrics").body.decode()
    assert 'peerstar_registry_requests_total{method="GET",route="blob",status="206"} 1.0' in body
    assert 'peerstar_registry_requests_total{method="GET",route="blob",status="404"} 1.0' in body
    assert 'peerstar_registry_response_bytes_total{route="blob"} 100.0' in body
    assert 'peerstar_registry_request_duration_seconds_count{route="blob"} 2.0' in body


def test_bind_address_policy() -> None:
    check_bind_address("localhost", False)
    check_bind_address("127.0.0.1", False)
    check_bind_address("::1", False)
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        with pytest.raises(PeerstarError, match="refusing to listen"):
            check_bind_address(host, False)
        check_bind_address(host, True)
    with pytest.raises(PeerstarError, match="no host"):
        check_bind_address("", True)


def test_client_hanging_up_stops_the_upstream_read(mem_registry: ThreadedRegistry) -> None:
    img = mem_registry.run(store_blob_image(mem_registry.store, os.urandom(32 << 20)))
    path = f"/v2/ipfs/{img.root_cid}/blobs/{img.layer_digests[0]}"
    s = socket.create_connection(("127.0.0.1", mem_registry.port), timeout=10)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()  # RST: the client is gone
    metrics_host = mem_registry.metrics_url.split("/", 3)[2]
    assert wait_until(lambda: b'aborted_responses_total{reason="client_gone"} 1.0'
                      in request(metrics_host, "GET", "/metrics").body, 10, 0.1), \
        "the response to a vanished client was never stopped"
    # far less than the blob was read from the store
    assert mem_registry.store.bytes_read < 16 << 20
