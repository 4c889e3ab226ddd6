"""The remote-snapshot side: which Prepare calls name a lazily mountable eStargz layer,
where that layer lives, and starting/stopping its FUSE mount.

Owns: reading the labels containerd passes with a layer's Prepare (ctr-remote's
`containerd.io/snapshot/remote/stargz.*`, CRI's `containerd.io/snapshot/cri.*`, the
`containerd.io/snapshot/stargz/toc.digest` annotation), resolving the registry from the
image reference (docker.io normalisation, plain HTTP for localhost/127.0.0.1/::1 and
configured insecure hosts, HTTPS otherwise -- containerd's rule), and `LayerMounter`,
which runs one `peerstar.lazyfs.mountd` process per layer in its own session, so a
snapshotter restart does not take running containers' layers down, and waits for its
readiness line.

Every reason not to go remote is a `NotRemote` with a sentence a log line can carry.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from peerstar.snapshotter.config import RemoteConfig

log = logging.getLogger("peerstar.snapshotter.remote")

LABEL_REF = "containerd.io/snapshot.ref"
LABEL_REMOTE = "containerd.io/snapshot/remote"
LABEL_STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
LABEL_STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
LABEL_STARGZ_PREFETCH = "containerd.io/snapshot/remote/stargz.prefetch"
LABEL_URLS_PREFIX = "containerd.io/snapshot/remote/urls"
LABEL_CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"


class NotRemote(Exception):
    """This layer is not mounted lazily; the message says why (it goes to the log)."""


@dataclass(frozen=True)
class ImageLocation:
    host: str  # registry host[:port] as written (docker.io normalised to its API host)
    repository: str


def parse_image_reference(ref: str) -> ImageLocation:
    """Registry host and repository of `HOST/REPO[:TAG][@DIGEST]` (docker.io rules)."""
    name = ref.split("@", 1)[0]
    slash = name.find("/")
    # A tag's colon comes after the last slash; a port's colon before the first.
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    first = name[:slash] if slash >= 0 else ""
    if first and ("." in first or ":" in first or first == "localhost"):
        host, repo = first, name[slash + 1:]
    else:
        host, repo = DOCKER_HUB, name
        if "/" not in repo:
            repo = "library/" + repo
    if not repo or not re.fullmatch(r"[a-z0-9]+(?:[._/-]+[a-z0-9]+)*", repo):
        raise NotRemote(f"cannot parse image reference {ref!r}")
    if host == DOCKER_HUB:
        host = DOCKER_HUB_API
    return ImageLocation(host, repo)


def _is_plain_http(host: str, insecure_hosts: list[str]) -> bool:
    if host in insecure_hosts:
        return True
    name = host[1:host.index("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
    return name in ("localhost", "::1") or name == "127.0.0.1" or name.startswith("127.")


@dataclass(frozen=True)
class RemoteLayer:
    """Everything needed to mount one layer again, persisted with its snapshot."""

    reference: str
    digest: str
    toc_digest: str
    url: str
    prefetch_size: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RemoteLayer:
        return cls(**{k: data[k] for k in ("reference", "digest", "toc_digest", "url")},
                   prefetch_size=int(data.get("prefetch_size", 0)))


def remote_layer_from_labels(labels: dict[str, str], cfg: RemoteConfig) -> RemoteLayer:
    """The layer a Prepare's labels describe, or NotRemote saying what is missing."""
    if not cfg.enable:
        raise NotRemote("remote snapshots are disabled in the config")
    if LABEL_REF not in labels:
        raise NotRemote(f"no {LABEL_REF} label")
    if LABEL_STARGZ_REFERENCE in labels or LABEL_STARGZ_DIGEST in labels:
        reference = labels.get(LABEL_STARGZ_REFERENCE, "")
        digest = labels.get(LABEL_STARGZ_DIGEST, "")
    elif LABEL_CRI_IMAGE_REF in labels or LABEL_CRI_LAYER_DIGEST in labels:
        reference = labels.get(LABEL_CRI_IMAGE_REF, "")
        digest = labels.get(LABEL_CRI_LAYER_DIGEST, "")
    else:
        raise NotRemote("no image reference/layer digest labels (pulled without "
                        "ctr-remote rpull or CRI snapshot annotations)")
    if not reference or not _DIGEST_RE.match(digest):
        raise NotRemote(f"incomplete layer labels (reference {reference!r}, digest {digest!r})")
    toc_digest = labels.get(LABEL_TOC_DIGEST, "")
    if not toc_digest:
        # No TOC digest: not an eStargz layer (or not annotated); never mount it unverified.
        raise NotRemote(f"layer {digest} has no {LABEL_TOC_DIGEST} label (not eStargz)")
    if not _DIGEST_RE.match(toc_digest):
        raise NotRemote(f"layer {digest}: malformed TOC digest {toc_digest!r}")
    loc = parse_image_reference(reference)
    scheme = "http" if _is_plain_http(loc.host, cfg.insecure_hosts) else "https"
    url = f"{scheme}://{loc.host}/v2/{loc.repository}/blobs/{digest}"
    try:
        prefetch = int(labels.get(LABEL_STARGZ_PREFETCH, "0") or 0)
    except ValueError:
        prefetch = 0
    return RemoteLayer(reference, digest, toc_digest, url, max(prefetch, cfg.prefetch_size))


