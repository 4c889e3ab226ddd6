"""A small, deterministic sample container image, built locally without network.

Owns: the sample source image used by tests, benchmarks and `peerstar demo` -- its layer
contents, writing it as an OCI image layout (through the project's `LayoutWriter`) or a
`docker save` archive, and the OCI archive packer (`ctr image import` input). Every
blob is a function of the arguments and of the host's `/bin/busybox` (Debian
`busybox-static`): fixed mtimes, uid/gid 0, sorted tar entries, gzip headers with mtime
0 and no file name, compact JSON in a fixed key order. The same call therefore always
yields the same digests.

Layer 1 is a busybox root filesystem (binary, applet symlinks, the usual dirs, a
passwd/group). Layer 2 adds known text files, a nested tree, an empty file, a
hardlink, a whiteout and an opaque directory (both hiding layer-1 content), and
`extra_mib` MiB of deterministic pseudo-random bytes so the image can be made bigger.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peerstar.errors import PeerstarError
from peerstar.localfile import atomic_write
from peerstar.oci import mediatypes as mt
from peerstar.oci.digest import sha256_digest
from peerstar.oci.layout import LayoutWriter
from peerstar.oci.model import descriptor, dump_json
from peerstar.oci.platform import host_platform
from peerstar.oci.reference import is_tag

# Fixed timestamp for every tar entry and the config's `created` (2024-01-01T00:00:00Z).
SAMPLE_MTIME = 1704067200
SAMPLE_CREATED = "2024-01-01T00:00:00Z"
DEFAULT_BUSYBOX = Path("/bin/busybox")
DEFAULT_REPOSITORY = "peerstar/sample"

SAMPLE_TEXT_PATH = "/etc/peerstar-sample.txt"
SAMPLE_TEXT = b"hello from the peerstar sample image\n"

BUSYBOX_APPLETS = (
    "cat", "cp", "echo", "env", "false", "find", "head", "id", "ln", "ls", "md5sum",
    "mkdir", "mv", "rm", "sh", "sha256sum", "sleep", "stat", "tail", "test", "touch",
    "true", "uname", "wc",
)  # fmt: skip


@dataclass(frozen=True)
class LayerEntry:
    """One tar entry of a layer. `path` is absolute or relative; it is stored relative.

    kind: "reg", "dir", "symlink" or "hardlink". `link` is the symlink target as
    written, or the hardlink target path (absolute or relative, stored relative).
    """

    path: str
    kind: str = "reg"
    data: bytes = b""
    mode: int | None = None
    link: str = ""


@dataclass(frozen=True)
class SampleLayer:
    """A built layer: the compressed blob's descriptor fields and its DiffID."""

    digest: str  # sha256 of the gzip blob (OCI) -- equals diff_id for docker-archive
    diff_id: str  # sha256 of the uncompressed tar
    size: int  # blob size in bytes
    media_type: str
    entries: tuple[LayerEntry, ...]


@dataclass
class SampleImage:
    """What `build_sample_image` wrote, plus the expected view of the root filesystem."""

    path: Path  # layout dir or archive file
    tag: str
    repository: str
    manifest_digest: str
    manifest_size: int
    config_digest: str
    layers: list[SampleLayer]
    architecture: str
    os: str = "linux"
    variant: str = ""
    # Merged root filesystem view, absolute paths. `files` holds every regular file
    # except /bin/busybox (its sha256 is in `busybox_sha256`).
    files: dict[str, bytes] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    removed: frozenset[str] = frozenset()  # present in layer 1, hidden by layer 2
    busybox_sha256: str = ""

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers]

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    @property
    def reference(self) -> str:
        """`repository:tag`, the name `ctr image import --base-name REPO` gives it."""
        return f"{self.repository}:{self.tag}"

    def layer_tar(self, index: int) -> bytes:
        """The uncompressed tar of layer `index`, rebuilt from its entries."""
        return build_layer_tar(self.layers[index].entries)


def _rel(path: str) -> str:
    cleaned = posixpath.normpath("/" + path).lstrip("/")
    if cleaned in ("", "."):
        raise PeerstarError(f"layer entry path {path!r} names the root directory")
    return cleaned


def pseudo_random_bytes(seed: str, size: int) -> bytes:
    """`size` deterministic, incompressible bytes derived from `seed` (SHAKE-256)."""
    return hashlib.shake_256(seed.encode()).digest(size) if size else b""


