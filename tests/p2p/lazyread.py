"""Run inside a node: read one file of an image through that node's registry, lazily.

`python -m tests.p2p.lazyread URL_BASE CID PATH` fetches the manifest (through the index
if there is one), then, for each eStargz layer until PATH is found, opens the layer with
Range requests only (footer, TOC, the file's chunks) and prints JSON: the file's bytes
(base64), the bytes fetched by Range and the total size of the image's layers.
"""

from __future__ import annotations

import base64
import json
import sys
import urllib.request
from typing import Any

from peerstar.estargz import TOC_DIGEST_ANNOTATION, Reader

ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
])


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.status, resp.read()


def main(base: str, cid: str, path: str) -> dict[str, Any]:
    root = f"{base}/v2/ipfs/{cid}"
    _, body = get(f"{root}/manifests/latest", {"Accept": ACCEPT})
    doc = json.loads(body)
    if "manifests" in doc:  # an index: take its first manifest
        _, body = get(f"{root}/manifests/{doc['manifests'][0]['digest']}", {"Accept": ACCEPT})
        doc = json.loads(body)
    fetched = 0
    ranges = 0
    total = sum(layer["size"] for layer in doc["layers"])
    for layer in reversed(doc["layers"]):  # upper layers win
        toc = layer.get("annotations", {}).get(TOC_DIGEST_ANNOTATION)
        if toc is None:
            continue

        def read_at(offset: int, length: int, digest: str = layer["digest"]) -> bytes:
            nonlocal fetched, ranges
            status, data = get(f"{root}/blobs/{digest}",
                               {"Range": f"bytes={offset}-{offset + length - 1}"})
            if status != 206 or len(data) != length:
                raise RuntimeError(f"Range read gave {status} with {len(data)} bytes")
            fetched += length
            ranges += 1
            return data

        reader = Reader.open(read_at, layer["size"], toc_digest=toc)
        if reader.lookup(path.lstrip("/")) is not None:
            data = reader.read(path.lstrip("/"))
            return {"data": base64.b64encode(data).decode(), "fetched": fetched,
                    "ranges": ranges, "layers_size": total}
    raise SystemExit(f"{path} is in no eStargz layer of {cid}")


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
