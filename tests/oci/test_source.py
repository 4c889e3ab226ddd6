"""Reading images: references, OCI layouts, docker archives, verified blob streams."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from peerstar.oci import (
    BlobError,
    ImageFormatError,
    ImageReferenceError,
    LayoutWriter,
    parse_image_ref,
)
from peerstar.oci.digest import verifying_stream
from peerstar.oci.model import CONFIG, INDEX, LAYER, MANIFEST
from peerstar.oci.reference import looks_like_image_ref
from peerstar.source import open_image
from peerstar.source.sample import SampleImage, build_sample_docker_archive
from tests.oci.conftest import OCI_GZIP, LayoutBuilder, gz
from tests.support.content import compact_json, sha256_digest
from tests.support.tars import tar_of_files


@pytest.mark.parametrize("text,transport,path,tag", [
    ("oci:/a/b", "oci", "/a/b", None),
    ("oci:/a/b:v1", "oci", "/a/b", "v1"),
    ("oci:rel:name:with:colons", "oci", "rel", "name:with:colons"),
    ("docker-archive:x.tar", "docker-archive", "x.tar", None),
    ("docker-archive:x.tar:busybox:latest", "docker-archive", "x.tar", "busybox:latest"),
    ("docker-archive:x.tar:@1", "docker-archive", "x.tar", "@1"),
])
def test_parse_reference(text: str, transport: str, path: str, tag: str | None) -> None:
    ref = parse_image_ref(text)
    assert (ref.transport, str(ref.path), ref.tag) == (transport, path, tag)
    assert str(ref) == text


@pytest.mark.parametrize("text,words", [
    ("docker://busybox", "unknown transport 'docker'"),
    ("dir:/x", "unknown transport 'dir'"),
    ("oci:", "path after oci: is empty"),
    ("oci:/x:-bad", "not a valid tag"),
    ("plainfile", "no transport"),
])
def test_bad_reference(text: str, words: str) -> None:
    with pytest.raises(ImageReferenceError, match=words):
        parse_image_ref(text)


def test_existing_file_with_colon_is_not_a_reference(tmp_path: Path) -> None:
    f = tmp_path / "a:b.tar"
    f.write_bytes(b"x")
    assert not looks_like_image_ref(str(f))
    assert looks_like_image_ref(f"oci:{tmp_path}/nope")


def test_docker_archive_matches_skopeo_manifest_and_walks(tmp_path: Path) -> None:
    image = build_sample_docker_archive(tmp_path / "img.tar", tag="v9")
    with open_image(f"docker-archive:{image.path}") as src:
        # The synthesised manifest is byte-identical to what skopeo reports.
        assert src.top_descriptor["digest"] == image.manifest_digest
        assert src.tag == "v9"
        nodes = list(src.walk())
        assert [n.kind for n in nodes] == [MANIFEST, CONFIG, LAYER, LAYER]
        assert [n.descriptor["digest"] for n in nodes[2:]] == image.layer_digests
        assert src.read_document(nodes[1].descriptor)["rootfs"]["diff_ids"] == image.diff_ids
        with src.read_blob(image.layer_digests[1], nodes[3].descriptor["size"]) as f:
            assert f.read() == image.layer_tar(1)


def _docker25_archive(path: Path, images: list[tuple[str, bytes]]) -> list[str]:
    """A docker 25+-style archive: blobs/sha256/<hex>, legacy dirs as symlinks, gzip layers."""
    buf = io.BytesIO()
    entries, digests = [], []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for repo_tag, layer in images:
            blob = gz(layer)
            hexd = sha256_digest(blob)[7:]
            add(f"blobs/sha256/{hexd}", blob)
            link = tarfile.TarInfo(f"{hexd}/layer.tar")
            link.type = tarfile.SYMTYPE
            link.linkname = f"../blobs/sha256/{hexd}"
            tar.addfile(link)
            config = compact_json({"architecture": "amd64", "os": "linux", "rootfs": {
                "type": "layers", "diff_ids": [sha256_digest(layer)]}})
            add(f"blobs/sha256/{sha256_digest(config)[7:]}", config)
            entries.append({"Config": f"blobs/sha256/{sha256_digest(config)[7:]}",
                            "RepoTags": [repo_tag], "Layers": [f"{hexd}/layer.tar"]})
            digests.append(sha256_digest(blob))
        add("manifest.json", compact_json(entries))
    path.write_bytes(buf.getvalue())
    return digests


def test_docker_archive_selection_symlinks_and_gzip(tmp_path: Path) -> None:
    a, b = tar_of_files({"a": b"A"}), tar_of_files({"b": b"B"})
    arch = tmp_path / "two.tar"
    digests = _docker25_archive(arch, [("example.com/one:1", a), ("two:latest", b)])
    with pytest.raises(ImageReferenceError, match="holds 2 images.*example.com/one:1"):
        open_image(f"docker-archive:{arch}")
    with open_image(f"docker-archive:{arch}:two") as src:  # ":latest" implied
        assert src.tag == "latest"
        [_, _, layer] = list(src.walk())
        assert layer.descriptor["digest"] == digests[1]
        with src.read_blob(digests[1]) as f:
            assert gzip.decompress(f.read()) == b
    with open_image(f"docker-archive:{arch}:@0") as src:
        assert src.tag == "1"
    with open_image(f"docker-archive:{arch}:one:1") as src:
        assert src.tag == "1"
    with pytest.raises(ImageReferenceError, match="no image named 'three'"):
        open_image(f"docker-archive:{arch}:three")
    # `docker save | gzip` is read too.
    gz_arch = tmp_path / "two.tar.gz"
    gz_arch.write_bytes(gzip.compress(arch.read_bytes()))
    with open_image(f"docker-archive:{gz_arch}:@1") as src:
        assert src.tag == "latest"


def test_oci_layout_tag_selection(tmp_path: Path, sample_image: SampleImage) -> None:
    with open_image(f"oci:{sample_image.path}") as src:  # one manifest: taken
        assert src.top_descriptor["digest"] == sample_image.manifest_digest
        assert src.tag == "latest"
    b = LayoutBuilder(tmp_path / "l")
    t = tar_of_files({"x": b"1"})
    m = b.image([(gz(t), OCI_GZIP, None)], [sha256_digest(t)])
    b.tag(m, "one")
    b.tag(m, "two")
    root = b.finish()
    with pytest.raises(ImageReferenceError, match="choose one.*tags: one, two"):
        open_image(f"oci:{root}")
    with pytest.raises(ImageReferenceError, match="no image tagged 'three'"):
        open_image(f"oci:{root}:three")
    with open_image(f"oci:{root}:two") as src:
        assert src.top_descriptor["digest"] == m["digest"]


def test_digest_cannot_escape_the_layout(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path / "l")
    b.entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "digest": "sha256:../../../etc/passwd", "size": 10})
    root = b.finish()
    with pytest.raises(ImageFormatError, match="not a valid digest"):
        open_image(f"oci:{root}")


def test_index_json_not_json(tmp_path: Path) -> None:
    root = LayoutBuilder(tmp_path / "l").finish()
    (root / "index.json").write_text("{nope")
    with pytest.raises(ImageFormatError, match="index.json: not valid JSON"):
        open_image(f"oci:{root}")


def test_verifying_stream() -> None:
    data = b"hello world"
    ok = verifying_stream(io.BytesIO(data), sha256_digest(data), len(data), name="t")
    assert ok.read() == data
    bad = verifying_stream(io.BytesIO(data), sha256_digest(b"other"), len(data), name="t")
    with pytest.raises(BlobError, match="hashes to"):
        bad.read()
    longer = verifying_stream(io.BytesIO(data + b"!"), sha256_digest(data), len(data), name="t")
    with pytest.raises(BlobError, match="longer than"):
        longer.read()
    short = verifying_stream(io.BytesIO(data[:5]), sha256_digest(data), len(data), name="t")
    with pytest.raises(BlobError, match="has 5 bytes"):
        short.read()


def test_layout_writer_new_and_abort(tmp_path: Path) -> None:
    target = tmp_path / "new"
    with LayoutWriter(target) as w:
        d = w.add_bytes(b"{}", "application/vnd.oci.image.config.v1+json")
        assert not target.exists()  # nothing visible before commit
    assert not target.exists() and list(tmp_path.iterdir()) == []  # aborted, cleaned
    with LayoutWriter(target) as w:
        d = w.add_bytes(b"{}", "application/vnd.oci.image.config.v1+json")
        w.commit(d, "t")
    assert (target / "blobs" / "sha256" / sha256_digest(b"{}")[7:]).read_bytes() == b"{}"
    index = json.loads((target / "index.json").read_bytes())
    assert index["manifests"][0]["annotations"] == {"org.opencontainers.image.ref.name": "t"}
    assert json.loads((target / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


def test_walk_kinds_for_index(tmp_path: Path) -> None:
    b = LayoutBuilder(tmp_path / "l")
    t = tar_of_files({"x": b"1"})
    m = b.image([(gz(t), OCI_GZIP, None)], [sha256_digest(t)])
    idx = b.blob(compact_json({"schemaVersion": 2, "manifests": [m, m]}),
                 "application/vnd.oci.image.index.v1+json")
    b.tag(idx, "i")
    with open_image(f"oci:{b.finish()}") as src:
        nodes = list(src.walk())
        assert [n.kind for n in nodes] == [INDEX, MANIFEST, CONFIG, LAYER]
        assert nodes[1].parents == [idx["digest"], idx["digest"]]
