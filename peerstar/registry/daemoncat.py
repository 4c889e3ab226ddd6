"""The registry's copying path to a kubo-compatible daemon: `cat` with offset/length over
aiohttp, used instead of the store's own client for the descriptor-tree walk and for
content reads when the zero-copy relay (`splice.py`) is off or unavailable.

Why: every registry request is one `cat`, so its fixed cost is the registry's latency
floor. Measured on this project's bench (js-ipfs, 64 KiB reads), a cat through
`peerstar.ipfs.RPCStore` (httpx) costs ~10 ms against ~4.5 ms for the same request
over aiohttp, which alone kept the registry under 0.5x of a direct cat. The store stays
the source of truth for configuration (its API URL); timeouts and retries are applied
by `upstream.read_stream` around every read, as for any store. A stream that ends
short (kubo reports mid-stream errors in a trailer aiohttp cannot see) is caught there
too, since the expected length is always known.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from yarl import URL

from peerstar.ipfs.errors import IPFSError, rpc_error_message

# Relay in pieces of this size: each piece costs a timeout scope, a metrics update and a
# write+drain on the way out, so 64 KiB network reads relayed one by one made a 1 MiB
# response cost ~3 ms more than a direct cat.
_RELAY_PIECE = 256 * 1024


class DaemonCat:
    """`cat(cid, offset, length)` against `<api_url>/api/v0/cat` (POST, as kubo wants)."""

    def __init__(self, api_url: str, *, connections: int = 128) -> None:
        self.api_url = api_url.rstrip("/")
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections),
                # no total timeout: a large body may take long; stalls are bounded per
                # read by the caller. No proxy from the environment for a local daemon.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                trust_env=False,
                auto_decompress=False,
                # bigger reads from the daemon: fewer wake-ups per MiB relayed
                read_bufsize=1 << 20,
            )
        return self._session

    async def cat(self, cid: str, offset: int = 0, length: int | None = None
                  ) -> AsyncIterator[bytes]:
        # A pre-encoded URL: CIDs are base32/base58 and offsets digits, nothing to quote,
        # and yarl's query building is a measurable part of a 64 KiB read.
        query = f"arg={cid}&offset={offset}" + ("" if length is None else f"&length={length}")
        if not cid.isalnum():
            raise IPFSError(f"not a CID: {cid[:80]!r}")
        url = URL(f"{self.api_url}/api/v0/cat?{query}", encoded=True)
        try:
            async with self._client().post(url) as r:
                if r.status != 200:
                    message = rpc_error_message(await r.read())
                    raise IPFSError(f"IPFS daemon at {self.api_url}: cat {cid} failed: "
                                    f"HTTP {r.status} {message[:300]}")
                async for chunk in r.content.iter_chunked(_RELAY_PIECE):
                    yield chunk
        except aiohttp.ClientError as exc:
            raise IPFSError(f"IPFS daemon at {self.api_url}: cat {cid}: {exc}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def fast_reader_for(store: object) -> DaemonCat | None:
    """A DaemonCat for stores that talk to a daemon over HTTP RPC, else None."""
    try:
        from peerstar.ipfs.rpc import RPCStore
    except ImportError:  # pragma: no cover - peerstar.ipfs is part of the package
        return None
    if isinstance(store, RPCStore):
        return DaemonCat(store.api.url)
    return None
