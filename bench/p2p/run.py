"""Benchmark: a container's cold start on a fresh node, its image on another node.

The project's headline figure (issue 14): how long a new node takes from "pull this
image" to the workload's first output line when the image was pushed on another node of
a private IPFS swarm, and how many bytes and sequential round trips to other nodes that
costs. Measured as a new user would run it, all on this machine:

- two nodes, network namespaces on a private bridge (tests/support/netns.py), each with
  js-ipfs (one generated swarm key; B bootstraps from A). The images are pushed on A
  with `peerstar push` (blocks local to A only).
- node B fresh for every trial: a new js-ipfs repo (new peer, empty blockstore)
  reconnected to A, its own `peerstar registry serve` on B's localhost:5050 over it, a
  new containerd root and a new snapshotter root. containerd, the snapshotter and the
  clients (`ctr`, `ctr-remote`) enter only B's network namespace (`nsenter --net`), so
  the FUSE mounts are those containerd and runc see.

Images (built locally from this machine's files, never downloaded; kept in --work):
  python  bench/coldstart's image (4 layers, ~237 MiB: busybox, Debian's python3.11 with
          its libraries and stdlib, dist-packages, gcc's tree); `python3 -c 'print(1)'`;
  big     peerstar.source.sample's image with 200 MiB of random data (busybox layer + a layer
          with the known text file and the data); `cat /etc/peerstar-sample.txt`.
Each as gzip layers (gzip -6), as eStargz (`peerstar convert --estargz`, what
`peerstar push --estargz` makes) and as eStargz with the workload's files prioritized
(`--prioritize-from`; python: the files the workload opens, recorded with strace;
big: busybox and the text file).

Modes, interleaved within each round of trials:
  full       gzip image: `ctr image pull --plain-http localhost:5050/ipfs/<CID>:latest`
             + `ctr run` (overlayfs), every layer through B's bridge;
  lazy       eStargz image: `ctr-remote image rpull --plain-http --snapshotter peerstar`
             + `ctr run --snapshotter peerstar` (`peerstar snapshotter serve`, default
             config: background fetch on);
  lazy-prio  the same on the prioritized image;
  lazy-learned  `lazy` on a node of a cluster that has run the image once: a "teacher"
             trial (`lazy` on a fresh B, its bridge's learning window shortened to
             LEARN_WINDOW s) while A runs a bridge too, which hears the layers' read
             profiles B's bridge publishes and keeps them (docs/learning.md); the
             teacher is then torn down and the measured trial runs on a fresh B whose
             bridge asks the swarm for the profiles when it serves the manifest. A's
             bridge lives only for this mode's trials, so `lazy` (learning on, the
             default) never finds a profile: it stays a never-seen image;
  go         the Go stargz snapshotter (bench/coldstart/main.go, built from Debian's
             sources) through the same bridge on the eStargz image;
  go-prio    the same on the prioritized image;
  local      `lazy` on node A itself (containerd, snapshotter and registry in A's
             namespace, every block local; fresh containerd and snapshotter roots):
             the baseline that shows what the network costs.

Per trial: wall time from the start of the pull to the workload's first output line,
the pull / run split, bytes received on the node's link (rx counter of its eth0) over
that time, and the sequential fetches from other nodes on the critical path: from the
node's registry access log, the requests that took >= 100 ms (they waited for blocks
from another node; a local one takes a few ms), and of those the largest set of pairwise
time-disjoint ones (greedy by end time) between the pull start and the output line.
Prints a markdown table of medians (image x mode) and the ratios against the targets;
every trial goes to --json (and WORK/results.json). Once per run, if `big` is measured,
a raw `cat` of its largest layer on A and on a fresh B shows what the swarm itself
delivers.

Run as root: `python bench/p2p/run.py [--trials 3] [--images python,big]
[--modes full,lazy,lazy-prio,go,go-prio,local] [--work DIR] [--json FILE]`.
Built artefacts stay in --work (default /tmp/peerstar-p2p) for the next run; processes,
mounts, namespaces and temporary directories are removed on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.coldstart import run as cs  # noqa: E402
from peerstar.k8s.keys import generate_swarm_key  # noqa: E402
from peerstar.oci import mediatypes as mt  # noqa: E402
from peerstar.oci.platform import host_platform  # noqa: E402
from peerstar.source.sample import (  # noqa: E402
    SAMPLE_TEXT,
    SAMPLE_TEXT_PATH,
    build_layer_tar,
    sample_layer_entries,
)
from tests.p2p import swarm  # noqa: E402
from tests.support.containerd import Containerd, start_containerd  # noqa: E402
from tests.support.content import sha256_digest  # noqa: E402
from tests.support.jsipfs import JsIpfs  # noqa: E402
from tests.support.netns import Network, Node  # noqa: E402
from tests.support.snapshotter import (  # noqa: E402
    SnapshotterProc,
    mounts_under,
    netns_prefix,
    stop_snapshotter,
)

MODES = ("full", "lazy", "lazy-prio", "lazy-learned", "go", "go-prio", "local")
IMAGES = ("python", "big")
BIG_EXTRA_MIB = 200
SLOW_MS = 100.0  # a bridge request at least this slow waited for another node's blocks
REGISTRY = f"localhost:{swarm.REGISTRY_PORT}"
MIB = 1 << 20
LEARN_WINDOW = 3.0  # the teacher's learning window (s): its container start is ~3 s
METRICS = "127.0.0.1:9105"  # a bridge's /metrics, in its node's namespace

# (image, numerator, denominator, target): wall-time ratios of medians, from the issue.
TARGETS = [
    ("python", "lazy", "go", 0.8),
    ("python", "lazy", "full", 0.25),
    ("python", "lazy", "local", 2.5),
    ("python", "lazy-prio", "full", 0.15),
    ("big", "lazy", "full", 0.1),
]
BYTES_TARGET = 1.5  # B's rx <= 1.5x (workload's compressed bytes + TOCs), python image


log = cs.log


# --- images ------------------------------------------------------------------------------


@dataclass
class Image:
    name: str
    workload: list[str]
    expected: str
    tars: list[Path]
    files: list[str]  # what the workload reads (image paths), prioritized in "prio"
    layers: dict[str, list[cs.Layer]]  # "gzip", "estargz", "prio"
    layouts: dict[str, Path] = field(default_factory=dict)
    need: dict[str, int] = field(default_factory=dict)  # cs.workload_bytes of "estargz"
    cids: dict[str, str] = field(default_factory=dict)  # variant -> CID pushed on A

    def summary(self) -> dict[str, Any]:
        return {"workload": self.workload, "uncompressed": sum(t.stat().st_size
                                                                for t in self.tars),
                "layers": len(self.tars), "files": self.files, "need": self.need,
                "cids": self.cids,
                "sizes": {k: sum(la.size for la in v) for k, v in self.layers.items()}}


def write_layout(dst: Path, layers: list[cs.Layer], workload: list[str]) -> Path:
    """An OCI image layout (tag `latest`) of `layers` (blobs hard-linked) with a config
    that runs `workload`; eStargz layers carry their TOC digest and uncompressed size."""
    blobs = dst / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes | None, digest: str, src: Path | None = None) -> None:
        target = blobs / digest.split(":", 1)[1]
        if target.exists():
            return
        if src is not None:
            try:
                os.link(src, target)
            except OSError:
                shutil.copyfile(src, target)
        else:
            assert data is not None
            target.write_bytes(data)

    descs = []
    for la in layers:
        put(None, la.digest, la.blob)
        desc: dict[str, Any] = {"mediaType": mt.OCI_LAYER_GZIP, "digest": la.digest,
                                "size": la.size}
        if la.toc_digest:
            desc["annotations"] = {mt.TOC_DIGEST_ANNOTATION: la.toc_digest,
                                   mt.UNCOMPRESSED_SIZE_ANNOTATION: str(la.uncompressed)}
        descs.append(desc)
    _os, arch, variant = host_platform()
    cfg: dict[str, Any] = {"architecture": arch, "os": "linux",
                           "config": {"Env": [cs.ENV_PATH], "Cmd": workload},
                           "rootfs": {"type": "layers",
                                      "diff_ids": [la.diff_id for la in layers]}}
    if variant:
        cfg["variant"] = variant
    config = json.dumps(cfg).encode()
    config_digest = sha256_digest(config)
    put(config, config_digest)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": descs}).encode()
    manifest_digest = sha256_digest(manifest)
    put(manifest, manifest_digest)
    (dst / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (dst / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_INDEX,
        "manifests": [{"mediaType": mt.OCI_MANIFEST, "digest": manifest_digest,
                       "size": len(manifest),
                       "annotations": {mt.REF_NAME_ANNOTATION: "latest"}}]}))
    return dst


def build_python(work: Path) -> Image:
    """bench/coldstart's image and workload (its builders, cached under WORK/python)."""
    d = work / "python"
    tars = cs.build_layer_tars(d / "layers")
    cs.extract_rootfs(tars, d / "rootfs")
    prio = d / "prioritized.txt"
    files = cs.record_workload(d / "rootfs", prio)
    layers = {"gzip": cs.gzip_layers(tars, d / "gzip"),
              "estargz": cs.estargz_layers(tars, d / "estargz", None),
              "prio": cs.estargz_layers(tars, d / "estargz-prio", prio)}
    return Image("python", list(cs.WORKLOAD), cs.EXPECTED, tars, files, layers)


