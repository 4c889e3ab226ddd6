"""Bad input to `peerstar push` / `peerstar pull`: each a one-line error, a non-zero exit,
no traceback, and nothing half-written left behind."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peerstar.ipfs import compute_cid
from peerstar.source.sample import SampleImage
from tests.image.conftest import (
    NERDCTL,
    FakeRegistry,
    RegistryImage,
    add,
    leftovers,
)
from tests.support.cli import assert_one_line_error, last_line, run_peerstar
from tests.support.content import compact_json, sha256_digest
from tests.support.jsipfs import JsIpfs
from tests.support.ports import free_port

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _fixture_manifest() -> tuple[dict[str, Any], dict[str, str]]:
    """The nerdctl fixture's pushed manifest and {digest: cid} of its files."""
    cids = {sha256_digest(p.read_bytes()): p.name for p in (NERDCTL / "ipfs").iterdir()}
    root = json.loads((NERDCTL / "ipfs" / (NERDCTL / "ROOT_CID").read_text().strip())
                      .read_bytes())
    index = json.loads((NERDCTL / "ipfs" / cids[root["digest"]]).read_bytes())
    m_desc = index["manifests"][0]
    manifest = json.loads((NERDCTL / "ipfs" / cids[m_desc["digest"]]).read_bytes())
    return manifest, cids


def _add_fixture(store_args: list[str]) -> None:
    for path in sorted((NERDCTL / "ipfs").iterdir()):
        assert add(store_args, path.read_bytes()) == path.name


def _add_image(store_args: list[str], manifest: dict[str, Any]) -> str:
    """Add `manifest` and its descriptor; the descriptor's CID."""
    data = compact_json(manifest)
    cid = add(store_args, data)
    return add(store_args, compact_json({"mediaType": MANIFEST, "digest": sha256_digest(data),
                                         "size": len(data), "urls": [f"ipfs://{cid}"]}))


def _pull_fails(store_args: list[str], cid: str, tmp_path: Path, *needles: str,
                extra: tuple[str, ...] = ()) -> str:
    out = tmp_path / "out"
    res = run_peerstar("pull", *store_args, *extra, cid, "--output", f"oci:{out}")
    line = assert_one_line_error(res, *needles)
    assert not out.exists()
    assert leftovers(tmp_path) == []
    return line


def test_unknown_cid_embedded(tmp_path: Path) -> None:
    args = ["--root", str(tmp_path / "store")]
    cid = compute_cid(b"never added anywhere")
    _pull_fails(args, cid, tmp_path, f"ipfs://{cid}", "is not in the embedded store")


def test_unknown_cid_daemon_is_bounded(image_jsipfs: JsIpfs, tmp_path: Path) -> None:
    args = ["--ipfs-address", image_jsipfs.api_multiaddr]
    cid = compute_cid(os.urandom(64))  # no node anywhere has it
    start = time.monotonic()
    line = _pull_fails(args, cid, tmp_path, f"ipfs://{cid}", "did not answer", "within 2 s",
                       extra=("--timeout", "2", "--retries", "1"))
    elapsed = time.monotonic() - start
    assert 4 <= elapsed < 20, (elapsed, line)  # two tries of 2 s plus backoff, not forever


def test_cid_that_is_not_a_descriptor(store_args: list[str], tmp_path: Path) -> None:
    text = add(store_args, b"hello, not json\n")
    _pull_fails(store_args, text, tmp_path, "is not an image descriptor", "not JSON")
    manifest, _ = _fixture_manifest()
    doc = add(store_args, compact_json(manifest))
    _pull_fails(store_args, doc, tmp_path, "is not an image descriptor",
                "a manifest or index, not its descriptor")
    big = add(store_args, os.urandom(300 << 10))
    _pull_fails(store_args, big, tmp_path, "too large to be an image descriptor")
    layer = manifest["layers"][0]
    layer_desc = add(store_args, compact_json({k: layer[k] for k in ("mediaType", "digest",
                                                                     "size", "urls")}))
    _pull_fails(store_args, layer_desc, tmp_path, "not an image manifest or index")


