"""`peerstar mount REF DIR`: an image's merged root filesystem from lazy layers.

Owns: parsing `HOST/REPO[:TAG|@DIGEST]`, resolving the manifest on the registry
(an index is narrowed to linux/<host arch>), checking every layer is eStargz (a TOC
digest annotation and a gzip/zstd layer type; anything else is a clear error: the
snapshotter does the fallback), mounting each layer with `mount_layer` under a work
dir, the read-only overlay of them at DIR, and the teardown. A small supervisor
process per image watches the mount table: when the overlay at DIR disappears
(`umount DIR` or `peerstar unmount DIR`), it unmounts the layers and removes the work
dir, so plain `umount DIR` ends everything cleanly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import select
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from peerstar.distribution.auth import RegistryAuth
from peerstar.distribution.client import RegistryClient, RegistryError, blob_url, manifest_url
from peerstar.errors import PeerstarError
from peerstar.estargz.compression import WRITABLE
from peerstar.lazyfs.mount import (
    DEFAULT_OPTIONS,
    LayerMount,
    MountError,
    find_mount,
    mount_layer,
)
from peerstar.lazyfs.options import MountOptions
from peerstar.lazyfs.state import mount_fstype, write_json_atomic
from peerstar.lazyfs.zygote import Zygote
from peerstar.oci.mediatypes import (
    DOCKER_LAYER_GZIP,
    INDEX_TYPES,
    TOC_DIGEST_ANNOTATION,
)
from peerstar.oci.platform import host_arch

log = logging.getLogger("peerstar.lazyfs.image")

DEFAULT_WORK_ROOT = Path("/var/lib/peerstar/mounts")
DEFAULT_CACHE_DIR = Path("/var/lib/peerstar/lazyfs-cache")
# What build writes, and Docker's gzip type (docker-archive sources keep it).
_LAYER_TYPES = frozenset({c.media_type for c in WRITABLE.values()} | {DOCKER_LAYER_GZIP})
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class ImageMountError(PeerstarError):
    """The image cannot be mounted lazily (reference, registry, layer format)."""


@dataclass(frozen=True)
class RemoteRef:
    host: str
    repository: str
    reference: str  # tag or digest


@dataclass(frozen=True)
class ImageLayer:
    """One eStargz layer of the image `peerstar mount` mounts: where its blob is."""

    digest: str
    size: int
    media_type: str
    toc_digest: str
    url: str


def parse_remote_ref(text: str) -> RemoteRef:
    """`HOST/REPO[:TAG|@DIGEST]` (a host is required: `peerstar mount` has no default)."""
    rest = text.removeprefix("docker://")
    name, at, digest = rest.partition("@")
    reference = "latest"
    if at:
        if not _DIGEST_RE.match(digest):
            raise ImageMountError(f"{text!r}: {digest!r} is not a sha256 digest")
        reference = digest
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
        if not at:
            reference = tag
    host, slash, repo = name.partition("/")
    if not slash or not repo or not host:
        raise ImageMountError(f"{text!r}: write HOST/REPOSITORY[:TAG|@DIGEST], e.g. "
                              "localhost:5050/ipfs/<CID>")
    return RemoteRef(host, repo, reference)


def resolve_layers(ref: RemoteRef, *, client: httpx.Client | None = None,
                   plain_http: bool | None = None, auth: RegistryAuth | None = None,
                   ca_file: str = "") -> list[ImageLayer]:
    """The image's layers, bottom first, each checked to be eStargz with a TOC digest."""
    # The layer daemons' trust (SSL_CERT_FILE, the system store, `ca_file`): the
    # manifest must not be refused where the layers would be read.
    registry = RegistryClient(ref.host, plain_http=plain_http, auth=auth, ca_file=ca_file,
                              label=f"{ref.host}/{ref.repository}", http=client)
    try:
        def get(reference: str) -> tuple[str, dict]:
            url = manifest_url(ref.host, ref.repository, reference, plain_http)
            try:
                manifest = registry.get_manifest(ref.repository, reference)
            except RegistryError as exc:
                raise ImageMountError(str(exc)) from None
            try:
                doc = json.loads(manifest.data)
            except ValueError:
                raise ImageMountError(f"{url}: manifest is not JSON") from None
            return manifest.media_type, doc

        mtype, doc = get(ref.reference)
        if mtype in INDEX_TYPES or "manifests" in doc:
            arch = host_arch()
            chosen = None
            for m in doc.get("manifests", []):
                plat = m.get("platform") or {}
                if plat.get("os") == "linux" and plat.get("architecture") == arch:
                    chosen = m
                    break
            if chosen is None:
                raise ImageMountError(f"{ref.host}/{ref.repository}:{ref.reference}: the index "
                                      f"has no linux/{arch} image")
            mtype, doc = get(chosen["digest"])
        layers = []
        for i, d in enumerate(doc.get("layers", [])):
            ann = d.get("annotations") or {}
            toc = ann.get(TOC_DIGEST_ANNOTATION, "")
            if d.get("mediaType") not in _LAYER_TYPES or not toc:
                raise ImageMountError(
                    f"layer {i} ({d.get('digest')}, {d.get('mediaType')}) is not eStargz (no "
                    f"{TOC_DIGEST_ANNOTATION} annotation): it cannot be mounted lazily; push "
                    "the image with --estargz (the snapshotter pulls such layers normally)")
            layers.append(ImageLayer(d["digest"], int(d.get("size", 0)), d["mediaType"], toc,
                                      blob_url(ref.host, ref.repository, d["digest"],
                                               plain_http)))
        if not layers:
            raise ImageMountError("the manifest lists no layers")
        return layers
    finally:
        registry.close()


