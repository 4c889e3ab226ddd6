"""The kubo RPC client against the real js-ipfs daemon: addresses, timeouts and retries
(with a daemon frozen by SIGSTOP), stream resumption, errors, and the swarm calls."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from peerstar.ipfs import (
    CHUNK_SIZE,
    EmbeddedStore,
    IPFSError,
    IPFSTimeoutError,
    RPCStore,
    compute_cid,
    open_store,
    parse_api_address,
)
from tests.ipfs.conftest import run
from tests.support.jsipfs import JsIpfs, generate_swarm_key, start_jsipfs
from tests.support.ports import free_port

BIG = random.Random(5).randbytes(40 * CHUNK_SIZE)


@pytest.mark.parametrize(
    "text,url",
    [
        ("/ip4/127.0.0.1/tcp/5001", "http://127.0.0.1:5001"),
        ("/ip4/127.0.0.1/tcp/5001/http", "http://127.0.0.1:5001"),
        ("/ip6/::1/tcp/5002", "http://[::1]:5002"),
        ("/dns4/localhost/tcp/5003/https", "https://localhost:5003"),
        ("http://127.0.0.1:5001", "http://127.0.0.1:5001"),
        ("http://127.0.0.1:5001/", "http://127.0.0.1:5001"),
        ("127.0.0.1:5004", "http://127.0.0.1:5004"),
    ],
)
def test_parse_api_address(text: str, url: str) -> None:
    assert parse_api_address(text) == url


@pytest.mark.parametrize("bad", ["", "/ip4/127.0.0.1", "/ip4/127.0.0.1/udp/5001",
                                 "/ip4/127.0.0.1/tcp/x", "ftp://host:1", "/unix/tmp/s"])
def test_parse_api_address_rejects(bad: str) -> None:
    with pytest.raises(IPFSError):
        parse_api_address(bad)


def test_open_store_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = Path.home()  # the conftest's temporary HOME
    s = open_store(root=tmp_path / "r")
    assert isinstance(s, EmbeddedStore) and s.root == tmp_path / "r"
    s = open_store()
    assert isinstance(s, EmbeddedStore) and s.root == home / ".local/share/peerstar"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert open_store().root == tmp_path / "xdg/peerstar"  # type: ignore[attr-defined]
    # ~/.ipfs/api when IPFS_PATH is unset
    (home / ".ipfs").mkdir()
    (home / ".ipfs/api").write_text("/ip4/127.0.0.1/tcp/4999\n")
    s = open_store()
    assert isinstance(s, RPCStore) and s.api.url == "http://127.0.0.1:4999"
    # IPFS_PATH replaces ~/.ipfs (kubo's rule): no api file there -> embedded
    monkeypatch.setenv("IPFS_PATH", str(tmp_path / "repo"))
    (tmp_path / "repo").mkdir()
    assert isinstance(open_store(), EmbeddedStore)
    (tmp_path / "repo/api").write_text("/ip4/127.0.0.1/tcp/4998")
    s = open_store()
    assert isinstance(s, RPCStore) and s.api.url == "http://127.0.0.1:4998"
    # an explicit address wins over everything
    s = open_store("http://127.0.0.1:4997", root=tmp_path / "r")
    assert isinstance(s, RPCStore) and s.api.url == "http://127.0.0.1:4997"


def test_unreachable_daemon_message() -> None:
    port = free_port()  # nothing listens there

    async def go() -> None:
        async with open_store(f"/ip4/127.0.0.1/tcp/{port}", retries=1, timeout=5) as s:
            t0 = time.monotonic()
            with pytest.raises(IPFSError) as info:
                await s.cat_bytes(compute_cid(b"x"))
            assert time.monotonic() - t0 < 5
            assert str(info.value) == (
                f"no IPFS API at /ip4/127.0.0.1/tcp/{port}: start the daemon or drop "
                "--ipfs-address to use the embedded store"
            )
            with pytest.raises(IPFSError, match="no IPFS API at"):
                await s.add(b"data")
            with pytest.raises(IPFSError, match="no IPFS API at"):
                await s.id()

    run(go())


def test_stale_api_file_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPFS_PATH", str(tmp_path))
    port = free_port()
    (tmp_path / "api").write_text(f"/ip4/127.0.0.1/tcp/{port}")

    async def go() -> None:
        async with open_store(retries=0) as s:
            with pytest.raises(IPFSError, match=f"remove {tmp_path / 'api'}"):
                await s.id()

    run(go())


def test_every_call_is_a_post(jsipfs: JsIpfs) -> None:
    """kubo answers GET with 405; js-ipfs too -- the client must never use GET."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{jsipfs.api_url}/api/v0/id", timeout=10)
    assert info.value.code == 405

    async def go() -> None:
        async with open_store(jsipfs.api_multiaddr) as s:
            assert (await s.id())["ID"] == jsipfs.peer_id

    run(go())


def test_timeout_when_daemon_is_frozen(jsipfs: JsIpfs) -> None:
    """SIGSTOP: the kernel still accepts connections but nothing answers. Each call fails
    with IPFSTimeoutError within (retries+1)*timeout + backoff, then the daemon recovers."""

    async def go() -> None:
        async with open_store(jsipfs.api_multiaddr, timeout=1.0, retries=1) as s:
            cid = await s.add(BIG)
            jsipfs.pause()
            try:
                for call in (s.id(), s.cat_bytes(cid, 0, 100), s.add(b"z" * 5_000_000),
                             s.block_get(cid), s.pin(cid)):
                    t0 = time.monotonic()
                    with pytest.raises(IPFSTimeoutError, match="did not answer"):
                        await call
                    elapsed = time.monotonic() - t0
                    assert 1.9 < elapsed < 4.0, elapsed  # 2 tries of 1 s + 0.25 s backoff
            finally:
                jsipfs.resume()
            assert (await s.id())["ID"] == jsipfs.peer_id

    run(go())


