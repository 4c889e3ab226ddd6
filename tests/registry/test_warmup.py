"""The warm-up of an image's layers when the registry serves its manifest, and the leaf
fan-out of multi-leaf reads (`peerstar.registry.warmup`), over an in-memory UnixFS store
in kubo's layout (`tests.registry.dagstore`) that records, holds and fails calls:

- exactly the config block, the skeleton nodes, the footer + TOC leaves and the
  prioritized leaves are asked for (eStargz with a landmark, eStargz without,
  zstd:chunked, a plain gzip blob), once per manifest digest, and later reads then
  name leaves without fetching a node;
- the manifest is answered while the warm-up hangs, and the warm-up never has more
  operations in flight than its bound;
- a warm-up that fails or times out fails no manifest or blob request, is counted in
  the metrics and logged once per blob;
- a multi-leaf read of a remote blob has all its leaves requested at once (a barrier
  in the store lets the stats through only when they are all in flight together); a
  local blob's reads send nothing but their cat;
- `block_stat` of both real backends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import random
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from peerstar.distribution.client import READ_KIND_HEADER
from peerstar.estargz import Reader, build
from peerstar.ipfs import BlockNotFoundError
from peerstar.ipfs.unixfs import CHUNK_SIZE, DagBuilder, chunk_bytes
from peerstar.oci import mediatypes as mt
from peerstar.registry import ReadPolicy, ServerOptions
from peerstar.registry.warmup import _SHORT_TAIL_LEAF
from tests.registry.conftest import open_backend
from tests.registry.dagstore import DagStore
from tests.registry.harness import ThreadedRegistry
from tests.registry.helpers import MANIFEST_ACCEPT, request
from tests.support.content import compact_json, sha256_digest
from tests.support.tars import tar_of_files
from tests.support.waiting import wait_until


def _files(seed: int, sizes: list[int]) -> list[tuple[str, bytes]]:
    rnd = random.Random(seed)
    return [(f"data/f{seed}-{i}.bin", rnd.randbytes(n)) for i, n in enumerate(sizes)]


@dataclass
class Layer:
    blob: bytes
    annotations: dict[str, str] = field(default_factory=dict)
    media_type: str = mt.OCI_LAYER_GZIP
    cid: str = ""
    digest: str = ""

    def dag(self) -> tuple[set[str], list[str]]:
        """(the CIDs of its DAG's non-leaf nodes, its leaves' CIDs in file order)."""
        builder = DagBuilder()
        for piece in chunk_bytes(self.blob):
            builder.add_chunk(piece)
        builder.finish()
        inner = {str(b.cid) for b in builder.blocks if b.cid.codec.name == "dag-pb"}
        leaves = [str(b.cid) for b in builder.blocks if b.cid.codec.name == "raw"]
        return inner, leaves

    def leaves_of(self, start: int, end: int) -> set[str]:
        """The leaves holding bytes [start, end)."""
        _, leaves = self.dag()
        return set(leaves[start // CHUNK_SIZE:(end - 1) // CHUNK_SIZE + 1])

    def toc_leaves(self) -> set[str]:
        return self.leaves_of(Reader.from_bytes(self.blob).footer.toc_offset, len(self.blob))

    def footer_read_leaves(self) -> set[str]:
        """The leaves the warm-up reads for the footer: the tail leaf, and the one before
        when the tail leaf is short (the TOC is likely to start there)."""
        size = len(self.blob)
        tail_start = (size - 1) // CHUNK_SIZE * CHUNK_SIZE
        if size - tail_start < _SHORT_TAIL_LEAF and tail_start:
            tail_start -= CHUNK_SIZE
        return self.leaves_of(tail_start, size)

    def prefetch_leaves(self) -> set[str]:
        end = Reader.from_bytes(self.blob).prefetch_end()
        return self.leaves_of(0, end) if end else set()


def _estargz(files: list[tuple[str, bytes]], prioritized: tuple[str, ...] = (),
             compression: str = "gzip") -> Layer:
    out = io.BytesIO()
    tar = tar_of_files(files, dirs=("data",))
    res = build(io.BytesIO(tar), out, compression=compression, level=1,
                prioritized=prioritized)
    media = mt.OCI_LAYER_GZIP if compression == "gzip" else res.media_type
    return Layer(out.getvalue(), dict(res.annotations), media)


@pytest.fixture(scope="module")
def layers() -> list[Layer]:
    """eStargz with prioritized files (~10 MiB), eStargz over 174 leaves without, a
    zstd:chunked layer with prioritized files, and a plain gzip blob of a few leaves."""
    a_files = _files(1, [700_000, 500_000, 9 << 20, 3000])
    big_files = _files(2, [20 << 20, 27 << 20])
    z_files = _files(3, [300_000, 2 << 20, 1 << 20])
    plain = random.Random(4).randbytes(900_000)
    return [
        _estargz(a_files, (a_files[1][0], a_files[0][0])),
        _estargz(big_files),
        _estargz(z_files, (z_files[1][0],), compression="zstd"),
        Layer(plain),
    ]


async def _store_image(store: DagStore, layers: list[Layer]) -> tuple[str, str]:
    """Add `layers` as a one-manifest image in nerdctl's format: (root CID, manifest
    digest); fills each layer's cid and digest."""
    async def desc(data: bytes, media_type: str, **extra: object) -> dict:
        cid = await store.add(data)
        return {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data),
                "urls": [f"ipfs://{cid}"], **extra}

    cfg = await desc(compact_json({"architecture": "amd64", "os": "linux",
                                   "rootfs": {"type": "layers", "diff_ids": []}}),
                     mt.OCI_CONFIG)
    descs = []
    for layer in layers:
        d = await desc(layer.blob, layer.media_type,
                       **({"annotations": layer.annotations} if layer.annotations else {}))
        layer.cid, layer.digest = d["urls"][0][len("ipfs://"):], d["digest"]
        descs.append(d)
    manifest = compact_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": cfg,
                             "layers": descs})
    top = await desc(manifest, mt.OCI_MANIFEST)
    return await store.add(compact_json(top)), top["digest"]


