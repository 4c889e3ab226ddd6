"""Range reads through the registry over a real js-ipfs daemon (the store's ranged read,
`RPCStore.cat`): byte-exact ranges on one kept-alive client connection, multi-range
bodies, a slow reader that still gets every byte, and a client hanging up mid-body."""

from __future__ import annotations

import asyncio
import http.client
import random
import socket
import time
from collections.abc import Iterator

import pytest

from peerstar.ipfs import open_store
from peerstar.registry import ReadPolicy, ServerOptions
from tests.registry.harness import ThreadedRegistry
from tests.registry.helpers import parse_multipart, request
from tests.support.ipfsimage import StoredImage, store_blob_image
from tests.support.jsipfs import JsIpfs

SIZE = 8 << 20


@pytest.fixture(scope="module")
def blob() -> bytes:
    return random.Random(11).randbytes(SIZE)


@pytest.fixture(scope="module")
def stored(jsipfs_daemon: JsIpfs, blob: bytes) -> StoredImage:
    async def go() -> StoredImage:
        store = open_store(jsipfs_daemon.api_multiaddr, timeout=120)
        try:
            return await store_blob_image(store, blob)
        finally:
            await store.close()
    return asyncio.run(go())


@pytest.fixture
def registry(jsipfs_daemon: JsIpfs, stored: StoredImage) -> Iterator[ThreadedRegistry]:
    opts = ServerOptions(policy=ReadPolicy(timeout=5, retries=1), write_timeout=3.0)
    with ThreadedRegistry(lambda: open_store(jsipfs_daemon.api_multiaddr, timeout=30,
                                             retries=0), opts, metrics=True) as reg:
        yield reg


def _path(img: StoredImage) -> str:
    return f"/v2/ipfs/{img.root_cid}/blobs/{img.layer_digests[0]}"


def _ranges() -> list[tuple[int, int]]:
    rnd = random.Random(5)
    edges = [(0, 0), (0, 262143), (262143, 262144), (SIZE - 1, SIZE - 1),
             (SIZE - 262144, SIZE - 1), (1, 3 << 20), (4 << 20, (4 << 20) + 65535)]
    rand = []
    for _ in range(30):
        a = rnd.randrange(SIZE)
        rand.append((a, min(SIZE - 1, a + rnd.choice([0, 1, 4095, 65535, 1 << 20,
                                                      rnd.randrange(2 << 20)]))))
    return edges + rand


def test_ranges_byte_exact_on_one_keepalive_connection(
        registry: ThreadedRegistry, stored: StoredImage, blob: bytes) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=30)
    try:
        for a, b in _ranges():
            conn.request("GET", _path(stored), headers={"Range": f"bytes={a}-{b}"})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes {a}-{b}/{SIZE}"
            assert body == blob[a:b + 1], (a, b)
        conn.request("GET", _path(stored))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == blob
    finally:
        conn.close()


def test_multi_range(registry: ThreadedRegistry, stored: StoredImage, blob: bytes) -> None:
    spec = [(0, 9), (262140, 262150), (SIZE - (2 << 20), SIZE - 1)]
    r = request(registry.host, "GET", _path(stored),
                {"Range": "bytes=" + ",".join(f"{a}-{b}" for a, b in spec)})
    assert r.status == 206
    parts = parse_multipart(r.headers["content-type"], r.body)
    assert [p[2] for p in parts] == [blob[a:b + 1] for a, b in spec]
    assert int(r.headers["content-length"]) == len(r.body)


def test_slow_reader_gets_every_byte(registry: ThreadedRegistry, stored: StoredImage,
                                     blob: bytes) -> None:
    # A small receive buffer and pauses: the registry's writes wait on the client.
    with socket.create_connection(("127.0.0.1", registry.port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        s.sendall(f"GET {_path(stored)} HTTP/1.1\r\nHost: x\r\nRange: bytes=100-"
                  f"{100 + (3 << 20) - 1}\r\n\r\n".encode())
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            buf += s.recv(4096)
        head, _, body = bytes(buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 206")
        got = bytearray(body)
        while len(got) < 3 << 20:
            part = s.recv(65536)
            assert part, "connection closed early"
            got += part
            if len(got) < 1 << 20:
                time.sleep(0.002)
        assert bytes(got) == blob[100:100 + (3 << 20)]


def test_client_hanging_up_is_an_abort_and_serving_goes_on(
        registry: ThreadedRegistry, stored: StoredImage, blob: bytes) -> None:
    s = socket.create_connection(("127.0.0.1", registry.port), timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(f"GET {_path(stored)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()  # RST with most of the 8 MiB unsent
    deadline = time.monotonic() + 10
    while True:
        metrics = request(registry.metrics_url.split("/", 3)[2], "GET", "/metrics").body
        if b'aborted_responses_total{reason="client_gone"} 1.0' in metrics:
            break
        assert time.monotonic() < deadline, "the aborted response was not noticed"
        time.sleep(0.1)
    r = request(registry.host, "GET", _path(stored), {"Range": "bytes=5-100004"})
    assert r.status == 206 and r.body == blob[5:100005]
