"""Fixtures and independent checkers for `peerstar.oci` tests.

The checkers recompute every value a converted image claims (blob digests and sizes,
DiffIDs, uncompressed sizes, TOC digests, zstd:chunked footer positions) with the
standard library and `zstandard` directly, not through peerstar.oci.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from peerstar.estargz import Reader
from tests.support.content import compact_json, sha256_digest
from tests.support.tars import tar_of_files

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
TOC_ANN = "containerd.io/snapshot/stargz/toc.digest"
USIZE_ANN = "io.containers.estargz.uncompressed-size"
ZCHECK_ANN = "io.containers.zstd-chunked.manifest-checksum"
ZPOS_ANN = "io.containers.zstd-chunked.manifest-position"
REF_NAME = "org.opencontainers.image.ref.name"
LANDMARKS = {".prefetch.landmark", ".no.prefetch.landmark", "stargz.index.json"}


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


class LayoutBuilder:
    """Write an OCI layout by hand (independently of peerstar.oci.layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_bytes(compact_json({"imageLayoutVersion": "1.0.0"}))
        self.entries: list[dict] = []

    def blob(self, data: bytes, media_type: str, **extra: Any) -> dict:
        digest = sha256_digest(data)
        (self.root / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def image(self, layers: list[tuple[bytes, str, dict | None]], diff_ids: list[str],
              *, arch: str = "amd64") -> dict:
        """layers: (blob bytes, media type, annotations or None)."""
        config = {"architecture": arch, "os": "linux", "config": {"Env": ["A=1"]},
                  "rootfs": {"type": "layers", "diff_ids": diff_ids},
                  "history": [{"created_by": "test"}]}
        cdesc = self.blob(compact_json(config), OCI_CONFIG)
        ldescs = []
        for data, mtype, ann in layers:
            d = self.blob(data, mtype)
            if ann:
                d["annotations"] = ann
            ldescs.append(d)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cdesc,
                    "layers": ldescs, "annotations": {"org.example.keep": "yes"}}
        return self.blob(compact_json(manifest), OCI_MANIFEST,
                         platform={"architecture": arch, "os": "linux"})

    def tag(self, desc: dict, name: str | None) -> None:
        entry = dict(desc)
        if name:
            entry["annotations"] = {**entry.get("annotations", {}), REF_NAME: name}
        self.entries.append(entry)

    def finish(self) -> Path:
        (self.root / "index.json").write_bytes(
            compact_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.entries}))
        return self.root


# --- independent checks --------------------------------------------------------------


def read_blob(layout: Path, digest: str) -> bytes:
    data = (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
    assert sha256_digest(data) == digest, f"blob file {digest} does not hash to its name"
    return data


def read_json(layout: Path, desc: dict) -> dict:
    data = read_blob(layout, desc["digest"])
    assert len(data) == desc["size"]
    return json.loads(data)


def decompress(blob: bytes, media_type: str) -> bytes:
    if media_type.endswith("+zstd"):
        return zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(blob), read_across_frames=True).read()
    if media_type.endswith("+gzip") or blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    return blob


def tar_files(data: bytes) -> dict[str, bytes]:
    """Regular files of a tar (names cleaned), landmarks and the TOC left out."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:
            name = m.name.removeprefix("./")
            if m.isfile() and name not in LANDMARKS:
                out[name] = tar.extractfile(m).read()
    return out


def toc_digest_independent(blob: bytes, media_type: str) -> tuple[str, dict[str, str]]:
    """The TOC digest read without peerstar, plus the zstd annotations it implies."""
    if media_type == OCI_GZIP:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob)), mode="r:") as tar:
            toc = tar.extractfile("stargz.index.json").read()
        return sha256_digest(toc), {}
    # zstd:chunked footer: last 40 bytes (inside a skippable frame).
    off, clen, ulen, kind = struct.unpack("<QQQQ", blob[-40:-8])
    assert blob[-8:] == b"GnUlInUx" and kind == 1
    ztoc = blob[off : off + clen]
    toc = zstandard.ZstdDecompressor().decompress(ztoc, max_output_size=ulen)
    assert len(toc) == ulen
    return sha256_digest(toc), {ZCHECK_ANN: sha256_digest(ztoc), ZPOS_ANN: f"{off}:{clen}:{ulen}:1"}


@dataclass
class CheckedManifest:
    desc: dict
    manifest: dict
    config: dict
    layer_files: list[dict[str, bytes]]  # files per converted layer


def check_image_manifest(layout: Path, desc: dict, *, compression: str = "gzip"
                         ) -> CheckedManifest:
    """Recompute and assert every claim of a converted image manifest."""
    assert desc["mediaType"] == OCI_MANIFEST
    manifest = read_json(layout, desc)
    assert manifest["mediaType"] == OCI_MANIFEST and manifest["schemaVersion"] == 2
    assert manifest["config"]["mediaType"] == OCI_CONFIG
    config = read_json(layout, manifest["config"])
    diff_ids = config["rootfs"]["diff_ids"]
    assert len(diff_ids) == len(manifest["layers"])
    want_type = OCI_GZIP if compression == "gzip" else OCI_ZSTD
    files = []
    for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        blob = read_blob(layout, layer["digest"])
        assert layer["size"] == len(blob)
        assert layer["mediaType"] == want_type
        raw = decompress(blob, layer["mediaType"])
        assert diff_id == sha256_digest(raw)
        ann = layer["annotations"]
        assert ann[USIZE_ANN] == str(len(raw))
        toc, zann = toc_digest_independent(blob, layer["mediaType"])
        assert ann[TOC_ANN] == toc
        for k, v in zann.items():
            assert ann[k] == v
        r = Reader.from_bytes(blob, toc_digest=toc)
        assert r.compression == compression
        r.verify_all()
        files.append(tar_files(raw))
    return CheckedManifest(desc, manifest, config, files)


def layout_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture
def layer_tars() -> list[bytes]:
    """Three distinct layer tars; the second has a multi-chunk file (at 64 KiB chunks)."""
    big = hashlib.sha256(b"seed").digest() * 10000  # 320000 bytes
    return [
        tar_of_files({"etc/hello.txt": b"hello\n", "etc/empty": b""}, dirs=("etc",)),
        tar_of_files({"data/big.bin": big, "data/small": b"s" * 100}, dirs=("data",)),
        tar_of_files({"arm/only.txt": b"arm64 layer\n"}, dirs=("arm",)),
    ]
