"""Store an OCI image layout into a content store in nerdctl's on-IPFS format (test helper;
`peerstar push` is written elsewhere), and convert the sample image to eStargz.
`push_layout` / `push_blob_image` do the storing from outside an event loop, on a store
of their own (a daemon's or an embedded one) that they close after (`on_store`).

nerdctl's format (REFERENCE.md section 3): every blob added with CIDv1; each descriptor
gets `urls: ["ipfs://<cid>"]`; manifests and index are rewritten bottom-up with those
descriptors and added too; finally the JSON of the top descriptor is added, and its CID
is the image's CID.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from peerstar.estargz import build
from peerstar.oci import mediatypes as mt
from tests.support.content import compact_json, sha256_digest


@dataclass
class StoredImage:
    """What `store_layout` wrote: the root CID and every digest's CID and bytes."""

    root_cid: str
    top_digest: str
    top_media_type: str
    manifest_digests: list[str] = field(default_factory=list)  # rewritten manifests
    index_digest: str | None = None
    cids: dict[str, str] = field(default_factory=dict)  # digest -> cid
    content: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes
    media_types: dict[str, str] = field(default_factory=dict)
    layer_digests: list[str] = field(default_factory=list)
    config_digest: str = ""


def _blob(layout: Path, digest: str) -> bytes:
    algo, hexd = digest.split(":", 1)
    return (layout / "blobs" / algo / hexd).read_bytes()


async def _add(store: Any, img: StoredImage, data: bytes, media_type: str) -> dict:
    cid = await store.add(data)
    digest = sha256_digest(data)
    img.cids[digest] = cid
    img.content[digest] = data
    img.media_types[digest] = media_type
    return {"mediaType": media_type, "digest": digest, "size": len(data),
            "urls": [f"ipfs://{cid}"]}


async def _store_manifest(store: Any, img: StoredImage, layout: Path, desc: dict) -> dict:
    manifest = json.loads(_blob(layout, desc["digest"]))
    cfg = manifest["config"]
    new_cfg = await _add(store, img, _blob(layout, cfg["digest"]), cfg["mediaType"])
    img.config_digest = new_cfg["digest"]
    manifest["config"] = {**cfg, **new_cfg}
    layers = []
    for layer in manifest["layers"]:
        new = await _add(store, img, _blob(layout, layer["digest"]), layer["mediaType"])
        img.layer_digests.append(new["digest"])
        layers.append({**layer, **new})
    manifest["layers"] = layers
    out = await _add(store, img, compact_json(manifest), desc["mediaType"])
    img.manifest_digests.append(out["digest"])
    extra = {k: v for k, v in desc.items() if k in ("annotations", "platform")}
    return {**out, **extra}


async def store_layout(store: Any, layout: Path, *, tag: str = "latest",
                       top: str = "manifest") -> StoredImage:
    """Add the image tagged `tag` of an OCI layout to `store` as nerdctl would.

    top="manifest": the top descriptor is the manifest (a single-platform image).
    top="index": the whole layout index is rewritten and added, and is the top.
    """
    index = json.loads((layout / "index.json").read_bytes())
    img = StoredImage(root_cid="", top_digest="", top_media_type="")
    if top == "manifest":
        [desc] = [m for m in index["manifests"]
                  if m.get("annotations", {}).get(mt.REF_NAME_ANNOTATION) == tag]
        top_desc = await _store_manifest(store, img, layout, desc)
        top_desc.pop("annotations", None)
    else:
        manifests = [await _store_manifest(store, img, layout, m) for m in index["manifests"]]
        new_index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests}
        top_desc = await _add(store, img, compact_json(new_index), mt.OCI_INDEX)
        img.index_digest = top_desc["digest"]
    img.top_digest = top_desc["digest"]
    img.top_media_type = top_desc["mediaType"]
    img.root_cid = await store.add(compact_json(top_desc))
    return img