def _metric(url: str, name: str) -> dict[str, float]:
    """A labelled counter/gauge from /metrics: {label value: value}."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for m in re.finditer(rf'^{name}(?:\{{\w+="([^"]*)"\}})? (\S+)$', text, re.M):
        out[m[1] or ""] = float(m[2])
    return out


@pytest.fixture
def registry_for(request: pytest.FixtureRequest) -> Iterator:
    """registry_for(store, **options) -> a started ThreadedRegistry; all stopped after."""
    started: list[ThreadedRegistry] = []

    def make(store: DagStore, **options: object) -> ThreadedRegistry:
        opts = {"policy": ReadPolicy(timeout=5.0, retries=1), **options}
        reg = ThreadedRegistry(lambda: store, ServerOptions(**opts), metrics=True)
        started.append(reg.start())
        return reg

    yield make
    for reg in started:
        reg.stop()


def _settle(reg: ThreadedRegistry) -> None:
    assert reg.server is not None and reg.server.warmup is not None
    reg.run(reg.server.warmup.settle(), timeout=120)


def _assert_config_warmed_once(store: DagStore, layers: list[Layer]) -> None:
    """The config, the client's next request, got one block_stat beside the layers."""
    inner = set().union(*(layer.dag()[0] | set(layer.dag()[1]) for layer in layers))
    others = [cid for cid in store.ops("block_stat") if cid not in inner]
    assert len(others) == 1
    assert json.loads(store._block(others[0]))["rootfs"]["type"] == "layers"


def _layer_calls(store: DagStore, layers: list[Layer]) -> dict[str, Counter]:
    """The store calls on blocks of the layers' DAGs, by op."""
    mine: set[str] = set()
    for layer in layers:
        inner, leaves = layer.dag()
        mine |= inner | set(leaves)
    out: dict[str, Counter] = {"block_get": Counter(), "block_stat": Counter(),
                               "cat": Counter()}
    for op, cid in store.calls:
        if cid in mine:
            out[op][cid] += 1
    return out


