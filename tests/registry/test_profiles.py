"""Learning a layer's read profile (`peerstar.registry.profiles`) and sharing it over the
directory:

- the pure parts: merging, coalescing to fit one pubsub message, the recording window
  and caps, and what a profile heard may claim (huge, malformed, out of range: clipped
  or dropped, never an exception);
- the directory: a profile record passes the message bound a digest record would not,
  heard profiles are kept (bounded) and answered for by nodes that only heard them;
- the bridge: the ranges containers read (on_demand, readahead, no header) of the
  layers of a manifest it served, in the window, are published once as the layer's
  profile, and bulk reads (toc, prefetch, background) are not; a bridge serving the
  manifest with a profile known warms exactly the leaves covering the learned ranges,
  after the footers and TOCs; a bogus profile warms nothing and breaks nothing.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from peerstar.distribution.client import READ_KIND_HEADER
from peerstar.ipfs import ContentStore, EmbeddedStore
from peerstar.ipfs.unixfs import CHUNK_SIZE
from peerstar.registry import LearnOptions, ReadPolicy, ServerOptions
from peerstar.registry import directory as directory_module
from peerstar.registry.directory import PROFILE_PREFIX, Directory, Record
from peerstar.registry.profiles import (
    MAX_TEXT,
    Recorder,
    coalesce,
    decode,
    encode,
    merge,
    total,
)
from tests.registry.dagstore import DagStore
from tests.registry.harness import ThreadedRegistry
from tests.registry.helpers import MANIFEST_ACCEPT, request
from tests.registry.test_warmup import Layer, _estargz, _files, _metric, _store_image
from tests.support.waiting import wait_until

OPTS = LearnOptions(window=20.0, max_ranges=8, max_bytes=1000)


# -- the pure parts ------------------------------------------------------------------------

def test_merge_and_coalesce_only_ever_grow_the_cover() -> None:
    assert merge([(50, 60), (0, 10), (10, 20), (55, 70), (30, 30), (5, 8)]) == [
        (0, 20), (50, 70)]
    ranges = [(0, 10), (12, 20), (100, 110), (1000, 1010), (1015, 1020)]
    # the two smallest gaps (2 and 5) close first
    assert coalesce(ranges, 3) == [(0, 20), (100, 110), (1000, 1020)]
    assert coalesce(ranges, 1) == [(0, 1020)]
    assert coalesce(ranges, 10) == ranges


def test_encode_fits_one_message_and_decode_gives_the_ranges_back() -> None:
    ranges = [(0, 4096), (1 << 20, (1 << 20) + 70_000), (9_000_000, 9_000_001)]
    text = encode(ranges)
    assert text == "0+1000,100000+11170,895440+1"
    assert decode(text, 10_000_000, LearnOptions()) == ranges
    # 2000 scattered ranges of a 4 GiB blob: coalesced until the text fits, covering all
    many = [(i * 2_000_003, i * 2_000_003 + 4096 + i) for i in range(2000)]
    text = encode(many)
    assert len(text) <= MAX_TEXT
    back = decode(text, 1 << 32, LearnOptions(max_ranges=10_000, max_bytes=1 << 40))
    assert 1 < len(back) < 2000
    assert all(any(s <= a and b <= e for s, e in back) for a, b in many)


@pytest.mark.parametrize("text", [
    None, 17, "", ["0+10"], "0+10,", "0+10,,20+5", "0-10", "0+10;20+5", "-5+10", "0x10+5",
    "g+1", "1" * 17 + "+1", "0+" + "f" * 17, "0+10," * 600,
])
def test_decode_drops_what_does_not_parse(text: object) -> None:
    assert decode(text, 1 << 20, LearnOptions()) == []


def test_decode_clips_to_the_blob_and_the_caps() -> None:
    size = 5000
    # past the end: clipped; wholly past it: gone; overlapping: merged
    assert decode("fa0+ffffffffffff,1000000+10,0+10,5+20", size, LearnOptions()) == [
        (0, 37), (4000, 5000)]
    assert decode("1388+10", size, LearnOptions()) == []  # starts at the end
    assert decode("0+10", 0, LearnOptions()) == []
    # caps: the first max_ranges ranges, at most max_bytes bytes of them
    text = ",".join(f"{i * 100:x}+a" for i in range(20))
    assert decode(text, size, OPTS) == [(i * 100, i * 100 + 10) for i in range(8)]
    assert decode("0+3e8,1000+3e8", size, OPTS) == [(0, 1000)]
    assert decode("0+320,1000+3e8", size, OPTS) == [(0, 800), (4096, 4296)]


def test_recorder_window_merging_and_caps() -> None:
    rec = Recorder(OPTS)
    assert not rec.add("sha256:x", [(0, 10)], 0.0)  # not a layer of a served manifest
    assert rec.take("sha256:x") == ([], 0)
    rec.expect("sha256:a", 4000)
    assert rec.add("sha256:a", [(100, 200)], 10.0)  # opens the window
    assert not rec.add("sha256:a", [(150, 300), (3900, 9000)], 15.0)  # clipped to 4000
    assert not rec.add("sha256:a", [(500, 510)], 30.5)  # 20 s after the first: too late
    # caps: 1000 bytes, 8 ranges at most; a range that would pass one is not taken
    rec.expect("sha256:b", 1 << 20)
    assert rec.add("sha256:b", [(0, 900)], 0.0)
    rec.add("sha256:b", [(1000, 1101)], 1.0)  # 1001 bytes: over
    rec.add("sha256:b", [(2000, 2050)], 1.0)
    for i in range(10):
        rec.add("sha256:b", [(10_000 + i * 100, 10_000 + i * 100 + 5)], 2.0)
    assert rec.take("sha256:a") == ([(100, 300), (3900, 4000)], 4000)
    b, size = rec.take("sha256:b")
    assert size == 1 << 20 and len(b) == 8 and total(b) <= 1000
    assert b[:3] == [(0, 900), (2000, 2050), (10_000, 10_005)]
    # once per process: taken blobs record nothing more
    rec.expect("sha256:a", 4000)
    assert not rec.add("sha256:a", [(0, 10)], 40.0)
    assert rec.take("sha256:a") == ([], 0)


# -- the directory ---------------------------------------------------------------------------

def test_directory_keeps_profiles_bounded_and_answers_for_heard_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory_module, "MAX_PROFILES", 3)

    async def scenario() -> None:
        store = EmbeddedStore(tmp_path / "store")  # pubsub within this process
        heard: list[str] = []
        a, b = Directory(store), Directory(store, on_have=lambda r: heard.append(r.key))
        await a.start()
        await b.start()
        text = encode([(i * 1000, i * 1000 + 10) for i in range(150)])
        assert 200 < len(text) <= MAX_TEXT
        a.verified(Record(PROFILE_PREFIX + "sha256:l0", text, 1 << 20, at=1.0))
        for i in range(1, 5):
            a.verified(Record(PROFILE_PREFIX + f"sha256:l{i}", "0+10", 1 << 20, at=1.0))
        # a digest record with a long value is not a record
        b._handle(json.dumps({"op": "have", "from": "x", "k": "sha256:d", "v": "b" * 300}
                             ).encode())
        # nor a profile beyond the bound
        b._handle(json.dumps({"op": "have", "from": "x", "k": PROFILE_PREFIX + "sha256:z",
                              "v": "0+1," * 740}).encode())
        await asyncio.sleep(0.2)
        assert heard == [PROFILE_PREFIX + f"sha256:l{i}" for i in range(5)]
        kept = [k for k in b.heard if k.startswith(PROFILE_PREFIX)]
        assert kept == [PROFILE_PREFIX + f"sha256:l{i}" for i in (2, 3, 4)]
        assert "sha256:d" not in b.heard
        await a.close()  # the node that recorded l4 is gone...
        c = Directory(store)
        await c.start()
        rec = await c.lookup(PROFILE_PREFIX + "sha256:l4", 2.0)  # ...b answers for it
        assert rec is not None and rec.value == "0+10" and rec.size == 1 << 20
        assert await c.lookup(PROFILE_PREFIX + "sha256:l0", 0.3) is None  # forgotten
        await b.close()
        await c.close()
        await store.close()

    asyncio.run(scenario())


# -- the bridge ----------------------------------------------------------------------------

class PubsubDagStore(DagStore):
    """The warm-up tests' recording store with pubsub among the bridges of one event
    loop (ContentStore's own, in-process)."""

    pubsub_publish = ContentStore.pubsub_publish
    pubsub_subscribe = ContentStore.pubsub_subscribe
    _local_topics = ContentStore._local_topics

    async def id(self) -> dict:
        return {"ID": "", "Addresses": []}


@pytest.fixture(scope="module")
def layers() -> list[Layer]:
    """Two eStargz layers of several leaves each (no prioritized files)."""
    return [_estargz(_files(11, [900_000, 1_500_000, 300_000])),
            _estargz(_files(12, [2_000_000, 40_000]))]


def _registry(store: DagStore, learn: LearnOptions | None) -> ThreadedRegistry:
    return ThreadedRegistry(lambda: store, ServerOptions(
        policy=ReadPolicy(timeout=5.0, retries=1), learn=learn), metrics=True).start()


def _get(reg: ThreadedRegistry, root: str, digest: str, start: int, end: int,
         kind: str | None) -> None:
    headers = {"Range": f"bytes={start}-{end - 1}"}
    if kind is not None:
        headers[READ_KIND_HEADER] = kind
    r = request(reg.host, "GET", f"/v2/ipfs/{root}/blobs/{digest}", headers)
    assert r.status == 206 and len(r.body) == end - start


def test_bridge_records_container_reads_in_the_window_and_publishes_once(
        layers: list[Layer]) -> None:
    store = PubsubDagStore()
    reg = _registry(store, LearnOptions(window=1.0))
    try:
        root, _ = reg.run(_store_image(store, layers))
        top, low = layers
        # before its manifest was served a blob is not recorded
        _get(reg, root, top.digest, 0, 100, "on_demand")
        r = request(reg.host, "GET", f"/v2/ipfs/{root}/manifests/latest",
                    {"Accept": MANIFEST_ACCEPT})
        assert r.status == 200
        _get(reg, root, top.digest, 1000, 2000, "on_demand")
        _get(reg, root, top.digest, 2000, 3000, "readahead")  # merged with the above
        _get(reg, root, top.digest, 700_000, 710_000, None)  # another lazy client
        for kind in ("toc", "prefetch", "background"):  # bulk: not a container's wait
            _get(reg, root, top.digest, 400_000, 500_000, kind)
        _get(reg, root, low.digest, 5, 6, "prefetch")  # no container read of `low`
        server = reg.server
        assert server is not None and server.directory is not None
        key = PROFILE_PREFIX + top.digest
        wait_until(lambda: key in server.directory.own, 10, 0.05)
        rec = server.directory.own[key]
        assert rec.value == encode([(1000, 3000), (700_000, 710_000)])
        assert rec.size == len(top.blob)
        assert PROFILE_PREFIX + low.digest not in server.directory.own
        # once per blob per process: later reads are not published again
        _get(reg, root, top.digest, 50_000, 60_000, "on_demand")
        reg.run(asyncio.sleep(1.5))
        assert server.directory.own[key] is rec
        assert _metric(reg.metrics_url, "peerstar_registry_profiles_total") == {
            "recorded": 1.0, "published": 1.0}
    finally:
        reg.stop()


def _leaves_of(layer: Layer, ranges: list[tuple[int, int]]) -> set[str]:
    out: set[str] = set()
    for start, end in ranges:
        out |= layer.leaves_of(start, end)
    return out


def test_bridge_warms_the_learned_ranges_after_the_tocs_and_drops_bogus_ones(
        layers: list[Layer]) -> None:
    store = PubsubDagStore()
    reg = _registry(store, LearnOptions(lookup_timeout=0.2))
    try:
        root, _ = reg.run(_store_image(store, layers))
        top, low = layers
        server = reg.server
        assert server is not None and server.directory is not None
        learned = [(300_000, 310_000), (1_600_000, 2_400_000)]
        toc_top, toc_low = top.toc_leaves(), low.toc_leaves()
        want = _leaves_of(top, learned) - toc_top
        assert len(want) >= 4
        # what other nodes said: a good profile for `top`, a bogus one for `low`
        # (past its end, and claiming another size)
        server.directory._remember(Record(PROFILE_PREFIX + top.digest, encode(learned),
                                          len(top.blob), at=1.0))
        server.directory._remember(Record(PROFILE_PREFIX + low.digest, encode(
            [(len(low.blob) + 10, len(low.blob) + 99999)]), 7, at=1.0))
        r = request(reg.host, "GET", f"/v2/ipfs/{root}/manifests/latest",
                    {"Accept": MANIFEST_ACCEPT})
        assert r.status == 200
        assert server.warmup is not None
        reg.run(server.warmup.settle(), timeout=60)
        every_leaf = set().union(*(set(la.dag()[1]) for la in layers))
        # of the layers' leaves, exactly those covering the learned ranges were stat'ed
        assert set(store.ops("block_stat")) & every_leaf == want
        # ...and after every footer and TOC read
        cats = [i for i, (op, c) in enumerate(store.calls)
                if op == "cat" and c in toc_top | toc_low]
        learned_stats = [i for i, (op, c) in enumerate(store.calls)
                         if op == "block_stat" and c in want]
        assert max(cats) < min(learned_stats)
        assert _metric(reg.metrics_url, "peerstar_registry_profiles_total") == {
            "applied": 1.0, "dropped": 1.0}
        warmed = _metric(reg.metrics_url, "peerstar_registry_profile_warmed_bytes_total")
        assert warmed == {"": float(sum(len(store._block(c)) for c in want))}
        assert not _metric(reg.metrics_url, "peerstar_registry_warmup_failures_total")
        # the reads are served as ever
        for start, end in learned:
            _get(reg, root, top.digest, start, end, "on_demand")
    finally:
        reg.stop()


def test_learning_off_records_and_asks_nothing(layers: list[Layer]) -> None:
    store = PubsubDagStore()
    reg = _registry(store, None)
    try:
        root, _ = reg.run(_store_image(store, layers))
        server = reg.server
        assert server is not None
        assert server.directory is None and server.recorder is None
        r = request(reg.host, "GET", f"/v2/ipfs/{root}/manifests/latest",
                    {"Accept": MANIFEST_ACCEPT})
        assert r.status == 200
        _get(reg, root, layers[0].digest, 0, CHUNK_SIZE * 2, "on_demand")
        assert server.warmup is not None
        reg.run(server.warmup.settle(), timeout=60)
        assert not store._local_topics()  # nobody subscribed, nothing published
    finally:
        reg.stop()
