"""Pubsub on both stores (`ContentStore.pubsub_publish` / `pubsub_subscribe`), and the
registry mirror's directory over it (peerstar.registry.directory): records announced by
one bridge are heard by another, a `want` is answered by the node that verified the
record, and a lookup nobody answers ends after its timeout."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from peerstar.ipfs import open_store
from peerstar.registry.directory import Directory, Record
from tests.ipfs.conftest import make_store, run


def test_published_messages_reach_subscribers(backend: tuple[str, dict[str, Any]]) -> None:
    async def main() -> list[bytes]:
        store = make_store(backend)
        got: list[bytes] = []

        async def listen() -> None:
            async for data in store.pubsub_subscribe("peerstar-test/pubsub"):
                got.append(data)
                if len(got) == 2:
                    return

        task = asyncio.create_task(listen())
        await asyncio.sleep(0.5)  # the daemon registers the subscription
        await store.pubsub_publish("peerstar-test/pubsub", b"one")
        await store.pubsub_publish("peerstar-test/pubsub", bytes(range(256)))
        async with asyncio.timeout(10):
            await task
        await store.close()
        return got

    assert run(main()) == [b"one", bytes(range(256))]


def test_directory_records_wants_and_timeout(backend: tuple[str, dict[str, Any]]) -> None:
    async def main() -> None:
        # Two bridges over the same node's pubsub (what two nodes see, on one node): two
        # clients of the daemon; the embedded store's pubsub is that of its one process.
        store_a = make_store(backend)
        store_b = open_store(**backend[1]) if backend[0] == "rpc" else store_a
        a, b = Directory(store_a, timeout=2.0), Directory(store_b, timeout=0.05)
        await a.start()
        await asyncio.sleep(0.5)
        # Learnt before b listened: only a `want` finds it.
        early = Record("sha256:" + "1" * 64, "bafkreiearly", 10, "application/x")
        a.verified(early)
        await asyncio.sleep(0.2)
        await b.start()
        await asyncio.sleep(0.5)
        late = Record("sha256:" + "2" * 64, "bafkreilate", 20)
        a.verified(late)
        await asyncio.sleep(0.5)
        assert b.heard.get(late.key) == late  # announced: a local hit for b
        assert early.key not in b.heard
        assert await b.lookup(early.key, timeout=2.0) == early  # asked and answered
        t0 = time.monotonic()
        assert await b.lookup("sha256:" + "3" * 64) is None
        assert time.monotonic() - t0 < 1.0  # bounded by b's 50 ms timeout
        # A newer tag resolution wins over an older one, whichever arrives last.
        b._remember(Record("tag:r/app:1", "sha256:" + "5" * 64, at=200.0))
        b._remember(Record("tag:r/app:1", "sha256:" + "4" * 64, at=100.0))
        assert b.heard["tag:r/app:1"].value == "sha256:" + "5" * 64
        b.own["tag:r/app:1"] = Record("tag:r/app:1", "sha256:" + "9" * 64, at=150.0)
        newest = await b.lookup("tag:r/app:1")
        assert newest is not None and newest.value == "sha256:" + "5" * 64
        for d in (a, b):
            await d.close()
        for s in {id(store_a): store_a, id(store_b): store_b}.values():
            await s.close()

    run(main())


def test_directory_claims_one_fetcher(backend: tuple[str, dict[str, Any]]) -> None:
    async def main() -> None:
        store_a = make_store(backend)
        store_b = open_store(**backend[1]) if backend[0] == "rpc" else store_a
        a, b = Directory(store_a, timeout=1.0), Directory(store_b, timeout=1.0)
        for d in (a, b):
            await d.start()
        await asyncio.sleep(0.5)
        key = "sha256:" + "6" * 64
        won = await asyncio.gather(a.claim(key), b.claim(key))
        assert sorted(won) == [False, True]  # claimed at the same moment: one fetches
        winner, loser = (a, b) if won[0] else (b, a)
        assert await winner.claim("sha256:" + "7" * 64)  # claimed by nobody else: fetch
        waiting = asyncio.create_task(loser.wait_for(key, 10.0))
        await asyncio.sleep(0.1)
        rec = Record(key, "bafkreiwinner", 30)
        winner.verified(rec)
        assert await waiting == rec
        # A failed winner drops its claim: the waiter stops waiting at once.
        other = "sha256:" + "8" * 64
        assert await winner.claim(other)
        await asyncio.sleep(0.5)
        assert not await loser.claim(other)
        waiting = asyncio.create_task(loser.wait_for(other, 10.0))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        winner.drop(other)
        assert await waiting is None and time.monotonic() - t0 < 5.0
        for d in (a, b):
            await d.close()
        for s in {id(store_a): store_a, id(store_b): store_b}.values():
            await s.close()

    run(main())
