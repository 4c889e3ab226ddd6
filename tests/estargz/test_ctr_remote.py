"""Conformance against the real tools: layers converted by stargz-snapshotter's
`ctr-remote image convert --estargz --oci` must read back through `peerstar.estargz`
with the same file listing, metadata and contents as the original layer tars; the
converted image's annotations and DiffIDs must be what the reference says. Also pushes
the sample (and the converted image) to the private docker-registry, where later tests
pull from.
"""

from __future__ import annotations

import gzip
import io
import json
import posixpath
import tarfile
import uuid
from dataclasses import dataclass

import pytest

from peerstar.estargz import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    TOC_TAR_NAME,
    UNCOMPRESSED_SIZE_ANNOTATION,
    Reader,
)
from peerstar.oci import mediatypes as mt
from peerstar.source.sample import (
    SAMPLE_MTIME,
    SAMPLE_TEXT,
    SAMPLE_TEXT_PATH,
    SampleImage,
    build_sample_image,
)
from tests.support.containerd import Containerd, Ctr
from tests.support.content import sha256_digest
from tests.support.registry import DockerRegistry

pytestmark = pytest.mark.slow

CHUNK = 4 << 20  # ctr-remote's default eStargz chunk size
EXTRA_MIB = 10  # the biggest extra file (~8.7 MiB) spans three chunks
_TAR_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
}


def _clean(name: str) -> str:
    # The reference's normalisation: clean("/" + name) minus the leading "/".
    return posixpath.normpath("/" + name).lstrip("/")


@dataclass
class OriginalEntry:
    type: str
    mode: int
    link: str
    data: bytes


def _original_entries(tar_bytes: bytes) -> dict[str, OriginalEntry]:
    out: dict[str, OriginalEntry] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read() if m.isreg() else b""
            link = _clean(m.linkname) if m.islnk() else m.linkname
            out[_clean(m.name)] = OriginalEntry(_TAR_TYPES[m.type], m.mode, link, data)
    return out


def _json_content(ctr: Ctr, digest: str) -> dict:
    return json.loads(ctr.run("content", "get", digest).stdout)


def _image_target(ctr: Ctr, ref: str) -> str:
    """Digest of the image's platform manifest (resolving an index if there is one)."""
    for line in ctr.lines("images", "ls"):
        fields = line.split()
        if fields[0] == ref:
            digest, media_type = fields[2], fields[1]
            break
    else:
        raise AssertionError(f"image {ref} not in `ctr images ls`")
    if "index" in media_type or "manifest.list" in media_type:
        index = _json_content(ctr, digest)
        [digest] = [m["digest"] for m in index["manifests"]
                    if m.get("platform", {}).get("os") == "linux"]
    return digest


@dataclass
class Converted:
    sample: SampleImage
    src: str
    dst: str
    manifest_digest: str
    manifest: dict
    config: dict
    blobs: list[bytes]