def build_big(work: Path) -> Image:
    """peerstar.source.sample's two layers with BIG_EXTRA_MIB MiB of random data; the workload
    cats the sample's known text file with busybox (static: nothing else to open)."""
    d = work / "big"
    (d / "layers").mkdir(parents=True, exist_ok=True)
    tars = [d / "layers" / f"layer{i}.tar" for i in range(2)]
    if not all(t.exists() for t in tars):
        for t, entries in zip(tars, sample_layer_entries(extra_mib=BIG_EXTRA_MIB),
                              strict=True):
            t.with_suffix(".tmp").write_bytes(build_layer_tar(entries))
            t.with_suffix(".tmp").rename(t)
    files = ["bin/busybox", SAMPLE_TEXT_PATH.lstrip("/")]
    prio = d / "prioritized.txt"
    prio.write_text("".join(f + "\n" for f in files))
    layers = {"gzip": cs.gzip_layers(tars, d / "gzip"),
              "estargz": cs.estargz_layers(tars, d / "estargz", None),
              "prio": cs.estargz_layers(tars, d / "estargz-prio", prio)}
    return Image("big", ["cat", SAMPLE_TEXT_PATH], SAMPLE_TEXT.decode().strip(), tars,
                 files, layers)


def prepare(image: Image, work: Path) -> None:
    for variant, layers in image.layers.items():
        image.layouts[variant] = write_layout(work / image.name / f"layout-{variant}",
                                              layers, image.workload)
    image.need = cs.workload_bytes(image.files, image.tars, image.layers["estargz"])


