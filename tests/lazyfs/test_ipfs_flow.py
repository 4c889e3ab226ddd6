"""The issue's headline flow with no external daemon: the sample image pushed with
`peerstar push --estargz` into the embedded store, served by `peerstar registry serve`,
mounted with `peerstar mount 127.0.0.1:PORT/ipfs/<CID> DIR`; a file reads byte-exact
and only a small part of the image is fetched."""

from __future__ import annotations

from pathlib import Path

import pytest

from peerstar.lazyfs.image import image_stats
from peerstar.source.sample import build_sample_image
from tests.lazyfs.conftest import is_mounted
from tests.support.cli import run_peerstar, serving_registry
from tests.support.ports import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_push_serve_mount_read(tmp_path: Path) -> None:
    sample = build_sample_image(tmp_path / "layout", extra_mib=8)
    root = tmp_path / "store"
    res = run_peerstar("push", "--estargz", "--root", str(root),
                       f"oci:{tmp_path / 'layout'}:latest")
    assert res.returncode == 0, res.stderr
    cid = res.stdout.strip().splitlines()[-1]
    port = free_port()
    target = tmp_path / "rootfs"
    target.mkdir()
    work_root = tmp_path / "work"
    with serving_registry("--root", root, "--listen", f"127.0.0.1:{port}", "--no-access-log",
                          log=tmp_path / "registry.log"):
        res = run_peerstar("mount", f"127.0.0.1:{port}/ipfs/{cid}", str(target), "--work-root",
                           str(work_root), "--cache-dir", str(tmp_path / "cache"),
                           "--no-background")
        assert res.returncode == 0, res.stderr
        try:
            assert (target / "etc/peerstar-sample.txt").read_bytes() == \
                sample.files["/etc/peerstar-sample.txt"]
            assert (target / "opt/peerstar/tree/a/b/c/deep.txt").read_bytes() == \
                b"deep in the tree\n"
            stats = image_stats(target, work_root)
            assert stats["size"] > 8 << 20
            assert 0 < stats["fetchedSize"] < stats["size"] // 20  # type: ignore[operator]
        finally:
            res = run_peerstar("unmount", str(target), "--work-root", str(work_root))
            assert res.returncode == 0, res.stderr
        assert not is_mounted(target)
