"""The directory's claim protocol (peerstar.registry.directory), over an in-memory pubsub
whose delivery delay is set per pair of bridges: N bridges that claim one digest at
once fetch it once, for any delays whose round trip stays within the lookup timeout,
and every other bridge gets the winner's record. (The same protocol over real js-ipfs
pubsub: tests/ipfs/test_pubsub.py; end to end: bench/mirror.)"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

from peerstar.registry.directory import Directory, Record

TIMEOUT = 0.1  # the lookup timeout: the claim window
KEY = "sha256:" + "a" * 64


class Bus:
    """Pubsub with a one-way delay per (sender, receiver), in seconds."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue[bytes]] = {}
        self.delay: dict[tuple[str, str], float] = {}

    def store(self, name: str) -> Store:
        self.queues[name] = asyncio.Queue()
        return Store(self, name)


class Store:
    """The part of a ContentStore the directory uses."""

    def __init__(self, bus: Bus, name: str) -> None:
        self.bus, self.name = bus, name

    async def id(self) -> dict[str, object]:
        return {"ID": self.name, "Addresses": []}

    async def pubsub_publish(self, topic: str, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        for dest, queue in self.bus.queues.items():
            loop.call_later(self.bus.delay.get((self.name, dest), 0.0), queue.put_nowait, data)

    async def pubsub_subscribe(self, topic: str) -> AsyncIterator[bytes]:
        queue = self.bus.queues[self.name]
        while True:
            yield await queue.get()


async def _cluster(bus: Bus, names: str) -> list[Directory]:
    dirs = []
    for name in names:
        d = Directory(bus.store(name), timeout=TIMEOUT)  # type: ignore[arg-type]
        d.node = name  # the tie-break order is the names'
        await d.start()
        dirs.append(d)
    return dirs


async def _pull(d: Directory, start: float, fetch: float) -> tuple[bool, Record | None]:
    """What the mirror does with a digest nobody announced: claim it; the winner fetches
    (taking `fetch` s) and announces it, the others wait for its record."""
    await asyncio.sleep(start)
    if await d.claim(KEY):
        await asyncio.sleep(fetch)
        rec = Record(KEY, f"bafy-{d.node}", 10)
        d.verified(rec)
        return True, rec
    return False, await d.wait_for(KEY, 5.0)


async def _race(names: str, delay: dict[tuple[str, str], float], starts: dict[str, float],
                fetch: float) -> list[tuple[bool, Record | None]]:
    bus = Bus()
    bus.delay = delay
    dirs = await _cluster(bus, names)
    try:
        return await asyncio.gather(*(_pull(d, starts[d.node], fetch) for d in dirs))
    finally:
        for d in dirs:
            await d.close()


def _fetched_once(results: list[tuple[bool, Record | None]]) -> None:
    winners = [rec for won, rec in results if won]
    assert len(winners) == 1, results
    assert all(rec == winners[0] for _, rec in results), results


def test_a_fast_winners_announcement_inside_the_window_ends_the_claim() -> None:
    # b claims while a's claim is on its way; a (lower id) wins, fetches a small blob at
    # once and announces it (which clears the claims heard): b takes a's record.
    delay = {("a", "b"): 0.02, ("b", "a"): 0.02}
    results = asyncio.run(_race("ab", delay, {"a": 0.0, "b": 0.01}, fetch=0.0))
    _fetched_once(results)
    assert results[0][0]  # the lowest id


def test_a_lower_claim_arriving_late_in_the_window_wins() -> None:
    # c claims first; a's claim (the lowest id) was sent just before c's reached a, and
    # reaches c late in c's window (a round trip of 0.8 timeouts): c waits.
    delay = {("c", "a"): 0.045, ("a", "c"): 0.035, ("b", "a"): 0.01, ("a", "b"): 0.01,
             ("b", "c"): 0.01, ("c", "b"): 0.01}
    results = asyncio.run(_race("abc", delay, {"a": 0.04, "b": 0.06, "c": 0.0}, fetch=0.2))
    _fetched_once(results)
    assert results[0][0]


def test_a_holder_answers_a_claim_that_missed_its_announcement() -> None:
    async def main() -> tuple[bool, Record | None]:
        bus = Bus()
        a, b = await _cluster(bus, "ab")
        rec = Record(KEY, "bafy-a", 10)
        a.own[KEY] = rec  # verified before b listened: b never heard the `have`
        try:
            won = await b.claim(KEY)
            return won, await b.wait_for(KEY, 1.0)
        finally:
            await a.close()
            await b.close()

    assert asyncio.run(main()) == (False, Record(KEY, "bafy-a", 10))


def test_n_bridges_claiming_at_once_fetch_once_for_any_delays_within_the_bound() -> None:
    rng = random.Random(16)
    names = "abcd"
    for _ in range(25):
        # One-way delays up to 0.4 timeouts (round trips within 0.8: a margin for the
        # event loop's own latency), starts spread over one delay, fetches fast or slow.
        delay = {(x, y): rng.uniform(0.0, 0.4 * TIMEOUT)
                 for x in names for y in names if x != y}
        starts = {x: rng.uniform(0.0, 0.4 * TIMEOUT) for x in names}
        fetch = rng.choice((0.0, 0.01, 0.3))
        _fetched_once(asyncio.run(_race(names, delay, starts, fetch)))
