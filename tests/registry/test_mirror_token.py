"""Private images through the mirror when the upstream uses the token flow of Docker Hub,
GHCR or Harbor (peerstar.registry.mirror, issue 16 item 5): a real TLS docker-registry
with `auth: token:` (tests.support.registry.PrivateRegistry) and a token service
(tests.support.tokenserver.TokenServer) that checks Basic credentials and signs JWTs.

The bridge holds no credentials and fetches no tokens: it passes the upstream's
`Bearer realm=...,service=...,scope=...` challenge on, the caller fetches a token from
that realm with its own credentials (peerstar's `RegistryAuth`, as containerd's
authorizer does; and a real containerd with `ctr --user`), and the bridge forwards the
caller's `Bearer <token>` to the upstream for the access check. Checked: a blob another
bridge holds is served from the cluster to a token that grants its repository; an
anonymous caller, an anonymous token, a wrong password (no token at all), another user's
token and a token for another repository get 401/404, and nothing is served. With a real
containerd, `ctr --user` and a CRI PullImage's pull secret become a token that reaches
the bridge.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from peerstar.distribution.auth import RegistryAuth
from peerstar.distribution.challenge import parse_challenge
from peerstar.source.sample import SampleImage, build_sample_image
from tests.registry.harness import ThreadedRegistry
from tests.registry.test_mirror_private import (
    _blob,
    _bridge,
    _get,
    _held_by_a_peer,
    _mirror,
    _private_layer,
    _private_layer_held_and_hosts,
)
from tests.support.containerd import CriOptions, HarnessError, start_containerd
from tests.support.cri.client import CriImages
from tests.support.registry import PrivateRegistry, push_layout, start_private_registry
from tests.support.tokenserver import SERVICE, TokenServer

pytestmark = pytest.mark.slow

USER, PASSWORD = "carol-7e1f", "pw-Token-44b0"
OTHER, OTHER_PASSWORD = "dave-2c9a", "pw-Other-13d7"  # may pull team/app only


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[SampleImage, SampleImage]:
    work = tmp_path_factory.mktemp("mirror-token-images")
    return (build_sample_image(work / "private", extra_mib=1),
            build_sample_image(work / "app", extra_mib=2))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    server = TokenServer(tmp_path_factory.mktemp("token-service"),
                         users={USER: PASSWORD, OTHER: OTHER_PASSWORD},
                         grants={USER: ("team/private", "team/app"), OTHER: ("team/app",)},
                         pushers=(USER,)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def upstream(images: tuple[SampleImage, SampleImage], tokens: TokenServer
             ) -> Iterator[PrivateRegistry]:
    try:
        reg = start_private_registry(USER, PASSWORD, token=tokens)
    except HarnessError as exc:
        pytest.fail(f"cannot start the private registry: {exc}", pytrace=False)
    try:
        push_layout(reg.url, "team/private", "1", images[0].path)
        push_layout(reg.url, "team/app", "1", images[1].path)
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def bridge(upstream: PrivateRegistry, tmp_path: Path) -> Iterator[ThreadedRegistry]:
    with _bridge(upstream, tmp_path) as reg:
        yield reg


def _client(bridge: ThreadedRegistry, auth: RegistryAuth) -> httpx.Client:
    """A registry client of the bridge as mirror host: it answers the bridge's 401 from
    the realm the challenge names, with its own credentials."""
    return httpx.Client(base_url=f"http://{bridge.host}", auth=auth, timeout=30,
                        trust_env=False)


def _token(tokens: TokenServer, user: str, password: str, scope: str) -> httpx.Response:
    return httpx.get(tokens.realm, params={"service": SERVICE, "scope": scope},
                     auth=(user, password) if user else None, timeout=10)


def test_the_token_flow_through_the_bridge(bridge: ThreadedRegistry,
                                           upstream: PrivateRegistry, tokens: TokenServer,
                                           images: tuple[SampleImage, SampleImage]) -> None:
    ns, mirror = upstream.host, _mirror(bridge)
    layer = _private_layer(images)
    data = _blob(images[0], layer)
    _held_by_a_peer(bridge, layer, data)
    path = f"team/private/blobs/{layer}"
    scope = "repository:team/private:pull"
    # Anonymous: the upstream's Bearer challenge, passed on as is.
    r = _get(bridge, ns, path)
    assert (r.status, r.error_code()) == (401, "UNAUTHORIZED")
    scheme, params = parse_challenge(r.headers["www-authenticate"])
    assert scheme.lower() == "bearer"
    assert (params["realm"], params["service"], params["scope"]) == \
        (tokens.realm, SERVICE, scope)
    # The caller's token decides, and the bridge checks each one at the upstream.
    anonymous = _token(tokens, "", "", scope).json()["token"]
    other = _token(tokens, OTHER, OTHER_PASSWORD, scope).json()["token"]
    for token in (anonymous, other, "not.a.jwt"):
        r = _get(bridge, ns, path, headers={"Authorization": f"Bearer {token}"})
        assert (r.status, r.error_code()) == (401, "UNAUTHORIZED"), token
        assert r.headers["www-authenticate"].startswith("Bearer ")
    assert _token(tokens, USER, "not-the-password", scope).status_code == 401
    # A token granting team/app does not open a digest of team/private through team/app.
    app = _token(tokens, OTHER, OTHER_PASSWORD, "repository:team/app:pull").json()["token"]
    r = _get(bridge, ns, f"team/app/blobs/{layer}", headers={"Authorization": f"Bearer {app}"})
    assert (r.status, r.error_code()) == (404, "BLOB_UNKNOWN")
    assert mirror.counts["cluster_hits"] == 0 and mirror.counts["upstream_bytes"] == 0
    # A client that answers the bridge's challenge with the wrong password gets nothing.
    with _client(bridge, RegistryAuth(USER, "not-the-password")) as client:
        r = client.get(f"/v2/{path}", params={"ns": ns})
        assert r.status_code == 401 and r.content != data
    # With its credentials: a token from the realm, then the blob from the cluster.
    issued = len(tokens.issued)
    with _client(bridge, RegistryAuth(USER, PASSWORD)) as client:
        r = client.get(f"/v2/{path}", params={"ns": ns})
        assert r.status_code == 200 and r.content == data
        r = client.get("/v2/team/private/manifests/1", params={"ns": ns},
                       headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        assert r.status_code == 200
        assert r.headers["docker-content-digest"] == images[0].manifest_digest
    assert tokens.issued[issued] == (USER, scope, "GET")
    assert mirror.counts["cluster_hits"] == 1 and mirror.counts["upstream_fetches"] == 0
    own = mirror.directory.own[layer]
    assert own.public is False  # the upstream refuses it to an anonymous HEAD
    # Held by this node now: still refused to a caller without a granting token.
    r = _get(bridge, ns, path, headers={"Authorization": f"Bearer {anonymous}"})
    assert r.status == 401


def test_ctr_pull_fetches_a_token_for_the_bridge_with_its_user(
        bridge: ThreadedRegistry, upstream: PrivateRegistry, tokens: TokenServer,
        images: tuple[SampleImage, SampleImage], tmp_path: Path) -> None:
    """containerd (ctr --hosts-dir) with the bridge as mirror host: the bridge answers
    401 with the upstream's Bearer challenge; without credentials containerd's anonymous
    token is refused and the pull fails; with `--user` containerd gets a token for that
    user from the realm, sends it to the bridge, and the private layer another bridge
    holds comes from the cluster."""
    mirror, layer, hosts, ref = _private_layer_held_and_hosts(bridge, upstream, images,
                                                              tmp_path)
    with start_containerd(tmp_path / "ctrd") as ctrd:
        issued = len(tokens.issued)
        proc = ctrd.ctr.run("image", "pull", "--hosts-dir", hosts, ref, check=False)
        print("ctr without credentials:", proc.stderr.decode()[-1500:])
        # containerd's anonymous token, refused by the bridge (the upstream's verdict)
        # and then by the upstream itself, the next host.
        assert proc.returncode != 0 and b"insufficient_scope" in proc.stderr
        assert mirror.counts["cluster_hits"] == 0 and mirror.counts["access_refused"] >= 1
        assert {user for user, _, _ in tokens.issued[issued:]} == {""}
        issued = len(tokens.issued)
        ctrd.ctr.run("image", "pull", "--hosts-dir", hosts, "--user", f"{USER}:{PASSWORD}",
                     ref, timeout=120)
        assert ctrd.ctr.image_exists(ref)
    print("tokens issued to ctr --user:", tokens.issued[issued:])
    assert (USER, "repository:team/private:pull", "POST") in tokens.issued[issued:]
    # What reached the bridge is a token (not the password): the grant is under its hash.
    granted = [k for k in mirror._grants if k[1:] == (upstream.host, "team/private", layer)]
    assert len(granted) == 1 and granted[0][0]
    assert mirror.counts["cluster_hits"] == 1


def test_cri_pull_secret_gets_a_token_for_the_bridge(
        bridge: ThreadedRegistry, upstream: PrivateRegistry, tokens: TokenServer,
        images: tuple[SampleImage, SampleImage], tmp_path: Path) -> None:
    """containerd's CRI plugin (config_path) with a PullImage carrying a pull secret as
    kubelet sends it (username and password, no server_address): containerd fetches a
    token for that user from the realm of the bridge's challenge and the private layer
    another bridge holds comes from the cluster."""
    mirror, layer, hosts, ref = _private_layer_held_and_hosts(bridge, upstream, images,
                                                              tmp_path)
    issued = len(tokens.issued)
    with (start_containerd(tmp_path / "ctrd", cri=CriOptions(config_path=str(hosts))) as ctrd,
          CriImages(ctrd.address, timeout=120) as cri):
        cri.pull(ref, username=USER, password=PASSWORD)
    assert (USER, "repository:team/private:pull", "POST") in tokens.issued[issued:]
    granted = [k for k in mirror._grants if k[1:] == (upstream.host, "team/private", layer)]
    assert len(granted) == 1 and granted[0][0]
    assert mirror.counts["cluster_hits"] == 1 and mirror.counts["upstream_fetches"] >= 1
