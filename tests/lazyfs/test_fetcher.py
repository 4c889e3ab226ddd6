"""BlobFetcher against a real HTTP server on loopback (and httpx's mock transport for
answers our server never gives): regions, merged multi-range requests, the fallback to
single ranges, singleflight, retries, bearer tokens, and reading eStargz through it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from peerstar.distribution.client import (
    READ_KIND_HEADER,
    READ_KINDS,
    blob_url,
    is_plain_http_host,
)
from peerstar.estargz import Reader
from peerstar.lazyfs.cache import DiskCache
from peerstar.lazyfs.fetcher import BlobFetcher, FetchError
from tests.lazyfs.blobserver import BlobServer
from tests.lazyfs.conftest import BIG, PRIORITY, Layer
from tests.support.content import sha256_digest

DATA = bytes(range(256)) * 4000  # 1,024,000 bytes
DIGEST = sha256_digest(DATA)


@pytest.fixture
def server() -> BlobServer:
    s = BlobServer({DIGEST: DATA}).start()
    yield s
    s.stop()


def _fetcher(server: BlobServer, tmp_path: Path, **kw) -> BlobFetcher:  # type: ignore[no-untyped-def]
    kw.setdefault("cache", DiskCache(tmp_path / "regions"))
    return BlobFetcher(server.url(DIGEST), digest=DIGEST, **kw)


def test_size_and_region_rounding(server: BlobServer, tmp_path: Path) -> None:
    f = _fetcher(server, tmp_path)
    assert f.size == len(DATA)
    assert (server.heads, server.ranges) == (1, [])  # a HEAD: no blob bytes read for it
    assert f.read_at(100_010, 20) == DATA[100_010:100_030]
    assert server.ranges[-1] == "bytes=100000-149999"  # rounded to its 50,000-byte region
    n = len(server.ranges)
    assert f.read_at(100_000, 50_000) == DATA[100_000:150_000]  # cached: no request
    assert len(server.ranges) == n
    assert f.read_at(len(DATA) - 3, 10) == DATA[-3:]  # short only at the end
    assert f.read_at(len(DATA), 10) == b""
    assert f.stats.fetched_bytes == 50_000 + (len(DATA) - 1_000_000)


def test_custom_region_size(server: BlobServer, tmp_path: Path) -> None:
    f = _fetcher(server, tmp_path, region_size=4096)
    assert f.read_at(5000, 10) == DATA[5000:5010]
    assert server.ranges[-1] == "bytes=4096-8191"


def test_missing_regions_merge_into_one_multirange_request(server: BlobServer,
                                                           tmp_path: Path) -> None:
    f = _fetcher(server, tmp_path)
    f.read_at(50_000, 1)  # region 1 cached
    f.read_at(150_000, 1)  # region 3 cached
    before = len(server.ranges)
    assert f.read_at(0, 250_000) == DATA[:250_000]
    assert server.ranges[before:] == ["bytes=0-49999,100000-149999,200000-249999"]
    assert not f.single_range


def test_fallback_to_single_range_on_400(tmp_path: Path) -> None:
    server = BlobServer({DIGEST: DATA}, multi_range=False).start()
    try:
        f = _fetcher(server, tmp_path)
        f.read_at(50_000, 1)
        assert f.read_at(0, 150_000) == DATA[:150_000]
        assert f.single_range
        assert server.ranges[-3:] == ["bytes=0-49999,100000-149999", "bytes=0-49999",
                                      "bytes=100000-149999"]
        f.read_at(300_000, 1)
        f.read_at(400_000, 1)
        before = len(server.ranges)
        assert f.read_at(250_000, 250_000) == DATA[250_000:500_000]
        assert all("," not in r for r in server.ranges[before:])  # never multi again
    finally:
        server.stop()


def test_identical_inflight_fetches_are_shared(server: BlobServer, tmp_path: Path) -> None:
    f = _fetcher(server, tmp_path)
    f.size  # noqa: B018 - discover first so only region fetches are counted
    original = f._get
    gate = threading.Event()

    def slow_get(header: str, kind: str) -> httpx.Response:
        gate.wait(5)
        return original(header, kind)

    f._get = slow_get  # type: ignore[method-assign]
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(f.read_at(60_000, 1000)))
               for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    gate.set()
    for t in threads:
        t.join(10)
    assert results == [DATA[60_000:61_000]] * 8
    assert server.ranges.count("bytes=50000-99999") == 1


def test_retries_then_error_then_recovery(server: BlobServer, tmp_path: Path) -> None:
    f = _fetcher(server, tmp_path, retries=2, backoff=0.05, timeout=2)
    assert f.size == len(DATA)
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(FetchError):
        f.read_at(0, 10)
    assert time.monotonic() - t0 >= 0.05 + 0.1  # two backoff sleeps
    server.start()
    assert f.read_at(0, 10) == DATA[:10]


def test_404_is_not_retried(server: BlobServer, tmp_path: Path) -> None:
    f = BlobFetcher(server.url("sha256:" + "0" * 64), retries=5, backoff=1.0)
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="404"):
        f.size  # noqa: B018
    assert time.monotonic() - t0 < 1.0


def test_bearer_token(tmp_path: Path) -> None:
    server = BlobServer({DIGEST: DATA}, token="s3cret").start()
    try:
        f = _fetcher(server, tmp_path)
        assert f.read_at(10, 10) == DATA[10:20]
        assert f.read_at(500_000, 10) == DATA[500_000:500_010]
        assert server.token_requests == 1  # the token is reused
    finally:
        server.stop()


def _mock(handler) -> httpx.Client:  # type: ignore[no-untyped-def]
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_200_whole_body_and_coalesced_206(tmp_path: Path) -> None:
    seen: list[str] = []

    def whole(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Range", ""))
        return httpx.Response(200, content=DATA)  # a server that ignores Range

    f = BlobFetcher("http://127.0.0.1:1/v2/r/blobs/" + DIGEST, client=_mock(whole))
    assert f.read_at(123_456, 7) == DATA[123_456:123_463]

    def coalesce(request: httpx.Request) -> httpx.Response:
        # Answers a multi-range request with one range covering all of them.
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(DATA))})
        specs = request.headers["Range"].removeprefix("bytes=").split(",")
        a = int(specs[0].split("-")[0])
        b = int(specs[-1].split("-")[1])
        return httpx.Response(206, content=DATA[a:b + 1], headers={
            "Content-Range": f"bytes {a}-{b}/{len(DATA)}"})

    cache = DiskCache(tmp_path / "c")
    f = BlobFetcher("http://127.0.0.1:1/v2/r/blobs/" + DIGEST, client=_mock(coalesce),
                    cache=cache)
    f.read_at(60_000, 1)
    assert f.read_at(0, 150_000) == DATA[:150_000]


def test_every_range_request_says_why_it_reads() -> None:
    kinds: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(DATA))})
        kinds.append(request.headers.get(READ_KIND_HEADER))
        a, b = (int(x) for x in request.headers["Range"].removeprefix("bytes=").split("-"))
        return httpx.Response(206, content=DATA[a:b + 1], headers={
            "Content-Range": f"bytes {a}-{b}/{len(DATA)}"})

    f = BlobFetcher("http://127.0.0.1:1/v2/r/blobs/" + DIGEST, client=_mock(answer))
    assert f.read_at(0, 10) == DATA[:10]
    assert f.read_at(100_000, 10, "toc") == DATA[100_000:100_010]
    assert f.read_at(200_000, 10, "background") == DATA[200_000:200_010]
    assert kinds == ["on_demand", "toc", "background"]
    assert set(kinds) <= READ_KINDS


def test_url_scheme_rule() -> None:
    assert is_plain_http_host("localhost:5050") and is_plain_http_host("127.0.0.1:5000")
    assert not is_plain_http_host("registry.example.com")
    assert blob_url("localhost:5050", "ipfs/bafy", "sha256:ab") == \
        "http://localhost:5050/v2/ipfs/bafy/blobs/sha256:ab"
    assert blob_url("ghcr.io", "a/b", "sha256:ab").startswith("https://ghcr.io/v2/a/b/")


def test_estargz_reader_through_fetcher(rich_layer: Layer, tmp_path: Path) -> None:
    server = BlobServer({rich_layer.digest: rich_layer.blob}).start()
    try:
        f = BlobFetcher(server.url(rich_layer.digest), cache=DiskCache(tmp_path / "r"))
        r = Reader.open(f.read_at, f.size, toc_digest=rich_layer.toc_digest)
        assert r.read("data/prio.txt") == PRIORITY
        assert r.read("data/big.bin", 300_000, 5) == BIG[300_000:300_005]
        assert f.stats.fetched_bytes < rich_layer.size // 2
    finally:
        server.stop()


def test_disk_cache_bounded_and_atomic(tmp_path: Path) -> None:
    c = DiskCache(tmp_path / "c", max_bytes=10_000)
    for i in range(10):
        c.put(f"k{i}", bytes([i]) * 3000)
        time.sleep(0.01)  # distinct mtimes: eviction order is by last use
    assert c.total <= 10_000
    assert c.get("k0") is None and c.get("k9") == bytes([9]) * 3000
    assert c.get("k9", size=5) is None  # wrong length counts as a miss
    assert list((tmp_path / "c" / "wip").iterdir()) == []
    files = [p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.name != ".lock"]
    assert sum(p.stat().st_size for p in files) == c.total == 9000
    # A hit makes a file recent: k7 (oldest) is used, so k8 goes first.
    time.sleep(0.01)
    assert c.get("k7") is not None
    time.sleep(0.01)
    c.put("new", b"x" * 3000)
    assert c.get("k7") is not None and c.get("k8") is None


def test_disk_cache_bound_holds_across_instances(tmp_path: Path) -> None:
    # Two mount daemons sharing one cache directory: the bound is on the directory, and
    # it holds after every write, whichever instance wrote.
    a = DiskCache(tmp_path / "c", max_bytes=20_000)
    b = DiskCache(tmp_path / "c", max_bytes=20_000)
    for i in range(40):
        (a if i % 2 else b).put(f"k{i}", b"z" * (2500 + 100 * (i % 7)))
        on_disk = sum(p.stat().st_size for p in (tmp_path / "c").rglob("*")
                      if p.is_file() and p.name != ".lock")
        assert on_disk <= 20_000
    a.put("last", b"y" * 2500)
    assert a.get("last") == b"y" * 2500
    # An entry bigger than the bound alone: the cache holds it and nothing else.
    b.put("huge", b"h" * 25_000)
    files = [p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.name != ".lock"]
    assert [p.stat().st_size for p in files] == [25_000]


def test_size_without_head_falls_back_to_a_two_byte_range(tmp_path: Path) -> None:
    server = BlobServer({DIGEST: DATA}, head=False).start()
    try:
        f = _fetcher(server, tmp_path)
        assert f.size == len(DATA)
        assert (server.heads, server.ranges) == (1, ["bytes=0-1"])
    finally:
        server.stop()