def build_layer_tar(entries: Iterable[LayerEntry]) -> bytes:
    """A deterministic uncompressed layer tar (PAX format) of `entries`, sorted by path.

    Parents are not added implicitly: list every directory you want in the tar. A
    hardlink that sorts before its target is held back until right after the target,
    because extractors (containerd's among them) need the target to exist already.
    """
    ordered: list[LayerEntry] = []
    waiting: dict[str, list[LayerEntry]] = {}  # hardlink target -> links held back
    emitted: set[str] = set()

    def emit(entry: LayerEntry) -> None:
        ordered.append(entry)
        name = _rel(entry.path)
        emitted.add(name)
        for link in waiting.pop(name, []):
            emit(link)

    for entry in sorted(entries, key=lambda e: _rel(e.path)):
        if entry.kind == "hardlink" and _rel(entry.link) not in emitted:
            waiting.setdefault(_rel(entry.link), []).append(entry)
        else:
            emit(entry)
    if waiting:
        raise PeerstarError(f"hardlinks to entries not in the layer: {sorted(waiting)}")
    seen: set[str] = set()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in ordered:
            name = _rel(entry.path)
            if name in seen:
                raise PeerstarError(f"layer entry {name!r} is listed twice")
            seen.add(name)
            info = tarfile.TarInfo(name)
            info.mtime = SAMPLE_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            data = None
            if entry.kind == "reg":
                info.type = tarfile.REGTYPE
                info.mode = 0o644 if entry.mode is None else entry.mode
                info.size = len(entry.data)
                data = io.BytesIO(entry.data)
            elif entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755 if entry.mode is None else entry.mode
            elif entry.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.mode = 0o777 if entry.mode is None else entry.mode
                info.linkname = entry.link
            elif entry.kind == "hardlink":
                info.type = tarfile.LNKTYPE
                info.mode = 0o644 if entry.mode is None else entry.mode
                info.linkname = _rel(entry.link)
            else:
                raise PeerstarError(f"layer entry {name!r}: unknown kind {entry.kind!r}")
            tar.addfile(info, data)
    return buf.getvalue()


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    """Gzip with mtime 0 and no file name, so the output depends only on `data`."""
    return gzip.compress(data, compresslevel=level, mtime=0)


