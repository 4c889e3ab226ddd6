"""A real js-ipfs daemon that stalls (SIGSTOP) or dies (SIGKILL) under the registry: the
per-read timeout and retries bound every wait, a stall that heals within the retries
completes the response byte-exact, and a response that cannot be completed is cut off
(connection closed short of Content-Length), never a complete-looking 200."""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
import time
from collections.abc import Iterator

import pytest

from peerstar.ipfs import open_store
from peerstar.registry import ReadPolicy, ServerOptions
from tests.registry.harness import ThreadedRegistry
from tests.registry.helpers import request
from tests.support.ipfsimage import StoredImage, push_blob_image
from tests.support.jsipfs import JsIpfs, start_jsipfs

pytestmark = pytest.mark.slow

TIMEOUT = 2.0
RETRIES = 2
SIZE = 64 << 20


@pytest.fixture(scope="module")
def blob() -> bytes:
    return os.urandom(SIZE)


def _registry(daemon: JsIpfs) -> ThreadedRegistry:
    options = ServerOptions(policy=ReadPolicy(timeout=TIMEOUT, retries=RETRIES))
    return ThreadedRegistry(
        lambda: open_store(daemon.api_multiaddr, timeout=TIMEOUT, retries=0), options,
        metrics=True)


def _push(daemon: JsIpfs, blob: bytes) -> StoredImage:
    # A generous timeout for the 64 MiB add: the registry's short one is for reads.
    return push_blob_image(lambda: open_store(daemon.api_multiaddr, timeout=120), blob)


@pytest.fixture(scope="module")
def stored(jsipfs_daemon: JsIpfs, blob: bytes) -> StoredImage:
    return _push(jsipfs_daemon, blob)


@pytest.fixture
def stalling(jsipfs_daemon: JsIpfs, stored: StoredImage
             ) -> Iterator[tuple[ThreadedRegistry, JsIpfs, StoredImage]]:
    with _registry(jsipfs_daemon) as reg:
        img = stored
        try:
            yield reg, jsipfs_daemon, img
        finally:
            jsipfs_daemon.resume()  # never leave the shared daemon stopped


def _path(img: StoredImage) -> str:
    return f"/v2/ipfs/{img.root_cid}/blobs/{img.layer_digests[0]}"


def _read_slowly(resp: http.client.HTTPResponse, after: int, hook) -> bytes:
    """Read the body in 256 KiB steps; call `hook()` once `after` bytes have arrived.

    http.client's read(amt) returns b"" at a premature EOF instead of raising, so the
    length is checked here against Content-Length.
    """
    expected = int(resp.headers["Content-Length"])
    parts, got, fired = [], 0, False
    while True:
        part = resp.read(256 << 10)
        if not part:
            body = b"".join(parts)
            if got < expected:
                raise http.client.IncompleteRead(body, expected - got)
            return body
        parts.append(part)
        got += len(part)
        if not fired and got >= after:
            fired = True
            hook()


def test_stall_before_first_byte_gives_504_then_recovers(stalling, blob: bytes) -> None:
    reg, daemon, img = stalling
    assert request(reg.host, "HEAD", _path(img)).status == 200  # tree walked, cached
    daemon.pause()
    t0 = time.monotonic()
    r = request(reg.host, "GET", _path(img), {"Range": "bytes=0-1023"}, timeout=60)
    elapsed = time.monotonic() - t0
    daemon.resume()
    assert r.status == 504 and r.error_code() == "UNAVAILABLE"
    # (retries + 1) reads of TIMEOUT each, plus backoff: bounded, not a hang
    assert (RETRIES + 1) * TIMEOUT <= elapsed < (RETRIES + 1) * TIMEOUT + 5
    r = request(reg.host, "GET", _path(img), {"Range": "bytes=1000-2999"}, timeout=60)
    assert r.status == 206 and r.body == blob[1000:3000]


def test_stall_mid_read_healed_within_retries(stalling, blob: bytes) -> None:
    reg, daemon, img = stalling
    conn = http.client.HTTPConnection("127.0.0.1", reg.port, timeout=60)
    conn.request("GET", _path(img))
    resp = conn.getresponse()
    assert resp.status == 200

    def stall() -> None:
        daemon.pause()
        # resumed after one read timed out, before the retries run out
        threading.Timer(TIMEOUT * 1.5, daemon.resume).start()

    body = _read_slowly(resp, 4 << 20, stall)
    conn.close()
    assert len(body) == SIZE
    assert hashlib.sha256(body).digest() == hashlib.sha256(blob).digest()
    metrics = request(reg.metrics_url.split("/", 3)[2], "GET", "/metrics").body
    assert b'peerstar_registry_upstream_errors_total{kind="timeout"}' in metrics


def test_stall_mid_read_never_healed_cuts_connection(stalling) -> None:
    reg, daemon, img = stalling
    conn = http.client.HTTPConnection("127.0.0.1", reg.port, timeout=60)
    conn.request("GET", _path(img))
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == SIZE
    t0 = time.monotonic()
    with pytest.raises(http.client.IncompleteRead) as info:
        _read_slowly(resp, 4 << 20, daemon.pause)
    elapsed = time.monotonic() - t0
    daemon.resume()
    conn.close()
    assert len(info.value.partial) < SIZE
    assert elapsed < (RETRIES + 1) * TIMEOUT + 10


def test_daemon_killed_mid_stream(blob: bytes) -> None:
    daemon = start_jsipfs()
    try:
        with _registry(daemon) as reg:
            img = _push(daemon, blob)
            conn = http.client.HTTPConnection("127.0.0.1", reg.port, timeout=60)
            conn.request("GET", _path(img))
            resp = conn.getresponse()
            assert resp.status == 200

            def kill() -> None:
                assert daemon.proc is not None
                daemon.proc.kill()
                daemon.proc.wait(10)

            with pytest.raises(http.client.IncompleteRead):
                _read_slowly(resp, 4 << 20, kill)
            conn.close()
            # the next request gets a prompt, honest error
            t0 = time.monotonic()
            r = request(reg.host, "GET", _path(img), {"Range": "bytes=0-9"}, timeout=60)
            assert r.status == 502 and r.error_code() == "UNAVAILABLE"
            assert time.monotonic() - t0 < 10
    finally:
        daemon.stop()
