"""Zero-copy relay of a daemon's `cat` body to a registry client (Linux splice(2)).

Owns: `SpliceCat`, a minimal HTTP/1.1 client for kubo's `POST /api/v0/cat` over raw
non-blocking sockets with a keep-alive pool, whose `relay` moves the response body from
the daemon's socket into a `Pipe` with splice(2) and on into the client's socket
(`Pipe.pass_on` / `Pipe.drain_to`), never reading a body byte into Python, with the
registry's per-read timeout and retries (`upstream.ReadPolicy`); and
`splice_reader_for`, which picks this path for stores that talk to a daemon over plain
HTTP on Linux.

Why: js-ipfs computes a 1 MiB `cat` for ~2.5 ms and then sends the whole MiB within
~0.4 ms, so a relay's per-byte cost is not hidden behind the daemon: it adds straight to
the latency of every large read. Copying through Python (recv into bytes, HTTP chunk
parsing, send) cost ~1.5 ms of CPU per MiB in the registry, measured on this project's
2-CPU machine, and kept 1 MiB reads at concurrency 1 near 0.65x of a direct `cat`; a bare
recv+send relay loop alone costs ~0.7 ms per MiB there, splice ~0.1-0.3 ms, as the
pages are handed from one socket to the other through the pipe without being copied.
For the same reason the burst is relayed inside one loop (`SpliceCat._cat`): each piece
goes on to the client as soon as it is in the pipe, and the server's generators are only
resumed for the headers, a slow client and the end of the range.

The response head (status line, headers) is parsed by aiohttp's HTTP parser (C, ~4 us;
h11 took ~40 us per request with the request it had to write first), an error
response's body by h11; the head and the chunk-size lines are read with MSG_PEEK and then
consumed to the exact byte, so no body byte is ever read into user space (a parser
would hand body bytes over by copying them, so the chunk-size lines of the body -- hex
digits and CRLF -- are read here). `SpliceCat.request_now` lets the server send a
`cat` before it builds its own response, so the daemon starts while the registry
does its bookkeeping. Waits on daemon sockets go through one epoll set of our own
(`_Readiness`), registered with the event loop once. Every byte
spliced out of the daemon's socket is counted at once (`_Progress`), so when a wait on
the daemon times out or the connection fails, the retry asks for exactly the bytes not
yet taken; those taken are a valid prefix, already with the client or still in the pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import socket
import sys
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import h11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpResponseParser

from peerstar.ipfs.errors import IPFSError, rpc_error_message
from peerstar.registry.upstream import OnFailure, ReadPolicy, UpstreamError, failed_read

log = logging.getLogger("peerstar.registry.splice")

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, not exported by Python 3.11
# A pipe holds this much; a 1 MiB read passes in one or two hand-overs.
PIPE_BYTES = 1 << 20
_MAX_HEAD = 16 << 10
_MAX_ERROR_BODY = 64 << 10
# A chunk-size line (hex digits, maybe extensions) and the CRLF before it fit in this.
_CHUNK_HEAD = 1024
_IDLE_CONNECTIONS = 64
_IDLE_PIPES = 64
# Before the client's headers are out, take at most this much: the headers and the
# first bytes reach the client sooner, and the rest is passed straight on (`pass_on`).
_FIRST_PIECE = 64 << 10
# Pass bytes on to the client in pieces of at least this much (or whenever the daemon
# pauses): each piece wakes the client, whose per-wake-up cost (~25 us of Python in an
# aiohttp client) made 64 KiB pieces dearer than the daemon's own 256 KiB chunks.
_PASS_ON = 256 << 10
# How long a finished response may take to deliver its last-chunk marker before its
# connection is dropped instead of being kept for the next read.
_FINISH_TIMEOUT = 2.0


def available() -> bool:
    """Whether splice(2) can be used here (Linux, Python exposing os.splice)."""
    return sys.platform.startswith("linux") and hasattr(os, "splice")


class Spliced:
    """`n` more bytes of the requested range were taken from the daemon, in order: they
    sit in the request's pipe or were already passed on to the client (`Pipe.pass_on`)."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class Pipe:
    """A kernel pipe the relayed bytes pass through; reusable only once drained."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller default pipe still works
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, PIPE_BYTES)
        self.pending = 0  # bytes written in and not yet drained
        # The client's socket, which the read loop may pass bytes on to directly; -1
        # until the server has put on the wire all aiohttp holds for this response.
        self.out = -1
        self.delivered = 0  # bytes moved on to `out` by the read loop itself

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.r = self.w = -1

    def pass_on(self) -> None:
        """Move what the pipe holds to `out` if it takes it now (never waits); a client
        that is slow or gone is left to `drain_to`, which waits or reports it."""
        if self.out < 0 or not self.pending:
            return
        try:
            moved = os.splice(self.r, self.out, self.pending, flags=_FLAGS)
        except OSError:  # BlockingIOError, or the client went away: drain_to tells
            return
        self.pending -= moved
        self.delivered += moved

    async def drain_to(self, fd: int, timeout: float) -> None:
        """Move everything the pipe holds into socket `fd` (non-blocking), waiting for
        it to accept data at most `timeout` seconds at a time.

        Raises TimeoutError if the peer accepts nothing for `timeout`, OSError
        (ConnectionError, BrokenPipeError) if it went away.
        """
        loop = asyncio.get_running_loop()
        while (n := self.pending) > 0:
            try:
                moved = os.splice(self.r, fd, n, flags=_FLAGS)
            except BlockingIOError:
                await _wait_writable(loop, fd, timeout)
                continue
            if moved == 0:  # the pipe is empty: our own accounting is wrong
                raise OSError("relay pipe ran dry")
            self.pending -= moved


class PipePool:
    """Pipes kept for reuse (a pipe costs four syscalls to make and close)."""

    def __init__(self) -> None:
        self._idle: list[Pipe] = []

    def get(self) -> Pipe:
        return self._idle.pop() if self._idle else Pipe()

    def put(self, pipe: Pipe) -> None:
        pipe.out = -1  # that request's socket descriptor is closed now
        pipe.delivered = 0
        if pipe.pending == 0 and len(self._idle) < _IDLE_PIPES:
            self._idle.append(pipe)
        else:
            pipe.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


async def _wait_writable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> None:
    """Until `fd` (a client's socket) is writable; TimeoutError after `timeout` seconds.

    The deadline is a plain timer on the future, cheaper than an `asyncio.timeout`
    scope (no task cancellation), as this wait may run a few times per relayed read
    (to a client slow to take it). Waits on daemon sockets go through `_Readiness`.
    """
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(fd, ready)
    timer = loop.call_later(timeout, _expire, fut)
    try:
        await fut
    finally:
        timer.cancel()
        loop.remove_writer(fd)


class _Readiness:
    """Waits for daemon sockets to turn readable through one epoll instance of our own,
    which is registered with the event loop once.

    Why not `loop.add_reader`: uvloop makes a poll handle for every `add_reader` on an fd
    it does not watch yet and destroys it on `remove_reader`, eight syscalls per wait
    (seen with strace), and the relay waits on a daemon socket at least once per range.
    Sockets are watched edge-triggered from their connection on (`watch`): a wait only
    ever follows a read that found the socket empty, so the next bytes (or the end of the
    stream) are an edge; an edge nobody waits for is dropped, and a wait woken by a stale
    one just reads nothing and waits again.
    """

    _EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET

    def __init__(self) -> None:
        self._ep: select.epoll | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[int, asyncio.Future] = {}

    def _epoll(self) -> select.epoll:
        if self._ep is None:
            self._ep = select.epoll()
        return self._ep

    def watch(self, sock: socket.socket) -> None:
        """Watch a new connection's socket (a closed socket leaves the set by itself, so
        its number may come back with another socket: registered anew)."""
        ep = self._epoll()
        try:
            ep.register(sock.fileno(), self._EVENTS)
        except FileExistsError:
            ep.modify(sock.fileno(), self._EVENTS)

    async def wait(self, fd: int, timeout: float | None) -> None:
        """Until socket `fd` (watched) has news; TimeoutError after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._attach(loop)
        fut = loop.create_future()
        self._waiters[fd] = fut
        timer = loop.call_later(timeout, _expire, fut) if timeout is not None else None
        try:
            await fut
        finally:
            if self._waiters.get(fd) is fut:
                del self._waiters[fd]
            if timer is not None:
                timer.cancel()

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._detach()
        loop.add_reader(self._epoll().fileno(), self._ready)
        self._loop = loop

    def _detach(self) -> None:
        if self._loop is not None and self._ep is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._ep.fileno())
        self._loop = None

    def _ready(self) -> None:
        if self._ep is None:
            return
        for fd, _events in self._ep.poll(0):
            fut = self._waiters.pop(fd, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def close(self) -> None:
        self._detach()
        for fut in self._waiters.values():
            if not fut.done():
                fut.cancel()
        self._waiters.clear()
        if self._ep is not None:
            self._ep.close()
            self._ep = None


class _Progress:
    __slots__ = ("taken",)

    def __init__(self) -> None:
        self.taken = 0


class _Conn:
    __slots__ = ("reused", "sock")

    def __init__(self, sock: socket.socket, reused: bool) -> None:
        self.sock = sock
        self.reused = reused


class _Stale(Exception):
    """A kept-alive connection turned out to be closed before any response byte."""


class _NoProtocol:
    """What aiohttp's response parser is given as its connection: only the head is fed
    to it, so the body stream it makes for the protocol is never used."""

    transport = None


class Requested:
    """A `cat` already sent on a kept-alive connection (`SpliceCat.request_now`), to be
    picked up by the `relay` of the same range; `discard` if that relay never runs."""

    __slots__ = ("cid", "conn", "length", "offset")

    def __init__(self, conn: _Conn, cid: str, offset: int, length: int) -> None:
        self.conn: _Conn | None = conn
        self.cid = cid
        self.offset = offset
        self.length = length

    def take(self, cid: str, offset: int, length: int) -> _Conn | None:
        """The connection, if this is the request for that range (once)."""
        conn = self.conn
        if conn is None or (cid, offset, length) != (self.cid, self.offset, self.length):
            return None
        self.conn = None
        return conn

    def discard(self) -> None:
        if self.conn is not None:
            self.conn.sock.close()  # its answer was never read: not reusable
            self.conn = None


def _request_bytes(host: str, cid: str, offset: int, length: int) -> bytes:
    # `cid` is alphanumeric and the numbers are ints (checked by the callers), so the
    # target needs no quoting; the daemon's answer is what gets a real parser.
    return (f"POST /api/v0/cat?arg={cid}&offset={offset}&length={length} HTTP/1.1\r\n"
            f"Host: {host}\r\nContent-Length: 0\r\n\r\n").encode("ascii")


def _peek(sock: socket.socket, limit: int) -> bytes | None:
    """Up to `limit` bytes that have arrived, left in the socket; None if none has yet.
    EOFError at the end of the stream."""
    try:
        peek = sock.recv(limit, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    if not peek:
        raise EOFError
    return peek


def _consume(sock: socket.socket, n: int) -> bytes:
    """Take `n` bytes already peeked."""
    got = sock.recv(n)
    if len(got) != n:  # the peeked bytes cannot vanish
        raise OSError("short read of peeked bytes")
    return got


def _take_chunk_size(sock: socket.socket, after_data: bool) -> int | None:
    """Consume the CRLF that closes the previous chunk's data (`after_data`) and the next
    chunk-size line, if all of it has arrived, in one read: the chunk's size. None (and
    nothing consumed) if it has not all arrived yet."""
    peek = _peek(sock, _CHUNK_HEAD)
    if peek is None:
        return None
    start = 2 if after_data else 0
    if after_data and peek[:2] != b"\r\n"[:len(peek)]:
        raise ValueError("no CRLF after chunk data")
    end = peek.find(b"\r\n", start)
    if end < 0:
        return None
    size = _chunk_size_of(peek[start:end])
    _consume(sock, end + 2)
    return size


def _chunk_size_of(line: bytes) -> int:
    """The size a chunk-size line gives (hex digits, maybe `;extensions`); ValueError if
    it is not one."""
    size = int(line.strip().split(b";")[0], 16)
    if size < 0:
        raise ValueError("negative chunk size")
    return size


class SpliceCat:
    """`cat` of a kubo-compatible daemon at `api_url` (http://host:port), body spliced."""

    def __init__(self, api_url: str) -> None:
        parts = urlsplit(api_url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ValueError(f"not an http://host:port URL: {api_url}")
        self.api_url = api_url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port
        self._host_header = parts.netloc
        self._addr: tuple | None = None
        self._family = socket.AF_INET
        self._idle: list[socket.socket] = []
        self._finishing: set[asyncio.Task] = set()
        self._readiness = _Readiness()
        self.pipes = PipePool()

    # -- connections ----------------------------------------------------------------------

    async def _connect(self, timeout: float) -> socket.socket:
        loop = asyncio.get_running_loop()
        if self._addr is None:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            self._family, _, _, _, self._addr = infos[0]
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(min(10.0, timeout)):
                await loop.sock_connect(sock, self._addr)
            self._readiness.watch(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _idle_conn(self) -> _Conn | None:
        while self._idle:
            sock = self._idle.pop()
            try:
                sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return _Conn(sock, True)  # open, nothing unexpected waiting
            except OSError:
                pass
            sock.close()  # EOF or stray bytes: not reusable
        return None

    async def _acquire(self, timeout: float) -> _Conn:
        return self._idle_conn() or _Conn(await self._connect(timeout), False)

    def _release(self, sock: socket.socket) -> None:
        if len(self._idle) < _IDLE_CONNECTIONS:
            self._idle.append(sock)
        else:
            sock.close()

    async def close(self) -> None:
        for task in list(self._finishing):
            task.cancel()
        for task in list(self._finishing):
            with contextlib.suppress(BaseException):
                await task
        while self._idle:
            self._idle.pop().close()
        self._readiness.close()
        self.pipes.close()

    # -- framing --------------------------------------------------------------------------

    @staticmethod
    def _take_until(sock: socket.socket, term: bytes, limit: int, have: bytearray
                    ) -> bytes | None:
        """Consume up to and including `term` if it has arrived, else what arrived so far
        (into `have`) and None. Never consumes a byte past `term`."""
        while True:
            peek = _peek(sock, limit)
            if peek is None:
                return None
            start = max(0, len(have) - len(term) + 1)
            joined = bytes(have) + peek
            idx = joined.find(term, start)
            if idx >= 0:
                _consume(sock, idx + len(term) - len(have))
                return joined[:idx + len(term)]
            if len(joined) > limit:
                raise IPFSError("daemon sent an oversized HTTP header or chunk line")
            have.extend(sock.recv(len(peek)))

    async def _read_until(self, sock: socket.socket, term: bytes, limit: int,
                          timeout: float | None) -> bytes:
        have = bytearray()
        while True:
            got = self._take_until(sock, term, limit, have)
            if got is not None:
                return got
            await self._readiness.wait(sock.fileno(), timeout)

    async def _chunk_size(self, sock: socket.socket, after_data: bool, timeout: float
                          ) -> int:
        """The next chunk's size (see `_take_chunk_size`), waiting for the daemon."""
        size = _take_chunk_size(sock, after_data)
        if size is not None:
            return size
        # Part of it is here: take it piecewise (waiting on a socket with unread bytes
        # in it would wake at once, again and again).
        if after_data and await self._read_until(sock, b"\r\n", 1024, timeout) != b"\r\n":
            raise ValueError("no CRLF after chunk data")
        return _chunk_size_of(await self._read_until(sock, b"\r\n", _CHUNK_HEAD, timeout))

    async def _error_body(self, sock: socket.socket, head: bytes, timeout: float) -> bytes:
        """The start (at most `_MAX_ERROR_BODY` bytes) of an error response's body, framed
        by h11 (an error is small and ends the connection, so copying it is fine)."""
        h = h11.Connection(h11.CLIENT)
        h.send(h11.Request(method="POST", target="/api/v0/cat",
                           headers=[("Host", self._host_header), ("Content-Length", "0")]))
        h.send(h11.EndOfMessage())
        parts: list[bytes] = []
        total = 0
        with contextlib.suppress(h11.RemoteProtocolError):
            h.receive_data(head)
            h.next_event()  # the Response, already parsed by the caller
            while total < _MAX_ERROR_BODY:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = sock.recv(1 << 16)
                    except BlockingIOError:
                        await self._readiness.wait(sock.fileno(), timeout)
                        continue
                    h.receive_data(data)  # b"" is the end of the stream
                    continue
                if not isinstance(event, h11.Data):
                    break  # EndOfMessage, ConnectionClosed
                parts.append(event.data)
                total += len(event.data)
        return b"".join(parts)[:_MAX_ERROR_BODY]

    # -- cat ------------------------------------------------------------------------------

    def request_now(self, cid: str, offset: int, length: int) -> Requested | None:
        """Send the `cat` of that range right away, without waiting, on a kept-alive
        connection: the daemon starts on it while the caller goes on (it then passes
        the result to `relay` of the same range). None if no connection is idle or the
        request does not go out at once; `relay` then sends it itself."""
        if not cid.isalnum():
            return None
        conn = self._idle_conn()
        if conn is None:
            return None
        req = _request_bytes(self._host_header, cid, offset, length)
        try:
            sent = conn.sock.send(req)
        except OSError:
            sent = -1
        if sent != len(req):  # a few hundred bytes: an idle socket takes them whole
            conn.sock.close()
            return None
        return Requested(conn, cid, offset, length)

    async def _send_request(self, conn: _Conn, cid: str, offset: int, length: int,
                            timeout: float) -> None:
        loop = asyncio.get_running_loop()
        req = _request_bytes(self._host_header, cid, offset, length)
        try:
            try:
                sent = conn.sock.send(req)  # an idle socket takes it whole
            except BlockingIOError:
                sent = 0
            if sent < len(req):
                async with asyncio.timeout(timeout):
                    await loop.sock_sendall(conn.sock, req[sent:])
        except ConnectionError:
            if conn.reused:
                raise _Stale from None
            raise

    async def _read_head(self, conn: _Conn, cid: str, timeout: float) -> tuple[bool, int]:
        """Read and parse the response head: (chunked, content length)."""
        sock = conn.sock
        try:
            head = await self._read_until(sock, b"\r\n\r\n", _MAX_HEAD, timeout)
        except (EOFError, ConnectionError) as exc:
            if conn.reused:
                raise _Stale from None
            if isinstance(exc, EOFError):
                raise IPFSError(f"IPFS daemon at {self.api_url} closed the connection "
                                f"before answering cat {cid}") from None
            raise
        parser = HttpResponseParser(_NoProtocol(), asyncio.get_running_loop(), _MAX_HEAD,
                                    max_line_size=_MAX_HEAD, max_field_size=_MAX_HEAD)
        try:
            messages, _, _ = parser.feed_data(head)
        except HttpProcessingError as exc:
            raise IPFSError(f"IPFS daemon at {self.api_url}: bad HTTP response head: "
                            f"{exc.message or exc}") from None
        message = messages[0][0] if messages else None
        if message is None or message.code < 200:  # no complete head, or a 1xx
            raise IPFSError(f"IPFS daemon at {self.api_url}: unexpected answer to cat "
                            f"{cid}: {head[:100]!r}")
        if message.code != 200:
            text = await self._error_body(sock, head, timeout)
            raise IPFSError(f"IPFS daemon at {self.api_url}: cat {cid} failed: "
                            f"HTTP {message.code} {rpc_error_message(text)[:300]}")
        if message.chunked:
            return True, -1
        length = message.headers.get("Content-Length")
        if length is not None and length.isdigit():
            return False, int(length)
        raise IPFSError(f"IPFS daemon at {self.api_url}: cat {cid}: response has neither "
                        "chunked encoding nor a length")

    async def _open(self, cid: str, offset: int, length: int, timeout: float,
                    requested: Requested | None) -> tuple[_Conn, bool, int]:
        """A connection with the request sent and the answer's head read: (connection,
        chunked, content length). A kept-alive connection found closed is replaced once."""
        conn = requested.take(cid, offset, length) if requested is not None else None
        try:
            if conn is None:
                conn = await self._acquire(timeout)
                await self._send_request(conn, cid, offset, length, timeout)
            chunked, body_left = await self._read_head(conn, cid, timeout)
        except _Stale:
            conn.sock.close()  # type: ignore[union-attr]
            conn = _Conn(await self._connect(timeout), False)
            try:
                await self._send_request(conn, cid, offset, length, timeout)
                chunked, body_left = await self._read_head(conn, cid, timeout)
            except BaseException:
                conn.sock.close()
                raise
        except BaseException:
            if conn is not None:
                conn.sock.close()
            raise
        return conn, chunked, body_left

    async def relay(self, pipe: Pipe, cid: str, offset: int, length: int,
                    policy: ReadPolicy, on_failure: OnFailure | None = None,
                    requested: Requested | None = None) -> AsyncIterator[Spliced]:
        """Exactly `length` bytes of `cid` from `offset` through `pipe`, or UpstreamError.

        Yields `Spliced(n)` (n bytes taken from the daemon since the last yield) when the
        caller has to act: the first bytes are in hand (send the headers, then set
        `pipe.out`), the pipe is full (the client is slow: drain it), or the range is
        complete. The same rules as `upstream.read_stream`: every wait on the daemon is
        bounded by `policy.timeout`, a failed or stalled read is retried from the first
        byte not yet taken, up to `policy.retries` times in a row, progress resets that
        budget. Bytes taken stay valid across a retry (they are the range's prefix, in
        the pipe or already with the client), so the count is exact at every await.
        `requested`: this range's request, already sent (`request_now`).
        """
        if not cid.isalnum():
            raise UpstreamError(f"not a CID: {cid[:80]!r}", timed_out=False)
        progress = _Progress()
        failures = 0
        try:
            while progress.taken < length:
                before = progress.taken
                timed_out = False
                try:
                    async with contextlib.aclosing(self._cat(
                            pipe, cid, offset + before, length - before, policy.timeout,
                            progress, requested)) as pieces:
                        async for piece in pieces:
                            yield piece
                    if progress.taken >= length:
                        return
                    why = f"stream ended after {progress.taken} of {length} bytes"
                except TimeoutError:
                    timed_out = True
                    why = f"no data for {policy.timeout:g} s"
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # IPFSError, connection errors, ...
                    why = f"{type(exc).__name__}: {exc}"
                if progress.taken > before:
                    failures = 0  # progress: this stall gets the full retry budget
                failures += 1
                await failed_read(policy, failures, cid, offset + progress.taken, why,
                                  timed_out, on_failure)
        finally:
            if requested is not None:
                requested.discard()

    async def _cat(self, pipe: Pipe, cid: str, offset: int, length: int, timeout: float,
                   progress: _Progress, requested: Requested | None
                   ) -> AsyncIterator[Spliced]:
        """One `cat` attempt; `progress.taken` counts every byte spliced, at once."""
        conn, chunked, body_left = await self._open(cid, offset, length, timeout,
                                                    requested)
        clean = False  # the connection may serve another request
        unreported = 0  # taken since the last yield
        try:
            sock = conn.sock
            fd = sock.fileno()
            remaining = length
            chunk_left = 0 if chunked else body_left
            after_data = False  # a chunk's data was read: its closing CRLF comes next
            while remaining > 0:
                if chunk_left == 0:
                    if not chunked:
                        break  # the body ended short of `length`: the caller sees it
                    pipe.pass_on()
                    chunk_left = await self._chunk_size(sock, after_data, timeout)
                    after_data = True
                    if chunk_left == 0:
                        break  # the last chunk came early: the body ended short
                    continue
                try:
                    n = os.splice(fd, pipe.w,
                                  min(chunk_left, remaining, PIPE_BYTES - pipe.pending,
                                      PIPE_BYTES if pipe.out >= 0 else _FIRST_PIECE),
                                  flags=_FLAGS)
                except BlockingIOError:
                    # Either the socket is empty or the pipe is full -- maybe before
                    # PIPE_BYTES, when the kernel gave a smaller pipe. Only an empty
                    # socket is worth a wait (edge-triggered: bytes already there would
                    # never wake it); a full pipe goes to the client first.
                    if pipe.pending >= PIPE_BYTES or (
                            pipe.pending and _peek(sock, 1) is not None):
                        yield Spliced(unreported)
                        unreported = 0
                        continue
                    pipe.pass_on()
                    await self._readiness.wait(fd, timeout)
                    continue
                if n == 0:
                    raise EOFError
                pipe.pending += n
                progress.taken += n
                unreported += n
                chunk_left -= n
                remaining -= n
                # Straight on to the client once its response is under way: it gets
                # each piece as soon as the daemon sent it, with no round trip through
                # the generators above (they account, and wait when the client is slow).
                if pipe.pending >= _PASS_ON or remaining == 0:
                    pipe.pass_on()
                if remaining > 0 and (pipe.out < 0 or pipe.pending >= PIPE_BYTES):
                    yield Spliced(unreported)
                    unreported = 0
            if remaining == 0 and chunk_left == 0:
                # Before the last yield: the caller closes this generator once it has
                # all it asked for, so code after that yield would not run.
                clean = True
                self._finish(sock, chunked)
            if unreported:
                yield Spliced(unreported)
        except EOFError:
            raise IPFSError(f"IPFS daemon at {self.api_url} closed the connection in the "
                            f"middle of cat {cid}") from None
        except ValueError:  # a chunk-size line that is not hex
            raise IPFSError(f"IPFS daemon at {self.api_url}: cat {cid}: bad chunked "
                            "encoding") from None
        finally:
            if not clean:
                conn.sock.close()


    # -- end of a response ----------------------------------------------------------------

    def _finish(self, sock: socket.socket, chunked: bool) -> None:
        """Keep the connection once the rest of the response (chunked: the CRLF after the
        data, the last chunk, trailers) has been read; the request does not wait for it."""
        if not chunked:
            self._release(sock)
            return
        tail = b"\r\n0\r\n\r\n"
        try:
            peek = sock.recv(len(tail), socket.MSG_PEEK)
        except BlockingIOError:
            peek = b""
        except OSError:
            sock.close()
            return
        if peek == tail:
            sock.recv(len(tail))
            self._release(sock)
            return
        task = asyncio.get_running_loop().create_task(self._finish_later(sock))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish_later(self, sock: socket.socket) -> None:
        try:
            async with asyncio.timeout(_FINISH_TIMEOUT):
                if await self._read_until(sock, b"\r\n", 1024, None) != b"\r\n":
                    raise IPFSError("more data than asked")
                if (await self._read_until(sock, b"\r\n", 1024, None)).strip() != b"0":
                    raise IPFSError("more data than asked")
                while (await self._read_until(sock, b"\r\n", _MAX_HEAD, None)) != b"\r\n":
                    pass  # a trailer (X-Stream-Error would have cut the body short)
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception:  # EOF, reset, more data than asked, slow: just drop it
            sock.close()
            return
        self._release(sock)


def splice_reader_for(store: object) -> SpliceCat | None:
    """A SpliceCat for stores that talk to a daemon over plain HTTP, on Linux; else None."""
    if not available():
        return None
    try:
        from peerstar.ipfs.rpc import RPCStore
    except ImportError:  # pragma: no cover - peerstar.ipfs is part of the package
        return None
    if not isinstance(store, RPCStore):
        return None
    try:
        return SpliceCat(store.api.url)
    except ValueError:
        return None