def _layer1_entries(busybox: bytes) -> list[LayerEntry]:
    entries = [
        LayerEntry("/bin", "dir"),
        LayerEntry("/bin/busybox", "reg", busybox, 0o755),
        LayerEntry("/dev", "dir"),
        LayerEntry("/etc", "dir"),
        LayerEntry("/etc/group", "reg", b"root:x:0:\nnogroup:x:65534:\n"),
        LayerEntry("/etc/hostname", "reg", b"peerstar-sample\n"),
        LayerEntry(
            "/etc/passwd",
            "reg",
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        # Hidden by a whiteout in layer 2.
        LayerEntry("/etc/peerstar-removed.txt", "reg", b"this file is deleted by layer 2\n"),
        LayerEntry("/home", "dir"),
        LayerEntry("/proc", "dir", mode=0o555),
        LayerEntry("/root", "dir", mode=0o700),
        LayerEntry("/sys", "dir", mode=0o555),
        LayerEntry("/tmp", "dir", mode=0o1777),
        LayerEntry("/usr", "dir"),
        LayerEntry("/usr/bin", "dir"),
        LayerEntry("/var", "dir"),
        # Its contents are hidden by an opaque marker in layer 2.
        LayerEntry("/var/opaque", "dir"),
        LayerEntry("/var/opaque/old.txt", "reg", b"old contents, hidden by layer 2\n"),
    ]
    entries += [LayerEntry(f"/bin/{applet}", "symlink", link="busybox") for applet in
                BUSYBOX_APPLETS]
    # An absolute symlink too, so link targets of both forms are exercised.
    entries.append(LayerEntry("/usr/bin/env", "symlink", link="/bin/busybox"))
    return entries


def _extra_sizes(extra_mib: int) -> list[int]:
    # Uneven sizes, none a multiple of 4 MiB (the eStargz chunk size), summing exactly
    # to extra_mib MiB: the biggest file spans several chunks once extra_mib > 4.
    total = extra_mib << 20
    if total == 0:
        return []
    small = total // 8 + 4097
    tiny = min(12345, total - small)
    return [s for s in (total - small - tiny, small, tiny) if s > 0]


def _layer2_entries(extra_mib: int) -> list[LayerEntry]:
    entries = [
        LayerEntry("/etc", "dir"),
        LayerEntry(SAMPLE_TEXT_PATH, "reg", SAMPLE_TEXT),
        LayerEntry("/etc/peerstar-sample-hardlink.txt", "hardlink", link=SAMPLE_TEXT_PATH),
        LayerEntry("/etc/.wh.peerstar-removed.txt", "reg", b""),
        LayerEntry("/opt", "dir"),
        LayerEntry("/opt/peerstar", "dir"),
        LayerEntry("/opt/peerstar/empty", "reg", b""),
        LayerEntry("/opt/peerstar/exec.sh", "reg", b"#!/bin/sh\necho sample script ran\n",
                   0o755),
        # 70,000 bytes: more than one 50,000-byte fetch region, less than a chunk.
        LayerEntry("/opt/peerstar/small-random.bin", "reg",
                   pseudo_random_bytes("peerstar-sample/small", 70000)),
        LayerEntry("/opt/peerstar/tree", "dir"),
        LayerEntry("/opt/peerstar/tree/a", "dir"),
        LayerEntry("/opt/peerstar/tree/a/b", "dir"),
        LayerEntry("/opt/peerstar/tree/a/b/c", "dir"),
        LayerEntry("/opt/peerstar/tree/a/b/c/deep.txt", "reg", b"deep in the tree\n"),
        LayerEntry("/opt/peerstar/tree/a/one.txt", "reg", b"one\n"),
        LayerEntry("/opt/peerstar/tree/a/b/two.txt", "reg", b"two\n" * 1000),
        LayerEntry("/opt/peerstar/tree/link-to-deep", "symlink", link="a/b/c/deep.txt"),
        LayerEntry("/var", "dir"),
        LayerEntry("/var/opaque", "dir"),
        LayerEntry("/var/opaque/.wh..wh..opq", "reg", b""),
        LayerEntry("/var/opaque/new.txt", "reg", b"new contents from layer 2\n"),
    ]
    if extra_mib:
        entries.append(LayerEntry("/opt/peerstar/random", "dir"))
        for i, size in enumerate(_extra_sizes(extra_mib)):
            entries.append(LayerEntry(f"/opt/peerstar/random/extra-{i}.bin", "reg",
                                      pseudo_random_bytes(f"peerstar-sample/extra-{i}", size)))
    return entries


def sample_layer_entries(
    *, extra_mib: int = 0, busybox: Path = DEFAULT_BUSYBOX
) -> list[list[LayerEntry]]:
    """The entries of the sample's two layers (bottom first)."""
    if extra_mib < 0:
        raise PeerstarError(f"extra_mib must be >= 0, got {extra_mib}")
    try:
        busybox_bytes = busybox.read_bytes()
    except OSError as exc:
        raise PeerstarError(
            f"cannot read {busybox} for the sample image ({exc.strerror}): install Debian's "
            "busybox-static (run scripts/install.sh)"
        ) from None
    return [_layer1_entries(busybox_bytes), _layer2_entries(extra_mib)]


def _merged_view(layers: Sequence[Sequence[LayerEntry]]) -> tuple[
    dict[str, bytes], dict[str, str], set[str]
]:
    """Apply the layers like overlayfs would: whiteouts and opaque dirs remove paths."""
    files: dict[str, bytes] = {}
    links: dict[str, str] = {}
    removed: set[str] = set()
    for entries in layers:
        lower = set(files) | set(links)
        for e in entries:
            path = "/" + _rel(e.path)
            parent, base = posixpath.split(path)
            if base == ".wh..wh..opq":
                gone = {p for p in lower if p.startswith(parent + "/")}
            elif base.startswith(".wh."):
                target = posixpath.join(parent, base[4:])
                gone = {p for p in lower if p == target or p.startswith(target + "/")}
            else:
                continue
            removed |= gone
            for p in gone:
                files.pop(p, None)
                links.pop(p, None)
        for e in entries:
            path = "/" + _rel(e.path)
            if posixpath.basename(path).startswith(".wh."):
                continue
            if e.kind == "reg":
                files[path] = e.data
            elif e.kind == "hardlink":
                files[path] = files["/" + _rel(e.link)]
            elif e.kind == "symlink":
                links[path] = e.link
            removed.discard(path)
    return files, links, removed


def _image_config(arch: str, variant: str, diff_ids: Sequence[str]) -> dict:
    config: dict = {
        "created": SAMPLE_CREATED,
        "architecture": arch,
        "os": "linux",
    }
    if variant:
        config["variant"] = variant
    config["config"] = {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["/bin/sh"],
        "WorkingDir": "/",
        "Labels": {"org.peerstar.sample": "1"},
    }
    config["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    config["history"] = [
        {"created": SAMPLE_CREATED, "created_by": "peerstar sample: busybox root filesystem"},
        {"created": SAMPLE_CREATED, "created_by": "peerstar sample: data files"},
    ]
    return config


@dataclass
class _Built:
    layers: list[SampleLayer]
    blobs: dict[str, bytes]  # digest -> bytes (layers, config, manifest)
    config: bytes
    config_digest: str
    manifest: bytes
    manifest_digest: str
    layer_tars: list[bytes]
    arch: str
    variant: str
    layer_entries: list[list[LayerEntry]]


def _build(extra_mib: int, busybox: Path, gzip_level: int) -> _Built:
    layer_entries = sample_layer_entries(extra_mib=extra_mib, busybox=busybox)
    _os, arch, variant = host_platform()
    layers: list[SampleLayer] = []
    blobs: dict[str, bytes] = {}
    tars: list[bytes] = []
    for entries in layer_entries:
        tar = build_layer_tar(entries)
        blob = gzip_bytes(tar, gzip_level)
        digest = sha256_digest(blob)
        blobs[digest] = blob
        tars.append(tar)
        layers.append(SampleLayer(digest, sha256_digest(tar), len(blob), mt.OCI_LAYER_GZIP,
                                  tuple(entries)))
    config = dump_json(_image_config(arch, variant or "", [la.diff_id for la in layers]))
    config_digest = sha256_digest(config)
    blobs[config_digest] = config
    manifest = dump_json({
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": la.media_type, "digest": la.digest, "size": la.size}
                   for la in layers],
    })
    manifest_digest = sha256_digest(manifest)
    blobs[manifest_digest] = manifest
    return _Built(layers, blobs, config, config_digest, manifest, manifest_digest, tars, arch,
                  variant or "", layer_entries)


