"""Fixtures for `peerstar push` / `peerstar pull` tests, which run the CLI as a subprocess
(`tests.support.cli`: exit codes and stderr as a user sees them): a js-ipfs daemon, the
sample image pushed into the docker-registry by `ctr image push --plain-http`, and a tiny
loopback registry whose answers (auth challenges, errors) the tests choose.

No test sees the developer's own IPFS daemon or data: HOME, IPFS_PATH and XDG_DATA_HOME
point at temporary directories.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from peerstar.source.sample import SampleImage
from tests.support.containerd import Containerd
from tests.support.content import sha256_digest
from tests.support.ipfsimage import on_store
from tests.support.jsipfs import JsIpfs
from tests.support.registry import DockerRegistry

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NERDCTL = FIXTURES / "nerdctl"


def leftovers(parent: Path) -> list[str]:
    """Staging/temp entries a writer may have left in `parent` (hidden names)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(autouse=True)
def _isolated_env(isolated_home: Path) -> None:
    """Every test here runs with a fresh HOME (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def image_jsipfs(jsipfs: JsIpfs) -> JsIpfs:
    return jsipfs


@pytest.fixture(params=["embedded", "jsipfs"])
def store_args(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    """CLI flags selecting each backend: the embedded store, or the js-ipfs daemon."""
    if request.param == "jsipfs":
        daemon: JsIpfs = request.getfixturevalue("image_jsipfs")
        return ["--ipfs-address", daemon.api_multiaddr]
    return ["--root", str(tmp_path / "store")]


@dataclass
class RegistryImage:
    registry: DockerRegistry
    repository: str
    tag: str
    manifest_digest: str

    @property
    def ref(self) -> str:
        return f"{self.registry.host}/{self.repository}:{self.tag}"


@pytest.fixture(scope="session")
def registry_image(containerd: Containerd, docker_registry: DockerRegistry,
                   sample_image: SampleImage) -> RegistryImage:
    """The sample image in the docker-registry, pushed there by `ctr image push`."""
    ctr = containerd.ctr
    [src] = ctr.import_oci_layout(sample_image.path,
                                  f"docker.io/peerstar/image-src-{uuid.uuid4().hex[:8]}")
    repo, tag = "peerstar/image-sample", "v1"
    remote = f"{docker_registry.host}/{repo}:{tag}"
    ctr.run("images", "tag", "--force", src, remote)
    ctr.push(remote)
    got = docker_registry.get_manifest(repo, tag)
    assert got.status == 200 and got.headers["docker-content-digest"] == \
        sample_image.manifest_digest
    return RegistryImage(docker_registry, repo, tag, sample_image.manifest_digest)


# --- a registry whose behaviour a test scripts ---------------------------------------


@dataclass
class FakeRegistry:
    """A loopback OCI registry serving one OCI layout, with optional bearer auth or a
    forced error status. `requests` records (method, path, Authorization)."""

    layout: Path | None = None
    token: str | None = None  # require `Bearer <token>` on /v2/ routes
    token_status: int = 200  # what the token endpoint answers
    token_user: tuple[str, str] | None = None  # basic credentials the token service wants
    fail_status: int | None = None  # answer every /v2/ request with this
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.server_address[1]}"

    def blob(self, digest: str) -> bytes | None:
        assert self.layout is not None
        path = self.layout / "blobs" / "sha256" / digest.split(":", 1)[1]
        return path.read_bytes() if path.is_file() else None


def _handler(reg: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET(head=True)

        def do_GET(self, head: bool = False) -> None:
            auth = self.headers.get("Authorization", "")
            reg.requests.append((self.command, self.path, auth))
            if self.path.startswith("/token"):
                if reg.token_user is not None:
                    import base64

                    want = "Basic " + base64.b64encode(
                        ":".join(reg.token_user).encode()).decode()
                    if auth != want:
                        self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
                        return
                if reg.token_status != 200:
                    self._send(reg.token_status, b'{"errors":[{"code":"DENIED"}]}')
                else:
                    self._send(200, json.dumps({"token": reg.token}).encode(),
                               {"Content-Type": "application/json"})
                return
            if reg.fail_status is not None:
                self._send(reg.fail_status, b'{"errors":[{"code":"UNKNOWN","message":"boom"}]}',
                           {"Content-Type": "application/json"}, head)
                return
            if reg.token is not None and auth != f"Bearer {reg.token}":
                realm = f"http://{reg.host}/token"
                self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {
                    "WWW-Authenticate": f'Bearer realm="{realm}",service="fake",'
                                        f'scope="repository:x/y:pull"'}, head)
                return
            parts = self.path.split("/")
            # /v2/<repo...>/manifests/<ref> or /v2/<repo...>/blobs/<digest>
            if len(parts) >= 5 and parts[-2] in ("manifests", "blobs"):
                ref = parts[-1]
                if parts[-2] == "manifests" and not ref.startswith("sha256:"):
                    assert reg.layout is not None
                    index = json.loads((reg.layout / "index.json").read_bytes())
                    ref = index["manifests"][0]["digest"]
                data = reg.blob(ref)
                if data is None:
                    self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}', head=head)
                    return
                headers = {"Docker-Content-Digest": sha256_digest(data)}
                if parts[-2] == "manifests":
                    headers["Content-Type"] = json.loads(data)["mediaType"]
                self._send(200, data, headers, head)
                return
            self._send(404, b"", head=head)

    return Handler


@pytest.fixture
def fake_registry() -> Iterator[Callable[..., FakeRegistry]]:
    """Start fake registries: `fake_registry(layout=..., token=..., fail_status=...)`."""
    started: list[FakeRegistry] = []

    def start(**kwargs: object) -> FakeRegistry:
        reg = FakeRegistry(**kwargs)  # type: ignore[arg-type]
        reg.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(reg))
        threading.Thread(target=reg.server.serve_forever, daemon=True).start()
        started.append(reg)
        return reg

    yield start
    for reg in started:
        assert reg.server is not None
        reg.server.shutdown()
        reg.server.server_close()


# --- reading what a push stored --------------------------------------------------------


def store_for(args: list[str]) -> object:
    """The content store the CLI flags `args` select (for checks from the test)."""
    from peerstar.ipfs import open_store

    if args[0] == "--ipfs-address":
        return open_store(args[1], timeout=30.0, retries=1)
    return open_store(None, Path(args[1]))


def cat(args: list[str], cid: str) -> bytes:
    """The whole content of `cid` in the store `args` select."""
    return on_store(lambda: store_for(args), lambda store: store.cat_bytes(cid))


def add(args: list[str], data: bytes) -> str:
    """Add `data` (pinned) to the store `args` select; its CID."""
    return on_store(lambda: store_for(args), lambda store: store.add(data))
