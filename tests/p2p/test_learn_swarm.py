"""A layer's read profile learned on one node warms another (`peerstar.registry.profiles`),
with real js-ipfs daemons and bridges in two network namespaces.

An eStargz image (no prioritized files, 8 MiB of random data besides) is pushed on node
A. Both nodes run a bridge; their directories meet on pubsub. Hostile messages come
first, published through A's daemon: a profile for the lower layer whose ranges lie
past its end, a profile too large for a record, and bytes that are not JSON. Then A's
bridge serves the manifest and three ranged reads of the upper layer marked
`Peerstar-Read-Kind: on_demand`; after its window (1 s) it publishes the layer's
profile. Then node B's bridge is asked for the manifest, and nothing else: B's daemon
holds the leaves covering those three ranges, fetched from A in the background, besides
the footers and TOCs -- and no other data leaf. The bogus profile was dropped (counted),
warmed nothing and failed nothing; B's reads return the right bytes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerstar.estargz import Reader
from peerstar.registry.directory import TOPIC
from peerstar.source.sample import build_sample_image
from tests.p2p import swarm
from tests.p2p.test_mirror import wait_for_topic
from tests.p2p.test_warmup_swarm import ACCEPT, REGISTRY, Cluster, _layers
from tests.support.netns import Node
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

METRICS = "127.0.0.1:9105"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("p2p-learn")
    build_sample_image(work / "plain", extra_mib=8)
    proc = subprocess.run([sys.executable, "-m", "peerstar", "convert",
                           f"oci:{work / 'plain'}:latest", f"oci:{work / 'layout'}:latest",
                           "--estargz"],
                          cwd=str(swarm.REPO), capture_output=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(swarm.REPO)))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    with swarm.private_swarm("ab") as (nodes, daemons):
        yield Cluster(nodes, daemons, work / "layout", work)


def _publish(node: Node, data: bytes) -> None:
    """`data` on the directory's topic through the node's daemon, as any peer could."""
    topic = "u" + base64.urlsafe_b64encode(TOPIC.encode()).decode().rstrip("=")
    with tempfile.NamedTemporaryFile(prefix="peerstar-learn-") as f:
        f.write(data)
        f.flush()
        swarm.rpc_raw(node, "pubsub/pub", [("arg", topic)], infile=Path(f.name))


def _profiles(node: Node) -> dict[str, float]:
    text = swarm.http(node, "GET", f"http://{METRICS}/metrics").decode()
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^peerstar_registry_profiles_total\{event="(\w+)"\} (\S+)$', text, re.M)}


def test_profile_learned_on_a_warms_b_before_any_read(cluster: Cluster) -> None:
    na, nb = cluster.nodes["a"], cluster.nodes["b"]
    a_id = cluster.daemons["a"].peer_id
    assert a_id in swarm.wait_for_peers(nb, {a_id})
    cid = swarm.push(na, cluster.layout)
    lower, upper = _layers(cluster.layout)
    r = Reader.from_bytes(upper.blob)
    assert not r.prefetch_end()  # nothing prioritized: only learning can warm data leaves
    toc = {swarm.mh(c) for layer in (lower, upper) for c in layer.leaves_of(
        Reader.from_bytes(layer.blob).footer.toc_offset, len(layer.blob))}
    # three reads a container might make, in three leaves of the random data
    size = len(upper.blob)
    reads = [(3 * 262_144 + 1000, 3 * 262_144 + 9000), (size // 2, size // 2 + 100),
             (20 * 262_144 - 50, 20 * 262_144 + 50)]
    learned = {swarm.mh(c) for s, e in reads for c in upper.leaves_of(s, e)}
    assert len(learned) == 4 and not learned & toc
    every_leaf = {swarm.mh(c) for layer in (lower, upper) for c in layer.leaves}
    assert len(every_leaf - learned - toc) > 20
    assert not every_leaf & swarm.local_blocks(nb)

    logs = cluster.logs
    with (swarm.registry(na, logs / "registry-a.log", "--learn-window", "1s"),
          swarm.registry(nb, logs / "registry-b.log", "--metrics-listen", METRICS)):
        wait_for_topic(cluster.nodes, cluster.daemons, "ab")
        # hostile peers first: what B's directory hears must break nothing
        _publish(na, json.dumps({"op": "have", "from": "evil", "k": "profile:" + lower.digest,
                                 "v": f"{len(lower.blob) + 10:x}+ffffff", "s": 0}).encode())
        _publish(na, json.dumps({"op": "have", "from": "evil", "k": "profile:" + upper.digest,
                                 "v": "0+1," * 3000}).encode())
        _publish(na, b"\xff not json")
        base = f"{REGISTRY}/v2/ipfs/{cid}"
        swarm.http(na, "GET", f"{base}/manifests/latest", headers=[ACCEPT])
        for s, e in reads:
            got = swarm.http(na, "GET", f"{base}/blobs/{upper.digest}",
                             headers=[f"Range: bytes={s}-{e - 1}",
                                      "Peerstar-Read-Kind: on_demand"])
            assert got == upper.blob[s:e]
        wait_until(lambda: _profiles(nb).get("heard", 0) >= 2, timeout=30, interval=0.2)
        assert _profiles(nb).get("heard") == 2.0  # the bogus lower one, then A's
        assert not learned & swarm.local_blocks(nb)

        started = time.monotonic()
        swarm.http(nb, "GET", f"{base}/manifests/latest", headers=[ACCEPT])
        wait_until(lambda: learned | toc <= swarm.local_blocks(nb), timeout=120, interval=0.3)
        held = swarm.local_blocks(nb)
        took = time.monotonic() - started
        assert toc <= held, f"{len(toc - held)} footer/TOC leaves missing on B"
        assert learned <= held, f"{len(learned - held)} learned leaves missing on B"
        assert not (every_leaf - learned - toc) & held  # nothing else came
        time.sleep(1.0)
        assert _profiles(nb) == {"heard": 2.0, "applied": 1.0, "dropped": 1.0}
        # the reads are served, from B's blocks now
        for s, e in reads:
            got = swarm.http(nb, "GET", f"{base}/blobs/{upper.digest}",
                             headers=[f"Range: bytes={s}-{e - 1}",
                                      "Peerstar-Read-Kind: on_demand"])
            assert got == upper.blob[s:e]
        got = swarm.http(nb, "GET", f"{base}/blobs/{lower.digest}",
                         headers=["Range: bytes=0-99"])
        assert got == lower.blob[:100]
    print(f"\nlearned leaves on B {took:.2f} s after its manifest GET")