def test_descriptor_without_ipfs_url(store_args: list[str], tmp_path: Path) -> None:
    _add_fixture(store_args)
    manifest, cids = _fixture_manifest()
    data = compact_json(manifest)
    # The top descriptor has no urls at all.
    bare = add(store_args, compact_json({"mediaType": MANIFEST, "digest": sha256_digest(data),
                                         "size": len(data)}))
    _pull_fails(store_args, bare, tmp_path, "has no ipfs:// URL", sha256_digest(data))
    # A layer whose only URL is http(s): nerdctl replaces those, so it was not pushed.
    layer = manifest["layers"][0]
    layer["urls"] = ["https://example.invalid/layer"]
    cid = _add_image(store_args, manifest)
    _pull_fails(store_args, cid, tmp_path, "has no ipfs:// URL", layer["digest"],
                "https://example.invalid/layer")


def test_tampered_blob_is_rejected(store_args: list[str], tmp_path: Path) -> None:
    _add_fixture(store_args)
    manifest, cids = _fixture_manifest()
    layer = manifest["layers"][0]
    original = (NERDCTL / "ipfs" / cids[layer["digest"]]).read_bytes()
    # Same size, one byte changed: only the digest check can catch it.
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    layer["urls"] = [f"ipfs://{add(store_args, bytes(tampered))}"]
    cid = _add_image(store_args, manifest)
    _pull_fails(store_args, cid, tmp_path, layer["digest"], f"hashes to {sha256_digest(tampered)}",
                "rejected")
    # Longer than its descriptor says.
    layer["urls"] = [f"ipfs://{add(store_args, original + b'x')}"]
    cid = _add_image(store_args, manifest)
    _pull_fails(store_args, cid, tmp_path, layer["digest"], "more than", "rejected")


def test_daemon_down(sample_image: SampleImage, tmp_path: Path) -> None:
    addr = f"/ip4/127.0.0.1/tcp/{free_port()}"  # nothing listens there
    res = run_peerstar("push", "--ipfs-address", addr, "--retries", "0",
                       f"oci:{sample_image.path}")
    assert_one_line_error(res, f"no IPFS API at {addr}", "drop --ipfs-address")
    assert res.stdout == ""
    # The daemon is checked before the source is read (or converted): the registry below
    # does not exist, yet the error is about the daemon.
    res = run_peerstar("push", "--ipfs-address", addr, "--retries", "0", "--estargz",
                       "--plain-http", f"127.0.0.1:{free_port()}/no/registry:1")
    assert_one_line_error(res, f"no IPFS API at {addr}")
    _pull_fails(["--ipfs-address", addr], compute_cid(b"x"), tmp_path,
                f"no IPFS API at {addr}", extra=("--retries", "0"))


def test_registry_errors(registry_image: RegistryImage, fake_registry: Any,
                         sample_image: SampleImage, tmp_path: Path) -> None:
    store = ["--root", str(tmp_path / "store")]
    host = registry_image.registry.host
    res = run_peerstar("push", *store, "--plain-http", f"docker://{host}/peerstar/nothing:v1")
    assert_one_line_error(res, f"docker://{host}/peerstar/nothing:v1", "manifest v1",
                          "not found")
    res = run_peerstar("push", *store, "--plain-http",
                       f"{registry_image.registry.host}/{registry_image.repository}:no-tag")
    assert_one_line_error(res, "not found")

    denied: FakeRegistry = fake_registry(layout=sample_image.path, token="t",
                                         token_status=401)
    res = run_peerstar("push", *store, "--plain-http", f"{denied.host}/private/image:1")
    assert_one_line_error(res, "token service", "refused access (HTTP 401)")

    broken: FakeRegistry = fake_registry(fail_status=500)
    res = run_peerstar("push", *store, "--plain-http", f"{broken.host}/any/image:1")
    assert_one_line_error(res, "registry error (HTTP 500)", "UNKNOWN boom")

    unauthorized: FakeRegistry = fake_registry(fail_status=401)
    res = run_peerstar("push", *store, "--plain-http", f"{unauthorized.host}/any/image:1")
    assert_one_line_error(res, "authentication required")

    # HTTPS to a plain-HTTP registry: the hint names --plain-http.
    res = run_peerstar("push", *store, "--timeout", "5", f"{broken.host}/any/image:1")
    assert_one_line_error(res, f"registry {broken.host}", "--plain-http")
    # Nothing was added for any of them.
    assert not (tmp_path / "store" / "pins").exists() or \
        list((tmp_path / "store" / "pins").iterdir()) == []


