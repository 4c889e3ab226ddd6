"""Run inside a node: read files of an image through that node's registry, lazily.

`python -m tests.p2p.lazyread URL_BASE CID PATH [PATH...]` fetches the manifest (through
the index if there is one), opens every eStargz layer with Range requests only (footer,
TOC), reads each PATH from the top-most layer that has it (only its chunks), and prints
JSON: the first file's bytes (base64), each file's size and sha256, the bytes and
requests fetched by Range, the total size of the image's layers and the elapsed time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
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


def main(base: str, cid: str, paths: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    root = f"{base}/v2/ipfs/{cid}"
    _, body = get(f"{root}/manifests/latest", {"Accept": ACCEPT})
    doc = json.loads(body)
    if "manifests" in doc:  # an index: take its first manifest
        _, body = get(f"{root}/manifests/{doc['manifests'][0]['digest']}", {"Accept": ACCEPT})
        doc = json.loads(body)
    counters = {"fetched": 0, "ranges": 0}
    total = sum(layer["size"] for layer in doc["layers"])

    def reader_for(layer: dict[str, Any]) -> Reader:
        def read_at(offset: int, length: int) -> bytes:
            status, data = get(f"{root}/blobs/{layer['digest']}",
                               {"Range": f"bytes={offset}-{offset + length - 1}"})
            if status != 206 or len(data) != length:
                raise RuntimeError(f"Range read gave {status} with {len(data)} bytes")
            counters["fetched"] += length
            counters["ranges"] += 1
            return data

        toc = layer["annotations"][TOC_DIGEST_ANNOTATION]
        return Reader.open(read_at, layer["size"], toc_digest=toc)

    readers = [reader_for(layer) for layer in reversed(doc["layers"])  # upper layers win
               if TOC_DIGEST_ANNOTATION in layer.get("annotations", {})]
    files: dict[str, dict[str, Any]] = {}
    first = b""
    for path in paths:
        name = path.lstrip("/")
        reader = next((r for r in readers if r.lookup(name) is not None), None)
        if reader is None:
            raise SystemExit(f"{path} is in no eStargz layer of {cid}")
        data = reader.read(name)
        if not files:
            first = data
        files[path] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return {"data": base64.b64encode(first).decode(), "files": files, **counters,
            "layers_size": total, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3:])))