# --- measuring -------------------------------------------------------------------------


def rx_bytes(node: Node) -> int:
    out = subprocess.run(["ip", "-n", node.netns, "-j", "-s", "link", "show", "eth0"],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])


def registry_log(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The JSON lines of a registry's stderr: (access log: one per request, with "path";
    others, e.g. its log of slow IPFS reads, with "upstream")."""
    access, other = [], []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and "ts" in entry and "ms" in entry:
                    (access if "path" in entry else other).append(entry)
    return access, other


def keep_logs(snap: SnapshotterProc, dest: Path) -> None:
    """The snapshotter's log, then each layer daemon's, into `dest` (WORK/logs): where a
    trial's time went, after its root is removed."""
    parts = [snap.log()]
    for p in sorted((snap.root / "cache" / "mounts").glob("*.log")):
        parts.append(f"--- layer daemon {p.name}\n{p.read_text(errors='replace')}")
    dest.write_text("\n".join(parts))


def sequential_fetches(entries: list[dict[str, Any]], start: float,
                       end: float) -> tuple[int, int]:
    """(largest set of pairwise time-disjoint requests >= SLOW_MS within [start, end],
    all such requests): greedy interval scheduling by end time."""
    slow = sorted((e["ts"] - e["ms"] / 1000.0, e["ts"]) for e in entries
                  if e.get("ms", 0) >= SLOW_MS and e["ts"] <= end
                  and e["ts"] - e["ms"] / 1000.0 >= start - 0.01)
    slow.sort(key=lambda iv: iv[1])
    count, last_end = 0, float("-inf")
    for s, e in slow:
        if s >= last_end:
            count, last_end = count + 1, e
    return count, len(slow)