def test_bad_arguments(sample_image: SampleImage, tmp_path: Path) -> None:
    store = ["--root", str(tmp_path / "store")]
    assert_one_line_error(run_peerstar("push", *store, f"oci:{tmp_path / 'nope'}"),
                          "does not exist")
    assert_one_line_error(run_peerstar("push", *store, "dir:/x"), "unknown transport")
    assert_one_line_error(run_peerstar("push", *store, str(sample_image.path)),
                          "is a local path", f"write oci:{sample_image.path}")
    assert_one_line_error(run_peerstar("push", *store, "docker://Bad Name"),
                          "not a valid repository name")
    assert_one_line_error(run_peerstar("pull", *store, "notacid", "-o", f"oci:{tmp_path}/o"),
                          "is not an IPFS image reference")
    assert_one_line_error(run_peerstar("pull", *store, "https://x/y", "-o", "oci:o"),
                          "give ipfs://CID")
    assert_one_line_error(run_peerstar("pull", *store, compute_cid(b"a"), "-o",
                                       f"docker-archive:{tmp_path}/x.tar"), "use oci:DIR")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert_one_line_error(run_peerstar("pull", *store, compute_cid(b"a"), "-o",
                                       f"oci:{busy}"), "not an OCI image layout")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert leftovers(tmp_path) == []
    assert_one_line_error(run_peerstar("push", *store, "--timeout", "0",
                                       f"oci:{sample_image.path}"), "--timeout")


def _limit_file_size() -> None:
    # Any write past 64 KiB fails with EFBIG, as a full disk fails with ENOSPC.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_write_failure_while_pulling_leaves_nothing(sample_image: SampleImage,
                                                    tmp_path: Path) -> None:
    store = ["--root", str(tmp_path / "store")]
    res = run_peerstar("push", *store, f"oci:{sample_image.path}")
    assert res.returncode == 0, res.stderr
    cid = last_line(res)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    res = run_peerstar("pull", *store, cid, "-o", f"oci:{out}", preexec_fn=_limit_file_size)
    assert_one_line_error(res, f"{out}: writing", "File too large", "nothing was written")
    assert list(work.iterdir()) == []


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_disk_full_while_pulling_leaves_nothing(sample_image: SampleImage,
                                                tmp_path: Path) -> None:
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    store = ["--root", str(tmp_path / "store")]
    res = run_peerstar("push", *store, f"oci:{sample_image.path}")
    assert res.returncode == 0, res.stderr
    with _tmpfs(tmp_path / "small", "512k") as small:
        out = small / "out"
        res = run_peerstar("pull", *store, last_line(res), "-o", f"oci:{out}")
        assert_one_line_error(res, "disk full", "nothing was written")
        assert list(small.iterdir()) == []


def test_push_refuses_a_corrupt_source_blob(store_args: list[str], sample_image: SampleImage,
                                            tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(sample_image.path, layout)
    # Both layers corrupted (same size): two transfers fail, one error is reported.
    for digest in sample_image.layer_digests:
        path = layout / "blobs" / "sha256" / digest.split(":")[1]
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
    res = run_peerstar("push", *store_args, f"oci:{layout}")
    line = assert_one_line_error(res, "the image is corrupt or was modified")
    assert any(d in line for d in sample_image.layer_digests)
    assert res.stdout == ""
