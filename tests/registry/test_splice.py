"""The zero-copy relay (`peerstar.registry.splice`): HTTP framing, retries and timeouts
against a scripted fake daemon (chunk lines split across TCP writes, short and cut
bodies, stalls, errors, more bytes than asked, keep-alive and stale connections), then
byte-exact Range reads, slow and vanishing clients through the registry over js-ipfs."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http.client
import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import pytest

from peerstar.ipfs import open_store
from peerstar.registry import ReadPolicy, ServerOptions, UpstreamError
from peerstar.registry.splice import (
    PIPE_BYTES,
    Pipe,
    Requested,
    SpliceCat,
    _Readiness,
    available,
)
from tests.registry.harness import ThreadedRegistry
from tests.registry.helpers import parse_multipart, request
from tests.support.ipfsimage import StoredImage, push_blob_image
from tests.support.jsipfs import JsIpfs
from tests.support.ports import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.skipif(not available(), reason="splice(2) is Linux-only")

DATA = random.Random(7).randbytes(3 << 20)
CID = "bafkqaaa"  # only its shape matters to the fake daemon


# -- a scripted daemon ---------------------------------------------------------------------

@dataclass
class FakeDaemon:
    """Answers `POST /api/v0/cat?arg&offset&length` from DATA, misbehaving on request."""

    # How the n-th request is answered (the last entry repeats): ok | cl (Content-Length)
    # | short (last chunk after half) | cut (closed after half) | stall (silent after
    # half) | stall0 (silent after the head) | error (HTTP 500) | error_chunked (HTTP 500,
    # chunked body) | garbage (not an HTTP head) | more (5000 bytes too many) | close
    # (connection closed after a good response) | drop (closed without an answer) |
    # badcrlf (chunk data not followed by CRLF)
    modes: list[str] = field(default_factory=lambda: ["ok"])
    chunk: int = 262144
    requests: list[tuple[int, int]] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> FakeDaemon:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode()
                q = parse_qs(urlsplit(target).query)
                off, n = int(q["offset"][0]), int(q["length"][0])
                self.requests.append((off, n))
                mode = self.modes[min(len(self.requests), len(self.modes)) - 1]
                if not await self._answer(writer, off, n, mode):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _write_split(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        # arbitrary TCP write boundaries: framing must not depend on them
        rnd = random.Random(len(self.requests))
        pos = 0
        while pos < len(data):
            step = rnd.choice([1, 2, 3, 7, 100, 4096, 70000])
            writer.write(data[pos:pos + step])
            pos += step
            if rnd.random() < 0.3:
                await writer.drain()
                await asyncio.sleep(0)
        await writer.drain()

    async def _answer(self, writer: asyncio.StreamWriter, off: int, n: int, mode: str
                      ) -> bool:
        if mode == "error":
            body = b'{"Message":"boom: no such block","Code":0,"Type":"error"}'
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
            return True
        if mode == "error_chunked":
            body = b'{"Message":"boom: chunked","Code":0,"Type":"error"}'
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked"
                         b"\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            await writer.drain()
            return True
        if mode == "garbage":
            writer.write(b"SSH-2.0-OpenSSH_9.2\r\nnot http at all\r\n\r\n")
            await writer.drain()
            return False
        if mode == "drop":
            return False
        data = DATA[off:off + n]
        if mode == "stall0":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(3600)
        if mode == "more":
            data = DATA[off:off + n + 5000]
        if mode == "cl":
            await self._write_split(writer, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                    % len(data) + data)
            return True
        out = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
               b"Trailer: X-Stream-Error\r\n\r\n"]
        half = len(data) // 2
        for i in range(0, len(data), self.chunk):
            part = data[i:i + self.chunk]
            if mode in ("short", "cut", "stall") and i + len(part) > half:
                part = part[:max(0, half - i)]
                if part:
                    out.append(b"%x\r\n%s\r\n" % (len(part), part))
                break
            out.append(b"%x;ext=1\r\n%s%s" % (len(part), part,
                                                 b"XX" if mode == "badcrlf" else b"\r\n"))
        if mode in ("cut", "stall"):
            await self._write_split(writer, b"".join(out))
            if mode == "stall":
                await asyncio.sleep(3600)
            return False  # cut: close mid-body
        out.append(b"0\r\n\r\n" if mode != "short" else
                   b"0\r\nX-Stream-Error: context canceled\r\n\r\n")
        await self._write_split(writer, b"".join(out))
        return mode != "close"


async def _collect(sc: SpliceCat, pipe: Pipe, off: int, n: int, policy: ReadPolicy,
                   failures: list[str] | None = None,
                   requested: Requested | None = None) -> bytes:
    """What `relay` puts through the pipe (pipe.out unset: it yields every piece)."""
    out = bytearray()
    async for piece in sc.relay(pipe, CID, off, n, policy,
                                failures.append if failures is not None else None,
                                requested):
        assert len(piece) >= 0
        while pipe.pending:
            chunk = os.read(pipe.r, pipe.pending)
            pipe.pending -= len(chunk)
            out += chunk
    return bytes(out)


def _run(modes: list[str], coro_fn, **kw):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        daemon = await FakeDaemon(modes=modes, **kw).start()
        sc = SpliceCat(daemon.url)
        pipe = Pipe()
        try:
            return await coro_fn(daemon, sc, pipe)
        finally:
            pipe.close()
            await sc.close()
            await daemon.stop()
    return asyncio.run(main())


FAST = ReadPolicy(timeout=0.5, retries=2)


@pytest.mark.parametrize("mode", ["ok", "cl"])
def test_framing_byte_exact_over_split_writes(mode: str) -> None:
    rnd = random.Random(3)
    ranges = [(0, 1), (0, 262144), (262143, 2), (len(DATA) - 1, 1), (0, len(DATA)),
              (5, PIPE_BYTES + 17)]
    ranges += [(o, rnd.randrange(1, len(DATA) - o + 1))
               for o in (rnd.randrange(len(DATA)) for _ in range(12))]

    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        for off, n in ranges:
            assert await _collect(sc, pipe, off, n, FAST) == DATA[off:off + n], (off, n)
            await asyncio.sleep(0.01)  # let a deferred end-of-response read finish
        # keep-alive: one connection served them all
        assert daemon.connections == 1

    _run([mode], go, chunk=100_000)


@pytest.mark.parametrize("mode", ["short", "cut"])
def test_short_or_cut_body_is_retried_from_the_first_missing_byte(mode: str) -> None:
    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        failures: list[str] = []
        off, n = 1000, 2 << 20
        assert await _collect(sc, pipe, off, n, FAST, failures) == DATA[off:off + n]
        assert failures == ["error"]
        assert daemon.requests == [(off, n), (off + n // 2, n - n // 2)]

    _run([mode, "ok"], go)


def test_stall_times_out_per_wait_and_gives_up_after_the_retries() -> None:
    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        failures: list[str] = []
        t0 = time.monotonic()
        with pytest.raises(UpstreamError) as info:
            await _collect(sc, pipe, 0, 2 << 20, FAST, failures)
        elapsed = time.monotonic() - t0
        assert info.value.timed_out and "at byte 1048576" in str(info.value)
        # progress (the first half) reset the budget: then retries + 1 stalls in a row
        assert failures == ["timeout"] * 3
        assert 3 * FAST.timeout <= elapsed < 3 * FAST.timeout + 2
        # each retry asked for exactly the bytes not yet taken
        assert daemon.requests == [(0, 2 << 20)] + [(1 << 20, 1 << 20)] * 2

    _run(["stall", "stall0"], go)


def test_stall_before_the_first_byte_is_a_timeout() -> None:
    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        with pytest.raises(UpstreamError) as info:
            await _collect(sc, pipe, 0, 10, FAST)
        assert info.value.timed_out and len(daemon.requests) == 3

    _run(["stall0"], go)


def test_stall_healed_within_retries_is_byte_exact() -> None:
    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        failures: list[str] = []
        assert await _collect(sc, pipe, 7, 2 << 20, FAST, failures) == DATA[7:7 + (2 << 20)]
        assert failures == ["timeout"]

    _run(["stall", "ok"], go)


def test_daemon_error_is_reported_with_its_message() -> None:
    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        with pytest.raises(UpstreamError) as info:
            await _collect(sc, pipe, 0, 10, ReadPolicy(timeout=1, retries=1))
        assert not info.value.timed_out
        assert "HTTP 500" in str(info.value) and "boom: no such block" in str(info.value)
        assert len(daemon.requests) == 2

    _run(["error"], go)


def test_chunked_error_body_is_read_for_its_message() -> None:
    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        with pytest.raises(UpstreamError) as info:
            await _collect(sc, pipe, 0, 10, ReadPolicy(timeout=1, retries=0))
        assert "HTTP 500" in str(info.value) and "boom: chunked" in str(info.value)

    _run(["error_chunked"], go)


def test_a_head_that_is_not_http_is_an_error_not_a_hang() -> None:
    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        with pytest.raises(UpstreamError) as info:
            await _collect(sc, pipe, 0, 10, ReadPolicy(timeout=1, retries=1))
        assert not info.value.timed_out
        assert "bad HTTP response head" in str(info.value)
        assert len(daemon.requests) == 2

    _run(["garbage"], go)


def test_more_bytes_than_asked_are_cut_and_the_connection_dropped() -> None:
    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        assert await _collect(sc, pipe, 10, 300_000, FAST) == DATA[10:300_010]
        assert await _collect(sc, pipe, 20, 1000, FAST) == DATA[20:1020]
        assert daemon.connections == 2

    _run(["more", "ok"], go)


def test_connection_closed_by_the_daemon_after_a_response_is_not_a_failure() -> None:
    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        failures: list[str] = []
        for off in range(0, 10 * 4096, 4096):
            await asyncio.sleep(0.02)  # the close reaches us before the next request
            assert await _collect(sc, pipe, off, 5000, FAST, failures) == \
                DATA[off:off + 5000]
        assert failures == []
        assert daemon.connections == 10

    _run(["close"], go)


def test_a_request_sent_early_is_answered_through_its_relay() -> None:
    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        assert sc.request_now(CID, 0, 10) is None  # no idle connection yet: not sent
        assert await _collect(sc, pipe, 0, 10, FAST) == DATA[:10]
        await asyncio.sleep(0.01)  # the end of that response is read, the connection idle
        requested = sc.request_now(CID, 777, 300_000)
        assert requested is not None
        await asyncio.sleep(0.05)  # the daemon answers before the relay starts
        assert daemon.requests == [(0, 10), (777, 300_000)]
        got = await _collect(sc, pipe, 777, 300_000, FAST, requested=requested)
        assert got == DATA[777:300_777]
        # the relay sent nothing itself, and the connection is kept for the next read
        assert daemon.requests == [(0, 10), (777, 300_000)] and daemon.connections == 1

    _run(["ok"], go)


def test_an_early_request_on_a_connection_the_daemon_dropped_is_sent_again() -> None:
    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        failures: list[str] = []
        assert await _collect(sc, pipe, 0, 10, FAST) == DATA[:10]
        await asyncio.sleep(0.01)
        requested = sc.request_now(CID, 50, 1000)
        assert requested is not None  # the drop has not happened yet: it is sent
        got = await _collect(sc, pipe, 50, 1000, FAST, failures, requested)
        assert got == DATA[50:1050]
        # not a failed read: a kept-alive connection found closed is replaced once
        assert failures == [] and daemon.connections == 2
        assert daemon.requests == [(0, 10), (50, 1000), (50, 1000)]

    _run(["ok", "drop", "ok"], go)


def test_an_early_request_never_relayed_is_discarded_with_its_connection() -> None:
    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        assert await _collect(sc, pipe, 0, 10, FAST) == DATA[:10]
        await asyncio.sleep(0.01)
        requested = sc.request_now(CID, 5, 5)
        assert requested is not None
        sock = requested.conn.sock  # type: ignore[union-attr]
        requested.discard()
        assert sock.fileno() == -1  # closed: its answer would be read by nobody
        # a relay of another range does not take it, and reads on a new connection
        assert requested.take(CID, 5, 5) is None
        assert await _collect(sc, pipe, 20, 30, FAST) == DATA[20:50]
        assert daemon.connections == 2

    _run(["ok"], go)


def test_chunk_data_without_its_crlf_is_bad_framing() -> None:
    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        with pytest.raises(UpstreamError) as info:
            await _collect(sc, pipe, 0, 250_000, ReadPolicy(timeout=1, retries=0))
        assert "bad chunked encoding" in str(info.value)

    _run(["badcrlf"], go, chunk=100_000)


def test_daemon_down_is_an_error_not_a_hang() -> None:
    port = free_port()  # nothing listens there

    async def go() -> None:
        sc = SpliceCat(f"http://127.0.0.1:{port}")
        pipe = Pipe()
        try:
            with pytest.raises(UpstreamError) as info:
                await _collect(sc, pipe, 0, 10, FAST)
            assert not info.value.timed_out
        finally:
            pipe.close()
            await sc.close()

    asyncio.run(go())


# -- through the registry, over js-ipfs ----------------------------------------------------

SIZE = 8 << 20


@pytest.fixture(scope="module")
def blob() -> bytes:
    return random.Random(11).randbytes(SIZE)


@pytest.fixture(scope="module")
def stored(jsipfs_daemon: JsIpfs, blob: bytes) -> StoredImage:
    return push_blob_image(lambda: open_store(jsipfs_daemon.api_multiaddr, timeout=120), blob)


def _registry(daemon: JsIpfs, **options: object) -> ThreadedRegistry:
    opts = ServerOptions(policy=ReadPolicy(timeout=5, retries=1), write_timeout=3.0,
                         **options)  # type: ignore[arg-type]
    return ThreadedRegistry(lambda: open_store(daemon.api_multiaddr, timeout=30, retries=0),
                            opts, metrics=True)


@pytest.fixture
def spliced(jsipfs_daemon: JsIpfs, stored: StoredImage) -> Iterator[ThreadedRegistry]:
    with _registry(jsipfs_daemon) as reg:
        assert reg.server is not None and reg.server._splice is not None
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


def test_spliced_ranges_byte_exact_on_one_keepalive_connection(
        spliced: ThreadedRegistry, stored: StoredImage, blob: bytes) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", spliced.port, timeout=30)
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
    # kept-alive daemon connections were reused, not one per read
    server = spliced.server
    assert server is not None and server._splice is not None
    assert len(server._splice._idle) <= 2


def test_spliced_multi_range(spliced: ThreadedRegistry, stored: StoredImage,
                             blob: bytes) -> None:
    spec = [(0, 9), (262140, 262150), (SIZE - 2 * PIPE_BYTES, SIZE - 1)]
    r = request(spliced.host, "GET", _path(stored),
                {"Range": "bytes=" + ",".join(f"{a}-{b}" for a, b in spec)})
    assert r.status == 206
    parts = parse_multipart(r.headers["content-type"], r.body)
    assert [p[2] for p in parts] == [blob[a:b + 1] for a, b in spec]
    assert int(r.headers["content-length"]) == len(r.body)


def test_zero_copy_off_gives_the_same_bytes(jsipfs_daemon: JsIpfs, stored: StoredImage,
                                            blob: bytes) -> None:
    with _registry(jsipfs_daemon, zero_copy=False) as reg:
        assert reg.server is not None and reg.server._splice is None
        for a, b in _ranges()[:10]:
            r = request(reg.host, "GET", _path(stored), {"Range": f"bytes={a}-{b}"})
            assert r.status == 206 and r.body == blob[a:b + 1]


def test_spliced_slow_reader_gets_every_byte(spliced: ThreadedRegistry,
                                             stored: StoredImage, blob: bytes) -> None:
    # A small receive buffer and pauses: the pipe fills and the relay waits on the client.
    with socket.create_connection(("127.0.0.1", spliced.port), timeout=30) as s:
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


def test_spliced_client_hanging_up_is_an_abort_and_serving_goes_on(
        spliced: ThreadedRegistry, stored: StoredImage, blob: bytes) -> None:
    s = socket.create_connection(("127.0.0.1", spliced.port), timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(f"GET {_path(stored)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()  # RST with most of the 8 MiB unsent
    metrics_host = spliced.metrics_url.split("/", 3)[2]
    assert wait_until(lambda: b'aborted_responses_total{reason="client_gone"} 1.0'
                      in request(metrics_host, "GET", "/metrics").body, 10, 0.1), \
        "the aborted relay was not noticed"
    r = request(spliced.host, "GET", _path(stored), {"Range": "bytes=5-100004"})
    assert r.status == 206 and r.body == blob[5:100005]


# -- readiness of daemon sockets ------------------------------------------------------------

def test_readiness_wakes_on_data_and_on_the_end_of_the_stream_and_times_out() -> None:
    async def main() -> None:
        readiness = _Readiness()
        a, b = socket.socketpair()
        try:
            a.setblocking(False)
            readiness.watch(a)
            with pytest.raises(TimeoutError):
                await readiness.wait(a.fileno(), 0.05)
            asyncio.get_running_loop().call_later(0.02, b.send, b"x")
            await readiness.wait(a.fileno(), 5)
            assert a.recv(10) == b"x"
            asyncio.get_running_loop().call_later(0.02, b.close)
            await readiness.wait(a.fileno(), 5)
            assert a.recv(10) == b""  # the end of the stream woke it
        finally:
            readiness.close()
            a.close()
            b.close()

    asyncio.run(main())


def test_readiness_watches_a_new_socket_that_reuses_a_closed_ones_number() -> None:
    async def main() -> None:
        readiness = _Readiness()
        a, b = socket.socketpair()
        fd = a.fileno()
        readiness.watch(a)
        a.close()  # leaves the epoll set by itself
        c, d = socket.socketpair()
        try:
            if c.fileno() != fd:  # make the number come back
                os.dup2(c.fileno(), fd)
                c.close()
                c = socket.socket(fileno=fd)
            c.setblocking(False)
            readiness.watch(c)
            readiness.watch(c)  # watched twice: still one registration
            asyncio.get_running_loop().call_later(0.02, d.send, b"y")
            await readiness.wait(c.fileno(), 5)
            assert c.recv(10) == b"y"
        finally:
            readiness.close()
            for s in (b, c, d):
                s.close()

    asyncio.run(main())


def test_readiness_serves_one_event_loop_after_another() -> None:
    readiness = _Readiness()
    a, b = socket.socketpair()
    a.setblocking(False)
    readiness.watch(a)

    async def once(data: bytes) -> bytes:
        asyncio.get_running_loop().call_later(0.02, b.send, data)
        await readiness.wait(a.fileno(), 5)
        return a.recv(10)

    try:
        assert asyncio.run(once(b"1")) == b"1"
        assert asyncio.run(once(b"2")) == b"2"  # a new loop: registered with it anew
    finally:
        readiness.close()
        a.close()
        b.close()


@pytest.mark.parametrize("n", [300_000, (1 << 20) + 12345])
@pytest.mark.parametrize("chunk", [262144, 1 << 21])
def test_a_pipe_smaller_than_planned_does_not_stall_a_relay_to_a_client(n: int, chunk: int
                                                                      ) -> None:
    """The kernel may refuse a 1 MiB pipe (a user's pipe quota): splice then stops short
    of the planned space while the daemon's bytes wait in its socket; the relay must pass
    the pipe on and go on, not wait for bytes that already arrived."""
    async def go(daemon: FakeDaemon, sc: SpliceCat, pipe: Pipe) -> None:
        fcntl.fcntl(pipe.w, 1031, 65536)  # F_SETPIPE_SZ: as small as a default pipe
        client, far = socket.socketpair()
        client.setblocking(False)
        far.setblocking(False)
        got = bytearray()
        loop = asyncio.get_running_loop()

        def readable() -> None:
            with contextlib.suppress(BlockingIOError):
                while data := far.recv(1 << 20):
                    got.extend(data)

        loop.add_reader(far.fileno(), readable)
        try:
            # the daemon's whole answer is in (or on its way to) the socket before the
            # relay reads a byte of it
            requested = sc.request_now(CID, 5, n)
            if requested is None:  # no kept-alive connection yet: make one
                warm = Pipe()
                try:
                    await _collect(sc, warm, 0, 10, ReadPolicy(timeout=3, retries=0))
                finally:
                    warm.close()
                requested = sc.request_now(CID, 5, n)
            assert requested is not None
            await asyncio.sleep(0.3)
            pipe.out = client.fileno()
            async for _piece in sc.relay(pipe, CID, 5, n, ReadPolicy(timeout=3, retries=0),
                                         None, requested):
                await pipe.drain_to(client.fileno(), 3)
            await pipe.drain_to(client.fileno(), 3)
            client.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(5):
                while len(got) < n:
                    await asyncio.sleep(0.01)
        finally:
            loop.remove_reader(far.fileno())
            client.close()
            far.close()
        assert bytes(got) == DATA[5:5 + n]

    _run(["ok"], go, chunk=chunk)
