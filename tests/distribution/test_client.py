"""The distribution client (peerstar.distribution.client) against the real Debian
docker-registry: plain HTTP on loopback, and HTTPS with a test CA and htpasswd basic auth
in its own network namespace; synchronous, asyncio and trio; manifests (GET by tag and
by digest, HEAD), blobs (size, whole, ranges), and the errors with status and code."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
from collections.abc import Iterator

import pytest
import trio

from peerstar.distribution.auth import RegistryAuth
from peerstar.distribution.client import (
    AsyncRegistryClient,
    RegistryClient,
    RegistryError,
    blob_url,
    is_plain_http_host,
    registry_base,
)
from peerstar.oci import mediatypes as mt
from tests.support.containerd import HarnessError
from tests.support.content import sha256_digest
from tests.support.ports import free_port
from tests.support.registry import (
    DockerRegistry,
    PrivateRegistry,
    push_image,
    start_private_registry,
)

USER, PASSWORD = "dist-user-3b1d", "dist-Secret-77e0"
LAYER = gzip.compress(random.Random(7).randbytes(150_000), mtime=0)  # incompressible
REPO = "dist/client"


def _push(base: str) -> str:
    return push_image(base, REPO, "v1", [(LAYER, {})], [sha256_digest(b"diff")])


@pytest.fixture(scope="module")
def plain(docker_registry: DockerRegistry) -> tuple[DockerRegistry, str]:
    return docker_registry, _push(docker_registry.url)


@pytest.fixture(scope="module")
def private() -> Iterator[tuple[PrivateRegistry, str]]:
    try:
        reg = start_private_registry(USER, PASSWORD)
    except HarnessError as exc:
        pytest.fail(f"cannot start the private registry: {exc}", pytrace=False)
    try:
        yield reg, _push(reg.url)
    finally:
        reg.stop()


def test_where_a_registry_is() -> None:
    assert is_plain_http_host("localhost:5000") and is_plain_http_host("127.0.0.2")
    assert is_plain_http_host("[::1]:5000") and not is_plain_http_host("10.0.0.5:5000")
    assert registry_base("ghcr.io") == "https://ghcr.io"
    assert registry_base("localhost:5000") == "http://localhost:5000"
    assert registry_base("localhost:5000", plain_http=False) == "https://localhost:5000"
    assert registry_base("10.0.0.5:5000", plain_http=True) == "http://10.0.0.5:5000"
    assert blob_url("r.example", "a/b", "sha256:ab") == "https://r.example/v2/a/b/blobs/sha256:ab"


def test_manifests_and_blobs_over_plain_http(plain: tuple[DockerRegistry, str]) -> None:
    reg, digest = plain
    with RegistryClient(reg.host) as client:  # 127.0.0.1: plain HTTP by containerd's rule
        assert client.base == f"http://{reg.host}"
        by_tag = client.get_manifest(REPO, "v1")
        assert (by_tag.digest, by_tag.media_type) == (digest, mt.OCI_MANIFEST)
        assert client.get_manifest(REPO, digest).data == by_tag.data
        head = client.head_manifest(REPO, "v1")
        assert (head.digest, head.media_type, head.size) == (digest, mt.OCI_MANIFEST,
                                                              len(by_tag.data))
        layer = json.loads(by_tag.data)["layers"][0]["digest"]
        assert client.blob_size(REPO, layer) == len(LAYER)
        with client.open_blob(REPO, layer) as whole:
            assert (whole.status, whole.size, whole.read()) == (200, len(LAYER), LAYER)
        with client.open_blob(REPO, layer, start=1000, length=5000) as part:
            assert (part.status, part.size, part.read()) == (206, 5000, LAYER[1000:6000])
        with client.open_blob(REPO, layer, start=len(LAYER) - 10) as tail:
            assert tail.read() == LAYER[-10:]
        with pytest.raises(RegistryError) as past_the_end:
            client.open_blob(REPO, layer, start=len(LAYER) + 10, length=5)
        assert past_the_end.value.status == 416


def test_errors_carry_status_and_distribution_code(plain: tuple[DockerRegistry, str]
                                                   ) -> None:
    reg, _ = plain
    with RegistryClient(reg.host, label="docker://x/y:z") as client:
        with pytest.raises(RegistryError) as missing:
            client.get_manifest(REPO, "no-such-tag")
        assert (missing.value.status, missing.value.code) == (404, "MANIFEST_UNKNOWN")
        assert str(missing.value).startswith("docker://x/y:z: manifest no-such-tag: not found")
        with pytest.raises(RegistryError) as blob:
            client.open_blob(REPO, sha256_digest(b"absent"))
        assert (blob.value.status, blob.value.code) == (404, "BLOB_UNKNOWN")
        with pytest.raises(RegistryError) as head:
            client.blob_size(REPO, sha256_digest(b"absent"))
        assert head.value.status == 404  # a HEAD has no body: no code
    with RegistryClient(f"127.0.0.1:{free_port()}") as nobody:
        with pytest.raises(RegistryError, match="cannot connect to registry") as down:
            nobody.get_manifest(REPO, "v1")
        assert down.value.status is None
    with RegistryClient(reg.host, plain_http=False, timeout=5) as tls_to_plain:
        with pytest.raises(RegistryError, match="--plain-http"):
            tls_to_plain.get_manifest(REPO, "v1")


async def _read_async(host: str, digest: str, **kw: object) -> tuple[bytes, bytes, int]:
    async with AsyncRegistryClient(host, **kw) as client:  # type: ignore[arg-type]
        manifest = await client.get_manifest(REPO, "v1")
        assert manifest.digest == digest
        layer = json.loads(manifest.data)["layers"][0]["digest"]
        async with await client.open_blob(REPO, layer, start=10, length=100) as part:
            piece = await part.read()
        async with await client.open_blob(REPO, layer) as whole:
            data = await whole.read()
        return piece, data, await client.blob_size(REPO, layer)


def test_async_client_under_asyncio_and_trio(plain: tuple[DockerRegistry, str]) -> None:
    reg, digest = plain
    expected = (LAYER[10:110], LAYER, len(LAYER))
    assert asyncio.run(_read_async(reg.host, digest)) == expected
    assert trio.run(_read_async, reg.host, digest) == expected

    async def missing() -> RegistryError:
        async with AsyncRegistryClient(reg.host) as client:
            with pytest.raises(RegistryError) as exc:
                await client.head_manifest(REPO, "nope")
            return exc.value

    assert asyncio.run(missing()).status == 404


@pytest.mark.slow
def test_https_registry_with_basic_auth_sync_and_async(
        private: tuple[PrivateRegistry, str], monkeypatch: pytest.MonkeyPatch) -> None:
    reg, digest = private
    for var in ("SSL_CERT_FILE", "SSL_CERT_DIR"):  # only the test CA decides trust here
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("peerstar.distribution.tls._tls", {})
    auth = RegistryAuth(USER, PASSWORD)  # one auth object for both kinds of client
    with RegistryClient(reg.host, auth=auth, ca_file=str(reg.ca)) as client:
        assert client.base == f"https://{reg.host}"
        manifest = client.get_manifest(REPO, "v1")
        assert manifest.digest == digest
        layer = json.loads(manifest.data)["layers"][0]["digest"]
        with client.open_blob(REPO, layer, start=5, length=50) as part:
            assert part.read() == LAYER[5:55]
    assert asyncio.run(_read_async(reg.host, digest, auth=auth, ca_file=str(reg.ca))) == (
        LAYER[10:110], LAYER, len(LAYER))

    with RegistryClient(reg.host, ca_file=str(reg.ca)) as anonymous:
        with pytest.raises(RegistryError, match="authentication required") as refused:
            anonymous.get_manifest(REPO, "v1")
        assert (refused.value.status, refused.value.code) == (401, "UNAUTHORIZED")
    wrong = RegistryAuth(USER, "wrong")
    with RegistryClient(reg.host, auth=wrong, ca_file=str(reg.ca)) as client:
        with pytest.raises(RegistryError) as rejected:
            client.get_manifest(REPO, "v1")
        assert rejected.value.status == 401
    with RegistryClient(reg.host, auth=auth) as untrusting:  # no CA: the test CA is unknown
        with pytest.raises(RegistryError, match="not trusted") as untrusted:
            untrusting.get_manifest(REPO, "v1")
        assert untrusted.value.status is None and "CERTIFICATE_VERIFY_FAILED" in str(
            untrusted.value)