@dataclass
class Trial:
    image: str
    mode: str
    n: int
    total: float = 0.0  # pull start -> workload's first output line
    pull: float = 0.0
    run: float = 0.0
    rx_bytes: int = 0  # on the pulling node's eth0, pull start -> output line
    fetches: int = 0  # sequential fetches from other nodes on the critical path
    slow_requests: int = 0  # bridge requests >= SLOW_MS in that window
    requests: int = 0  # bridge requests in that window
    served_bytes: int = 0  # response bytes the bridge sent in that window
    upstream_slow: int = 0  # the bridge's own slow IPFS reads logged in it, if it logs them
    setup_s: float = 0.0  # fresh node start-up before the clock (not measured time)
    load: float = 0.0  # 1-minute load average at the start
    notes: dict[str, float] = field(default_factory=dict)
    # the bridge's requests in the window: [start, end] (s after the pull start), ms,
    # bytes, path tail, range
    requests_log: list[list[Any]] = field(default_factory=list)
    error: str = ""


@dataclass
class Cluster:
    a: Node
    b: Node
    key: bytes
    da: JsIpfs
    stargzd: Path | None
    namespace: str = field(default_factory=lambda: f"p2p-bench-{os.getpid()}")
    bases: list[Path] = field(default_factory=list)  # snapshotter roots made here
    logs: Path = Path()  # the bridges' logs of this run (WORK/logs)
    peerstar_config: str = ""  # TOML for peerstar's snapshotter (--peerstar-config)

    def new_base(self) -> Path:
        base = Path(tempfile.mkdtemp(prefix="pbs-", dir="/tmp"))
        self.bases.append(base)
        return base

    def fresh_b_daemon(self) -> JsIpfs:
        db = swarm.start_daemon(self.b, self.key, [self.da.swarm_multiaddr])
        try:
            if self.da.peer_id not in swarm.wait_for_peers(self.b, {self.da.peer_id}):
                raise SystemExit("node B did not connect to A")
        except BaseException:
            db.stop()
            raise
        return db


def ctr_base(prefix: list[str], binary: str, daemon: Containerd) -> list[str]:
    return [*prefix, binary, "--address", daemon.ctr.address, "--namespace",
            daemon.ctr.namespace]


def profiles(node: Node) -> dict[str, float]:
    """The read-profile counters of the bridge in `node` (its /metrics on METRICS)."""
    text = swarm.http(node, "GET", f"http://{METRICS}/metrics", timeout=10).decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("peerstar_registry_profiles_total{"):
            event = line.split('"')[1]
            out[event] = float(line.rsplit(" ", 1)[1])
    return out


def learned_trial(cl: Cluster, image: Image, n: int) -> Trial:
    """`lazy-learned`: A's bridge up, a teacher `lazy` trial on a fresh B whose bridge
    publishes the profiles A's bridge hears, then the measured trial on a fresh B."""
    alog = cl.logs / f"registry-a-{image.name}-lazy-learned-{n}.log"
    with swarm.registry(cl.a, alog, "--metrics-listen", METRICS):
        def taught() -> None:
            # every layer's window opened before the output line: all closed by now
            time.sleep(LEARN_WINDOW + 0.5)
            published = profiles(cl.b).get("published", 0)
            if not published:
                raise RuntimeError("the teacher's bridge published no read profile")
            deadline = time.monotonic() + 30
            while profiles(cl.a).get("heard", 0) < published:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"A's bridge heard {profiles(cl.a)} of the "
                                       f"{published:g} profiles the teacher published")
                time.sleep(0.2)

        teacher = one_trial(cl, image, "lazy", n, label="lazy-teacher", bridge_args=(
            "--learn-window", f"{LEARN_WINDOW}s", "--metrics-listen", METRICS),
            after_output=taught)
        if teacher.error:
            raise RuntimeError(f"teacher trial: {teacher.error}")
        log(f"teacher {n} {image.name}: {teacher.total:.2f} s; A's bridge keeps "
            f"{profiles(cl.a).get('heard', 0):g} profiles")
        trial = one_trial(cl, image, "lazy-learned", n)
        trial.notes["teacher_s"] = teacher.total
        trial.notes.update({f"a_{k}": v for k, v in profiles(cl.a).items()})
        return trial


