"""Helpers for the multi-node tests: js-ipfs daemons and peerstar registries inside the
network namespaces of `tests.support.netns`, and raw RPC/HTTP calls made from inside a
node (each node's 127.0.0.1 is its own, so calls run through the node's `ip netns exec`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from multiformats import CID, multihash

from peerstar.k8s.keys import generate_swarm_key
from tests.support.cli import serving_registry
from tests.support.containerd import HarnessError
from tests.support.jsipfs import JsIpfs, start_jsipfs
from tests.support.netns import Network, Node

REPO = Path(__file__).resolve().parents[2]
API_PORT, SWARM_PORT, GATEWAY_PORT, RPC_PORT = 5001, 4001, 8080, 5003
REGISTRY_PORT = 5050

# Runs inside a node: POST (kubo RPC) or GET (registry) to a loopback URL; an optional file
# is sent as the multipart body `add` expects; the response body is streamed to stdout.
_CLIENT = r"""
import os, sys, urllib.error, urllib.request
method, url, timeout, infile = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
headers = dict(h.split(": ", 1) for h in sys.argv[5:])
data = None
if infile != "-":
    b = "peerstar" + os.urandom(8).hex()
    with open(infile, "rb") as f:
        payload = f.read()
    data = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"blob\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + \
           f"\r\n--{b}--\r\n".encode()
    headers["Content-Type"] = f"multipart/form-data; boundary={b}"
req = urllib.request.Request(url, data=data, method=method, headers=headers)
try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
except urllib.error.HTTPError as e:
    sys.stderr.write(f"HTTP {e.code}: {e.read()[:2000]!r}")
    sys.exit(3)
