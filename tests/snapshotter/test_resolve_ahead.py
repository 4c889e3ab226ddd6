"""Resolving an image's other layers at its first Prepare: the layer-list labels, the
footer + TOC + prefetch range fetched concurrently into the region cache, and mounts that
then start without the network; a layer that cannot be resolved ahead still mounts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerstar.lazyfs.cache import DiskCache
from peerstar.lazyfs.fetcher import BlobFetcher
from peerstar.lazyfs.resolve import region_cache, resolve_ahead
from peerstar.snapshotter.config import RemoteConfig
from peerstar.snapshotter.remote import (
    LABEL_CRI_IMAGE_LAYERS,
    LABEL_STARGZ_LAYERS,
    LayerMounter,
    RemoteLayer,
    image_layer_digests,
)
from tests.lazyfs.blobserver import BlobServer
from tests.lazyfs.conftest import BIG, Layer, make_layer, rich_tar

D = ["sha256:" + c * 64 for c in "123"]


def test_layer_list_labels() -> None:
    assert image_layer_digests({LABEL_STARGZ_LAYERS: ",".join(D)}) == D
    # CRI's label; cut short where containerd's label limit is reached (a trailing comma).
    assert image_layer_digests({LABEL_CRI_IMAGE_LAYERS: f"{D[0]},{D[1]},"}) == D[:2]
    assert image_layer_digests({LABEL_STARGZ_LAYERS: f"{D[0]}, bogus,sha256:12,{D[2]}"}) == [
        D[0], D[2]]
    assert image_layer_digests({}) == []


@pytest.fixture(scope="module")
def layers() -> list[Layer]:
    return [make_layer(rich_tar(), prioritized=("data/prio.txt",)),
            make_layer(rich_tar(), prioritized=("data/big.bin",), chunk_size=64 << 10)]


@pytest.fixture
def server(layers: list[Layer]) -> Iterator[BlobServer]:
    s = BlobServer({la.digest: la.blob for la in layers}).start()
    yield s
    s.stop()


def test_resolve_ahead_fills_what_the_mount_reads_first(server: BlobServer, layers: list[Layer],
                                                        tmp_path: Path) -> None:
    la = layers[1]
    toc_seen = threading.Event()
    res = resolve_ahead(server.url(la.digest), la.digest, region_cache(tmp_path),
                        on_toc=toc_seen.set)
    assert toc_seen.is_set()
    assert res.size == la.size and 0 < res.toc_offset < la.size
    # The prioritized file (BIG, uncompressible) lies before the landmark.
    assert res.prefetch_end > len(BIG)
    fetched = list(server.ranges)
    assert fetched
    # A mount's opening reads (footer, TOC, prefetch range) now hit the cache only:
    # the server sees at most the size probe.
    f = BlobFetcher(server.url(la.digest), cache=DiskCache(tmp_path / "regions"))
    from peerstar.lazyfs.layer import LazyLayer

    lay = LazyLayer.open(f, toc_digest=la.toc_digest)
    lay.prefetch()
    assert lay.prefetch_error is None
    e = lay.reader.lookup("data/big.bin")
    assert e is not None and lay.read_file(e, 0, len(BIG)) == BIG
    assert [r for r in server.ranges[len(fetched):] if r != "bytes=0-1"] == []


def test_mounter_resolves_the_other_layers_once_and_mounts_wait_for_them(
        server: BlobServer, layers: list[Layer], tmp_path: Path) -> None:
    first, second = layers
    mounter = LayerMounter(RemoteConfig(zygote=False, background_fetch=False),
                           tmp_path / "cache")
    try:
        server.delays["bytes="] = 0.3  # every range stalls: a mount would have to wait
        layer = RemoteLayer("127.0.0.1/test/layer:v1", first.digest, first.toc_digest,
                            server.url(first.digest))
        missing = "sha256:" + "9" * 64  # listed, but the registry does not have it
        assert mounter.resolve_ahead(layer, [first.digest, second.digest, missing]) == 2
        assert mounter.resolve_ahead(layer, [second.digest, missing]) == 0  # once
        t = time.monotonic()
        mounter._wait_resolved(second.digest)
        assert time.monotonic() - t >= 0.3  # it waited for the TOC, fetched ahead
        mounter._wait_resolved(missing)  # failed: does not wait for the mount timeout
        mounter._wait_resolved(first.digest)  # not resolved ahead: nothing to wait for
        regions = DiskCache(tmp_path / "cache" / "regions")
        f = BlobFetcher(server.url(second.digest), cache=regions, size=second.size)
        tail = f.num_regions() - 1
        assert f.is_cached(tail)
    finally:
        mounter.close()