def one_trial(cl: Cluster, image: Image, mode: str, n: int, *, label: str = "",
              bridge_args: tuple[str, ...] = (),
              after_output: Callable[[], None] | None = None) -> Trial:
    """One trial of `mode` (`label` names its logs; `bridge_args` go to its bridge;
    `after_output` runs once the workload answered, before the node is torn down)."""
    label = label or mode
    trial = Trial(image.name, mode, n, load=os.getloadavg()[0])
    node = cl.a if mode == "local" else cl.b
    prefix = netns_prefix(node)
    variant = {"full": "gzip", "lazy-prio": "prio", "go-prio": "prio"}.get(mode, "estargz")
    ref = f"{REGISTRY}/ipfs/{image.cids[variant]}:latest"
    reglog = cl.logs / f"registry-{image.name}-{label}-{n}.log"
    setup = time.monotonic()
    snap: SnapshotterProc | cs.GoSnapshotter | None = None
    daemon: Containerd | None = None
    with contextlib.ExitStack() as stack:
        if mode != "local":
            stack.callback(cl.fresh_b_daemon().stop)
        stack.enter_context(swarm.registry(node, reglog, *bridge_args))
        try:
            plugins: dict[str, str] = {}
            if mode in ("lazy", "lazy-prio", "lazy-learned", "local"):
                snap = SnapshotterProc(cl.new_base(), cl.peerstar_config, prefix=prefix)
                snap.start()
                plugins = {"peerstar": str(snap.address)}
            elif mode in ("go", "go-prio"):
                assert cl.stargzd is not None
                snap = cs.GoSnapshotter(cl.stargzd, cl.new_base(), prefix=prefix).start()
                plugins = {"stargz": str(snap.address)}
            daemon = start_containerd(namespace=cl.namespace, proxy_plugins=plugins,
                                      prefix=prefix)
            snapshotter = ([] if mode == "full" else ["--snapshotter", "stargz"]
                           if mode.startswith("go") else ["--snapshotter", "peerstar"])
            if snapshotter:
                time.sleep(0.5)  # let containerd connect to the plugin before the clock
            trial.setup_s = time.monotonic() - setup
            if mode == "full":
                pull = [*ctr_base(prefix, "ctr", daemon), "image", "pull", "--plain-http",
                        ref]
            else:
                pull = [*ctr_base(prefix, "ctr-remote", daemon), "image", "rpull",
                        "--plain-http", *snapshotter, ref]
            rx0 = rx_bytes(node)
            w0, t0 = time.time(), time.monotonic()
            proc = subprocess.run(pull, capture_output=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"pull failed: {proc.stderr.decode()[-2000:]}")
            t1 = time.monotonic()
            t2 = cs.run_workload([*ctr_base(prefix, "ctr", daemon), "run", *snapshotter,
                                  "--rm", ref, f"p2p-{image.name}-{mode}-{n}",
                                  *image.workload], expected=image.expected)
            rx1 = rx_bytes(node)
            w2 = w0 + (t2 - t0)
            trial.total, trial.pull, trial.run = t2 - t0, t1 - t0, t2 - t1
            trial.rx_bytes = rx1 - rx0
            if isinstance(snap, SnapshotterProc):
                time.sleep(2.5)  # the layer daemons write their stats every 2 s
            if after_output is not None:
                after_output()
        finally:
            if daemon is not None:
                daemon.stop()
            if isinstance(snap, SnapshotterProc):
                snap.stop()
                snap.unmount_all()
                if trial.total:
                    trial.notes = cs.peerstar_profile(snap)
                keep_logs(snap, cl.logs / f"snapshotter-{image.name}-{label}-{n}.log")
                stop_snapshotter(snap)
            elif snap is not None:
                snap.stop()
    entries, upstream = registry_log(reglog)
    window = [e for e in entries if w0 - 0.01 <= e["ts"] <= w2]
    trial.upstream_slow = sum(1 for e in upstream if w0 - 0.01 <= e["ts"] <= w2)
    trial.fetches, trial.slow_requests = sequential_fetches(entries, w0, w2)
    trial.requests = len(window)
    trial.served_bytes = sum(int(e.get("bytes") or 0) for e in window)
    trial.requests_log = [[round(e["ts"] - e["ms"] / 1000 - w0, 3), round(e["ts"] - w0, 3),
                           e["ms"], e.get("bytes"), str(e.get("path", ""))[-24:],
                           e.get("range")] for e in window]
    return trial


