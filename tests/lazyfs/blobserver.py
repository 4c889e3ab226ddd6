"""A tiny registry-like blob server for lazyfs tests (aiohttp, 127.0.0.1 only).

Owns: serving `/v2/<repo>/blobs/<digest>` from a dict with single and multi-range
answers (206, `multipart/byteranges`), an optional "no multi-range" mode (400, as some
servers do), an optional "no HEAD" mode (405), an optional bearer-token requirement with
a `/token` realm, counting the bytes served, and stopping/starting on the same port (a
registry outage).
"""

from __future__ import annotations

import asyncio
import threading
import uuid

from aiohttp import web

from tests.support.ports import free_port


class BlobServer:
    def __init__(self, blobs: dict[str, bytes] | None = None, *, multi_range: bool = True,
                 token: str | None = None, head: bool = True) -> None:
        self.blobs: dict[str, bytes] = dict(blobs or {})
        self.multi_range = multi_range
        self.head = head  # False: HEAD answers 405, as some registries' storage does
        self.heads = 0
        self.token = token
        self.port = free_port()
        self.bytes_served = 0
        self.ranges: list[str] = []  # Range headers of blob GETs, in order
        self.token_requests = 0
        self.delays: dict[str, float] = {}  # Range header prefix -> seconds to stall it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, digest: str, repo: str = "test/layer") -> str:
        return f"http://{self.host}/v2/{repo}/blobs/{digest}"

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        return web.json_response({"token": self.token})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401, headers={
                "WWW-Authenticate": f'Bearer realm="http://{self.host}/token",'
                                    f'service="test",scope="repository:test/layer:pull"'})
        data = self.blobs.get(request.match_info["digest"])
        if data is None:
            return web.Response(status=404)
        size = len(data)
        header = request.headers.get("Range")
        if request.method == "HEAD":
            self.heads += 1
            if not self.head:
                return web.Response(status=405)
            return web.Response(headers={"Content-Length": str(size)})
        if not header:
            self.bytes_served += size
            return web.Response(body=data)
        self.ranges.append(header)
        for prefix, seconds in self.delays.items():
            if header.startswith(prefix):
                await asyncio.sleep(seconds)
                break
        spans = []
        for spec in header.removeprefix("bytes=").split(","):
            a, _, b = spec.strip().partition("-")
            start, end = int(a), min(int(b), size - 1)
            if start >= size:
                return web.Response(status=416)
            spans.append((start, end))
        if len(spans) == 1:
            a, b = spans[0]
            self.bytes_served += b - a + 1
            return web.Response(status=206, body=data[a:b + 1], headers={
                "Content-Range": f"bytes {a}-{b}/{size}"})
        if not self.multi_range:
            return web.Response(status=400)
        boundary = uuid.uuid4().hex
        body = bytearray()
        for a, b in spans:
            body += (f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Range: bytes {a}-{b}/{size}\r\n\r\n").encode()
            body += data[a:b + 1] + b"\r\n"
            self.bytes_served += b - a + 1
        body += f"--{boundary}--\r\n".encode()
        return web.Response(status=206, body=bytes(body), headers={
            "Content-Type": f"multipart/byteranges; boundary={boundary}"})

    def start(self) -> BlobServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_route("GET", "/token", self._token)
            app.router.add_route("*", "/v2/{repo:.+}/blobs/{digest}", self._blob)
            self._runner = web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
            loop.run_until_complete(site.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("blob server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None
        self._thread = None
