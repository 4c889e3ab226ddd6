"""Whole-image conversion: every claim in the output recomputed independently."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from peerstar.convert import ConvertError, ConvertOptions, convert
from peerstar.estargz import build
from peerstar.oci import BlobError, parse_image_ref
from peerstar.source.sample import SampleImage, build_sample_docker_archive
from tests.oci.conftest import (
    OCI_GZIP,
    OCI_INDEX,
    OCI_MANIFEST,
    REF_NAME,
    TOC_ANN,
    USIZE_ANN,
    LayoutBuilder,
    check_image_manifest,
    decompress,
    gz,
    layout_tree,
    read_blob,
    read_json,
    tar_files,
)
from tests.support.content import sha256_digest


def _index(layout: Path) -> dict:
    return json.loads((layout / "index.json").read_bytes())


def _skopeo() -> str:
    path = shutil.which("skopeo")
    if path is None:
        pytest.fail("skopeo is not installed: run scripts/install.sh", pytrace=False)
    return path


def _no_leftovers(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if ".peerstar-" in p.name] == []


def test_oci_layout_sample_converted_and_checked(sample_image: SampleImage,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = convert(f"oci:{sample_image.path}:latest", parse_image_ref(f"oci:{out}"))
    [entry] = _index(out)["manifests"]
    assert entry["annotations"] == {REF_NAME: "latest"}  # source tag carried over
    assert entry["platform"]["architecture"] == sample_image.architecture
    assert entry["digest"] == report.top["digest"]
    checked = check_image_manifest(out, entry)
    # Contents preserved: the converted tars hold the same files as the source layers.
    for i, files in enumerate(checked.layer_files):
        assert files == tar_files(sample_image.layer_tar(i))
    assert checked.config["architecture"] == sample_image.architecture
    src_manifest = json.loads(read_blob(sample_image.path, sample_image.manifest_digest))
    src_config = json.loads(read_blob(sample_image.path, src_manifest["config"]["digest"]))
    assert {k: v for k, v in checked.config.items() if k != "rootfs"} == {
        k: v for k, v in src_config.items() if k != "rootfs"}
    # The report matches the layout.
    assert [la.blob_digest for la in report.layers] == [
        d["digest"] for d in checked.manifest["layers"]]
    assert [la.source_digest for la in report.layers] == sample_image.layer_digests
    assert [la.diff_id for la in report.layers] == checked.config["rootfs"]["diff_ids"]
    _no_leftovers(tmp_path)


def test_docker_archive_converted_to_oci(tmp_path: Path) -> None:
    image = build_sample_docker_archive(tmp_path / "img.tar", tag="v3")
    out = tmp_path / "out"
    report = convert(f"docker-archive:{image.path}", parse_image_ref(f"oci:{out}:conv"))
    [entry] = _index(out)["manifests"]
    assert entry["annotations"][REF_NAME] == "conv"
    checked = check_image_manifest(out, entry)
    for i, files in enumerate(checked.layer_files):
        assert files == tar_files(image.layer_tar(i))
    assert "docker" not in json.dumps(checked.manifest)  # all media types are OCI now
    assert [la.source_digest for la in report.layers] == image.layer_digests


def test_docker_archive_zstdchunked(tmp_path: Path) -> None:
    image = build_sample_docker_archive(tmp_path / "img.tar")
    out = tmp_path / "out"
    convert(f"docker-archive:{image.path}:peerstar/sample:latest",
            parse_image_ref(f"oci:{out}"), ConvertOptions(compression="zstd"))
    [entry] = _index(out)["manifests"]
    assert entry["annotations"][REF_NAME] == "latest"
    checked = check_image_manifest(out, entry, compression="zstd")
    assert checked.layer_files[1] == tar_files(image.layer_tar(1))


def _multi_layout(root: Path, layer_tars: list[bytes]) -> tuple[Path, dict, dict, dict]:
    b = LayoutBuilder(root)
    l0, l1, l2 = layer_tars
    amd = b.image([(gz(l0), OCI_GZIP, None), (gz(l1), OCI_GZIP, {"org.example.l": "1"})],
                  [sha256_digest(l0), sha256_digest(l1)], arch="amd64")
    # arm64 shares the first layer and has a plain (uncompressed) tar second layer.
    arm = b.image([(gz(l0), OCI_GZIP, None),
                   (l2, "application/vnd.oci.image.layer.v1.tar", None)],
                  [sha256_digest(l0), sha256_digest(l2)], arch="arm64")
    cfg = b.blob(b"{}", "application/vnd.example.config+json")
    data = b.blob(b"attestation", "application/vnd.in-toto+json")
    art = b.blob(json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg,
                             "layers": [data]}).encode(), OCI_MANIFEST)
    art["annotations"] = {"vnd.docker.reference.digest": amd["digest"],
                          "vnd.docker.reference.type": "attestation-manifest"}
    art["platform"] = {"architecture": "unknown", "os": "unknown"}
    nested = b.blob(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                "manifests": [amd, arm, art],
                                "annotations": {"org.example.idx": "x"}}).encode(), OCI_INDEX)
    b.tag(nested, "multi")
    return b.finish(), amd, arm, art


def test_multi_platform_nested_index_preserved(tmp_path: Path,
                                               layer_tars: list[bytes]) -> None:
    src, amd, arm, art = _multi_layout(tmp_path / "src", layer_tars)
    out = tmp_path / "out"
    report = convert(f"oci:{src}:multi", parse_image_ref(f"oci:{out}"),
                     ConvertOptions(chunk_size=64 << 10))
    [top] = _index(out)["manifests"]
    assert top["mediaType"] == OCI_INDEX and top["annotations"] == {REF_NAME: "multi"}
    nested = read_json(out, top)
    assert nested["annotations"] == {"org.example.idx": "x"}
    new_amd, new_arm, new_art = nested["manifests"]
    assert new_amd["platform"] == amd["platform"] and new_arm["platform"] == arm["platform"]
    a = check_image_manifest(out, new_amd)
    r = check_image_manifest(out, new_arm)
    assert a.manifest["annotations"] == {"org.example.keep": "yes"}
    assert a.manifest["layers"][1]["annotations"]["org.example.l"] == "1"
    # The shared layer was converted once and is the same blob in both images.
    assert a.manifest["layers"][0]["digest"] == r.manifest["layers"][0]["digest"]
    assert len(report.layers) == 3
    assert [f == tar_files(t) for f, t in zip(a.layer_files + r.layer_files[1:],
                                              layer_tars, strict=True)] == [True] * 3
    # Small chunks: the 320000-byte file spans several chunks.
    from peerstar.estargz import Reader

    blob = read_blob(out, a.manifest["layers"][1]["digest"])
    assert len(Reader.from_bytes(blob).chunks("data/big.bin")) == 5
    # The attestation manifest is copied as it is, its subject annotation remapped.
    assert new_art["digest"] == art["digest"]
    assert new_art["annotations"]["vnd.docker.reference.digest"] == new_amd["digest"]
    assert read_blob(out, art["digest"]) == read_blob(src, art["digest"])


def test_multi_platform_skopeo_accepts(tmp_path: Path, layer_tars: list[bytes]) -> None:
    skopeo = _skopeo()
    src, *_ = _multi_layout(tmp_path / "src", layer_tars)
    out = tmp_path / "out"
    convert(f"oci:{src}:multi", parse_image_ref(f"oci:{out}"))
    nested = read_json(out, _index(out)["manifests"][0])
    amd = read_json(out, nested["manifests"][0])
    info = json.loads(subprocess.run(
        [skopeo, "--override-arch", "amd64", "inspect", f"oci:{out}:multi"],
        capture_output=True, check=True, timeout=60).stdout)
    assert info["Architecture"] == "amd64"
    assert info["Layers"] == [d["digest"] for d in amd["layers"]]
    copy = tmp_path / "copy"
    subprocess.run([skopeo, "copy", "--all", "--preserve-digests", f"oci:{out}:multi",
                    f"oci:{copy}:multi"], capture_output=True, check=True, timeout=120)
    assert _index(copy)["manifests"][0]["digest"] == _index(out)["manifests"][0]["digest"]


def test_skopeo_inspect_and_copy_single(sample_image: SampleImage, tmp_path: Path) -> None:
    skopeo = _skopeo()
    out = tmp_path / "out"
    report = convert(f"oci:{sample_image.path}", parse_image_ref(f"oci:{out}:t"))
    info = json.loads(subprocess.run([skopeo, "inspect", f"oci:{out}"], capture_output=True,
                                     check=True, timeout=60).stdout)
    assert info["Digest"] == report.top["digest"]
    assert info["Layers"] == [la.blob_digest for la in report.layers]
    copy = tmp_path / "copy"
    subprocess.run([skopeo, "copy", f"oci:{out}:t", f"oci:{copy}:t"], capture_output=True,
                   check=True, timeout=120)
    # skopeo keeps the layers (and their annotations) as they are.
    copied = read_json(copy, _index(copy)["manifests"][0])
    assert [d["digest"] for d in copied["layers"]] == info["Layers"]
    assert all(TOC_ANN in d["annotations"] for d in copied["layers"])


def test_untagged_multi_manifest_index_json_becomes_an_index(
        tmp_path: Path, layer_tars: list[bytes]) -> None:
    b = LayoutBuilder(tmp_path / "src")
    amd = b.image([(gz(layer_tars[0]), OCI_GZIP, None)], [sha256_digest(layer_tars[0])],
                  arch="amd64")
    arm = b.image([(gz(layer_tars[2]), OCI_GZIP, None)], [sha256_digest(layer_tars[2])],
                  arch="arm64")
    b.tag(amd, None)
    b.tag(arm, None)
    src = b.finish()
    out = tmp_path / "out"
    convert(f"oci:{src}", parse_image_ref(f"oci:{out}:both"))
    [top] = _index(out)["manifests"]
    assert top["mediaType"] == OCI_INDEX
    entries = read_json(out, top)["manifests"]
    assert [e["platform"]["architecture"] for e in entries] == ["amd64", "arm64"]
    for e in entries:
        check_image_manifest(out, e)


def _estargz(tar: bytes, compression: str = "gzip") -> tuple[bytes, object]:
    import io

    dst = io.BytesIO()
    result = build(tar, dst, compression=compression)
    return dst.getvalue(), result


def _lying_toc(blob: bytes) -> bytes:
    """The blob with one chunkDigest in its TOC replaced (footer left valid)."""
    toc_off = int(blob[-51:][16:32], 16)
    raw = gzip.decompress(blob[toc_off:-51])
    start = raw.index(b'"chunkDigest": "sha256:') + len(b'"chunkDigest": "sha256:')
    raw = raw[:start] + b"0" * 64 + raw[start + 64:]
    return blob[:toc_off] + gzip.compress(raw, mtime=0) + blob[-51:]


def test_already_estargz_layers_kept_byte_identical(tmp_path: Path,
                                                    layer_tars: list[bytes]) -> None:
    l0, l1, l2 = layer_tars
    e0, r0 = _estargz(l0)
    e1, r1 = _estargz(l1)
    e2, r2 = _estargz(l2)
    b = LayoutBuilder(tmp_path / "src")
    plain = gz(l2)
    lying = _lying_toc(e2)
    man = b.image([
        (e0, OCI_GZIP, dict(r0.annotations)),             # annotated eStargz: kept
        (e1, OCI_GZIP, None),                             # footer only: kept
        (plain, OCI_GZIP, None),                          # plain gzip: converted
        (e0, OCI_GZIP, {TOC_ANN: sha256_digest(b"not the toc")}),  # annotation lies: reconverted
        (lying, OCI_GZIP, None),                          # chunk digest lies: reconverted
    ], [r0.diff_id, r1.diff_id, sha256_digest(l2), r0.diff_id,
        sha256_digest(decompress(lying, OCI_GZIP))])
    b.tag(man, "e")
    src = b.finish()
    out = tmp_path / "out"
    report = convert(f"oci:{src}:e", parse_image_ref(f"oci:{out}"))
    checked = check_image_manifest(out, _index(out)["manifests"][0])
    layers = checked.manifest["layers"]
    assert layers[0]["digest"] == sha256_digest(e0) and read_blob(out, sha256_digest(e0)) == e0
    assert layers[1]["digest"] == sha256_digest(e1) and read_blob(out, sha256_digest(e1)) == e1
    assert layers[1]["annotations"][TOC_ANN] == r1.toc_digest
    assert layers[1]["annotations"][USIZE_ANN] == str(r1.uncompressed_size)
    assert layers[2]["digest"] not in (sha256_digest(plain),)
    # Same source digest as layer 0 but a different descriptor: converted once, layer 0's
    # result reused (identical layers are converted once, keyed on the digest).
    assert layers[3]["digest"] == sha256_digest(e0)
    assert layers[4]["digest"] != sha256_digest(lying)
    kept = {la.source_digest: la.kept for la in report.layers}
    assert kept == {sha256_digest(e0): True, sha256_digest(e1): True,
                    sha256_digest(plain): False, sha256_digest(lying): False}
    notes = {la.source_digest: la.note for la in report.layers}
    assert "reconverted" in notes[sha256_digest(lying)]
    assert checked.layer_files[4] == tar_files(l2)


def test_lying_annotation_alone_is_reconverted(tmp_path: Path,
                                               layer_tars: list[bytes]) -> None:
    e0, r0 = _estargz(layer_tars[0])
    b = LayoutBuilder(tmp_path / "src")
    b.tag(b.image([(e0, OCI_GZIP, {TOC_ANN: sha256_digest(b"wrong")})], [r0.diff_id]), "x")
    out = tmp_path / "out"
    [layer] = convert(f"oci:{b.finish()}", parse_image_ref(f"oci:{out}")).layers
    assert not layer.kept and "annotated as eStargz" in layer.note
    checked = check_image_manifest(out, _index(out)["manifests"][0])
    assert checked.layer_files[0] == tar_files(layer_tars[0])


def test_zstdchunked_layer_kept_gzip_estargz_reconverted(tmp_path: Path,
                                                         layer_tars: list[bytes]) -> None:
    z0, rz = _estargz(layer_tars[0], "zstd")
    e1, r1 = _estargz(layer_tars[1])
    b = LayoutBuilder(tmp_path / "src")
    b.tag(b.image([(z0, "application/vnd.oci.image.layer.v1.tar+zstd", None),
                   (e1, OCI_GZIP, dict(r1.annotations))], [rz.diff_id, r1.diff_id]), "z")
    out = tmp_path / "out"
    report = convert(f"oci:{b.finish()}", parse_image_ref(f"oci:{out}"),
                     ConvertOptions(compression="zstd"))
    assert [la.kept for la in report.layers] == [True, False]
    checked = check_image_manifest(out, _index(out)["manifests"][0], compression="zstd")
    assert checked.manifest["layers"][0]["digest"] == sha256_digest(z0)
    # The annotations we computed for the kept blob equal the builder's own.
    assert checked.manifest["layers"][0]["annotations"] == rz.annotations


def test_conversion_is_deterministic(sample_image: SampleImage, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    convert(f"oci:{sample_image.path}", parse_image_ref(f"oci:{a}"),
            ConvertOptions(layer_jobs=1, workers=1))
    convert(f"oci:{sample_image.path}", parse_image_ref(f"oci:{b}"),
            ConvertOptions(layer_jobs=2, workers=2))
    tree_a, tree_b = layout_tree(a), layout_tree(b)
    assert tree_a == tree_b
    assert len(tree_a) == 2 + 2 + 2  # oci-layout, index.json, manifest, config, 2 layers


def test_tampered_source_blob_fails_and_leaves_nothing(sample_image: SampleImage,
                                                       tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(sample_image.path, src)
    victim = src / "blobs" / "sha256" / sample_image.layer_digests[1][7:]
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises((BlobError, ConvertError)) as info:
        convert(f"oci:{src}", parse_image_ref(f"oci:{out}"))
    assert sample_image.layer_digests[1] in str(info.value)
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_existing_layout_gets_a_new_tag(sample_image: SampleImage, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(sample_image.path, out)
    convert(f"oci:{out}:latest", parse_image_ref(f"oci:{out}:esgz"))
    entries = _index(out)["manifests"]
    assert [e["annotations"][REF_NAME] for e in entries] == ["latest", "esgz"]
    assert entries[0]["digest"] == sample_image.manifest_digest
    check_image_manifest(out, entries[1])
    # Writing back under the source's own tag is refused (it would replace the source).
    with pytest.raises(ConvertError, match="replace the source image"):
        convert(f"oci:{out}:latest", parse_image_ref(f"oci:{out}"))
    _no_leftovers(tmp_path)


def test_prioritized_files_per_layer_and_missing_everywhere(tmp_path: Path,
                                                            layer_tars: list[bytes]) -> None:
    from peerstar.estargz import Reader

    e0, r0 = _estargz(layer_tars[0])  # already eStargz, but rebuilt for the priority list
    b = LayoutBuilder(tmp_path / "src")
    b.tag(b.image([(e0, OCI_GZIP, dict(r0.annotations)), (gz(layer_tars[1]), OCI_GZIP, None)],
                  [r0.diff_id, sha256_digest(layer_tars[1])]), "p")
    src = b.finish()
    out = tmp_path / "out"
    report = convert(f"oci:{src}", parse_image_ref(f"oci:{out}"),
                     ConvertOptions(prioritized=("data/small",)))
    assert [la.kept for la in report.layers] == [False, False]
    assert report.layers[0].missing_prioritized == ["data/small"]
    checked = check_image_manifest(out, _index(out)["manifests"][0])
    names = [e.name for e in Reader.from_bytes(
        read_blob(out, checked.manifest["layers"][1]["digest"])).entries]
    assert names.index("data/small") < names.index(".prefetch.landmark") < names.index(
        "data/big.bin")
    bad = tmp_path / "bad"
    with pytest.raises(ConvertError, match="'nowhere/file'.*in no layer"):
        convert(f"oci:{src}", parse_image_ref(f"oci:{bad}"),
                ConvertOptions(prioritized=("data/small", "nowhere/file")))
    assert not bad.exists()
    _no_leftovers(tmp_path)