# --- the raw swarm, for reference --------------------------------------------------------

# Runs inside a node: stream `cat` of a CID to nowhere, report bytes and seconds.
_CAT = r"""
import json, sys, time, urllib.request
url = sys.argv[1]
t = time.perf_counter(); n = 0
with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=1800) as r:
    while True:
        b = r.read(1 << 20)
        if not b:
            break
        n += len(b)
print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t}))
"""


def timed_cat(node: Node, cid: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{swarm.API_PORT}/api/v0/cat?arg={cid}"
    before = rx_bytes(node)
    proc = node.run([sys.executable, "-c", _CAT, url], timeout=1900)
    if proc.returncode != 0:
        raise RuntimeError(f"cat in {node.label} failed: {proc.stderr.decode()[-2000:]}")
    res = json.loads(proc.stdout)
    res["rx_bytes"] = rx_bytes(node) - before
    res["MBps"] = res["bytes"] / res["seconds"] / 1e6
    return res


def largest_layer_cid(node: Node, cid: str) -> tuple[str, int]:
    """(CID, size) of the largest layer of an image pushed by `peerstar push`."""
    doc = json.loads(swarm.cat(node, cid))
    while "layers" not in doc:  # descriptor -> index/manifest -> manifest
        nxt = doc["manifests"][0] if "manifests" in doc else doc
        doc = json.loads(swarm.cat(node, nxt["urls"][0].removeprefix("ipfs://")))
    layer = max(doc["layers"], key=lambda la: la["size"])
    return layer["urls"][0].removeprefix("ipfs://"), layer["size"]


def swarm_cat(cl: Cluster, image: Image) -> dict[str, Any]:
    cid, size = largest_layer_cid(cl.a, image.cids["gzip"])
    res: dict[str, Any] = {"cid": cid, "size": size, "on_a": timed_cat(cl.a, cid)}
    db = cl.fresh_b_daemon()
    try:
        res["on_fresh_b"] = timed_cat(cl.b, cid)
    finally:
        db.stop()
    return res


# --- report ------------------------------------------------------------------------------


def medians(trials: list[Trial]) -> dict[tuple[str, str], dict[str, float]]:
    groups: dict[tuple[str, str], list[Trial]] = {}
    for t in trials:
        if not t.error:
            groups.setdefault((t.image, t.mode), []).append(t)
    return {k: {f: statistics.median(getattr(t, f) for t in ts)
                for f in ("total", "pull", "run", "rx_bytes", "fetches", "slow_requests",
                          "served_bytes")} | {"n": len(ts)}
            for k, ts in groups.items()}


def report(trials: list[Trial], images: list[Image], modes: list[str],
           cat: dict[str, Any] | None) -> list[str]:
    out: list[str] = []
    med = medians(trials)
    for im in images:
        s = im.summary()["sizes"]
        out.append(f"- **{im.name}**: {len(im.tars)} layers, "
                   f"{sum(t.stat().st_size for t in im.tars) / MIB:.1f} MiB uncompressed; "
                   f"gzip {s['gzip'] / MIB:.1f} MiB, eStargz {s['estargz'] / MIB:.1f} MiB, "
                   f"prioritized {s['prio'] / MIB:.1f} MiB. `{' '.join(im.workload)}` opens "
                   f"{len(im.files)} files: {im.need['uncompressed'] / MIB:.2f} MiB, "
                   f"{im.need['compressed'] / MIB:.2f} MiB compressed; TOCs + footers "
                   f"{im.need['tocs'] / 1024:.1f} KiB.")
    out += ["", "| image | mode | wall to output (s) | pull (s) | run (s) | node rx (MiB) "
            "| sequential remote fetches | bridge requests >= 100 ms | bridge sent (MiB) "
            "| trials |", "|---|---|---|---|---|---|---|---|---|---|"]
    for im in images:
        for m in modes:
            v = med.get((im.name, m))
            if v is None:
                out.append(f"| {im.name} | {m} | failed | | | | | | | 0 |")
                continue
            out.append(f"| {im.name} | {m} | {v['total']:.2f} | {v['pull']:.2f} | "
                       f"{v['run']:.2f} | {v['rx_bytes'] / MIB:.2f} | {v['fetches']:g} | "
                       f"{v['slow_requests']:g} | {v['served_bytes'] / MIB:.2f} | "
                       f"{v['n']:g} |")
    out += ["", "Per trial, wall to output (s):", ""]
    for im in images:
        for m in modes:
            ts = [t for t in trials if t.image == im.name and t.mode == m]
            if ts:
                out.append(f"- {im.name} {m}: " + ", ".join(
                    "error" if t.error else f"{t.total:.2f}" for t in ts))
    out += ["", "| ratio (medians) | figure | target |", "|---|---|---|"]
    for img, num, den, target in TARGETS:
        a, b = med.get((img, num)), med.get((img, den))
        if a and b:
            r = a["total"] / b["total"]
            out.append(f"| {img}: {num} / {den} wall | {r:.3f}x | <= {target}x -- "
                       f"{'met' if r <= target else 'MISSED'} |")
    for im in images:
        need = im.need["compressed"] + im.need["tocs"]
        for m in ("lazy", "lazy-prio", "lazy-learned", "go", "go-prio"):
            v = med.get((im.name, m))
            if v is None or not need:
                continue
            r = v["rx_bytes"] / need
            if im.name == "python" and m == "lazy":
                verdict = f"<= {BYTES_TARGET}x -- {'met' if r <= BYTES_TARGET else 'MISSED'}"
            else:
                verdict = "(reference)"
            out.append(f"| {im.name}: {m} B's rx / (workload compressed + TOCs) | "
                       f"{r:.2f}x | {verdict} |")
    if cat:
        a, b = cat["on_a"], cat["on_fresh_b"]
        out += ["", f"Raw swarm: `cat` of the big image's {cat['size'] / MIB:.0f} MiB gzip "
                f"layer: on A {a['MBps']:.0f} MB/s, on a fresh B {b['MBps']:.1f} MB/s "
                f"({b['rx_bytes'] / MIB:.1f} MiB on B's link)."]
    prof = [t for t in trials if t.notes and not t.error]
    if prof:
        kinds = ("toc", "prefetch", "on_demand", "background")
        out += ["", "peerstar's bytes by kind (medians, from the layer daemons' stats "
                "~2.5 s after the output):", "",
                "| image | mode | layers | sum of mounts (s) | " + " | ".join(kinds) + " |",
                "|---" * (4 + len(kinds)) + "|"]
        for im in images:
            for m in ("lazy", "lazy-prio", "lazy-learned", "local"):
                ts = [t for t in prof if t.image == im.name and t.mode == m]
                if not ts:
                    continue

                def note(key: str, ts: list[Trial] = ts) -> float:
                    return statistics.median(t.notes.get(key, 0.0) for t in ts)
                out.append(f"| {im.name} | {m} | {note('layers'):.0f} | "
                           f"{note('mount_s'):.2f} | " + " | ".join(
                               f"{note('bytes_' + k) / MIB:.2f} MiB" for k in kinds) + " |")
    return out


# --- main --------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {bad or text!r}; choose from {','.join(allowed)}")
    return [x for x in allowed if x in items]


def logged_trial(cl: Cluster, image: Image, mode: str, n: int) -> Trial:
    """One trial; a failure is recorded (and logged) and the run goes on."""
    try:
        t = learned_trial(cl, image, n) if mode == "lazy-learned" else one_trial(
            cl, image, mode, n)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - keep going
        t = Trial(image.name, mode, n, error=str(exc)[-3000:])
        log(f"trial {n} {image.name} {mode} FAILED: {t.error}")
        return t
    log(f"trial {n} {image.name} {mode}: {t.total:.2f} s (pull {t.pull:.2f} + run "
        f"{t.run:.2f}), rx {t.rx_bytes / MIB:.2f} MiB, {t.fetches} sequential remote "
        f"fetches ({t.slow_requests} slow of {t.requests} requests), setup {t.setup_s:.1f} s,"
        f" load {t.load:.1f}")
    return t


@contextlib.contextmanager
def cluster(work: Path, stargzd: Path | None) -> Iterator[Cluster]:
    """Nodes A and B on a private bridge, js-ipfs on A; all removed on exit."""
    with Network() as net:
        a, b = net.add_node("a"), net.add_node("b")
        key = generate_swarm_key().encode()
        da = swarm.start_daemon(a, key)
        cl = Cluster(a, b, key, da, stargzd, logs=work / "logs")
        shutil.rmtree(cl.logs, ignore_errors=True)
        cl.logs.mkdir(parents=True)
        try:
            yield cl
        finally:
            da.stop()
            # What a trial cut short may have left in its snapshotter's root goes too.
            for base in cl.bases:
                for point in mounts_under(base):
                    if subprocess.run(["umount", point], capture_output=True).returncode:
                        subprocess.run(["umount", "-l", point], capture_output=True)
                if not mounts_under(base):
                    shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--images", default=",".join(IMAGES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--work", type=Path, default=Path("/tmp/peerstar-p2p"))
    ap.add_argument("--json", type=Path, help="write every trial and the medians here")
    ap.add_argument("--peerstar-config", default="", metavar="TOML",
                    help="config of peerstar's snapshotter in the lazy modes (a literal "
                    "backslash-n is a newline), e.g. '[remote]\\nbackground_fetch = false' "
                    "for one side of an A/B")
    ap.add_argument("--no-swarm-cat", action="store_true",
                    help="skip the raw `cat` of the big image's largest layer on A and B")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (network namespaces, containerd, overlay and FUSE)")
    image_names = _choices(args.images, IMAGES, "images")
    modes = _choices(args.modes, MODES, "modes")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC)

    images: list[Image] = []
    for name in image_names:
        log(f"building the {name} image (cached in {work / name})")
        im = build_python(work) if name == "python" else build_big(work)
        prepare(im, work)
        images.append(im)
    stargzd = None
    if {"go", "go-prio"} & set(modes):
        stargzd = cs.build_stargzd(work / "go")
        if stargzd is None:
            log("go modes skipped: the Go snapshotter could not be built")
            modes = [m for m in modes if not m.startswith("go")]

    trials: list[Trial] = []
    cat = None
    interrupted = False
    with cluster(work, stargzd) as cl:
        cl.peerstar_config = args.peerstar_config.replace("\\n", "\n")
        for im in images:
            for variant, layout in im.layouts.items():
                # the eStargz layouts are already what `push --estargz` converts to
                im.cids[variant] = swarm.push(cl.a, layout, timeout=1200)
            log(f"pushed {im.name} on A: {im.cids}")
        try:
            for n in range(args.trials):
                for im in images:
                    for m in modes:
                        trials.append(logged_trial(cl, im, m, n))
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: cleaning up, then reporting the trials done so far")
        big = next((im for im in images if im.name == "big"), None)
        if big is not None and not args.no_swarm_cat and not interrupted:
            try:
                cat = swarm_cat(cl, big)
            except (Exception, SystemExit) as exc:  # noqa: BLE001
                log(f"swarm cat failed: {exc}")

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    lines = report(trials, images, modes, cat)
    print(f"\nbench/p2p, {started:%Y-%m-%d %H:%M} UTC, commit {commit}, "
          f"{args.trials} trials, medians:\n")
    print("\n".join(lines))
    doc = {"started": started.isoformat(), "commit": commit, "trials_per_mode": args.trials,
           "peerstar_config": args.peerstar_config,
           "images": {im.name: im.summary() for im in images}, "modes": modes,
           "trials": [asdict(t) for t in trials],
           "medians": {f"{k[0]}/{k[1]}": v for k, v in medians(trials).items()},
           "swarm_cat": cat, "report": lines}
    (work / "results.json").write_text(json.dumps(doc, indent=1))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 130 if interrupted else 1 if any(t.error for t in trials) else 0


if __name__ == "__main__":
    sys.exit(main())
