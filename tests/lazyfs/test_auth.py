"""Registry auth of the lazy fetcher (peerstar.distribution.auth) and its TLS trust
(peerstar.distribution.tls.tls_context): Basic sent up front once accepted, the OAuth2
refresh-token grant, credentials from the environment, 401/403 and untrusted
certificates failing at once with the host named; a real TLS server on loopback."""

from __future__ import annotations

import base64
import http.server
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from peerstar.distribution.auth import RegistryAuth
from peerstar.distribution.tls import tls_context
from peerstar.lazyfs.fetcher import BlobFetcher, FetchError
from peerstar.lazyfs.state import (
    PASSWORD_ENV,
    REFRESH_TOKEN_ENV,
    TOKEN_ENV,
    USERNAME_ENV,
    auth_from_env,
    auth_to_env,
)
from tests.support.tls import issue_server_cert, make_ca

BLOB = bytes(range(256)) * 40
URL = "https://reg.example/v2/app/blobs/sha256:" + "a" * 64


def basic(user: str, pw: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


def blob_response(request: httpx.Request) -> httpx.Response:
    rng = request.headers.get("Range", "")
    if rng.startswith("bytes="):
        a, b = (int(x) for x in rng[6:].split("-"))
        return httpx.Response(206, content=BLOB[a:b + 1],
                              headers={"Content-Range": f"bytes {a}-{b}/{len(BLOB)}"})
    return httpx.Response(200, content=BLOB)


def test_basic_challenge_then_sent_up_front() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != basic("alice", "pw"):
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        return blob_response(request)

    client = httpx.Client(auth=RegistryAuth("alice", "pw"),
                          transport=httpx.MockTransport(handler))
    f = BlobFetcher(URL, client=client, region_size=1000)
    assert f.read_at(0, 10) == BLOB[:10]
    assert f.read_at(5000, 10) == BLOB[5000:5010]
    # One 401 for the first request only; every later one carries the credentials.
    assert seen[0] is None and seen[1:] == [basic("alice", "pw")] * (len(seen) - 1)


def test_wrong_basic_credentials_fail_at_once_naming_the_host() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    client = httpx.Client(auth=RegistryAuth("alice", "wrong"),
                          transport=httpx.MockTransport(handler))
    f = BlobFetcher(URL, client=client, retries=3, backoff=5.0)
    t0 = time.monotonic()
    with pytest.raises(FetchError) as exc:
        f.read_at(0, 10)
    assert time.monotonic() - t0 < 2.0  # not retried
    assert "HTTP 401 Unauthorized: credentials missing or rejected by registry " \
           "reg.example" in str(exc.value)
    assert not exc.value.retryable and calls == 2  # anonymous, then with Basic once


def test_token_service_refusal_fails_at_once_saying_so() -> None:
    """A token service's 200 without a token (or its 4xx) is not the blob's answer."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/token":
            return httpx.Response(200, json={"nothing": "here"})
        return httpx.Response(401, headers={"WWW-Authenticate":
                                            'Bearer realm="https://auth.example/token"'})

    client = httpx.Client(auth=RegistryAuth(), transport=httpx.MockTransport(handler))
    f = BlobFetcher(URL, client=client, size=len(BLOB), retries=3, backoff=5.0)
    with pytest.raises(FetchError) as exc:
        f.read_at(0, 10)
    assert "token service https://auth.example/token returned no token" in str(exc.value)
    assert not exc.value.retryable and calls == ["/v2/app/blobs/sha256:" + "a" * 64, "/token"]


def test_403_is_not_retried() -> None:
    client = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(403)))
    with pytest.raises(FetchError, match="HTTP 403 Forbidden.*reg.example") as exc:
        BlobFetcher(URL, client=client, backoff=5.0).read_at(0, 1)
    assert not exc.value.retryable


def test_refresh_token_grant() -> None:
    """A docker config `identitytoken`: exchanged by POST (grant_type=refresh_token)."""
    grants: list[dict[str, list[str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            assert request.method == "POST"
            grants.append(parse_qs(request.content.decode()))
            return httpx.Response(200, json={"access_token": "acc-1"})
        if request.headers.get("Authorization") != "Bearer acc-1":
            return httpx.Response(401, headers={"WWW-Authenticate":
                                                'Bearer realm="https://auth.example/token",'
                                                'service="reg",scope="repository:app:pull"'})
        return blob_response(request)

    auth = RegistryAuth(refresh_token="refresh-xyz")
    client = httpx.Client(auth=auth, transport=httpx.MockTransport(handler))
    f = BlobFetcher(URL, client=client, region_size=1000)
    assert f.read_at(100, 5) == BLOB[100:105]
    assert f.read_at(3000, 5) == BLOB[3000:3005]
    assert len(grants) == 1  # the access token is reused
    g = grants[0]
    assert g["grant_type"] == ["refresh_token"] and g["refresh_token"] == ["refresh-xyz"]
    assert g["service"] == ["reg"] and g["scope"] == ["repository:app:pull"]
    # A mount daemon is handed what was given, not the access token obtained here.
    assert auth_to_env(auth) == {REFRESH_TOKEN_ENV: "refresh-xyz"}


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(USERNAME_ENV, "envuser")
    monkeypatch.setenv(PASSWORD_ENV, "envpw")
    monkeypatch.setenv(TOKEN_ENV, "tok")
    monkeypatch.setenv(REFRESH_TOKEN_ENV, "ref")
    a = auth_from_env()
    assert (a.username, a.password, a.refresh_token) == ("envuser", "envpw", "ref")
    assert auth_from_env("cli-user").username == "cli-user"
    for k in (USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV, REFRESH_TOKEN_ENV):
        monkeypatch.delenv(k)
    assert auth_from_env().anonymous


def test_to_env_round_trips_through_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    given = RegistryAuth("u", "p", "tok", "ref")
    for k, v in auth_to_env(given).items():
        monkeypatch.setenv(k, v)
    got = auth_from_env()
    assert (got.username, got.password, got.token, got.refresh_token) == (
        "u", "p", "tok", "ref")
    assert auth_to_env(RegistryAuth()) == {}


# -- TLS against a real server -------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        resp = blob_response(httpx.Request("GET", "https://x/",
                                           headers={"Range": self.headers.get("Range", "")}))
        self.send_response(resp.status_code)
        for k, v in resp.headers.items():
            if k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(resp.content)))
        self.end_headers()
        self.wfile.write(resp.content)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    server_pair = issue_server_cert(ca, d, "127.0.0.1")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server_pair.cert, server_pair.key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"https://127.0.0.1:{srv.server_address[1]}/v2/app/blobs/sha256:{'a' * 64}", \
            ca.cert
    finally:
        srv.shutdown()
        srv.server_close()


def test_untrusted_certificate_fails_at_once(tls_server: tuple[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = tls_server
    for k in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(k, raising=False)
    f = BlobFetcher(url, retries=3, backoff=5.0)
    t0 = time.monotonic()
    with pytest.raises(FetchError) as exc:
        f.read_at(0, 10)
    assert time.monotonic() - t0 < 3.0, "a certificate error must not be retried"
    host = url.split("/")[2]
    assert f"TLS certificate of {host} not trusted" in str(exc.value)
    assert "add its CA to [remote] ca_file or SSL_CERT_FILE" in str(exc.value)
    assert not exc.value.retryable
    f.close()


@pytest.mark.parametrize("how", ["ca_file", "SSL_CERT_FILE"])
def test_ca_file_or_ssl_cert_file_trusts_it(tls_server: tuple[str, Path], how: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    url, ca = tls_server
    for k in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(k, raising=False)
    if how == "SSL_CERT_FILE":
        monkeypatch.setenv(how, str(ca))
        # The context is cached per CA file; SSL_CERT_FILE is read at build time.
        monkeypatch.setattr("peerstar.distribution.tls._tls", {})
    f = BlobFetcher(url, region_size=1000, ca_file=str(ca) if how == "ca_file" else "")
    assert f.read_at(2000, 100) == BLOB[2000:2100]
    f.close()
    if how == "ca_file":  # added to, not instead of, the usual trust
        ctx = tls_context(str(ca))
        assert len(ctx.get_ca_certs()) > 1


def test_certificate_for_another_name_says_so(tls_server: tuple[str, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    url, ca = tls_server
    # A trusted CA, but the certificate is issued for 127.0.0.1 only.
    f = BlobFetcher(url.replace("127.0.0.1", "localhost"), retries=3, backoff=5.0,
                    ca_file=str(ca))
    with pytest.raises(FetchError) as exc:
        f.read_at(0, 1)
    assert "not trusted" in str(exc.value) and "mismatch" in str(exc.value)
    assert "issued for another name or address" in str(exc.value)
    f.close()


def test_image_manifests_use_the_layer_trust(tls_server: tuple[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`peerstar mount` resolves the manifest with the same trust as the layer reads."""
    from peerstar.lazyfs.image import ImageMountError, parse_remote_ref, resolve_layers

    url, ca = tls_server
    ref = parse_remote_ref(url.split("/")[2] + "/app:latest")
    for k in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ImageMountError) as untrusted:
        resolve_layers(ref, plain_http=False)
    assert "CERTIFICATE_VERIFY_FAILED" in str(untrusted.value)
    # Trusted now: the TLS handshake passes and the (blob-serving) test server's answer
    # is refused as a manifest instead.
    with pytest.raises(ImageMountError) as reached:
        resolve_layers(ref, plain_http=False, ca_file=str(ca))
    assert str(reached.value).endswith("/v2/app/manifests/latest: manifest is not JSON")
