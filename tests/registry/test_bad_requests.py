"""Requests a registry must survive (issue 17), over the real embedded store: content the
store does not hold is 404 at once (never retried into a 502), Range positions of 20 or
more digits, and clients that half-close their side after sending the request."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerstar.ipfs import EmbeddedStore, compute_cid
from peerstar.registry import ReadPolicy, ServerOptions
from tests.registry.harness import ThreadedRegistry
from tests.registry.helpers import request
from tests.support.ipfsimage import StoredImage, store_blob_image

SIZE = 600 << 10  # three 256 KiB leaves under one node


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ThreadedRegistry]:
    # the production retry count: a missing block must not be retried at all
    options = ServerOptions(policy=ReadPolicy(timeout=5.0, retries=3), warm_up=False)
    with ThreadedRegistry(lambda: EmbeddedStore(tmp_path / "store"), options,
                          metrics=True) as reg:
        yield reg


@pytest.fixture
def image(registry: ThreadedRegistry) -> StoredImage:
    return registry.run(store_blob_image(registry.store, os.urandom(SIZE)))


def _blob(img: StoredImage) -> str:
    return f"/v2/ipfs/{img.root_cid}/blobs/{img.layer_digests[0]}"


def _metrics(reg: ThreadedRegistry) -> str:
    return request(reg.metrics_url.split("/", 3)[2], "GET", "/metrics").body.decode()


def test_an_image_the_store_lacks_is_unknown_at_once(registry: ThreadedRegistry) -> None:
    absent = compute_cid(b"never added to this store")
    base = f"/v2/ipfs/{absent}"
    for method in ("GET", "HEAD"):
        r = request(registry.host, method, f"{base}/manifests/latest")
        assert r.status == 404, method
        if method == "GET":
            assert r.error_code() == "MANIFEST_UNKNOWN"
            assert absent in r.json()["errors"][0]["detail"]  # type: ignore[index]
    r = request(registry.host, "GET", f"{base}/blobs/sha256:" + "a" * 64)
    assert r.status == 404 and r.error_code() == "BLOB_UNKNOWN"
    r = request(registry.host, "GET", f"{base}/tags/list")
    assert r.status == 404 and r.error_code() == "NAME_UNKNOWN"
    # not one failed attempt was counted: nothing was retried
    assert "peerstar_registry_upstream_errors_total{" not in _metrics(registry)


def test_a_blob_the_store_lacks_is_unknown(registry: ThreadedRegistry,
                                          image: StoredImage) -> None:
    layer_cid = image.cids[image.layer_digests[0]]
    root: Path = registry.store.root
    (root / "blocks" / layer_cid[-3:-1] / layer_cid).unlink()  # the layer's root block
    for headers in ({}, {"Range": "bytes=0-99"}, {"Range": "bytes=300000-300099"}):
        r = request(registry.host, "GET", _blob(image), headers)
        assert r.status == 404 and r.error_code() == "BLOB_UNKNOWN", headers
    # the other blobs are still there
    config = f"/v2/ipfs/{image.root_cid}/blobs/{image.config_digest}"
    r = request(registry.host, "GET", config)
    assert r.status == 200 and r.body == image.content[image.config_digest]
    assert "peerstar_registry_upstream_errors_total{" not in _metrics(registry)


@pytest.mark.parametrize("digits", [20, 25, 400])
def test_a_range_start_of_many_digits_is_not_satisfiable(
        registry: ThreadedRegistry, image: StoredImage, digits: int) -> None:
    r = request(registry.host, "GET", _blob(image), {"Range": f"bytes={'9' * digits}-"})
    assert r.status == 416 and r.error_code() == "RANGE_INVALID"
    assert r.headers["content-range"] == f"bytes */{SIZE}"


def test_range_ends_of_many_digits_mean_the_end(registry: ThreadedRegistry,
                                                image: StoredImage) -> None:
    blob = image.content[image.layer_digests[0]]
    for spec in (f"bytes=5-{'9' * 25}", f"bytes=-{'9' * 25}"):
        r = request(registry.host, "GET", _blob(image), {"Range": spec})
        start = 5 if spec.startswith("bytes=5") else 0
        assert r.status == 206, spec
        assert r.headers["content-range"] == f"bytes {start}-{SIZE - 1}/{SIZE}"
        assert r.body == blob[start:]


def _half_closed(reg: ThreadedRegistry, path: str) -> bytes:
    """Send a GET of `path`, shut our sending side, read until the registry closes."""
    with socket.create_connection(("127.0.0.1", reg.port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while part := s.recv(65536):
            got += part
        return bytes(got)


def test_a_client_half_closing_after_its_request_is_closed_quietly(
        registry: ThreadedRegistry, image: StoredImage, caplog: pytest.LogCaptureFixture
        ) -> None:
    paths = ["/v2/", f"/v2/ipfs/{image.root_cid}/manifests/latest", _blob(image),
             f"/v2/ipfs/{image.root_cid}/blobs/sha256:" + "b" * 64,
             f"/v2/ipfs/{compute_cid(b'absent')}/manifests/latest"]
    with caplog.at_level(logging.WARNING):
        for path in paths:
            t0 = time.monotonic()
            got = _half_closed(registry, path)
            assert time.monotonic() - t0 < 5, path  # closed, not left hanging
            # answered in full, or closed without a byte
            if got:
                head, _, body = got.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                assert length == [len(body)], path
        time.sleep(0.2)  # anything logged after the close
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
    # and the registry serves on
    r = request(registry.host, "GET", _blob(image), {"Range": "bytes=0-9"})
    assert r.status == 206 and r.body == image.content[image.layer_digests[0]][:10]
