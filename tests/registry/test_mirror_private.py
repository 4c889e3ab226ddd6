"""Private images through the mirror (peerstar.registry.mirror, issue 16 item 5): a real
TLS + htpasswd docker-registry upstream (tests.support.registry.PrivateRegistry, in its own
network namespace) holding a private repository, and the bridge over the embedded store.

"Another bridge holds it" is a directory record naming a CID in the node's store, as the
other mirror tests do. Checked: content the cluster holds is served only to a request whose
credentials the upstream accepts for that repository and that digest (anonymous: the
upstream's 401 and its challenge; wrong credentials: 401); with the right ones it comes
from the cluster, with no blob bytes from the upstream; a grant for repository X does not
open a digest of Y through X's name; grants are cached for the TTL, per credential; with
the upstream down only public content, or content granted to this credential, is served.
With a real containerd (ctr --hosts-dir, and the CRI plugin with config_path): how the
credentials of a pull reach the bridge as mirror host (docs/mirror.md).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerstar.ipfs import EmbeddedStore
from peerstar.registry import ReadPolicy, ServerOptions
from peerstar.registry.directory import Record
from peerstar.registry.mirror import Mirror, MirrorOptions, _credential
from peerstar.registry.origin import parse_mirror
from peerstar.source.sample import SampleImage, build_sample_image
from tests.registry.harness import ThreadedRegistry
from tests.registry.helpers import Reply, request
from tests.support.containerd import CriOptions, HarnessError, start_containerd
from tests.support.cri.client import CriImages
from tests.support.registry import (
    MANIFEST_ACCEPT,
    PrivateRegistry,
    push_layout,
    start_private_registry,
)

pytestmark = pytest.mark.slow

USER, PASSWORD = "bob-5d2a", "pw-Private-91c4"
TTL = 1.0


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode())
            .decode()}


RIGHT = _basic(USER, PASSWORD)
WRONG = _basic(USER, "not-the-password")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[SampleImage, SampleImage]:
    work = tmp_path_factory.mktemp("mirror-private-images")
    return (build_sample_image(work / "private", extra_mib=1),
            build_sample_image(work / "app", extra_mib=2))


def _start(images: tuple[SampleImage, SampleImage]) -> PrivateRegistry:
    try:
        reg = start_private_registry(USER, PASSWORD)
    except HarnessError as exc:
        pytest.fail(f"cannot start the private registry: {exc}", pytrace=False)
    try:
        push_layout(reg.url, "team/private", "1", images[0].path)
        push_layout(reg.url, "team/app", "1", images[1].path)
    except BaseException:
        reg.stop()
        raise
    return reg


@pytest.fixture(scope="module")
def upstream(images: tuple[SampleImage, SampleImage]) -> Iterator[PrivateRegistry]:
    reg = _start(images)
    try:
        yield reg
    finally:
        reg.stop()


def _bridge(reg: PrivateRegistry, root: Path) -> ThreadedRegistry:
    mirror = MirrorOptions(upstreams=(parse_mirror(reg.url),), ca_file=str(reg.ca),
                           tag_ttl=TTL, access_ttl=TTL, offline_grace=600.0,
                           lookup_timeout=0.02, upstream_timeout=5.0)
    options = ServerOptions(policy=ReadPolicy(timeout=5.0, retries=1), warm_up=False,
                            mirror=mirror)
    return ThreadedRegistry(lambda: EmbeddedStore(root / "store"), options)


@pytest.fixture
def bridge(upstream: PrivateRegistry, tmp_path: Path) -> Iterator[ThreadedRegistry]:
    with _bridge(upstream, tmp_path) as reg:
        yield reg


def _get(bridge: ThreadedRegistry, ns: str, path: str, method: str = "GET",
         headers: dict[str, str] | None = None) -> Reply:
    return request(bridge.host, method, f"/v2/{path}?ns={ns}",
                   {"Accept": MANIFEST_ACCEPT, **(headers or {})})


def _mirror(bridge: ThreadedRegistry) -> Mirror:
    assert bridge.server is not None and bridge.server.mirror is not None
    return bridge.server.mirror


def _blob(image: SampleImage, digest: str) -> bytes:
    return (image.path / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def _held_by_a_peer(bridge: ThreadedRegistry, digest: str, data: bytes,
                    public: bool = False) -> str:
    """Another bridge verified `digest` and announced its CID (the content is in the
    cluster); returns the CID."""
    cid = bridge.run(bridge.store.add(data))
    _mirror(bridge).directory._remember(Record(digest, cid, len(data),
                                               "application/octet-stream", public=public))
    return cid


def _private_layer(images: tuple[SampleImage, SampleImage]) -> str:
    [layer] = [d for d in images[0].layer_digests if d not in images[1].layer_digests]
    return layer


def test_cluster_content_needs_the_upstreams_yes(bridge: ThreadedRegistry,
                                                 upstream: PrivateRegistry,
                                                 images: tuple[SampleImage, SampleImage]
                                                 ) -> None:
    ns, mirror = upstream.host, _mirror(bridge)
    layer = _private_layer(images)
    data = _blob(images[0], layer)
    cid = _held_by_a_peer(bridge, layer, data)
    path = f"team/private/blobs/{layer}"
    for method, extra in (("GET", {}), ("HEAD", {}), ("GET", {"Range": "bytes=0-99"})):
        r = _get(bridge, ns, path, method, extra)
        assert r.status == 401, (method, extra, r.status)
        assert r.headers["www-authenticate"] == 'Basic realm="peerstar-test"'
        if method == "GET":
            assert r.error_code() == "UNAUTHORIZED"
    r = _get(bridge, ns, path, headers=WRONG)
    assert (r.status, r.error_code()) == (401, "UNAUTHORIZED")
    r = _get(bridge, ns, "team/private/manifests/1")  # a tag: the upstream's challenge
    assert r.status == 401 and "www-authenticate" in r.headers
    r = _get(bridge, ns, f"team/private/manifests/{images[0].manifest_digest}")
    assert r.status == 401 and "www-authenticate" in r.headers
    assert mirror.counts["upstream_bytes"] == 0 and mirror.counts["cluster_hits"] == 0
    # The right credentials: from the cluster, no blob bytes from the upstream.
    r = _get(bridge, ns, path, headers=RIGHT)
    assert r.status == 200 and r.body == data
    assert mirror.counts["upstream_bytes"] == 0 and mirror.counts["upstream_fetches"] == 0
    assert mirror.counts["cluster_hits"] == 1
    # Kept and announced as not public: the upstream refused an anonymous HEAD.
    own = mirror.directory.own[layer]
    assert own.value == cid and own.public is False
    # Now held by this node too: still refused without credentials.
    r = _get(bridge, ns, path)
    assert r.status == 401 and r.headers["www-authenticate"] == 'Basic realm="peerstar-test"'
    r = _get(bridge, ns, "team/private/manifests/1", headers=RIGHT)
    assert r.status == 200 and r.headers["docker-content-digest"] == \
        images[0].manifest_digest


def test_a_grant_is_per_digest_not_per_repository(bridge: ThreadedRegistry,
                                                  upstream: PrivateRegistry,
                                                  images: tuple[SampleImage, SampleImage]
                                                  ) -> None:
    ns, mirror = upstream.host, _mirror(bridge)
    own_layer = images[1].layer_digests[-1]
    assert _get(bridge, ns, f"team/app/blobs/{own_layer}", headers=RIGHT).body == \
        _blob(images[1], own_layer)
    layer = _private_layer(images)
    _held_by_a_peer(bridge, layer, _blob(images[0], layer))
    # Allowed to pull team/app, asking for a digest of team/private through team/app's name.
    r = _get(bridge, ns, f"team/app/blobs/{layer}", headers=RIGHT)
    assert (r.status, r.error_code()) == (404, "BLOB_UNKNOWN")
    r = _get(bridge, ns, f"team/app/manifests/{images[0].manifest_digest}", headers=RIGHT)
    assert (r.status, r.error_code()) == (404, "MANIFEST_UNKNOWN")
    assert mirror.counts["cluster_hits"] == 0


def test_grants_are_cached_for_the_ttl_per_credential(bridge: ThreadedRegistry,
                                                      upstream: PrivateRegistry,
                                                      images: tuple[SampleImage, SampleImage]
                                                      ) -> None:
    ns, mirror = upstream.host, _mirror(bridge)
    layer = _private_layer(images)
    data = _blob(images[0], layer)
    _held_by_a_peer(bridge, layer, data)
    path = f"team/private/blobs/{layer}"
    t0 = time.monotonic()
    assert _get(bridge, ns, path, headers=RIGHT).body == data
    checks = mirror.counts["access_checks"]
    assert checks == 1
    assert _get(bridge, ns, path, headers=RIGHT).body == data
    assert _get(bridge, ns, path, "HEAD", RIGHT).status == 200
    if time.monotonic() - t0 < TTL / 2:
        assert mirror.counts["access_checks"] == checks  # within the TTL: no upstream HEAD
    # Another credential (none) is checked on its own, and refused.
    assert _get(bridge, ns, path).status == 401
    time.sleep(TTL + 0.1)
    before = mirror.counts["access_checks"]
    assert _get(bridge, ns, path, headers=RIGHT).status == 200
    assert mirror.counts["access_checks"] == before + 1  # the TTL passed: asked again


def test_upstream_down_serves_public_or_granted_content_only(
        images: tuple[SampleImage, SampleImage], tmp_path: Path) -> None:
    reg = _start(images)
    try:
        ns = reg.host
        with _bridge(reg, tmp_path) as bridge:
            mirror = _mirror(bridge)
            private = _private_layer(images)
            granted = images[1].layer_digests[-1]
            assert _get(bridge, ns, f"team/app/blobs/{granted}", headers=RIGHT).status == 200
            # Two digests other bridges hold: one they found public, one they did not.
            public_layer, closed_layer = images[0].layer_digests[0], private
            assert public_layer != closed_layer
            _held_by_a_peer(bridge, public_layer, _blob(images[0], public_layer),
                            public=True)
            _held_by_a_peer(bridge, closed_layer, _blob(images[0], closed_layer))
            reg.stop()
            time.sleep(TTL + 0.1)  # the grant is past its TTL, within its offline grace
            r = _get(bridge, ns, f"team/app/blobs/{granted}", headers=RIGHT)
            assert r.status == 200 and r.body == _blob(images[1], granted)
            r = _get(bridge, ns, f"team/app/blobs/{granted}")  # not granted to anonymous
            assert (r.status, r.error_code()) == (503, "UNAVAILABLE")
            r = _get(bridge, ns, f"team/private/blobs/{public_layer}")
            assert r.status == 200 and r.body == _blob(images[0], public_layer)
            for headers in ({}, RIGHT):
                r = _get(bridge, ns, f"team/private/blobs/{closed_layer}", headers=headers)
                assert (r.status, r.error_code()) == (503, "UNAVAILABLE")
                assert "not known to be public" in r.body.decode()
            # Content nobody holds: the upstream is needed for it, as before.
            missing = images[0].config_digest
            r = _get(bridge, ns, f"team/private/blobs/{missing}", headers=RIGHT)
            assert (r.status, r.error_code()) == (502, "UNAVAILABLE")
            assert mirror.counts["offline_served"] == 2
    finally:
        reg.stop()


def _private_layer_held_and_hosts(bridge: ThreadedRegistry, upstream: PrivateRegistry,
                                  images: tuple[SampleImage, SampleImage], tmp_path: Path
                                  ) -> tuple[Mirror, str, Path, str]:
    """A private layer held by a "peer"; containerd's hosts dir naming the bridge as the
    upstream's mirror. (the mirror, the layer, the hosts dir, the image's reference)"""
    mirror = _mirror(bridge)
    layer = _private_layer(images)
    _held_by_a_peer(bridge, layer, _blob(images[0], layer))
    hosts = tmp_path / "certs.d"
    (hosts / upstream.host).mkdir(parents=True)
    (hosts / upstream.host / "hosts.toml").write_text(
        f'server = "{upstream.url}"\nca = "{upstream.ca}"\n\n'
        f'[host."http://{bridge.host}"]\n  capabilities = ["pull", "resolve"]\n')
    return mirror, layer, hosts, f"{upstream.host}/team/private:1"


def test_ctr_pull_answers_the_bridges_challenge_with_its_credentials(
        bridge: ThreadedRegistry, upstream: PrivateRegistry,
        images: tuple[SampleImage, SampleImage], tmp_path: Path) -> None:
    """containerd (ctr --hosts-dir) against the bridge as mirror host: without credentials
    the pull fails, the bridge's 401 (the upstream's Basic challenge) its first error (the
    upstream, tried next, refuses too); with `--user` ctr
    answers that challenge by sending its Basic credentials to the mirror host, and the
    private layer another bridge holds comes from the cluster."""
    mirror, layer, hosts, ref = _private_layer_held_and_hosts(bridge, upstream, images,
                                                              tmp_path)
    with start_containerd(tmp_path / "ctrd") as ctrd:
        proc = ctrd.ctr.run("image", "pull", "--hosts-dir", hosts, ref, check=False)
        assert proc.returncode != 0 and b"401" in proc.stderr + proc.stdout
        print("ctr without credentials:", proc.stderr.decode()[-600:])
        assert mirror.counts["access_refused"] >= 1 and mirror.counts["cluster_hits"] == 0
        ctrd.ctr.run("image", "pull", "--hosts-dir", hosts, "--user", f"{USER}:{PASSWORD}",
                 ref, timeout=120)
        assert ctrd.ctr.image_exists(ref)
    # What containerd sent the mirror host: the Basic credentials given to ctr.
    assert (_credential(RIGHT["Authorization"]), upstream.host, "team/private", layer) \
        in mirror._grants
    assert mirror.counts["cluster_hits"] == 1  # the layer another bridge holds
    assert images[0].manifest_digest in mirror.directory.own  # the rest via the bridge
    assert mirror.counts["upstream_fetches"] >= 1


def test_cri_pull_secret_reaches_the_bridge_unless_scoped_to_the_upstream(
        bridge: ThreadedRegistry, upstream: PrivateRegistry,
        images: tuple[SampleImage, SampleImage], tmp_path: Path) -> None:
    """containerd's CRI plugin with `config_path`: a PullImage carrying credentials
    without `server_address` (what kubelet sends for a pull secret: its keyring keeps only
    username and password) gives them to the mirror host too, so the private layer comes
    from the cluster. Credentials scoped to the upstream (`server_address`) are withheld
    from the mirror host (`ParseAuth`): the bridge refuses the anonymous requests and
    containerd pulls from the upstream itself."""
    mirror, layer, hosts, ref = _private_layer_held_and_hosts(bridge, upstream, images,
                                                              tmp_path)
    with (start_containerd(tmp_path / "ctrd", cri=CriOptions(config_path=str(hosts))) as ctrd,
          CriImages(ctrd.address, timeout=120) as cri):
        # Scoped to the upstream: the bridge sees no credentials, the upstream serves all.
        cri.pull(ref, username=USER, password=PASSWORD, server_address=upstream.url)
        assert mirror.counts["access_refused"] >= 1
        assert mirror.counts["cluster_hits"] == 0 and mirror.counts["upstream_fetches"] == 0
        assert not any(k[0] for k in mirror._grants)  # no credential ever reached it
        cri.remove(ref)
        ctrd.ctr.run("content", "rm", layer, check=False)
        # As kubelet sends a pull secret: the bridge gets them and serves from the cluster.
        cri.pull(ref, username=USER, password=PASSWORD)
    assert (_credential(RIGHT["Authorization"]), upstream.host, "team/private", layer) \
        in mirror._grants
    assert mirror.counts["cluster_hits"] == 1