def test_manifest_warms_skeleton_footer_toc_and_prioritized_leaves_only(
        layers: list[Layer], registry_for) -> None:
    store = DagStore()
    reg = registry_for(store)
    root, manifest = reg.run(_store_image(store, layers))
    # HEAD is enough to start it
    r = request(reg.host, "HEAD", f"/v2/ipfs/{root}/manifests/latest",
                {"Accept": MANIFEST_ACCEPT})
    # (`latest` is the manifest as served: without its ipfs:// URLs, same layers)
    served = reg.run(reg.server.trees.get(root)).served[manifest]
    assert r.status == 200 and r.headers["docker-content-digest"] == served
    _settle(reg)

    calls = _layer_calls(store, layers)
    skeleton = set().union(*(layer.dag()[0] for layer in layers))
    assert set(calls["block_get"]) == skeleton  # every node above the leaves...
    assert max(calls["block_get"].values()) == 1  # ...fetched once
    assert len(layers[1].dag()[0]) == 3  # the big layer has interior nodes: a 2-level DAG
    footer_toc = set().union(*(layer.toc_leaves() | layer.footer_read_leaves()
                               for layer in layers[:3]))
    # two short tail leaves (9300 and 39317 bytes) had the leaf before read with them
    assert sum(len(layer.footer_read_leaves()) == 2 for layer in layers) == 2
    last_leaf = {layers[3].dag()[1][-1]}  # the plain blob: its footer looked at, no more
    assert set(calls["cat"]) == footer_toc | last_leaf
    prefetch = (layers[0].prefetch_leaves() | layers[2].prefetch_leaves()) - footer_toc
    assert prefetch and not layers[1].prefetch_leaves()
    assert set(calls["block_stat"]) == prefetch
    # ...and nothing else of the layers: most of their leaves were never asked for
    untouched = set().union(*(set(layer.dag()[1]) for layer in layers)) - footer_toc - \
        last_leaf - prefetch
    assert len(untouched) > 200
    _assert_config_warmed_once(store, layers)
    assert _metric(reg.metrics_url, "peerstar_registry_warmups_total") == {
        "estargz": 3.0, "plain": 1.0}
    assert not _metric(reg.metrics_url, "peerstar_registry_warmup_failures_total")

    # once per manifest digest: GET after HEAD starts nothing new
    before = len(store.calls)
    r = request(reg.host, "GET", f"/v2/ipfs/{root}/manifests/{manifest}")
    assert r.status == 200
    _settle(reg)
    assert len(store.calls) == before + 0

    # reads now name the leaf at once: the skeleton the warm-up loaded is the locator's
    big = layers[1]
    _, leaves = big.dag()
    for offset in (5, 180 * CHUNK_SIZE + 7, len(big.blob) - 100):
        r = request(reg.host, "GET", f"/v2/ipfs/{root}/blobs/{big.digest}",
                    {"Range": f"bytes={offset}-{offset + 9}"})
        assert r.status == 206 and r.body == big.blob[offset:offset + 10]
        assert store.calls[-1] == ("cat", leaves[offset // CHUNK_SIZE])
    assert len(store.ops("block_get")) == len(skeleton)


def test_manifest_is_answered_while_the_warm_up_hangs_and_in_flight_stays_bounded(
        layers: list[Layer], registry_for) -> None:
    store = DagStore()
    reg = registry_for(store, warm_up_limit=2)
    root, manifest = reg.run(_store_image(store, layers))
    for layer in layers:
        inner, leaves = layer.dag()
        store.hold |= inner | set(leaves)  # every call on a layer block waits
    started = time.monotonic()
    r = request(reg.host, "GET", f"/v2/ipfs/{root}/manifests/latest",
                {"Accept": MANIFEST_ACCEPT}, timeout=30)
    assert r.status == 200
    assert r.headers["docker-content-digest"] == reg.run(reg.server.trees.get(root)).served[
        manifest]
    assert time.monotonic() - started < 25  # it came back (it would hang forever)
    warm = reg.server.warmup  # type: ignore[union-attr]
    wait_until(lambda: store.in_flight >= 2, 30, 0.01)
    assert store.in_flight == 2  # held in the store: the bound is reached...
    time.sleep(0.3)
    assert store.max_in_flight == 2 and warm.in_flight == 2  # ...and not passed
    assert _metric(reg.metrics_url, "peerstar_registry_warmup_in_flight") == {"": 2.0}
    store.release()
    _settle(reg)
    # the whole warm-up ran (dozens of concurrent leaf operations) within the bound
    assert len(store.ops("block_stat")) > 2
    assert store.max_in_flight == 2 and warm.max_in_flight == 2
    _assert_config_warmed_once(store, layers)
    assert _metric(reg.metrics_url, "peerstar_registry_warmups_total") == {
        "estargz": 3.0, "plain": 1.0}


@pytest.mark.parametrize("fault", ["error", "hang"])
def test_failing_or_hanging_warm_up_fails_no_request_and_is_counted(
        layers: list[Layer], registry_for, fault: str,
        caplog: pytest.LogCaptureFixture) -> None:
    store = DagStore()
    # a warm-up operation gives up after the read timeout
    reg = registry_for(store, policy=ReadPolicy(timeout=0.5, retries=0))
    root, _ = reg.run(_store_image(store, layers))
    blocks = set()
    for layer in layers:
        inner, leaves = layer.dag()
        blocks |= inner | set(leaves)
    # the block calls fail or never answer; the range reads' cats still work
    if fault == "error":
        store.fail, store.fail_ops = blocks, {"block_get", "block_stat"}
    else:
        store.hold, store.hold_ops = blocks, {"block_get", "block_stat"}
    with caplog.at_level("INFO", logger="peerstar.registry"):
        r = request(reg.host, "GET", f"/v2/ipfs/{root}/manifests/latest",
                    {"Accept": MANIFEST_ACCEPT})
        assert r.status == 200
        for layer in layers:
            path = f"/v2/ipfs/{root}/blobs/{layer.digest}"
            r = request(reg.host, "GET", path, {"Range": "bytes=1000-300999"})
            assert r.status == 206 and r.body == layer.blob[1000:301000]
            r = request(reg.host, "GET", path, {"Range": "bytes=0-99",
                                                READ_KIND_HEADER: "prefetch"})
            assert r.status == 206 and r.body == layer.blob[:100]
            r = request(reg.host, "GET", path)
            assert r.status == 200 and r.body == layer.blob
        _settle(reg)
        r = request(reg.host, "GET", f"/v2/ipfs/{root}/manifests/latest",
                    {"Accept": MANIFEST_ACCEPT})
        assert r.status == 200
    failures = _metric(reg.metrics_url, "peerstar_registry_warmup_failures_total")
    # every layer is more than one leaf: its root needs a block_get, which never works
    assert failures.get("skeleton") == 4.0 and failures.get("footer") == 4.0, failures
    assert _metric(reg.metrics_url, "peerstar_registry_warmups_total") == {"failed": 4.0}
    logged = [r for r in caplog.records if "warm-up of blob" in r.getMessage()]
    assert sorted(r.getMessage().split()[3] for r in logged) == sorted(
        layer.cid for layer in layers)  # once per blob
    why = "injected failure" if fault == "error" else "timed out"
    assert all(why in r.getMessage() for r in logged)
    store.release()


def test_multi_leaf_read_of_a_remote_blob_has_its_leaves_in_flight_together(
        layers: list[Layer], registry_for) -> None:
    store = DagStore(delay=0.06)  # every block call takes >= 60 ms: "over the network"
    reg = registry_for(store, slow_read=0.05)
    root, _ = reg.run(_store_image(store, layers))
    r = request(reg.host, "GET", f"/v2/ipfs/{root}/manifests/latest",
                {"Accept": MANIFEST_ACCEPT})
    assert r.status == 200
    _settle(reg)
    big = layers[1]
    assert reg.server.warmup.is_remote(big.cid)  # type: ignore[union-attr]
    _, leaves = big.dag()
    # 6 leaves across the boundary of the two interior nodes (leaves 171..176)
    start, end = 171 * CHUNK_SIZE + 10, 177 * CHUNK_SIZE - 10
    wanted = set(leaves[171:177])
    store.stat_barrier(len(wanted))  # a stat returns only once all six are in flight
    stats_before = len(store.ops("block_stat"))
    r = request(reg.host, "GET", f"/v2/ipfs/{root}/blobs/{big.digest}",
                {"Range": f"bytes={start}-{end - 1}"})
    assert r.status == 206 and r.body == big.blob[start:end]
    _settle(reg)
    stats = store.ops("block_stat")[stats_before:]
    assert set(stats) == wanted and len(stats) == len(wanted)
    assert store.max_by_op["block_stat"] >= len(wanted)  # all at once
    assert not _metric(reg.metrics_url, "peerstar_registry_warmup_failures_total")
    # leaves known local now: the same read again sends no stat
    r = request(reg.host, "GET", f"/v2/ipfs/{root}/blobs/{big.digest}",
                {"Range": f"bytes={start}-{end - 1}"})
    assert r.status == 206 and r.body == big.blob[start:end]
    _settle(reg)
    assert len(store.ops("block_stat")) == stats_before + len(wanted)


def test_local_blob_reads_send_only_their_cat(layers: list[Layer], registry_for) -> None:
    store = DagStore()
    reg = registry_for(store, slow_read=30.0)  # nothing is ever slow: every blob local
    root, _ = reg.run(_store_image(store, layers))
    r = request(reg.host, "GET", f"/v2/ipfs/{root}/manifests/latest",
                {"Accept": MANIFEST_ACCEPT})
    assert r.status == 200
    _settle(reg)
    big = layers[1]
    stats = len(store.ops("block_stat"))
    cats = len(store.ops("cat"))
    for start in (10, 171 * CHUNK_SIZE, 180 * CHUNK_SIZE + 5):
        r = request(reg.host, "GET", f"/v2/ipfs/{root}/blobs/{big.digest}",
                    {"Range": f"bytes={start}-{start + 6 * CHUNK_SIZE}"})
        assert r.status == 206 and r.body == big.blob[start:start + 6 * CHUNK_SIZE + 1]
    _settle(reg)
    assert len(store.ops("block_stat")) == stats and len(store.ops("cat")) == cats + 3
    assert not reg.server.warmup.is_remote(big.cid)  # type: ignore[union-attr]


def test_no_warm_up_option(layers: list[Layer], registry_for) -> None:
    store = DagStore()
    reg = registry_for(store, warm_up=False)
    root, _ = reg.run(_store_image(store, layers))
    calls = len(store.calls)
    r = request(reg.host, "GET", f"/v2/ipfs/{root}/manifests/latest",
                {"Accept": MANIFEST_ACCEPT})
    assert r.status == 200
    _settle(reg)
    assert all(op == "cat" for op, _ in store.calls[calls:])  # the tree walk only
    assert not any(cid in {layer.cid for layer in layers} for _, cid in store.calls[calls:])


@pytest.mark.parametrize("kind", ["jsipfs", "embedded"])
def test_block_stat_of_both_backends(kind: str, request: pytest.FixtureRequest,
                                     tmp_path: Path) -> None:
    from peerstar.ipfs.unixfs import compute_cid

    daemon = request.getfixturevalue("jsipfs_daemon") if kind == "jsipfs" else None
    store = open_backend(kind, daemon, tmp_path / "store")()
    data = random.Random(9).randbytes(3 * CHUNK_SIZE + 5)

    async def go() -> None:
        try:
            root = await store.add(data)
            raw = await store.block_get(root)
            assert await store.block_stat(root) == len(raw)
            leaf = compute_cid(data[:CHUNK_SIZE])
            assert await store.block_stat(leaf) == CHUNK_SIZE
            if kind == "embedded":  # everything is local: a presence check
                with pytest.raises(BlockNotFoundError):
                    await store.block_stat(compute_cid(b"not stored"))
        finally:
            await store.close()

    asyncio.run(go())


def _blob_get(reg: ThreadedRegistry, root: str, layer: Layer, start: int, end: int,
              kind: str | None) -> tuple[float, int, bytes]:
    """GET bytes [start, end) of `layer` with `Peerstar-Read-Kind: kind` (none when
    None): (seconds taken, status, body)."""
    headers = {"Range": f"bytes={start}-{end - 1}"}
    if kind is not None:
        headers[READ_KIND_HEADER] = kind
    t0 = time.monotonic()
    r = request(reg.host, "GET", f"/v2/ipfs/{root}/blobs/{layer.digest}", headers, timeout=60)
    return time.monotonic() - t0, r.status, r.body


def _hold_toc_of(store: DagStore, layer: Layer) -> None:
    """The warm-up's footer / TOC reads of `layer` wait for release()."""
    store.hold, store.hold_ops = layer.footer_read_leaves() | layer.toc_leaves(), {"cat"}


def test_bulk_stage_starts_only_after_every_toc_stage(layers: list[Layer],
                                                      registry_for) -> None:
    store = DagStore()
    reg = registry_for(store, warm_up_toc_wait=60.0)
    warm = reg.server.warmup  # type: ignore[union-attr]
    root, manifest = reg.run(_store_image(store, layers))
    phase_over_at_source: list[bool] = []

    def source(digest: str, tree: object) -> list:
        # the hook for more bulk jobs: called once the TOC phase is over
        phase_over_at_source.append(not any(warm.toc_phase_running(x.cid) for x in layers))

        async def job() -> None:
            await warm.bulk_op(layers[0].cid, layers[0].dag()[1][5],
                               lambda: store.block_stat(layers[0].dag()[1][5]))
        return [job()]

    warm.bulk_sources.append(source)
    _hold_toc_of(store, layers[1])  # the big layer's TOC read hangs
    r = request(reg.host, "GET", f"/v2/ipfs/{root}/manifests/latest",
                {"Accept": MANIFEST_ACCEPT})
    assert r.status == 200
    held = layers[1].footer_read_leaves()
    assert wait_until(lambda: any(c in held for c in store.ops("cat")), 30, 0.01)
    # the other layers' TOCs are read, their prioritized leaves are not asked for
    others = layers[0].toc_leaves() | layers[2].toc_leaves()
    assert wait_until(lambda: others <= set(store.ops("cat")), 30, 0.01)
    time.sleep(0.5)
    prefetch = layers[0].prefetch_leaves() | layers[2].prefetch_leaves()
    assert not prefetch & set(store.ops("block_stat"))
    assert warm.toc_phase_running(layers[0].cid) and not phase_over_at_source
    store.release()
    _settle(reg)
    stats = store.ops("block_stat")
    assert prefetch - others <= set(stats)  # the bulk ran once the TOC phase ended...
    last_toc = max(i for i, (op, c) in enumerate(store.calls) if op == "cat" and c in held)
    first_bulk = min(i for i, (op, c) in enumerate(store.calls)
                     if op == "block_stat" and c in prefetch)
    assert last_toc < first_bulk  # ...after the last TOC read
    assert phase_over_at_source == [True]
    assert stats.count(layers[0].dag()[1][5]) >= 1  # the source's job ran
    assert not warm.toc_phase_running(layers[0].cid)
    assert _metric(reg.metrics_url, "peerstar_registry_warmups_total") == {
        "estargz": 3.0, "plain": 1.0}


@pytest.mark.parametrize("kind", ["prefetch", "background", "on_demand", "toc", "readahead",
                                  None])
def test_bulk_read_waits_for_the_toc_phase_a_critical_one_does_not(
        layers: list[Layer], registry_for, kind: str | None) -> None:
    store = DagStore()
    reg = registry_for(store, warm_up_toc_wait=60.0)
    root, _ = reg.run(_store_image(store, layers))
    _hold_toc_of(store, layers[1])
    r = request(reg.host, "GET", f"/v2/ipfs/{root}/manifests/latest",
                {"Accept": MANIFEST_ACCEPT})
    assert r.status == 200
    warm = reg.server.warmup  # type: ignore[union-attr]
    assert wait_until(lambda: warm.toc_phase_running(layers[0].cid), 30, 0.01)
    a = layers[0]
    bulk = kind in ("prefetch", "background")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(_blob_get, reg, root, a, 1000, 301000, kind)
        time.sleep(1.0)
        assert reply.done() is not bulk  # a bulk read is held while the TOCs are read
        store.release()
        seconds, status, body = reply.result(30)
    assert status == 206 and body == a.blob[1000:301000]
    if bulk:
        assert 1.0 <= seconds < 10
    else:
        assert seconds < 0.9
    deferred = _metric(reg.metrics_url, "peerstar_registry_bulk_reads_deferred_total")
    assert deferred == ({"phase_ended": 1.0} if bulk else {})


def test_stuck_toc_phase_holds_a_bulk_read_no_longer_than_the_bound(
        layers: list[Layer], registry_for) -> None:
    store = DagStore()
    # the held reads would time out after 30 s: only the bound ends the TOC phase
    reg = registry_for(store, warm_up_toc_wait=1.0, policy=ReadPolicy(timeout=30.0, retries=0))
    root, _ = reg.run(_store_image(store, layers))
    _hold_toc_of(store, layers[1])  # never released during the test
    r = request(reg.host, "GET", f"/v2/ipfs/{root}/manifests/latest",
                {"Accept": MANIFEST_ACCEPT})
    assert r.status == 200
    a = layers[0]
    seconds, status, body = _blob_get(reg, root, a, 0, 70_000, "prefetch")
    assert status == 206 and body == a.blob[:70_000]
    assert seconds < 2.0  # at most the bound (1 s) and the read
    # past the bound the bulk went on without the stuck layer
    assert wait_until(lambda: a.prefetch_leaves() - a.toc_leaves() <= set(store.ops("block_stat")),
               3, 0.01)
    warm = reg.server.warmup  # type: ignore[union-attr]
    assert not warm.toc_phase_running(a.cid)
    seconds, status, _ = _blob_get(reg, root, a, 0, 70_000, "prefetch")
    assert status == 206 and seconds < 0.5  # the phase is over: no more waiting
    assert sum(_metric(reg.metrics_url,
                       "peerstar_registry_bulk_reads_deferred_total").values()) == 1.0
    store.release()
