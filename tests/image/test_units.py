"""Small pure functions of push/pull: docker references, Go-shaped JSON, platforms, CIDs
in image references, top-descriptor checks."""

from __future__ import annotations

import pytest

from peerstar.errors import PeerstarError
from peerstar.ipfs import compute_cid
from peerstar.ipfsimage.format import (
    go_descriptor,
    go_json,
    parse_image_cid,
    parse_top_descriptor,
)
from peerstar.oci.platform import parse_platform
from peerstar.source.docker import parse_credentials, parse_docker_ref


@pytest.mark.parametrize(("text", "host", "repo", "ref"), [
    ("docker://127.0.0.1:5000/a/b:v1", "127.0.0.1:5000", "a/b", "v1"),
    ("127.0.0.1:5000/a/b", "127.0.0.1:5000", "a/b", "latest"),
    ("localhost/x@sha256:" + "a" * 64, "localhost", "x", "sha256:" + "a" * 64),
    ("alpine:3.19", "registry-1.docker.io", "library/alpine", "3.19"),
    ("docker.io/library/alpine", "registry-1.docker.io", "library/alpine", "latest"),
    ("docker.io/alpine", "registry-1.docker.io", "library/alpine", "latest"),
    ("user/app:1", "registry-1.docker.io", "user/app", "1"),
    ("ghcr.io/o/r/s:t", "ghcr.io", "o/r/s", "t"),
])
def test_parse_docker_ref(text: str, host: str, repo: str, ref: str) -> None:
    r = parse_docker_ref(text)
    assert (r.host, r.repository, r.reference) == (host, repo, ref)


@pytest.mark.parametrize(("text", "needle"), [
    ("docker://", "empty docker reference"),
    ("h.io/Upper/x", "not a valid repository name"),
    ("h.io/x:bad tag", "not a valid tag"),
    ("h.io/x@sha256:zz", "not a valid digest"),
])
def test_parse_docker_ref_errors(text: str, needle: str) -> None:
    with pytest.raises(PeerstarError, match=needle):
        parse_docker_ref(text)


def test_credentials() -> None:
    assert parse_credentials("u:p:q") == ("u", "p:q")
    assert parse_credentials(None) is None
    with pytest.raises(PeerstarError, match="USER:PASSWORD"):
        parse_credentials(":p")


def test_go_json_and_descriptor_order() -> None:
    d = go_descriptor({"platform": {"variant": "v8", "os": "linux", "architecture": "arm64"},
                       "annotations": {"z": "<&>", "a": "\u2028"}, "urls": ["ipfs://x"],
                       "size": 1, "digest": "sha256:0", "mediaType": "m", "extra": True})
    assert go_json(d) == (
        b'{"mediaType":"m","digest":"sha256:0","size":1,"urls":["ipfs://x"],'
        b'"annotations":{"a":"\\u2028","z":"\\u003c\\u0026\\u003e"},'
        b'"platform":{"architecture":"arm64","os":"linux","variant":"v8"},"extra":true}')
    assert go_json({"é": 1}) == '{"é":1}'.encode()  # UTF-8, not \\u escapes, as Go


def test_parse_platform() -> None:
    assert parse_platform("linux/amd64") == ("linux", "amd64", None)
    assert parse_platform("Linux/aarch64/v8") == ("linux", "arm64", "v8")
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(PeerstarError, match="OS/ARCH"):
            parse_platform(bad)


def test_parse_image_cid() -> None:
    cid = compute_cid(b"x")
    v0 = "QmVkbauSDEaMP4Tkq6Epm9uW75mWm136n81YH8fGtfwdHU"
    assert parse_image_cid(f"ipfs://{cid}") == cid == parse_image_cid(f"/ipfs/{cid}")
    assert parse_image_cid(v0).startswith("bafybei")  # CIDv0 normalised to v1 base32
    with pytest.raises(PeerstarError, match="not an IPFS image reference"):
        parse_image_cid("bafy-not-a-cid")


def test_parse_top_descriptor() -> None:
    good = (b'{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"sha256:'
            + b"a" * 64 + b'","size":3,"urls":["ipfs://x"]}')
    assert parse_top_descriptor(good, where="w")["size"] == 3
    with pytest.raises(PeerstarError, match="not JSON"):
        parse_top_descriptor(b"\xff", where="w")
    with pytest.raises(PeerstarError, match="mediaType/digest/size"):
        parse_top_descriptor(b"[1]", where="w")
    with pytest.raises(PeerstarError, match="not a valid digest"):
        parse_top_descriptor(b'{"mediaType":"m","digest":"sha256:1","size":1}', where="w")
