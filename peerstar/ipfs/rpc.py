"""An async client for kubo's HTTP RPC API (`/api/v0/...`), as a `ContentStore`.

Owns: `add` (a streamed multipart upload, never the whole blob in memory), `cat` with
offset/length (streamed, resumed at the right offset after a dropped connection; the
one way peerstar reads a daemon's content, the registry's reads included),
`block/get` (verified locally), `block/stat` (fetches a block without shipping it),
`pin/add`, `pin/rm`, `pin/ls` (of one CID), `id`, `swarm/peers`, `swarm/connect`,
`pubsub/pub` and `pubsub/sub`;
timeouts, retries with exponential backoff, and CID normalisation to CIDv1 base32.

Every call is a POST (kubo answers GET with 405), over aiohttp: a `cat` through it costs
less than half of what one through httpx did (~4.5 against ~10 ms for 64 KiB from
js-ipfs), and every `cat` is a registry request's fixed cost. The session is made in the
event loop of the first call (and anew if a later call comes from another loop).
Timeout semantics: `timeout` bounds each attempt of a small call (id, pin, block/get,
swarm) as a whole, and for the streaming calls (add, cat) the wait for the answer and
every gap between bytes (for `add`, also the daemon taking each piece of the upload),
so a large transfer may run long while a stalled daemon is still detected within
`timeout`.
Retries (`retries` extra attempts, backoff 0.25 s doubling to 4 s) cover refused or
dropped connections, timeouts and 502/503/504; an error the daemon reports (HTTP
400/500 with a JSON `Message`) is not retried. An `add` is retried only when its input
can be rewound (bytes, seekable file); a `cat` that fails mid-stream resumes at
offset + bytes already delivered.

js-ipfs 0.66 deviations handled here (the test daemon; kubo needs none of this):
- CIDs come back base58btc (CIDv0-looking `zdj7...` for v1) unless `cid-base=base32`
  is passed; we pass it and still normalise whatever comes back.
- `add` must be told `raw-leaves=true` and `chunker=size-262144` explicitly to be
  certain of kubo's layout (both are js defaults for CIDv1, we do not rely on it).
  Its balanced layout uses 174 links per node, like kubo, so no flag is needed there.
- some sizes are JSON numbers rather than strings; we read neither for data paths.
- `cat` with `length=0` is a 400 "Invalid request query input": we answer b"" without a
  call. An offset past the end is a 500 worded differently from kubo: both become
  `OffsetError` (an offset equal to the size reads nothing, as in kubo).
- a malformed CID is a 400 with a generic message: we parse CIDs locally first, so the
  user sees which CID is wrong and why.
- a block the daemon does not have and cannot get (kubo offline: "block was not found
  locally", "could not find") is `BlockNotFoundError`, as in the embedded store.
- `stat_size` reads the root block (`block/get`) and decodes it rather than calling
  `files/stat`, which behaves differently across daemons.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from peerstar.ipfs.address import APIAddress
from peerstar.ipfs.base import AddInput, ContentStore, iter_input, rewindable
from peerstar.ipfs.cid import check_supported, normalize_cid, parse_cid, verify_block
from peerstar.ipfs.errors import (
    BlockNotFoundError,
    CorruptBlockError,
    IPFSError,
    IPFSTimeoutError,
    OffsetError,
    rpc_error_message,
)
from peerstar.ipfs.unixfs import RAW, decode_file_node

log = logging.getLogger(__name__)

_RETRY_STATUS = {502, 503, 504}
_BACKOFF_FIRST = 0.25
_BACKOFF_MAX = 4.0
# Read a `cat` body in pieces of up to this much: each piece costs its consumer a
# timeout scope and a write; 64 KiB network reads passed on one by one made a 1 MiB
# registry response ~3 ms slower than a direct cat.
_PIECE = 256 * 1024
# A registry serves many reads at once, plus its warm-up's block calls.
_CONNECTIONS = 128
# How kubo words a block it does not have and may not fetch (offline mode).
_NOT_FOUND = ("not found locally", "could not find")

# kubo's `add --cid-version=1` layout, spelled out (see the module docstring).
ADD_PARAMS = {
    "cid-version": "1",
    "raw-leaves": "true",
    "chunker": "size-262144",
    "hash": "sha2-256",
    "cid-base": "base32",
    "progress": "false",
}


def _multibase(data: bytes) -> str:
    """base64url multibase (`u` prefix), as the pubsub RPC wants topics and sends data."""
    return "u" + base64.urlsafe_b64encode(data).decode().rstrip("=")


async def _finish_body(content: aiohttp.StreamReader) -> None:
    """Read what is left of a body that holds no more bytes we want (the end of its
    chunked encoding, usually already here), so aiohttp keeps its connection for the
    next request; a daemon sending more than asked loses its connection instead."""
    extra = 0
    while not content.at_eof() and extra <= _PIECE:
        extra += len(await content.readany())


class _Retryable(Exception):
    """An attempt failed in a way another attempt may fix."""

    def __init__(self, why: str, *, timeout: bool = False, unreachable: bool = False) -> None:
        super().__init__(why)
        self.timeout = timeout
        self.unreachable = unreachable


class RPCStore(ContentStore):
    """A kubo (or js-ipfs) daemon reached over its HTTP RPC API."""

    def __init__(self, api: APIAddress, *, timeout: float = 30.0, retries: int = 3) -> None:
        self.api = api
        self.timeout = timeout
        self.retries = max(0, retries)
        self.description = f"IPFS API at {api.shown}"
        self._base = api.url + "/api/v0/"
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- plumbing ---------------------------------------------------------------------
    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=_CONNECTIONS),
                # No total: a large body may take long. Stalls are bounded per read.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout,
                                              sock_read=self.timeout),
                # A proxy from the environment must not sit between us and a local daemon.
                trust_env=False,
                auto_decompress=False,
                # bigger reads from the daemon: fewer wake-ups per MiB
                read_bufsize=1 << 20,
            )
            self._loop = loop
        return self._session

    def _url(self, path: str, params: dict[str, str] | list[tuple[str, str]]) -> URL:
        # Encoded once here: yarl's own query building is a measurable part of a small cat.
        return URL(f"{self._base}{path}?{urlencode(params)}", encoded=True)

    def _unreachable(self) -> IPFSError:
        if self.api.source == "--ipfs-address":
            hint = "start the daemon or drop --ipfs-address to use the embedded store"
        else:
            hint = f"start the daemon or remove {self.api.source} to use the embedded store"
        return IPFSError(f"no IPFS API at {self.api.shown}: {hint}")

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(min(_BACKOFF_FIRST * (2**attempt), _BACKOFF_MAX))

    def _classify(self, exc: Exception, what: str) -> _Retryable:
        if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one too
            return _Retryable(f"{what}: no answer within {self.timeout:g} s", timeout=True)
        if isinstance(exc, aiohttp.ClientConnectorError):
            return _Retryable(f"{what}: cannot connect ({exc})", unreachable=True)
        return _Retryable(f"{what}: {type(exc).__name__}: {exc}")

    def _final_error(self, last: _Retryable, what: str) -> IPFSError:
        tries = self.retries + 1
        if last.unreachable:
            return self._unreachable()
        if last.timeout:
            return IPFSTimeoutError(
                f"IPFS daemon at {self.api.shown} did not answer {what} within "
                f"{self.timeout:g} s ({tries} tries); is it overloaded, stopped, or is the "
                f"content unavailable?"
            )
        return IPFSError(f"IPFS daemon at {self.api.shown}: {last} ({tries} tries)")

    async def _raise_for_status(self, resp: aiohttp.ClientResponse, what: str) -> None:
        if resp.status < 400:
            return
        message = rpc_error_message(await resp.read())
        if resp.status in _RETRY_STATUS:
            raise _Retryable(f"{what}: HTTP {resp.status} {message[:200]}")
        if any(words in message.lower() for words in _NOT_FOUND):
            raise BlockNotFoundError(f"IPFS daemon at {self.api.shown}: {what}: "
                                     f"{message[:500]}")
        raise IPFSError(f"IPFS daemon at {self.api.shown}: {what} failed: {message[:500]}")

    async def _call(self, path: str, params: dict[str, str] | list[tuple[str, str]]) -> bytes:
        """A small call: the whole attempt is bounded by `timeout`; retried."""
        last: _Retryable | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await self._backoff(attempt - 1)
            try:
                async with asyncio.timeout(self.timeout):
                    async with self._client().post(self._url(path, params)) as resp:
                        await self._raise_for_status(resp, path)
                        return await resp.read()
            except _Retryable as exc:
                last = exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = self._classify(exc, path)
            log.debug("%s attempt %d failed: %s", path, attempt + 1, last)
        assert last is not None
        raise self._final_error(last, path)

    async def _call_json(self, path: str, params: Any = ()) -> Any:
        body = await self._call(path, params or {})
        text = body.decode(errors="replace").strip()
        if not text:
            return None
        try:
            return json.loads(text.splitlines()[-1])
        except ValueError:
            raise IPFSError(f"IPFS daemon at {self.api.shown}: {path}: not JSON: "
                            f"{text[:200]!r}") from None

    # -- ContentStore -----------------------------------------------------------------
    async def add(self, data: AddInput, *, pin: bool = True, only_hash: bool = False) -> str:
        params = dict(ADD_PARAMS, pin="true" if pin else "false")
        if only_hash:
            params["only-hash"] = "true"
        start = rewindable(data)
        last: _Retryable | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await self._backoff(attempt - 1)
                if start is not None and not isinstance(
                        data, bytes | bytearray | memoryview | AsyncIterable):
                    data.seek(start)
            consumed = [False]
            try:
                return await self._add_once(data, params, consumed)
            except _Retryable as exc:
                last = exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = self._classify(exc, "add")
            log.debug("add attempt %d failed: %s", attempt + 1, last)
            if consumed[0] and start is None:
                break  # a one-shot stream was partly sent: another attempt would lose data
        assert last is not None
        raise self._final_error(last, "add")

    async def _add_once(self, data: AddInput, params: dict[str, str],
                        consumed: list[bool]) -> str:
        boundary = "peerstar-" + os.urandom(12).hex()
        head = (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="blob"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        loop = asyncio.get_running_loop()
        # An error of the caller's input (a source blob failing its digest) ends the body
        # inside aiohttp's writer, which reports it, if at all, as a connection error: it
        # is kept here and raised as itself.
        input_error: list[BaseException] = []

        async with asyncio.timeout(None) as stall:
            def daemon_turn(on: bool) -> None:
                # The daemon must take each piece within `timeout`; the time our caller's
                # input takes to give the next piece does not count. (aiohttp pulls the
                # body in a task of its own, which may outlive this scope.)
                with contextlib.suppress(RuntimeError):
                    stall.reschedule(loop.time() + self.timeout if on else None)

            async def body() -> AsyncIterator[bytes]:
                daemon_turn(True)
                yield head
                pieces = aiter(iter_input(data))
                while True:
                    daemon_turn(False)
                    try:
                        piece = await anext(pieces)
                    except StopAsyncIteration:
                        break
                    except BaseException as exc:
                        input_error.append(exc)
                        raise
                    consumed[0] = True
                    daemon_turn(True)
                    yield piece
                daemon_turn(True)
                yield tail
                daemon_turn(False)  # the answer's wait is bounded by sock_read

            try:
                async with self._client().post(
                    self._url("add", params), data=body(),
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                ) as resp:
                    await self._raise_for_status(resp, "add")
                    raw = await resp.read()
            except BaseException:
                if input_error:
                    raise input_error[0] from None
                raise
            if input_error:
                raise input_error[0]
        root = None
        for line in raw.decode(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise IPFSError(f"IPFS daemon at {self.api.shown}: add: bad answer "
                                f"{line[:200]!r}") from None
            if obj.get("Message") and not obj.get("Hash"):
                raise IPFSError(f"IPFS daemon at {self.api.shown}: add failed: {obj['Message']}")
            if obj.get("Hash"):
                root = obj["Hash"]
        if root is None:
            raise IPFSError(f"IPFS daemon at {self.api.shown}: add returned no CID")
        return normalize_cid(root)

    async def cat(self, cid: str, offset: int = 0, length: int | None = None
                  ) -> AsyncIterator[bytes]:
        if offset < 0 or (length is not None and length < 0):
            raise IPFSError("offset and length must be >= 0")
        arg = normalize_cid(cid)  # malformed CIDs fail here, before any request
        if length == 0:
            return
        delivered = 0
        last: _Retryable | None = None
        attempt = 0
        while attempt <= self.retries:
            if attempt:
                await self._backoff(attempt - 1)
            params: dict[str, str] = {"arg": arg, "offset": str(offset + delivered)}
            if length is not None:
                params["length"] = str(length - delivered)
            progressed = False
            try:
                async with self._client().post(self._url("cat", params)) as resp:
                    try:
                        await self._raise_for_status(resp, "cat")
                    except (_Retryable, BlockNotFoundError):
                        raise
                    except IPFSError as exc:
                        # kubo and js-ipfs word this differently; give one error type.
                        if "offset" in str(exc).lower():
                            raise OffsetError(f"offset {offset + delivered} is past the end "
                                              f"of {arg} ({exc})") from None
                        raise
                    async for part in resp.content.iter_chunked(_PIECE):
                        last_part = length is not None and delivered + len(part) >= length
                        if length is not None and last_part:
                            part = part[: length - delivered]  # never trust the server here
                            # Take the end of the body before the caller has all it asked
                            # for (and may stop here): the connection is then reused.
                            await _finish_body(resp.content)
                        if part:
                            delivered += len(part)
                            progressed = True
                            yield part
                        if last_part:
                            return
                return
            except _Retryable as exc:
                last = exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = self._classify(exc, "cat")
            log.debug("cat attempt %d failed after %d bytes: %s", attempt + 1, delivered, last)
            # Bytes arrived before the failure: the connection works, resume without
            # spending a retry (a stall still fails each attempt after `timeout`).
            if not progressed:
                attempt += 1
        assert last is not None
        raise self._final_error(last, "cat")

    async def block_get(self, cid: str) -> bytes:
        c = parse_cid(cid)
        check_supported(c)
        data = await self._call("block/get", {"arg": normalize_cid(c)})
        if not verify_block(c, data):
            raise CorruptBlockError(f"block {normalize_cid(c)} from {self.description} "
                                    f"does not match its hash")
        return data

    async def block_stat(self, cid: str) -> int:
        # kubo and js-ipfs 0.66 both fetch a block they lack (from peers) to answer this,
        # and send back only its size: the cheap way to get a block into the node.
        res = await self._call_json("block/stat", {"arg": normalize_cid(cid)})
        try:
            return int(res["Size"])
        except (TypeError, KeyError, ValueError):
            raise IPFSError(f"IPFS daemon at {self.api.shown}: block/stat {cid}: no size in "
                            f"{str(res)[:200]!r}") from None

    async def stat_size(self, cid: str) -> int:
        c = parse_cid(cid)
        raw = await self.block_get(cid)
        if c.codec.name == RAW:
            return len(raw)
        return decode_file_node(raw).size

    async def pin(self, cid: str) -> None:
        await self._call_json("pin/add", {"arg": normalize_cid(cid), "recursive": "true"})

    async def unpin(self, cid: str) -> None:
        await self._call_json("pin/rm", {"arg": normalize_cid(cid), "recursive": "true"})

    async def pinned(self, cid: str) -> bool:
        try:
            await self._call_json("pin/ls", {"arg": normalize_cid(cid), "type": "recursive"})
        except IPFSError as exc:
            if "not pinned" in str(exc):  # kubo's and js-ipfs's words for it
                return False
            raise
        return True

    async def id(self) -> dict[str, Any]:
        res = await self._call_json("id")
        return res if isinstance(res, dict) else {}

    async def swarm_peers(self) -> list[dict[str, Any]]:
        res = await self._call_json("swarm/peers")
        return list((res or {}).get("Peers") or [])

    async def swarm_connect(self, addr: str) -> None:
        await self._call_json("swarm/connect", {"arg": addr})

    # -- pubsub (kubo >= 0.11 and js-ipfs 0.66 alike: multibase topics and data) ------
    async def pubsub_publish(self, topic: str, data: bytes) -> None:
        boundary = "peerstar-" + os.urandom(12).hex()
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"data\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
        url = self._url("pubsub/pub", {"arg": _multibase(topic.encode())})
        try:
            async with asyncio.timeout(self.timeout):
                async with self._client().post(url, data=body, headers={
                        "Content-Type": f"multipart/form-data; boundary={boundary}"}) as resp:
                    await self._raise_for_status(resp, "pubsub/pub")
                    await resp.read()
        except (aiohttp.ClientError, TimeoutError, _Retryable) as exc:
            raise IPFSError(f"IPFS daemon at {self.api.shown}: pubsub/pub failed: "
                            f"{type(exc).__name__}: {exc}") from None

    async def pubsub_subscribe(self, topic: str) -> AsyncIterator[bytes]:
        url = self._url("pubsub/sub", {"arg": _multibase(topic.encode())})
        # A subscription is quiet for as long as nobody publishes: no read timeout.
        idle = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=None)
        try:
            async with self._client().post(url, timeout=idle) as resp:
                await self._raise_for_status(resp, "pubsub/sub")
                async for line in resp.content:
                    try:
                        data = json.loads(line).get("data")
                    except (ValueError, AttributeError):
                        continue
                    if isinstance(data, str) and data.startswith("u"):
                        text = data[1:]
                        with contextlib.suppress(ValueError):
                            yield base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (aiohttp.ClientError, _Retryable) as exc:
            raise IPFSError(f"IPFS daemon at {self.api.shown}: pubsub/sub failed: "
                            f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()