def work_dir_for(target: Path, work_root: Path = DEFAULT_WORK_ROOT) -> Path:
    key = hashlib.sha256(str(Path(target).resolve()).encode()).hexdigest()[:16]
    return work_root / key


def mount_image(ref_text: str, target: Path, *, work_root: Path = DEFAULT_WORK_ROOT,
                cache_dir: Path = DEFAULT_CACHE_DIR, options: MountOptions = DEFAULT_OPTIONS,
                plain_http: bool | None = None, auth: RegistryAuth | None = None
                ) -> dict[str, object]:
    """Mount every layer lazily (each with `options` and `auth`, which the manifest
    requests use too) and the overlay of them at `target`; returns a summary."""
    target = Path(target).resolve()
    if not target.is_dir():
        raise ImageMountError(f"{target} is not a directory")
    if mount_fstype(target) is not None:
        raise ImageMountError(f"{target} is already a mount point")
    ref = parse_remote_ref(ref_text)
    # The layer daemons fork from a zygote: its imports (~0.4 s, once) overlap the
    # manifest resolution, and each layer then costs a fork, not a Python start-up.
    try:
        zygote: Zygote | None = Zygote.start(ca_file=options.fetch.ca_file)
    except OSError as exc:
        log.warning("no mount daemon zygote (%s): layer daemons start with python -m", exc)
        zygote = None
    try:
        return _mount_image(ref_text, ref, target, work_root=work_root, cache_dir=cache_dir,
                            options=options, plain_http=plain_http, auth=auth,
                            zygote=zygote)
    finally:
        if zygote is not None:
            zygote.close()  # the layer daemons are not its children: they stay


def _mount_image(ref_text: str, ref: RemoteRef, target: Path, *, work_root: Path,
                 cache_dir: Path, options: MountOptions, plain_http: bool | None,
                 auth: RegistryAuth | None, zygote: Zygote | None) -> dict[str, object]:
    layers = resolve_layers(ref, plain_http=plain_http, auth=auth,
                            ca_file=options.fetch.ca_file)
    work = work_dir_for(target, work_root)
    if work.exists():
        _teardown(work, target=None)
    work.mkdir(parents=True)
    mounts: list[LayerMount] = []
    try:
        def one(i: int, layer: ImageLayer) -> LayerMount:
            mp = work / "layers" / str(i)
            mp.mkdir(parents=True)
            return mount_layer(layer.url, layer.digest, layer.toc_digest, mp, cache_dir,
                               options, size=layer.size or None, auth=auth, zygote=zygote)

        # Layers mount in parallel: each daemon's TOC fetch and prefetch are independent.
        with ThreadPoolExecutor(max_workers=min(8, len(layers))) as pool:
            futures = [pool.submit(one, i, layer) for i, layer in enumerate(layers)]
            errors: list[Exception] = []
            for fut in futures:  # collect every success, so a failure unmounts them all
                try:
                    mounts.append(fut.result())
                except Exception as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]
        lowers = [str(m.mountpoint) for m in reversed(mounts)]  # overlay: top layer first
        if len(lowers) == 1:
            # Without an upper dir overlayfs wants two lower dirs; an empty one is neutral.
            empty = work / "empty"
            empty.mkdir()
            lowers.append(str(empty))
        state = {"target": str(target), "ref": ref_text, "cache_dir": str(cache_dir),
                 "layers": [{"digest": lay.digest, "mountpoint": str(m.mountpoint),
                             "size": lay.size} for lay, m in zip(layers, mounts, strict=True)]}
        write_json_atomic(work / "state.json", state)
        res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                              "ro,lowerdir=" + ":".join(lowers), str(target)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise ImageMountError(f"overlay mount at {target} failed: {res.stderr.strip()}")
    except BaseException:
        for m in mounts:
            try:
                m.unmount()
            except MountError as exc:
                log.warning("%s", exc)
        shutil.rmtree(work, ignore_errors=True)
        raise
    _start_supervisor(work, target)
    return {"target": str(target), "work_dir": str(work), "layers": [
        {"digest": lay.digest, "size": lay.size, "mount_seconds": m.mount_seconds}
        for lay, m in zip(layers, mounts, strict=True)]}


