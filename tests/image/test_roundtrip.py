"""The whole path with real parts: docker-registry (image pushed by ctr) -> `peerstar push
--estargz` -> CID -> `peerstar pull` -> `ctr image import` -> `ctr run`, through the
embedded store and through a js-ipfs daemon."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from peerstar.estargz import Reader
from peerstar.source.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH, SampleImage
from tests.image.conftest import RegistryImage, cat, leftovers
from tests.support.cli import last_line, run_peerstar
from tests.support.containerd import Containerd

TOC = "containerd.io/snapshot/stargz/toc.digest"
USIZE = "io.containers.estargz.uncompressed-size"


@pytest.mark.slow
def test_registry_estargz_push_pull_run(store_args: list[str], registry_image: RegistryImage,
                                        containerd: Containerd, sample_image: SampleImage,
                                        tmp_path: Path) -> None:
    res = run_peerstar("push", *store_args, "--estargz", "--plain-http",
                       f"docker://{registry_image.ref}")
    assert res.returncode == 0, res.stderr
    cid = last_line(res)
    # Converted layers: eStargz with both annotations, in IPFS under their urls.
    top = json.loads(cat(store_args, cid))
    manifest = json.loads(cat(store_args, top["urls"][0][len("ipfs://"):]))
    assert len(manifest["layers"]) == len(sample_image.layer_digests)
    for layer, src_digest in zip(manifest["layers"], sample_image.layer_digests, strict=True):
        assert layer["digest"] != src_digest
        assert set(layer["annotations"]) == {TOC, USIZE}
        blob = cat(store_args, layer["urls"][0][len("ipfs://"):])
        reader = Reader.from_bytes(blob, toc_digest=layer["annotations"][TOC])
        reader.verify_all()
    # Re-pushing converts again and still gives the same CID (deterministic conversion).
    again = run_peerstar("push", *store_args, "--estargz", "--plain-http",
                         f"docker://{registry_image.ref}")
    assert again.returncode == 0 and last_line(again) == cid

    out = tmp_path / "pulled"
    res = run_peerstar("pull", *store_args, f"ipfs://{cid}", "--output", f"oci:{out}")
    assert res.returncode == 0, res.stderr
    assert leftovers(tmp_path) == []

    ctr = containerd.ctr
    base = f"docker.io/peerstar/pulled-{uuid.uuid4().hex[:8]}"
    assert ctr.import_oci_layout(out, base) == [f"{base}:latest"]
    name = f"rt-{uuid.uuid4().hex[:8]}"
    text = ctr.text("run", "--rm", f"{base}:latest", name, "/bin/sh", "-c",
                    f"cat {SAMPLE_TEXT_PATH}; /opt/peerstar/exec.sh")
    assert text.splitlines() == [SAMPLE_TEXT.decode().rstrip("\n"), "sample script ran"]