def test_freeze_mid_stream_times_out(jsipfs: JsIpfs) -> None:
    async def go() -> None:
        async with open_store(jsipfs.api_multiaddr) as s:
            cid = await s.add(BIG)
        async with open_store(jsipfs.api_multiaddr, timeout=1.0, retries=0) as s:
            got = 0
            t0 = 0.0
            try:
                with pytest.raises(IPFSTimeoutError):
                    async for part in s.cat(cid):
                        got += len(part)
                        if t0 == 0.0:
                            jsipfs.pause()  # freeze after the first bytes arrived
                            t0 = time.monotonic()
            finally:
                jsipfs.resume()
            # One stalled read (1 s) plus one resumed request (1 s): well under 4 s.
            assert time.monotonic() - t0 < 4.0
            assert 0 < got < len(BIG)

    run(go())


def test_retries_ride_out_a_short_freeze_and_resume_at_the_right_offset(jsipfs: JsIpfs) -> None:
    async def go() -> None:
        async with open_store(jsipfs.api_multiaddr) as s:
            cid = await s.add(BIG)
        async with open_store(jsipfs.api_multiaddr, timeout=1.0, retries=4) as s:
            loop = asyncio.get_running_loop()
            parts = []
            paused = False
            try:
                async for part in s.cat(cid, 1000):
                    parts.append(part)
                    if not paused:
                        paused = True
                        jsipfs.pause()
                        loop.call_later(2.5, jsipfs.resume)  # longer than the timeout
            finally:
                jsipfs.resume()
            assert b"".join(parts) == BIG[1000:]
            # A call started while the daemon is frozen succeeds once it thaws.
            jsipfs.pause()
            loop.call_later(1.5, jsipfs.resume)
            t0 = time.monotonic()
            try:
                assert (await s.id())["ID"] == jsipfs.peer_id
            finally:
                jsipfs.resume()
            assert time.monotonic() - t0 >= 1.4

    run(go())


def test_ranged_reads_stopped_at_their_length_reuse_one_connection(jsipfs: JsIpfs) -> None:
    """A caller that stops once it has its `length` bytes (the registry does) must not
    cost a new connection per read: the client takes the end of the body first. A
    counting TCP relay in front of the daemon sees every connection made."""

    async def go() -> None:
        async with open_store(jsipfs.api_multiaddr) as s:
            cid = await s.add(BIG)
        accepted = 0
        host, port = jsipfs.api_url.removeprefix("http://").rsplit(":", 1)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(1 << 16):
                    w.write(data)
                    await w.drain()
            except ConnectionError:
                pass
            finally:
                w.close()

        async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            ur, uw = await asyncio.open_connection(host, int(port))
            await asyncio.gather(pipe(r, uw), pipe(ur, w))

        server = await asyncio.start_server(relay, "127.0.0.1", 0)
        relay_port = server.sockets[0].getsockname()[1]
        try:
            async with open_store(f"/ip4/127.0.0.1/tcp/{relay_port}", retries=0) as s:
                for offset, length in [(0, 10), (5000, 70000), (CHUNK_SIZE - 3, 6),
                                       (len(BIG) - 100, 100), (1, 3 * CHUNK_SIZE)] * 4:
                    got = bytearray()
                    stream = s.cat(cid, offset, length)
                    async for part in stream:
                        got += part
                        if len(got) >= length:
                            break  # as the registry's read_stream does
                    await stream.aclose()
                    assert bytes(got) == BIG[offset:offset + length]
        finally:
            server.close()
        assert accepted == 1

    run(go())


def test_daemon_error_is_reported_not_retried(jsipfs: JsIpfs) -> None:
    async def go() -> None:
        async with open_store(jsipfs.api_multiaddr, timeout=10, retries=3) as s:
            t0 = time.monotonic()
            with pytest.raises(IPFSError, match="swarm/connect failed"):
                await s.swarm_connect("/ip4/127.0.0.1/tcp/1/p2p/" + jsipfs.peer_id + "x")
            assert time.monotonic() - t0 < 5

    run(go())


def test_swarm_two_nodes_private_network(jsipfs: JsIpfs) -> None:
    """Same swarm key: connect, peers, and an offset read on B of content added on A.
    The session daemon (no key) cannot connect to them."""
    key = generate_swarm_key()
    a = start_jsipfs(swarm_key=key)
    try:
        b = start_jsipfs(swarm_key=key)
        try:
            async def go() -> None:
                async with open_store(a.api_multiaddr) as sa, \
                        open_store(b.api_multiaddr, timeout=30) as sb:
                    assert isinstance(sb, RPCStore)
                    await sb.swarm_connect(a.swarm_multiaddr)  # type: ignore[attr-defined]
                    peers = await sb.swarm_peers()  # type: ignore[attr-defined]
                    assert a.peer_id in [p["Peer"] for p in peers]
                    data = random.Random(11).randbytes(2 * CHUNK_SIZE + 10)
                    cid = await sa.add(data)
                    assert await sb.cat_bytes(cid, CHUNK_SIZE - 3, 20) == \
                        data[CHUNK_SIZE - 3 : CHUNK_SIZE + 17]
                async with open_store(jsipfs.api_multiaddr, retries=0) as s0:
                    with pytest.raises(IPFSError, match="swarm/connect failed"):
                        await s0.swarm_connect(a.swarm_multiaddr)  # type: ignore[attr-defined]

            run(go())
        finally:
            b.stop()
    finally:
        a.stop()
