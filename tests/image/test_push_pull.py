"""`peerstar push` / `peerstar pull` on both backends: nerdctl's on-IPFS format (checked
against a fixture written as nerdctl writes it), stable CIDs, every source transport,
platform selection, and pulled layouts that skopeo reads."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from peerstar.estargz import Reader
from peerstar.ipfs import compute_cid
from peerstar.source.sample import SampleImage, build_sample_docker_archive
from tests.image.conftest import (
    NERDCTL,
    FakeRegistry,
    RegistryImage,
    add,
    cat,
    leftovers,
)
from tests.support.cli import assert_one_line_error, last_line, run_peerstar
from tests.support.containerd import HarnessError, require_binaries
from tests.support.content import compact_json, sha256_digest

OCI_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
}
DESCRIPTOR_KEYS = ["mediaType", "digest", "size", "urls", "annotations", "platform"]


def _push(store_args: list[str], *args: str | Path) -> str:
    res = run_peerstar("push", *store_args, *args)
    assert res.returncode == 0, res.stderr
    cid = last_line(res)
    assert cid.startswith(("bafk", "bafy")), res.stdout
    return cid


def _check_descriptor(desc: dict[str, Any], store_args: list[str],
                      seen: dict[str, bytes]) -> None:
    """Recursively check a pushed descriptor and what it points to (nerdctl's shape)."""
    keys = list(desc)
    assert keys == [k for k in DESCRIPTOR_KEYS if k in desc], keys  # Go field order
    assert desc["mediaType"] in OCI_TYPES
    [url] = desc["urls"]
    assert url.startswith("ipfs://")
    cid = url[len("ipfs://"):]
    data = cat(store_args, cid)
    assert compute_cid(data) == cid  # added with kubo's --cid-version=1 layout
    assert len(data) == desc["size"] and sha256_digest(data) == desc["digest"]
    seen[desc["digest"]] = data
    if "annotations" in desc:
        assert list(desc["annotations"]) == sorted(desc["annotations"])
    kind = desc["mediaType"].rsplit(".", 2)[-2]
    if kind in ("index", "manifest"):
        doc = json.loads(data)
        # Compact, as Go's json.Marshal writes it.
        assert json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode() == data
        assert doc["schemaVersion"] == 2 and doc["mediaType"] == desc["mediaType"]
        children = doc["manifests"] if kind == "index" else [doc["config"], *doc["layers"]]
        expected = (["schemaVersion", "mediaType", "manifests"] if kind == "index"
                    else ["schemaVersion", "mediaType", "config", "layers"])
        assert [k for k in doc if k != "annotations"] == expected
        for child in children:
            _check_descriptor(child, store_args, seen)


def _check_pushed(store_args: list[str], cid: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    root = cat(store_args, cid)
    top = json.loads(root)
    assert list(top) == ["mediaType", "digest", "size", "urls"]
    assert compact_json(top) == root
    seen: dict[str, bytes] = {}
    _check_descriptor(top, store_args, seen)
    return top, seen


def test_push_has_nerdctl_shape_and_stable_cid(store_args: list[str],
                                               sample_image: SampleImage) -> None:
    cid = _push(store_args, f"oci:{sample_image.path}")
    top, blobs = _check_pushed(store_args, cid)
    assert top["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    manifest = json.loads(blobs[top["digest"]])
    # Layers and config are the source's bytes, untouched.
    assert [d["digest"] for d in manifest["layers"]] == sample_image.layer_digests
    assert manifest["config"]["digest"] == sample_image.config_digest
    for layer in manifest["layers"]:
        src = sample_image.path / "blobs" / "sha256" / layer["digest"].split(":")[1]
        assert blobs[layer["digest"]] == src.read_bytes()
    # The rewritten manifest is the source manifest plus urls, nothing else.
    src_manifest = json.loads((sample_image.path / "blobs" / "sha256" /
                               sample_image.manifest_digest.split(":")[1]).read_bytes())
    for d in [manifest["config"], *manifest["layers"]]:
        d.pop("urls")
    assert manifest == src_manifest
    # Re-pushing, with or without the tag, gives the same CID.
    assert _push(store_args, f"oci:{sample_image.path}:latest") == cid


def test_push_matches_nerdctl_fixture(store_args: list[str]) -> None:
    """Pushing the fixture's source image gives nerdctl's bytes and CIDs exactly."""
    root_cid = (NERDCTL / "ROOT_CID").read_text().strip()
    cid = _push(store_args, f"oci:{NERDCTL / 'source'}")
    assert cid == root_cid
    for path in sorted((NERDCTL / "ipfs").iterdir()):
        assert cat(store_args, path.name) == path.read_bytes(), path.name
    top, _ = _check_pushed(store_args, cid)
    assert top["mediaType"] == "application/vnd.oci.image.index.v1+json"


def test_pull_nerdctl_fixture(store_args: list[str], tmp_path: Path) -> None:
    """A nerdctl-format image, added file by file as nerdctl adds it, pulls into a layout."""
    for path in sorted((NERDCTL / "ipfs").iterdir()):
        assert add(store_args, path.read_bytes()) == path.name
    root_cid = (NERDCTL / "ROOT_CID").read_text().strip()
    top = json.loads((NERDCTL / "ipfs" / root_cid).read_bytes())
    out = tmp_path / "pulled"
    res = run_peerstar("pull", *store_args, f"ipfs://{root_cid}", "--output", f"oci:{out}")
    assert res.returncode == 0, res.stderr
    assert last_line(res) == top["digest"]
    index = json.loads((out / "index.json").read_bytes())
    [entry] = index["manifests"]
    assert entry == {"mediaType": top["mediaType"], "digest": top["digest"],
                     "size": top["size"],
                     "annotations": {"org.opencontainers.image.ref.name": "latest"}}
    stored = {p.name: p.read_bytes() for p in (out / "blobs" / "sha256").iterdir()}
    expected = {hashlib.sha256(p.read_bytes()).hexdigest(): p.read_bytes()
                for p in (NERDCTL / "ipfs").iterdir() if p.name != root_cid}
    assert stored == expected  # index, manifest (with urls), config, layer: byte for byte
    p_index = json.loads(expected[top["digest"].split(":")[1]])
    manifest = json.loads(expected[p_index["manifests"][0]["digest"].split(":")[1]])
    layer = manifest["layers"][0]
    blob = stored[layer["digest"].split(":")[1]]
    reader = Reader.from_bytes(blob, toc_digest=layer["annotations"][
        "containerd.io/snapshot/stargz/toc.digest"])
    assert reader.read("hello.txt") == (NERDCTL / "HELLO").read_bytes()
    assert leftovers(tmp_path) == []


def test_same_cid_from_registry_and_layout(registry_image: RegistryImage,
                                           sample_image: SampleImage, tmp_path: Path) -> None:
    """docker://, a bare reference and oci: give the same image, so the same CID."""
    args = ["--root", str(tmp_path / "store")]
    from_layout = _push(args, f"oci:{sample_image.path}")
    from_registry = _push(args, "--plain-http", f"docker://{registry_image.ref}")
    bare = _push(args, "--plain-http", registry_image.ref)
    assert from_layout == from_registry == bare


def test_docker_archive_gets_oci_types(tmp_path: Path) -> None:
    image = build_sample_docker_archive(tmp_path / "d.tar")
    args = ["--root", str(tmp_path / "store")]
    cid = _push(args, f"docker-archive:{image.path}")
    top, blobs = _check_pushed(args, cid)
    manifest = json.loads(blobs[top["digest"]])
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    # docker save writes plain tars: named by what the bytes are, not "gzip".
    for layer in manifest["layers"]:
        data = blobs[layer["digest"]]
        want = ("application/vnd.oci.image.layer.v1.tar+gzip" if data[:2] == b"\x1f\x8b"
                else "application/vnd.oci.image.layer.v1.tar")
        assert layer["mediaType"] == want
    assert [sha256_digest(blobs[d["digest"]]) for d in manifest["layers"]] == \
        [d["digest"] for d in manifest["layers"]]
    out = tmp_path / "out"
    res = run_peerstar("pull", *args, cid, "-o", f"oci:{out}:t1")
    assert res.returncode == 0, res.stderr


def test_bearer_token_registry(fake_registry: Any, sample_image: SampleImage,
                               tmp_path: Path) -> None:
    reg: FakeRegistry = fake_registry(layout=sample_image.path, token="s3cret")
    args = ["--root", str(tmp_path / "store")]
    cid = _push(args, "--plain-http", f"docker://{reg.host}/peerstar/sample:latest")
    assert cid == _push(args, f"oci:{sample_image.path}")
    tokens = [r for r in reg.requests if r[1].startswith("/token")]
    assert len(tokens) == 1  # one token, reused for every request
    assert "scope=repository%3Ax%2Fy%3Apull" in tokens[0][1]
    authed = [r for r in reg.requests if r[1].startswith("/v2/") and r[2]]
    assert authed and all(r[2] == "Bearer s3cret" for r in authed)


def test_bearer_token_with_credentials(fake_registry: Any, sample_image: SampleImage,
                                       tmp_path: Path) -> None:
    reg: FakeRegistry = fake_registry(layout=sample_image.path, token="t0k",
                                      token_user=("alice", "pw:with:colons"))
    args = ["--root", str(tmp_path / "store")]
    ref = f"docker://{reg.host}/private/sample:latest"
    cid = _push(args, "--plain-http", "--creds", "alice:pw:with:colons", ref)
    assert cid == _push(args, f"oci:{sample_image.path}")
    res = run_peerstar("push", *args, "--plain-http", ref)
    assert_one_line_error(res, "token service", "refused access (HTTP 401)")
    res = run_peerstar("push", *args, "--plain-http", "--creds", "alice:wrong", ref)
    assert_one_line_error(res, "refused access (HTTP 401)")
    assert_one_line_error(run_peerstar("push", *args, "--creds", "nopassword", ref),
                          "--creds must be USER:PASSWORD")


def _two_platform_layout(sample_image: SampleImage, dst: Path) -> tuple[str, str]:
    """A copy of the sample layout whose top is an index of the sample manifest for
    linux/amd64 and for linux/arm64 (the same manifest bytes: enough for selection)."""
    shutil.copytree(sample_image.path, dst)
    m_digest = sample_image.manifest_digest
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m_digest,
             "size": sample_image.manifest_size}
    # Two distinct manifests: the arm64 one carries an annotation so its digest differs.
    manifest = json.loads((dst / "blobs" / "sha256" / m_digest.split(":")[1]).read_bytes())
    manifest["annotations"] = {"test": "arm64"}
    arm = compact_json(manifest)
    (dst / "blobs" / "sha256" / sha256_digest(arm).split(":")[1]).write_bytes(arm)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [
                 {**entry, "platform": {"architecture": "amd64", "os": "linux"}},
                 {**entry, "digest": sha256_digest(arm), "size": len(arm),
                  "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}}]}
    data = compact_json(index)
    (dst / "blobs" / "sha256" / sha256_digest(data).split(":")[1]).write_bytes(data)
    (dst / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": index["mediaType"], "digest": sha256_digest(data), "size": len(data),
        "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))
    return m_digest, sha256_digest(arm)


def test_platform_selection(sample_image: SampleImage, tmp_path: Path) -> None:
    amd, arm = _two_platform_layout(sample_image, tmp_path / "multi")
    args = ["--root", str(tmp_path / "store")]
    src = f"oci:{tmp_path / 'multi'}:multi"

    def platforms(cid: str) -> list[tuple[str, str]]:
        top, blobs = _check_pushed(args, cid)
        index = json.loads(blobs[top["digest"]])
        return [(m["platform"]["architecture"], m["digest"]) for m in index["manifests"]]

    every = platforms(_push(args, "--all-platforms", src))
    assert [a for a, _ in every] == ["amd64", "arm64"]
    only_arm = platforms(_push(args, "--platform", "linux/arm64", src))
    assert [a for a, _ in only_arm] == ["arm64"]
    both = platforms(_push(args, "--platform", "linux/arm64", "--platform", "linux/amd64", src))
    assert both == every
    res = run_peerstar("push", *args, "--platform", "linux/s390x", src)
    assert_one_line_error(res, "no manifest for platform linux/s390x", "amd64", "arm64/v8")
    res = run_peerstar("push", *args, "--platform", "linux", src)
    assert_one_line_error(res, "expected OS/ARCH")


@pytest.mark.slow
def test_skopeo_reads_pulled_layout(sample_image: SampleImage, tmp_path: Path) -> None:
    try:
        skopeo = require_binaries("skopeo")["skopeo"]
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    args = ["--root", str(tmp_path / "store")]
    cid = _push(args, f"oci:{sample_image.path}")
    out = tmp_path / "pulled"
    res = run_peerstar("pull", *args, cid, "--output", f"oci:{out}:v2")
    assert res.returncode == 0, res.stderr
    info = json.loads(subprocess.run([skopeo, "inspect", f"oci:{out}:v2"], check=True,
                                     capture_output=True, timeout=60).stdout)
    assert info["Layers"] == sample_image.layer_digests
    # skopeo copies it on (every blob present and verified by skopeo).
    subprocess.run([skopeo, "copy", f"oci:{out}:v2", f"oci:{tmp_path / 'copy'}:v2"],
                   check=True, capture_output=True, timeout=120)
    assert (tmp_path / "copy" / "index.json").is_file()


def test_pull_skips_other_platforms_not_in_ipfs(store_args: list[str], tmp_path: Path) -> None:
    """nerdctl pushes only the selected platform and leaves the other index entries
    without URLs: pull takes the host's entry and leaves those out, saying so."""
    from peerstar.oci.platform import host_platform

    for path in sorted((NERDCTL / "ipfs").iterdir()):
        assert add(store_args, path.read_bytes()) == path.name
    root_cid = (NERDCTL / "ROOT_CID").read_text().strip()
    top = json.loads((NERDCTL / "ipfs" / root_cid).read_bytes())
    by_digest = {sha256_digest(p.read_bytes()): p for p in (NERDCTL / "ipfs").iterdir()}
    index = json.loads(by_digest[top["digest"]].read_bytes())
    os_, arch, _ = host_platform()
    [entry] = index["manifests"]
    entry["platform"] = {"architecture": arch, "os": os_}
    other = {"mediaType": entry["mediaType"], "digest": sha256_digest(b"never pushed"), "size": 12,
             "platform": {"architecture": "s390x" if arch != "s390x" else "ppc64le",
                          "os": "linux"}}
    index["manifests"] = [entry, other]

    def push_index(doc: dict[str, Any]) -> str:
        data = compact_json(doc)
        icid = add(store_args, data)
        return add(store_args, compact_json({
            "mediaType": doc["mediaType"], "digest": sha256_digest(data), "size": len(data),
            "urls": [f"ipfs://{icid}"]}))

    out = tmp_path / "pulled"
    res = run_peerstar("pull", *store_args, push_index(index), "-o", f"oci:{out}")
    assert res.returncode == 0, res.stderr
    assert f"left out: platforms linux/{other['platform']['architecture']}" in res.stderr
    blobs = {p.name for p in (out / "blobs" / "sha256").iterdir()}
    assert entry["digest"].split(":")[1] in blobs
    assert other["digest"].split(":")[1] not in blobs
    # The host's own entry must be in IPFS.
    index["manifests"] = [{k: v for k, v in entry.items() if k != "urls"}, other]
    res = run_peerstar("pull", *store_args, push_index(index), "-o", f"oci:{tmp_path / 'o2'}")
    assert_one_line_error(res, "has no ipfs:// URL", entry["digest"])
    assert not (tmp_path / "o2").exists()