class MountError(Exception):
    """The lazy mount of a layer failed; the message says why."""


def _mount_fstype(mountpoint: Path) -> str | None:
    target = str(Path(mountpoint))
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5:
                    point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                                   fields[4])
                    if point == target:
                        found = right.split()[0]
    except OSError:
        return None
    return found


class LayerMounter:
    """Starts, checks and stops lazy layer mounts (one mount daemon process each)."""

    def __init__(self, cfg: RemoteConfig, cache_dir: Path) -> None:
        self.cfg = cfg
        self.cache_dir = Path(cache_dir)

    def _argv(self, layer: RemoteLayer, mountpoint: Path, ready_fd: int) -> list[str]:
        c = self.cfg
        argv = [sys.executable, "-m", "peerstar.lazyfs.mountd", "--url", layer.url,
                "--digest", layer.digest, "--toc-digest", layer.toc_digest,
                "--mountpoint", str(mountpoint), "--cache-dir", str(self.cache_dir),
                "--prefetch-timeout", str(c.prefetch_timeout),
                "--prefetch-size", str(layer.prefetch_size),
                "--region-size", str(c.region_size),
                "--region-cache-bytes", str(c.region_cache_bytes),
                "--chunk-cache-bytes", str(c.chunk_cache_bytes),
                "--timeout", str(c.request_timeout), "--retries", str(c.retries),
                "--ready-fd", str(ready_fd)]
        if not c.verify:
            argv.append("--no-verify")
        if not c.background_fetch:
            argv.append("--no-background")
        return argv

    def is_mounted(self, mountpoint: Path) -> bool:
        """A live lazy mount is at `mountpoint` (a dead FUSE server fails the stat)."""
        if not (_mount_fstype(mountpoint) or "").startswith("fuse"):
            return False
        try:
            os.stat(mountpoint)
        except OSError:
            return False
        return True

    def mount(self, layer: RemoteLayer, mountpoint: Path) -> dict[str, Any]:
        """Mount `layer` at `mountpoint`; returns the daemon's readiness report."""
        mountpoint = Path(mountpoint)
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        logs = self.cache_dir / "logs"
        logs.mkdir(exist_ok=True)
        rfd, wfd = os.pipe()
        log_file = logs / f"{mountpoint.parent.name}-{layer.digest[7:19]}.log"
        try:
            with open(log_file, "ab") as out:
                env = dict(os.environ)
                # The daemon imports peerstar from wherever this process did.
                root = str(Path(__file__).resolve().parent.parent.parent)
                env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
                proc = subprocess.Popen(
                    self._argv(layer, mountpoint, wfd), pass_fds=(wfd,),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, env=env)
        except OSError as exc:
            os.close(rfd)
            os.close(wfd)
            raise MountError(f"cannot start the mount daemon: {exc}") from None
        os.close(wfd)
        # Reap the child whenever it exits; it may outlive us (own session), that is fine.
        threading.Thread(target=proc.wait, daemon=True, name="mountd-reaper").start()
        try:
            report = self._read_ready(rfd, proc, self.cfg.mount_timeout
                                      + self.cfg.prefetch_timeout)
        finally:
            os.close(rfd)
        if not report.get("ok"):
            tail = ""
            try:
                tail = log_file.read_text(errors="replace")[-600:].strip()
            except OSError:
                pass
            raise MountError(f"{report.get('error') or 'mount daemon failed'}"
                             + (f" (log {log_file}: ...{tail[-300:]})" if tail else ""))
        if not self.is_mounted(mountpoint):
            raise MountError(f"mount daemon reported ready but {mountpoint} is not mounted")
        return report

    @staticmethod
    def _read_ready(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                return {"ok": False, "error": f"mount not ready within {timeout:.0f} s"}
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:  # every writer closed: the daemon exited without a report
                code = proc.poll()
                return {"ok": False, "error": f"mount daemon exited (status {code}) "
                                              "without reporting"}
            buf += chunk
        try:
            return json.loads(buf.split(b"\n", 1)[0])
        except ValueError:
            return {"ok": False, "error": f"unreadable readiness report {buf[:200]!r}"}

    def unmount(self, mountpoint: Path) -> None:
        """Unmount (the daemon then exits); lazily if the mount is busy or dead."""
        mountpoint = Path(mountpoint)
        for _ in range(3):
            if not (_mount_fstype(mountpoint) or "").startswith("fuse"):
                return
            proc = subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
            if proc.returncode == 0:
                return
            time.sleep(0.1)
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
