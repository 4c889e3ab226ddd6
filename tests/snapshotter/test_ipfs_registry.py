"""The README's flow end to end, with no external daemon: the sample image pushed with
`peerstar push --estargz` into the embedded store, served by `peerstar registry serve`,
pulled with `ctr-remote image rpull` through the peerstar snapshotter, and a container
reading a file: the registry serves ranges only, a small part of the image's bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from peerstar.source.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH
from tests.snapshotter.conftest import ipfs_bridge, running_stack

pytestmark = pytest.mark.slow

EXTRA_MIB = 16


def test_push_estargz_registry_serve_rpull_run(tmp_path: Path) -> None:
    with ipfs_bridge(tmp_path, EXTRA_MIB) as bridge:
        cid, ref = bridge.cid, bridge.ref
        assert cid.startswith("bafkrei")  # CIDv1, raw leaf: the manifest is one small block
        with running_stack("[remote]\nbackground_fetch = false\n") as st:
            ctr = st.containerd.ctr
            ctr.remote("image", "rpull", "--plain-http", "--snapshotter", "peerstar", ref)
            out = ctr.text("run", "--snapshotter", "peerstar", "--rm", ref, "ipfs-cat",
                           "cat", SAMPLE_TEXT_PATH)
            assert out == SAMPLE_TEXT.decode()
            assert st.snapshotter.log().count("mounted lazily from http://127.0.0.1") == 2
            content = {line.split()[0] for line in ctr.lines("content", "ls")[1:]}
    entries = bridge.access_log()
    blobs = [e for e in entries if "/blobs/" in e["path"]]
    layer_reads = [e for e in blobs if e["path"].rsplit("/", 1)[1] not in content]
    assert layer_reads, entries  # the layers were read from the registry...
    assert not {e["path"].rsplit("/", 1)[1] for e in layer_reads} & content  # ...not stored
    # ...in ranges only (a GET without Range would be a full download), and in total far
    # less than the image: the EXTRA_MIB MiB of data were never read.
    assert all(e["range"] for e in layer_reads if e["method"] == "GET"), layer_reads
    served = sum(e["bytes"] for e in layer_reads)
    assert 0 < served < (EXTRA_MIB << 20) // 4, served
    print(f"served {served} bytes of layers for a {EXTRA_MIB} MiB image")