def _check_tag(tag: str) -> None:
    if not is_tag(tag):
        raise PeerstarError(f"invalid image tag {tag!r}: use letters, digits, '_', '.', '-' "
                            "(at most 128, not starting with '.' or '-')")


def _sample_image(built: _Built, path: Path, tag: str, repository: str) -> SampleImage:
    files, links, removed = _merged_view(built.layer_entries)
    busybox = files.pop("/bin/busybox")
    return SampleImage(
        path=path, tag=tag, repository=repository,
        manifest_digest=built.manifest_digest, manifest_size=len(built.manifest),
        config_digest=built.config_digest, layers=built.layers,
        architecture=built.arch, variant=built.variant,
        files=files, symlinks=links, removed=frozenset(removed),
        busybox_sha256=sha256_digest(busybox),
    )


def build_sample_image(
    layout_dir: Path,
    *,
    tag: str = "latest",
    extra_mib: int = 0,
    busybox: Path = DEFAULT_BUSYBOX,
    gzip_level: int = 6,
    repository: str = DEFAULT_REPOSITORY,
) -> SampleImage:
    """Write the sample image into the OCI image layout `layout_dir` under `tag`.

    Creates the directory if needed. An existing layout is extended: blobs are added and
    the index entry named `tag` is replaced, other entries are kept (`LayoutWriter`, so
    nothing is visible before the whole image is written). A non-empty directory
    without an `oci-layout` file is refused. `repository` is not stored in
    the layout (OCI ref names are tags); it is the name tests give the image on import.
    """
    _check_tag(tag)
    layout_dir = Path(layout_dir)
    layout_dir.parent.mkdir(parents=True, exist_ok=True)
    with LayoutWriter(layout_dir) as writer:  # refuses a path that is not (or not yet) a layout
        built = _build(extra_mib, busybox, gzip_level)
        for digest, data in built.blobs.items():
            media_type = (mt.OCI_MANIFEST if digest == built.manifest_digest else
                          mt.OCI_CONFIG if digest == built.config_digest else mt.OCI_LAYER_GZIP)
            writer.add_bytes(data, media_type)
        platform = {"architecture": built.arch, "os": "linux"}
        if built.variant:
            platform["variant"] = built.variant
        writer.commit(descriptor(mt.OCI_MANIFEST, built.manifest_digest, len(built.manifest),
                                 platform=platform), tag)
    return _sample_image(built, layout_dir, tag, repository)


def _tar_add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = SAMPLE_MTIME
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _tar_add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mtime = SAMPLE_MTIME
    info.mode = 0o755
    tar.addfile(info)