def convert_layout_estargz(src: Path, dst: Path, *, tag: str = "latest") -> Path:
    """Write to `dst` an OCI layout of `src`'s image `tag` with every layer converted to
    eStargz (gzip level 9, 4 MiB chunks, as `nerdctl ipfs push --estargz`), annotated with
    the TOC digest and uncompressed size, and the config's DiffIDs updated."""
    index = json.loads((src / "index.json").read_bytes())
    [desc] = [m for m in index["manifests"]
              if m.get("annotations", {}).get(mt.REF_NAME_ANNOTATION) == tag]
    manifest = json.loads(_blob(src, desc["digest"]))
    config = json.loads(_blob(src, manifest["config"]["digest"]))
    blobs: dict[str, bytes] = {}
    layers, diff_ids = [], []
    for layer in manifest["layers"]:
        tar = gzip.decompress(_blob(src, layer["digest"]))
        out = io.BytesIO()
        res = build(io.BytesIO(tar), out, compression="gzip", level=9, chunk_size=4 << 20)
        blob = out.getvalue()
        blobs[res.blob_digest] = blob
        layers.append({"mediaType": mt.OCI_LAYER_GZIP, "digest": res.blob_digest,
                       "size": res.blob_size, "annotations": dict(res.annotations)})
        diff_ids.append(res.diff_id)
    config["rootfs"]["diff_ids"] = diff_ids
    cfg_bytes = compact_json(config)
    blobs[sha256_digest(cfg_bytes)] = cfg_bytes
    manifest["config"] = {**manifest["config"], "digest": sha256_digest(cfg_bytes),
                          "size": len(cfg_bytes)}
    manifest["layers"] = layers
    man_bytes = compact_json(manifest)
    blobs[sha256_digest(man_bytes)] = man_bytes
    (dst / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    for digest, data in blobs.items():
        (dst / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
    (dst / "oci-layout").write_bytes(compact_json({"imageLayoutVersion": "1.0.0"}))
    new_desc = {**desc, "digest": sha256_digest(man_bytes), "size": len(man_bytes)}
    (dst / "index.json").write_bytes(compact_json({"schemaVersion": 2, "manifests": [new_desc]}))
    return dst


async def store_blob_image(store: Any, layer: bytes | Path) -> StoredImage:
    """A one-layer image whose layer is `layer` (bytes, or a file streamed to the store),
    stored in nerdctl's format; for Range and load tests on large blobs."""
    img = StoredImage(root_cid="", top_digest="", top_media_type=mt.OCI_MANIFEST)
    cfg = compact_json({"architecture": "amd64", "os": "linux",
                        "rootfs": {"type": "layers", "diff_ids": []}})
    cfg_desc = await _add(store, img, cfg, mt.OCI_CONFIG)
    img.config_digest = cfg_desc["digest"]
    if isinstance(layer, Path):
        h = hashlib.sha256()
        with open(layer, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        with open(layer, "rb") as f:
            cid = await store.add(f)
        digest = "sha256:" + h.hexdigest()
        size = layer.stat().st_size
        img.cids[digest] = cid
        img.media_types[digest] = mt.OCI_LAYER_GZIP
        layer_desc = {"mediaType": mt.OCI_LAYER_GZIP, "digest": digest, "size": size,
                      "urls": [f"ipfs://{cid}"]}
    else:
        layer_desc = await _add(store, img, layer, mt.OCI_LAYER_GZIP)
    img.layer_digests.append(layer_desc["digest"])
    manifest = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": cfg_desc,
                "layers": [layer_desc]}
    top = await _add(store, img, compact_json(manifest), mt.OCI_MANIFEST)
    img.manifest_digests.append(top["digest"])
    img.top_digest = top["digest"]
    img.root_cid = await store.add(compact_json(top))
    return img


T = TypeVar("T")


def on_store(store_factory: Callable[[], Any], use: Callable[[Any], Awaitable[T]]) -> T:
    """`use(store)` run to completion on a new store from `store_factory`, which is closed
    after (for tests outside an event loop)."""
    async def go() -> T:
        store = store_factory()
        try:
            return await use(store)
        finally:
            await store.close()
    return asyncio.run(go())


def push_layout(store_factory: Callable[[], Any], layout: Path) -> StoredImage:
    """`store_layout` of `layout` on a new store from `store_factory`."""
    return on_store(store_factory, lambda store: store_layout(store, layout))


def push_blob_image(store_factory: Callable[[], Any], layer: bytes | Path) -> StoredImage:
    """`store_blob_image` of `layer` on a new store from `store_factory`."""
    return on_store(store_factory, lambda store: store_blob_image(store, layer))
