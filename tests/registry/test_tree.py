"""Descriptor-tree walking and its cache: what is recorded, what is refused, LRU bounds,
one walk per CID under concurrency, failures not cached."""

from __future__ import annotations

import asyncio
import json

import pytest
from multiformats import CID

from peerstar.ipfsimage.format import IPFSImageError, parse_image_cid
from peerstar.oci.errors import OCIError
from peerstar.registry.tree import TreeCache, walk_tree
from peerstar.source.sample import SampleImage
from tests.registry.helpers import without_urls
from tests.registry.memstore import MemoryStore, raw_cid
from tests.support.content import sha256_digest
from tests.support.ipfsimage import store_layout


def _reader(store: MemoryStore):
    async def read_small(cid: str, n: int) -> bytes:
        return await store.cat_bytes(cid, 0, n)
    return read_small


def test_walk_records_every_descriptor(sample_image: SampleImage) -> None:
    async def go() -> None:
        store = MemoryStore()
        img = await store_layout(store, sample_image.path)
        tree = await walk_tree(img.root_cid, _reader(store))
        assert tree.top_digest == img.top_digest
        # the manifest as served by tag: without the ipfs:// URLs, under its own digest
        served = tree.served[img.top_digest]
        assert tree.resolve_manifest("latest") == served != img.top_digest
        body = tree.manifests[served]
        assert sha256_digest(body) == served
        assert json.loads(body) == without_urls(json.loads(img.content[img.top_digest]))
        assert set(tree.blobs) == {img.top_digest, served, img.config_digest,
                                   *img.layer_digests}
        assert tree.blobs[served].size == len(body) and not tree.blobs[served].cid
        for digest, ref in tree.blobs.items():
            if digest == served:
                continue
            assert ref.cid == img.cids[digest]
            assert ref.size == len(img.content[digest])
            assert ref.media_type == img.media_types[digest]
        assert tree.manifests == {img.top_digest: img.content[img.top_digest], served: body}
        assert tree.resolve_manifest(img.top_digest) == img.top_digest
        # the walk read the root and the manifest only, never config or layers
        assert [c for c, _, _ in store.cats] == [img.root_cid, img.cids[img.top_digest]]
    asyncio.run(go())


async def _top(store: MemoryStore, manifest: bytes, **override) -> str:
    cid = await store.add(manifest)
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256_digest(manifest), "size": len(manifest), "urls": [f"ipfs://{cid}"]}
    desc.update(override)
    return await store.add(json.dumps(desc).encode())


@pytest.mark.parametrize(("build", "message"), [
    (lambda s: s.add(b"\x00\x01 not json"), "not JSON"),
    (lambda s: s.add(b'{"mediaType":"x","digest":"sha256:00","size":1}'), "not a valid digest"),
    (lambda s: _top(s, b'{"config":{},"layers":[]}', urls=None), "has no ipfs:// URL"),
    (lambda s: _top(s, b'{"config":{},"layers":[]}', urls=["https://x"]),
     r"has no ipfs:// URL \(urls: \['https://x'\]\)"),
    (lambda s: _top(s, b'{"config":{},"layers":[]}', urls=["ipfs://not-a-cid"]),
     "bad ipfs:// URL"),
    (lambda s: _top(s, b'{"config":{},"layers":[]}', digest="sha256:" + "0" * 64),
     "hashes to .*: rejected"),
    (lambda s: _top(s, b'{"config":{},"layers":[]}', size=-1), "not a non-negative integer"),
    (lambda s: _top(s, b'{"layers":[]}'), "config: descriptor is not a JSON object"),
    (lambda s: _top(s, b"[1,2]"), "expected a JSON object"),
    (lambda s: s.add(b'{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip",'
                     b'"digest":"sha256:' + b"0" * 64 + b'","size":1}'),
     "not an image manifest or index"),
])
def test_walk_refuses_non_images(build, message: str) -> None:
    async def go() -> None:
        store = MemoryStore()
        root = await build(store)
        with pytest.raises(OCIError, match=message):
            await walk_tree(root, _reader(store))
    asyncio.run(go())


def test_cache_shares_walks_bounds_memory_and_skips_failures(sample_image: SampleImage
                                                             ) -> None:
    async def go() -> None:
        store = MemoryStore()
        img = await store_layout(store, sample_image.path)
        walks = 0
        read = _reader(store)

        async def counting(cid: str, n: int) -> bytes:
            nonlocal walks
            walks += cid == img.root_cid
            await asyncio.sleep(0.01)
            return await read(cid, n)

        cache = TreeCache(counting)
        trees = await asyncio.gather(*(cache.get(img.root_cid) for _ in range(20)))
        assert walks == 1 and all(t is trees[0] for t in trees)
        assert len(cache) == 1 and cache.misses == 1 and cache.hits == 19
        # failures propagate and are not cached
        missing = raw_cid(b"absent")
        for _ in range(2):
            with pytest.raises(Exception, match="not found"):
                await cache.get(missing)
        assert cache.misses == 3 and len(cache) == 1
        # LRU by cost: room for about two trees of this size
        cost = trees[0].cost()
        small = TreeCache(read, max_bytes=2 * cost + cost // 2)
        roots = [img.root_cid]
        for tag in ("a", "b"):
            man = img.content[img.top_digest] + b" " * (1 if tag == "a" else 2)
            roots.append(await _top(store, man))
        for r in roots:
            await small.get(r)
        assert len(small) == 2 and small.bytes <= 2 * cost + cost // 2
        assert img.root_cid not in small._trees  # the oldest went first
    asyncio.run(go())


def test_parse_image_cid() -> None:
    v1 = raw_cid(b"x")
    assert parse_image_cid(v1) == v1
    # CIDv0 (dag-pb) is normalised to CIDv1 base32 with the same multihash
    v0 = "QmVkbauSDEaMP4Tkq6Epm9uW75mWm136n81YH8fGtfwdHU"
    got = parse_image_cid(v0)
    assert got.startswith("bafybei") and got.islower()
    assert CID.decode(got).digest == CID.decode(v0).digest
    assert CID.decode(got).version == 1 and CID.decode(got).codec.name == "dag-pb"
    for bad in ("", "x" * 201, "bafy/..", "not-a-cid", "Qm"):
        with pytest.raises(IPFSImageError, match="not an IPFS image reference"):
            parse_image_cid(bad)
