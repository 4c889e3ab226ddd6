"""The README's main job: `peerstar demo` builds, converts, verifies and reads by range."""

from __future__ import annotations

import json

from peerstar.estargz import TOC_DIGEST_ANNOTATION, Reader
from tests.support.cli import assert_one_line_error, run_peerstar


def test_demo_runs_and_leaves_a_verified_estargz_image(tmp_path):
    p = run_peerstar("demo", "--workdir", str(tmp_path), "--extra-mib", "2")
    assert p.returncode == 0, p.stderr
    assert "hello from the peerstar sample image" in p.stdout
    assert p.stdout.count(" ok ") >= 2
    # the whole flow: embedded IPFS store -> registry -> lazy FUSE mount -> read
    assert "through FUSE: 'hello from the peerstar sample image'" in p.stdout
    fetched = [line for line in p.stdout.splitlines() if "from the registry" in line]
    pct = float(fetched[0].split("(")[1].split("%")[0])
    assert 0 < pct < 5, fetched
    with open("/proc/self/mounts") as mounts:
        assert str(tmp_path) not in mounts.read()
    out = tmp_path / "sample-estargz"
    index = json.loads((out / "index.json").read_text())
    mdesc = index["manifests"][0]
    manifest = json.loads((out / "blobs/sha256" / mdesc["digest"][7:]).read_text())
    for layer in manifest["layers"]:
        blob = (out / "blobs/sha256" / layer["digest"][7:]).read_bytes()
        Reader.from_bytes(blob, toc_digest=layer["annotations"][TOC_DIGEST_ANNOTATION]
                          ).verify_all()


def test_demo_refuses_a_workdir_that_is_not_a_layout(tmp_path):
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / "precious.txt").write_text("keep me")
    p = run_peerstar("demo", "--workdir", str(tmp_path), timeout=120)
    assert p.returncode == 1
    assert_one_line_error(p)
    assert (tmp_path / "sample" / "precious.txt").read_text() == "keep me"