@pytest.fixture(scope="module")
def converted(containerd: Containerd, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    ctr = containerd.ctr
    sample = build_sample_image(tmp_path_factory.mktemp("esgz-src") / "layout",
                                extra_mib=EXTRA_MIB)
    base = f"docker.io/peerstar/conv-{uuid.uuid4().hex[:8]}"
    [src] = ctr.import_oci_layout(sample.path, base)
    dst = f"{base}-esgz:latest"
    ctr.remote("image", "convert", "--estargz", "--oci", src, dst)
    digest = _image_target(ctr, dst)
    manifest = _json_content(ctr, digest)
    config = _json_content(ctr, manifest["config"]["digest"])
    blobs = [ctr.run("content", "get", layer["digest"]).stdout for layer in manifest["layers"]]
    return Converted(sample, src, dst, digest, manifest, config, blobs)


def test_conversion_changed_the_layers(converted: Converted) -> None:
    layers = converted.manifest["layers"]
    assert len(layers) == 2
    assert [la["mediaType"] for la in layers] == [mt.OCI_LAYER_GZIP] * 2
    for layer, blob, original in zip(layers, converted.blobs, converted.sample.layers,
                                     strict=True):
        assert layer["digest"] == sha256_digest(blob) != original.digest
        assert layer["size"] == len(blob)
        assert layer["annotations"][TOC_DIGEST_ANNOTATION].startswith("sha256:")


def test_diff_ids_and_uncompressed_size(converted: Converted) -> None:
    diff_ids = converted.config["rootfs"]["diff_ids"]
    for i, (layer, blob) in enumerate(zip(converted.manifest["layers"], converted.blobs,
                                          strict=True)):
        plain = gzip.decompress(blob)  # a valid multi-member gzip stream
        assert diff_ids[i] == sha256_digest(plain)
        assert layer["annotations"][UNCOMPRESSED_SIZE_ANNOTATION] == str(len(plain))
    # The original DiffIDs are gone: the TOC entry is part of the new tar stream.
    assert diff_ids != converted.sample.diff_ids


@pytest.mark.parametrize("index", [0, 1])
def test_peerstar_reads_converted_layer(converted: Converted, index: int) -> None:
    layer = converted.manifest["layers"][index]
    toc_digest = layer["annotations"][TOC_DIGEST_ANNOTATION]
    r = Reader.from_bytes(converted.blobs[index], toc_digest=toc_digest)
    assert r.compression == "gzip"
    assert r.toc_digest == toc_digest == sha256_digest(r.toc_json)
    r.verify_all()

    original = _original_entries(converted.sample.layer_tar(index))
    entries = {e.name: e for e in r.entries if e.type != "chunk"}
    # ctr-remote without a prefetch record writes the "no prefetch" landmark first.
    assert r.entries[0].name == NO_PREFETCH_LANDMARK
    assert r.read(NO_PREFETCH_LANDMARK) == b"\x0f"
    assert PREFETCH_LANDMARK not in entries
    listed = {n for n in entries if n not in (NO_PREFETCH_LANDMARK, TOC_TAR_NAME)}
    assert listed == set(original)

    for name, want in original.items():
        e = entries[name]
        assert (e.type, e.mode, e.uid, e.gid) == (want.type, want.mode, 0, 0), name
        assert e.mtime() == SAMPLE_MTIME, name
        assert e.uname == "root" and e.gname == "root", name
        if want.type == "reg":
            assert e.size == len(want.data), name
            assert e.digest == sha256_digest(want.data), name
            assert r.read(name) == want.data, name
        elif want.type == "symlink":
            assert e.link_name == want.link, name
        elif want.type == "hardlink":
            assert _clean(e.link_name) == want.link, name
            target = r.lookup(name)
            assert target is not None and target.name == want.link
            assert target.num_link == 2
            assert r.read(name) == original[want.link].data


def test_chunks_and_ranged_reads(converted: Converted) -> None:
    r = Reader.from_bytes(converted.blobs[1])
    extras = {p.lstrip("/"): d for p, d in converted.sample.files.items()
              if p.startswith("/opt/peerstar/random/")}
    big_name, big = max(extras.items(), key=lambda item: len(item[1]))
    chunks = r.chunks(big_name)
    assert 2 * CHUNK < len(big) < 3 * CHUNK
    assert len(chunks) == 3
    assert [c.chunk_offset for c in chunks] == [0, CHUNK, 2 * CHUNK]
    assert [c.type for c in chunks] == ["reg", "chunk", "chunk"]
    for c in chunks:
        end = c.chunk_offset + (c.chunk_size or len(big) - c.chunk_offset)
        assert c.chunk_digest == sha256_digest(big[c.chunk_offset:end])
    # A read across a chunk boundary, and one at the very end.
    assert r.read(big_name, CHUNK - 10, 30) == big[CHUNK - 10:CHUNK + 20]
    assert r.read(big_name, len(big) - 5) == big[-5:]
    assert r.read(SAMPLE_TEXT_PATH.lstrip("/"), 6, 4) == SAMPLE_TEXT[6:10]
    assert set(r.listdir("opt/peerstar/tree/a")) == {"b", "one.txt"}


def test_converted_image_runs(containerd: Containerd, converted: Converted) -> None:
    cid = f"esgz-{uuid.uuid4().hex[:8]}"
    out = containerd.ctr.text("run", "--rm", converted.dst, cid, "/bin/sh", "-c",
                              f"cat {SAMPLE_TEXT_PATH}; ls /opt/peerstar/random | wc -l")
    assert out.splitlines() == [SAMPLE_TEXT.decode().rstrip("\n"), "3"]


def _push_and_check(ctr: Ctr, registry: DockerRegistry, src: str, repo: str, tag: str,
                    manifest_digest: str) -> dict:
    remote = f"{registry.host}/{repo}:{tag}"
    ctr.run("images", "tag", "--force", src, remote)
    ctr.push(remote)
    got = registry.get_manifest(repo, tag)
    assert got.status == 200, got.body[:500]
    assert got.headers["docker-content-digest"] == manifest_digest
    assert sha256_digest(got.body) == manifest_digest
    by_digest = registry.get_manifest(repo, manifest_digest)
    assert by_digest.status == 200 and by_digest.body == got.body
    manifest = json.loads(got.body)
    for blob in [manifest["config"], *manifest["layers"]]:
        head = registry.request("HEAD", f"/v2/{repo}/blobs/{blob['digest']}")
        assert head.status == 200, blob["digest"]
        assert int(head.headers["content-length"]) == blob["size"]
    return manifest


def test_push_sample_to_registry(containerd: Containerd, docker_registry: DockerRegistry,
                                 sample_image: SampleImage) -> None:
    ctr = containerd.ctr
    [src] = ctr.import_oci_layout(sample_image.path,
                                  f"docker.io/peerstar/push-{uuid.uuid4().hex[:8]}")
    manifest = _push_and_check(ctr, docker_registry, src, "peerstar/sample", "latest",
                               sample_image.manifest_digest)
    assert [la["digest"] for la in manifest["layers"]] == sample_image.layer_digests
    missing = docker_registry.get_manifest("peerstar/sample", "no-such-tag")
    assert missing.status == 404


def test_push_converted_to_registry(containerd: Containerd, docker_registry: DockerRegistry,
                                    converted: Converted) -> None:
    manifest = _push_and_check(containerd.ctr, docker_registry, converted.dst,
                               "peerstar/sample", "estargz", converted.manifest_digest)
    # The lazy-pull annotations survive the registry round trip.
    for pushed, local in zip(manifest["layers"], converted.manifest["layers"], strict=True):
        assert pushed["annotations"][TOC_DIGEST_ANNOTATION] == \
            local["annotations"][TOC_DIGEST_ANNOTATION]
    blob = converted.blobs[1]
    ranged = docker_registry.request(
        "GET", f"/v2/peerstar/sample/blobs/{manifest['layers'][1]['digest']}",
        {"Range": "bytes=0-1"})
    assert ranged.status == 206 and ranged.body == blob[:2]


def test_original_layers_unchanged_in_content_store(containerd: Containerd,
                                                    converted: Converted) -> None:
    # Converting must not disturb the source image (its blobs stay byte-identical).
    for layer in converted.sample.layers:
        data = containerd.ctr.run("content", "get", layer.digest).stdout
        assert sha256_digest(data) == layer.digest


@pytest.fixture(scope="module")
def converted_zstd(containerd: Containerd, converted: Converted) -> Converted:
    ctr = containerd.ctr
    dst = converted.src.rsplit(":", 1)[0] + "-zstd:latest"
    ctr.remote("image", "convert", "--zstdchunked", "--oci", converted.src, dst)
    digest = _image_target(ctr, dst)
    manifest = _json_content(ctr, digest)
    config = _json_content(ctr, manifest["config"]["digest"])
    blobs = [ctr.run("content", "get", layer["digest"]).stdout for layer in manifest["layers"]]
    return Converted(converted.sample, converted.src, dst, digest, manifest, config, blobs)


@pytest.mark.parametrize("index", [0, 1])
def test_peerstar_reads_zstd_chunked_layer(converted_zstd: Converted, index: int) -> None:
    from peerstar.estargz import (
        ZSTD_MANIFEST_CHECKSUM_ANNOTATION,
        ZSTD_MANIFEST_POSITION_ANNOTATION,
    )
    from peerstar.estargz.compression import ZSTD_CHUNKED
    from peerstar.estargz.reader import compute_diff_id

    layer = converted_zstd.manifest["layers"][index]
    blob = converted_zstd.blobs[index]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    ann = layer["annotations"]
    r = Reader.from_bytes(blob, toc_digest=ann[TOC_DIGEST_ANNOTATION])
    assert r.compression == "zstd"
    r.verify_all()
    off, clen, ulen, typ = (int(x) for x in ann[ZSTD_MANIFEST_POSITION_ANNOTATION].split(":"))
    assert (off, clen, ulen, typ) == (r.footer.toc_offset, r.footer.toc_size, len(r.toc_json), 1)
    assert ann[ZSTD_MANIFEST_CHECKSUM_ANNOTATION] == sha256_digest(blob[off:off + clen])
    diff_id, _ = compute_diff_id(lambda o, n: blob[o:o + n], len(blob), ZSTD_CHUNKED)
    assert converted_zstd.config["rootfs"]["diff_ids"][index] == diff_id
    original = _original_entries(converted_zstd.sample.layer_tar(index))
    listed = {e.name for e in r.entries if e.type != "chunk"} - {NO_PREFETCH_LANDMARK}
    assert listed == set(original)
    for name, want in original.items():
        if want.type == "reg":
            assert r.read(name) == want.data, name