def image_stats(target: Path, work_root: Path = DEFAULT_WORK_ROOT) -> dict[str, object]:
    """Per-layer fetch statistics of a mounted image, and totals."""
    work = work_dir_for(target, work_root)
    state = json.loads((work / "state.json").read_text())
    out = []
    for lay in state["layers"]:
        p = Path(lay["mountpoint"]) / ".peerstar-lazyfs" / f"{lay['digest']}.json"
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            out.append({"digest": lay["digest"], "size": lay["size"]})
    return {"layers": out,
            "fetchedSize": sum(int(s.get("fetchedSize", 0)) for s in out),
            "size": sum(int(s.get("size", 0)) for s in out)}


def unmount_image(target: Path, work_root: Path = DEFAULT_WORK_ROOT,
                  timeout: float = 20.0) -> None:
    target = Path(target).resolve()
    work = work_dir_for(target, work_root)
    if mount_fstype(target) == "overlay":
        res = subprocess.run(["umount", str(target)], capture_output=True, text=True)
        if res.returncode != 0:
            raise ImageMountError(f"cannot unmount {target}: {res.stderr.strip()}")
    elif not work.exists():
        raise ImageMountError(f"{target} is not mounted by peerstar")
    # The supervisor tears the layers down; do it here too in case it is gone.
    deadline = time.monotonic() + timeout
    while work.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if work.exists():
        _teardown(work, target=None)


def _teardown(work: Path, target: Path | None) -> None:
    try:
        state = json.loads((work / "state.json").read_text())
    except (OSError, ValueError):
        state = {"layers": []}
    cache_dir = Path(state.get("cache_dir", DEFAULT_CACHE_DIR))
    for lay in reversed(state.get("layers", [])):
        mp = Path(lay["mountpoint"])
        m = find_mount(mp, cache_dir)
        try:
            if m is not None:
                m.unmount()
            elif (mount_fstype(mp) or "").startswith("fuse"):
                subprocess.run(["umount", "-l", str(mp)], capture_output=True)
        except MountError as exc:
            log.warning("%s", exc)
    shutil.rmtree(work, ignore_errors=True)


def _start_supervisor(work: Path, target: Path) -> None:
    with open(work / "supervisor.log", "ab") as logf:
        subprocess.Popen([sys.executable, "-m", "peerstar.lazyfs.image", "supervise", str(work),
                          str(target)], stdin=subprocess.DEVNULL, stdout=logf,
                         stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, "PYTHONPATH": str(
                             Path(__file__).resolve().parent.parent.parent)})


def supervise(work: Path, target: Path) -> int:
    """Wait until the overlay at `target` is gone, then unmount the layers."""
    # /proc/self/mounts signals POLLPRI on every change of the mount table.
    with open("/proc/self/mounts") as f:
        poller = select.poll()
        poller.register(f, select.POLLPRI | select.POLLERR)
        while mount_fstype(target) == "overlay":
            poller.poll(5000)
            f.seek(0)
            f.read()
    _teardown(work, target)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "supervise":
        logging.basicConfig(level=logging.INFO)
        sys.exit(supervise(Path(sys.argv[2]), Path(sys.argv[3])))
    print("usage: python -m peerstar.lazyfs.image supervise WORK TARGET", file=sys.stderr)
    sys.exit(2)
