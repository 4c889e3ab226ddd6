"""The mirror's pins are bounded (peerstar.registry.pins), against the real js-ipfs daemon
and Debian's docker-registry as the upstream: past `pin_bytes` the least recently served
mirrored content is no longer pinned and the newest is; serving an unpinned blob again
fetches, verifies and pins it again; the ledger survives a bridge restart and keeps the
bound; content pinned before the mirror met it (a push) is never unpinned by it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerstar.ipfs.cid import normalize_cid
from peerstar.ipfs.rpc import ADD_PARAMS
from peerstar.registry import ReadPolicy, ServerOptions
from peerstar.registry.mirror import Mirror, MirrorOptions
from peerstar.registry.origin import parse_mirror
from peerstar.source.sample import SampleImage, build_sample_image
from tests.registry.conftest import open_backend
from tests.registry.harness import ThreadedRegistry
from tests.registry.helpers import request
from tests.support.jsipfs import JsIpfs
from tests.support.registry import (
    MANIFEST_ACCEPT,
    DockerRegistry,
    blob_path,
    push_layout,
    start_registry,
)

pytestmark = pytest.mark.slow

CAP = 9 << 18  # bytes of mirrored content kept pinned (2.25 MiB: two of the layers)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[SampleImage]:
    work = tmp_path_factory.mktemp("mirror-pin-images")
    return [build_sample_image(work / f"v{n}", extra_mib=n) for n in (1, 2)]


@pytest.fixture
def upstream(images: list[SampleImage]) -> Iterator[DockerRegistry]:
    reg = start_registry(access_log=True)
    try:
        for n, image in enumerate(images, 1):
            push_layout(reg.url, "team/app", str(n), image.path)
        yield reg
    finally:
        reg.stop()


def _bridge(upstream: DockerRegistry, daemon: JsIpfs, state: Path) -> ThreadedRegistry:
    mirror = MirrorOptions(upstreams=(parse_mirror(upstream.url),), lookup_timeout=0.02,
                           upstream_timeout=5.0, pin_bytes=CAP, pin_state=str(state))
    options = ServerOptions(policy=ReadPolicy(timeout=5.0, retries=1), warm_up=False,
                            mirror=mirror)
    return ThreadedRegistry(open_backend("jsipfs", daemon, state.parent), options).start()


def _mirror(bridge: ThreadedRegistry) -> Mirror:
    assert bridge.server is not None and bridge.server.mirror is not None
    return bridge.server.mirror


def _pins(daemon: JsIpfs) -> set[str]:
    keys = (daemon.rpc("pin/ls", [("type", "recursive")]) or {}).get("Keys", {})
    return {normalize_cid(k) for k in keys}


def _get_blob(bridge: ThreadedRegistry, upstream: DockerRegistry, digest: str) -> str:
    """GET blob `digest` through the mirror, check its bytes; returns its CID."""
    r = request(bridge.host, "GET", f"/v2/team/app/blobs/{digest}?ns={upstream.host}",
                {"Accept": MANIFEST_ACCEPT})
    assert r.status == 200, (digest, r.status, r.body[:200])
    assert r.body == blob_path(upstream, digest).read_bytes()
    return _mirror(bridge)._blobs[digest].cid


def test_mirror_pins_stay_within_the_bound(images: list[SampleImage],
                                           upstream: DockerRegistry, jsipfs: JsIpfs,
                                           tmp_path: Path) -> None:
    state = tmp_path / "mirror-pins.json"
    # A push pinned this content before the mirror met it: it stays the push's.
    pushed = images[1].config_digest
    pushed_cid = normalize_cid(jsipfs.add_bytes(blob_path(upstream, pushed).read_bytes(),
                                                list(ADD_PARAMS.items()))["Hash"])
    assert pushed_cid in _pins(jsipfs)
    # (the two images share their base layer)
    digests = list(dict.fromkeys(d for image in images
                                 for d in (image.config_digest, *image.layer_digests)))
    sizes = {d: blob_path(upstream, d).stat().st_size for d in digests}
    assert sum(sizes.values()) > CAP  # enough to go past the bound
    bridge = _bridge(upstream, jsipfs, state)
    cids: dict[str, str] = {}
    try:
        for d in digests:
            cids[d] = _get_blob(bridge, upstream, d)
        assert cids[pushed] == pushed_cid  # the same bytes, the same CID
        ledger = _mirror(bridge).pins
        assert pushed not in ledger
        assert 0 < ledger.bytes <= CAP or len(ledger.entries) == 1
        pinned = _pins(jsipfs)
        oldest, newest = digests[0], digests[-1]
        assert cids[oldest] not in pinned and oldest not in ledger
        assert cids[newest] in pinned and newest in ledger
        assert all(cids[d] in pinned for d in ledger.entries)
        assert pushed_cid in pinned  # never the mirror's to unpin
        kept = sum(sizes[d] for d in digests if cids[d] in pinned and d != pushed)
        assert kept <= CAP or len(ledger.entries) == 1
        # Served again, an unpinned blob is fetched, verified and pinned again.
        upstream_before = upstream.bytes_served(oldest)
        assert _get_blob(bridge, upstream, oldest) == cids[oldest]
        assert upstream.bytes_served(oldest) > upstream_before
        assert cids[oldest] in _pins(jsipfs) and oldest in ledger
        order = list(ledger.entries)
    finally:
        bridge.stop()
    # The ledger is on disk, in served order, and a restarted bridge keeps the bound.
    saved = json.loads(state.read_text())
    assert [d for d, _, _ in saved["pins"]] == order
    assert not list(tmp_path.glob(".mirror-pins.json.*"))  # no temporary left
    bridge = _bridge(upstream, jsipfs, state)
    try:
        ledger = _mirror(bridge).pins
        assert list(ledger.entries) == order
        first = order[0]
        # A blob the restarted bridge never served pushes the oldest one out.
        fresh = max((d for d in digests if d not in ledger and d != pushed), key=sizes.get)
        assert ledger.bytes + sizes[fresh] > CAP
        _get_blob(bridge, upstream, fresh)
        assert first not in ledger and cids[first] not in _pins(jsipfs)
        assert fresh in ledger and cids[fresh] in _pins(jsipfs)
        assert pushed_cid in _pins(jsipfs)
    finally:
        bridge.stop()
