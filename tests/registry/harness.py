"""Run a `RegistryServer` on 127.0.0.1 in a background thread with its own event loop, so
blocking clients (ctr, skopeo, urllib, raw sockets) can talk to it from the test.

The store is created inside that loop (httpx clients are bound to the loop that made
them); `run(coro)` executes a coroutine there, e.g. to push an image into the store.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from peerstar.registry import RegistryServer, ServerOptions

T = TypeVar("T")


class ThreadedRegistry:
    def __init__(self, store_factory: Callable[[], Any],
                 options: ServerOptions | None = None, *, metrics: bool = False) -> None:
        self._store_factory = store_factory
        self._options = options
        self._metrics = metrics
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="registry-under-test")
        self.server: RegistryServer | None = None
        self.store: Any = None

    def start(self) -> ThreadedRegistry:
        self._thread.start()

        async def boot() -> None:
            self.store = self._store_factory()
            self.server = RegistryServer(self.store, self._options)
            await self.server.start("127.0.0.1", 0, metrics_host="127.0.0.1" if
                                    self._metrics else None, metrics_port=0)

        self.run(boot())
        return self

    def run(self, coro: Awaitable[T], timeout: float = 600) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore
        return fut.result(timeout)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def metrics_url(self) -> str:
        assert self.server is not None
        host, port = self.server.metrics_addresses[0]
        return f"http://{host}:{port}/metrics"

    def stop(self) -> None:
        async def down() -> None:
            if self.server is not None:
                await self.server.stop()
            if self.store is not None:
                await self.store.close()

        if self._thread.is_alive():
            try:
                self.run(down(), timeout=30)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> ThreadedRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