"""


def http(node: Node, method: str, url: str, *, infile: Path | None = None,
         headers: Sequence[str] = (), timeout: float = 60.0) -> bytes:
    """Make one HTTP request from inside `node`; HarnessError on any failure."""
    proc = node.run([sys.executable, "-c", _CLIENT, method, url, str(timeout),
                     str(infile) if infile else "-", *headers], timeout=timeout + 30)
    if proc.returncode != 0:
        raise HarnessError(f"{method} {url} in {node.label}: "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return proc.stdout


def rpc_raw(node: Node, path: str, params: Sequence[tuple[str, str]] = (), *,
            infile: Path | None = None, timeout: float = 60.0) -> bytes:
    url = f"http://127.0.0.1:{API_PORT}/api/v0/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(list(params))
    return http(node, "POST", url, infile=infile, timeout=timeout)


def rpc(node: Node, path: str, params: Sequence[tuple[str, str]] = (), *,
        timeout: float = 60.0) -> Any:
    body = rpc_raw(node, path, params, timeout=timeout)
    return json.loads(body) if body.strip() else None


def add(node: Node, data: bytes) -> str:
    """`add` as peerstar pushes (CIDv1, raw leaves, pinned); returns the CID (base32)."""
    with tempfile.NamedTemporaryFile(prefix="peerstar-p2p-") as f:
        f.write(data)
        f.flush()
        out = rpc_raw(node, "add", [("cid-version", "1"), ("raw-leaves", "true"),
                                    ("pin", "true"), ("cid-base", "base32")],
                      infile=Path(f.name), timeout=300)
    return json.loads(out.splitlines()[-1])["Hash"]


def cat(node: Node, cid: str, offset: int | None = None, length: int | None = None, *,
        timeout: float = 120.0) -> bytes:
    params = [("arg", cid)]
    if offset is not None:
        params.append(("offset", str(offset)))
    if length is not None:
        params.append(("length", str(length)))
    # js-ipfs's own per-call timeout, so a fetch nobody can serve ends with an error.
    params.append(("timeout", f"{int(timeout)}s"))
    return rpc_raw(node, "cat", params, timeout=timeout + 10)


def push(node: Node, layout: Path, *, estargz: bool = False, timeout: float = 300.0) -> str:
    """`peerstar push` of the layout's `latest` image on `node` into its js-ipfs (with
    `estargz`, converted to eStargz on the way); the image's CID."""
    convert = ["--estargz"] if estargz else []
    proc = node.run([sys.executable, "-m", "peerstar", "push", *convert, "--ipfs-address",
                     f"/ip4/127.0.0.1/tcp/{API_PORT}", f"oci:{layout}:latest"],
                    cwd=str(REPO), timeout=timeout, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0:
        raise HarnessError(f"peerstar push of {layout} in {node.label} failed: "
                           f"{proc.stderr.decode(errors='replace')[-3000:]}")
    cid = proc.stdout.decode().strip().splitlines()[-1]
    if not cid.startswith("baf"):
        raise HarnessError(f"peerstar push of {layout} printed {cid!r}, not a CIDv1")
    return cid


def mh(cid: str) -> str:
    """A block's identity in a blockstore: its multihash (hex), whatever the CID's codec."""
    return bytes(CID.decode(cid).digest).hex()


def local_blocks(node: Node) -> set[str]:
    """Multihashes of every block in the node's repo (`refs/local`, which js-ipfs reports
    with the raw codec). js-ipfs keeps no bitswap counters, so which blocks a node holds
    is the evidence of what it fetched."""
    out = rpc_raw(node, "refs/local")
    return {mh(json.loads(line)["Ref"]) for line in out.splitlines() if line.strip()}


def leaf_cids(data: bytes, chunk: int = 256 * 1024) -> list[str]:
    """Multihashes of the raw leaves `add --cid-version=1 --raw-leaves` makes of `data`."""
    return [mh(str(CID("base32", 1, "raw", multihash.digest(data[i:i + chunk], "sha2-256"))))
            for i in range(0, len(data), chunk)]


def num_objects(node: Node) -> int:
    return int(rpc(node, "repo/stat")["NumObjects"])


def peers(node: Node) -> set[str]:
    res = rpc(node, "swarm/peers") or {}
    return {p.get("Peer", "") for p in res.get("Peers") or []}


def wait_for_peers(node: Node, expected: set[str], timeout: float = 60.0) -> set[str]:
    """Poll until `node` is connected to every peer in `expected`; return its peers."""
    deadline = time.monotonic() + timeout
    while True:
        now = peers(node)
        if expected <= now or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def start_daemon(node: Node, swarm_key: bytes | None, bootstrap: Sequence[str] = (),
                 timeout: float = 120.0) -> JsIpfs:
    """js-ipfs in `node`: swarm on the node's address, API etc. on its own loopback, the
    given swarm key (None = public network) and bootstrap list, nothing else to dial."""
    return start_jsipfs(swarm_key=swarm_key, prefix=node.prefix, swarm_host=node.addr,
                        ports=(API_PORT, SWARM_PORT, GATEWAY_PORT, RPC_PORT),
                        bootstrap=bootstrap, timeout=timeout)


@contextmanager
def private_swarm(labels: str, bare: str = ""
                  ) -> Iterator[tuple[dict[str, Node], dict[str, JsIpfs]]]:
    """One node (network namespace) per label, each with js-ipfs on a fresh swarm key,
    all bootstrapping from the first, plus a node per label of `bare` with no daemon (e.g.
    for a registry); daemons stopped and namespaces removed on exit.
    A harness failure fails the test with its reason (no traceback)."""
    key = generate_swarm_key().encode()
    daemons: dict[str, JsIpfs] = {}
    errors: list[HarnessError] = []
    try:
        net = Network()
    except HarnessError as exc:
        pytest.fail(f"cannot create network namespaces: {exc}", pytrace=False)
    try:
        try:
            nodes = {label: net.add_node(label) for label in labels + bare}
            first = labels[0]
            daemons[first] = start_daemon(nodes[first], key)
            # The others at once: each start is seconds of mostly waiting.
            with ThreadPoolExecutor(max(1, len(labels) - 1)) as pool:
                futures = {label: pool.submit(start_daemon, nodes[label], key,
                                              [daemons[first].swarm_multiaddr])
                           for label in labels[1:]}
                for label, future in futures.items():
                    try:
                        daemons[label] = future.result()
                    except HarnessError as exc:
                        errors.append(exc)
            if errors:
                raise errors[0]
        except HarnessError as exc:
            pytest.fail(f"cannot start the swarm: {exc}", pytrace=False)
        yield nodes, daemons
    finally:
        for d in daemons.values():
            d.stop()
        net.remove()


def registry(node: Node, log: Path, *args: str
             ) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """`peerstar registry serve [ARGS]` on the node's own localhost:5050, over the node's
    daemon."""
    return serving_registry("--listen", f"127.0.0.1:{REGISTRY_PORT}", "--ipfs-address",
                            f"/ip4/127.0.0.1/tcp/{API_PORT}", "--read-timeout", "60s", *args,
                            log=log, prefix=node.prefix)