def write_oci_archive(layout_dir: Path, archive: Path) -> Path:
    """Pack an OCI image layout directory into a tar (`ctr image import` input).

    Files are added sorted with fixed metadata, so equal layouts give equal archives.
    Temporary files left by interrupted writes (dot-prefixed) are skipped.
    """
    layout_dir = Path(layout_dir)
    if not (layout_dir / "oci-layout").is_file() or not (layout_dir / "index.json").is_file():
        raise PeerstarError(f"{layout_dir} is not an OCI image layout (needs oci-layout and "
                            "index.json)")
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(archive) as f, tarfile.open(fileobj=f, mode="w",
                                                  format=tarfile.PAX_FORMAT) as tar:
        for root, dirs, names in os.walk(layout_dir):
            dirs.sort()
            rel_root = os.path.relpath(root, layout_dir)
            if rel_root != ".":
                _tar_add_dir(tar, rel_root.replace(os.sep, "/"))
            for name in sorted(names):
                if name.startswith("."):
                    continue
                rel = name if rel_root == "." else f"{rel_root}/{name}"
                _tar_add_bytes(tar, rel.replace(os.sep, "/"), Path(root, name).read_bytes())
    return archive


def build_sample_docker_archive(
    path: Path,
    *,
    tag: str = "latest",
    extra_mib: int = 0,
    busybox: Path = DEFAULT_BUSYBOX,
    repository: str = DEFAULT_REPOSITORY,
) -> SampleImage:
    """Write the sample image as a `docker save` archive (tar) at `path`.

    Layout: `manifest.json`, `repositories`, `<config hex>.json`, and per layer
    `<id>/layer.tar` (uncompressed), `<id>/VERSION`, `<id>/json`, where `<id>` is the
    layer's chain ID. In the returned `SampleImage`, layer digests equal the diff IDs
    (the blobs are the plain tars) and `manifest_digest` is that of the Docker schema 2
    manifest a registry would serve for it (what `skopeo inspect` reports).
    """
    _check_tag(tag)
    path = Path(path)
    if path.exists():
        raise PeerstarError(f"{path} already exists: refusing to overwrite it; remove it or "
                            "choose another path for the docker archive")
    built = _build(extra_mib, busybox, 6)
    layer_ids: list[str] = []
    chain = ""
    for la in built.layers:
        # Chain ID, as docker uses for layer directory names.
        chain = la.diff_id if not chain else sha256_digest(f"{chain} {la.diff_id}".encode())
        layer_ids.append(chain.split(":", 1)[1])
    config_name = built.config_digest.split(":", 1)[1] + ".json"
    repo_tag = f"{repository}:{tag}"
    manifest_json = dump_json([{
        "Config": config_name,
        "RepoTags": [repo_tag],
        "Layers": [f"{lid}/layer.tar" for lid in layer_ids],
    }])
    repositories = dump_json({repository: {tag: layer_ids[-1]}})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f, tarfile.open(fileobj=f, mode="w",
                                               format=tarfile.PAX_FORMAT) as tar:
        members: list[tuple[str, bytes | None]] = []
        for i, lid in enumerate(layer_ids):
            v1 = {"id": lid, "created": SAMPLE_CREATED, "os": "linux"}
            if i:
                v1["parent"] = layer_ids[i - 1]
            members += [(lid, None), (f"{lid}/VERSION", b"1.0"),
                        (f"{lid}/json", dump_json(v1)),
                        (f"{lid}/layer.tar", built.layer_tars[i])]
        members += [(config_name, built.config), ("manifest.json", manifest_json),
                    ("repositories", repositories)]
        for name, data in sorted(members, key=lambda m: m[0]):
            if data is None:
                _tar_add_dir(tar, name)
            else:
                _tar_add_bytes(tar, name, data)
    # containers/image (skopeo) describes every docker-archive layer with the gzip media
    # type even though the tars are plain; use the same so `manifest_digest` matches.
    docker_layers = [
        SampleLayer(la.diff_id, la.diff_id, len(t),
                    mt.DOCKER_LAYER_GZIP, la.entries)
        for la, t in zip(built.layers, built.layer_tars, strict=True)
    ]
    docker_manifest = dump_json({
        "schemaVersion": 2,
        "mediaType": mt.DOCKER_MANIFEST,
        "config": {"mediaType": mt.DOCKER_CONFIG,
                   "size": len(built.config), "digest": built.config_digest},
        "layers": [{"mediaType": la.media_type, "size": la.size, "digest": la.digest}
                   for la in docker_layers],
    })
    image = _sample_image(built, path, tag, repository)
    image.layers = docker_layers
    image.manifest_digest = sha256_digest(docker_manifest)
    image.manifest_size = len(docker_manifest)
    return image
