"""A private Docker registry (Debian `docker-registry`, distribution 2.8) for tests.

Owns: writing its config (filesystem storage in a temp dir, no auth unless htpasswd
Basic auth is asked for, delete enabled, listening on 127.0.0.1 only), starting it on a
free port, waiting until `GET /v2/` answers (200, or 401 with auth), small HTTP helpers
for assertions, an outage (`take_down`, then `bring_back` on the same port), and
stopping it.

Also `PrivateRegistry`: the same registry the way a real private one is set up -- HTTPS
with a certificate of a test CA for its IP address, htpasswd basic auth or, given a
`tests.support.tokenserver.TokenServer`, the token flow of Docker Hub and the like
(`auth: token:`) -- inside a network namespace joined to the host by a veth
(`tests.support.netns.HostLinkedNode`), so clients on the host reach it at a 10.78.n.2
address and treat it as a remote HTTPS registry. The upload helpers (`upload_blob`,
`put_manifest`, `push_image`) reach it once its base URL is registered with
`register_access` (CA and credentials, or a token, per base URL).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerstar.oci import mediatypes as mt
from peerstar.oci.platform import host_platform
from tests.support.containerd import HarnessError, require_binaries
from tests.support.content import sha256_digest
from tests.support.netns import HostLinkedNode, Node
from tests.support.ports import free_port
from tests.support.waiting import http_ok, stop_process, wait_until

if TYPE_CHECKING:
    from tests.support.tokenserver import TokenServer

MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def _config(root: Path, port: int, access_log: bool = False, addr: str = "127.0.0.1",
            htpasswd: Path | None = None) -> str:
    # JSON is valid YAML, and json.dumps quotes paths safely.
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": not access_log}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"{addr}:{port}"},
    }
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": "peerstar-test", "path": str(htpasswd)}}
    return json.dumps(config, indent=2)


@dataclass
class HTTPResult:
    status: int
    headers: dict[str, str]
    body: bytes


class _RegistryLog:
    """The log of a registry process started under `base`."""

    base: Path

    @property
    def log_path(self) -> Path:
        return self.base / "registry.log"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


@dataclass
class DockerRegistry(_RegistryLog):
    """A running registry; `host` is `127.0.0.1:PORT` (use with `--plain-http`)."""

    base: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    remove_base: bool = False
    access_log: bool = False  # Apache combined lines in the log: `bytes_served()` reads them
    # Inside a node of tests.support.netns: its `prefix`, listening on `addr`:5000.
    prefix: list[str] = field(default_factory=list)
    addr: str = "127.0.0.1"
    # (user, password): htpasswd Basic auth over plain HTTP (a private upstream inside
    # a test network, where TLS adds nothing to what is tested).
    basic_auth: tuple[str, str] | None = None

    @property
    def host(self) -> str:
        return f"{self.addr}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                timeout: float = 10.0) -> HTTPResult:
        """One HTTP request to the registry; HTTP errors are returned, not raised."""
        req = urllib.request.Request(self.url + path, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return HTTPResult(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                                  resp.read())
        except urllib.error.HTTPError as exc:
            return HTTPResult(exc.code, {k.lower(): v for k, v in exc.headers.items()},
                              exc.read())

    def get_manifest(self, repository: str, reference: str) -> HTTPResult:
        """GET /v2/<repository>/manifests/<reference> accepting OCI and Docker types."""
        return self.request("GET", f"/v2/{repository}/manifests/{reference}",
                            {"Accept": MANIFEST_ACCEPT})

    def _ready(self) -> bool:
        if not self.prefix and self.basic_auth is None:
            return http_ok(self.url + "/v2/")
        # With auth, an anonymous GET /v2/ answers 401: up all the same.
        code = ("import sys,urllib.request,urllib.error\n"
                "try: urllib.request.urlopen(sys.argv[1],timeout=2)\n"
                "except urllib.error.HTTPError as e: sys.exit(e.code!=401)")
        return subprocess.run([*self.prefix, sys.executable, "-c", code, self.url + "/v2/"],
                              capture_output=True, timeout=30).returncode == 0

    def bytes_served(self, path_part: str = "/blobs/") -> int:
        """Body bytes of the 2xx GETs whose path contains `path_part`, from the access log
        (needs `access_log`)."""
        total = 0
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = re.search(r'"GET (\S+) HTTP/[0-9.]+" (\d{3}) (\d+|-)', line)
            if m and path_part in m.group(1) and m.group(2).startswith("2") and \
                    m.group(3) != "-":
                total += int(m.group(3))
        return total

    def _launch(self) -> subprocess.Popen[bytes]:
        """Run the registry on the config under `base` (its port is in there)."""
        binary = require_binaries("docker-registry")["docker-registry"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.prefix, binary, "serve", str(self.base / "config.yml")],
                stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self.process

    def start(self, timeout: float = 30.0, attempts: int = 3) -> DockerRegistry:
        """Start on a free port and wait until `/v2/` answers 200."""
        storage = self.base / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        htpasswd = None
        if self.basic_auth is not None:
            from tests.support.tls import htpasswd_line

            htpasswd = self.base / "htpasswd"
            htpasswd.write_text(htpasswd_line(*self.basic_auth))
        for _attempt in range(attempts):
            self.port = PRIVATE_PORT if self.prefix else free_port()
            (self.base / "config.yml").write_text(_config(storage, self.port,
                                                         self.access_log, self.addr,
                                                         htpasswd))
            process = self._launch()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    break  # most likely lost the port race: try another port
                if self._ready():
                    return self
                time.sleep(0.05)
            self._terminate()
        raise HarnessError(f"docker-registry did not answer GET /v2/ after {attempts} "
                           f"attempts; log:\n{self.log_tail()}")

    def take_down(self) -> None:
        """An outage: stop the registry process, keeping its port and storage for
        `bring_back`."""
        self._terminate()

    def bring_back(self, timeout: float = 30.0) -> DockerRegistry:
        """Start the registry again after `take_down`, on the same port with the same
        storage, and wait until `/v2/` answers 200."""
        self._launch()
        if not wait_until(self._ready, timeout):
            raise HarnessError(f"docker-registry did not come back on port {self.port}; "
                               f"log:\n{self.log_tail()}")
        return self

    def _terminate(self) -> None:
        proc = self.process
        stop_process(proc, timeout=10)
        self.process = None

    def stop(self) -> None:
        """Stop the registry (idempotent); remove its directory if the harness made it."""
        self._terminate()
        if self.remove_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> DockerRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class RegistryAccess:
    """How the upload helpers reach a registry: the CA to trust and basic credentials,
    or a whole Authorization header (a Bearer token)."""

    cafile: str | None = None
    username: str | None = None
    password: str | None = None
    authorization: str | None = None

    def context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.cafile) if self.cafile else None

    def headers(self) -> dict[str, str]:
        if self.authorization is not None:
            return {"Authorization": self.authorization}
        if self.username is None:
            return {}
        raw = f"{self.username}:{self.password or ''}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


_ACCESS: dict[str, RegistryAccess] = {}  # base URL (scheme://host:port) -> access


def register_access(base: str, access: RegistryAccess) -> None:
    """Use `access` for every upload-helper request to `base` (until `forget_access`)."""
    _ACCESS[base.rstrip("/")] = access


def forget_access(base: str) -> None:
    _ACCESS.pop(base.rstrip("/"), None)


def _access_for(url: str) -> RegistryAccess:
    for base, access in _ACCESS.items():
        if url == base or url.startswith(base + "/"):
            return access
    return RegistryAccess()


def _http(method: str, url: str, data: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    access = _access_for(url)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={**access.headers(), **(headers or {})})
    with urllib.request.urlopen(req, timeout=60, context=access.context()) as resp:
        return resp.status, dict(resp.headers.items())


def upload_blob(base: str, repo: str, data: bytes) -> str:
    """A monolithic upload (POST, then PUT ?digest=) of the distribution API to the
    registry at `base` (http://HOST:PORT); returns the blob's digest."""
    digest = sha256_digest(data)
    _, headers = _http("POST", f"{base}/v2/{repo}/blobs/uploads/", b"")
    loc = headers["Location"]
    loc = base + loc if loc.startswith("/") else loc
    status, _ = _http("PUT", f"{loc}{'&' if '?' in loc else '?'}digest={digest}", data,
                      {"Content-Type": "application/octet-stream"})
    assert status == 201, status
    return digest


def put_manifest(base: str, repo: str, tag: str, manifest: bytes, media_type: str) -> str:
    """PUT a manifest under `tag`; returns its digest."""
    status, _ = _http("PUT", f"{base}/v2/{repo}/manifests/{tag}", manifest,
                      {"Content-Type": media_type})
    assert status == 201, status
    return sha256_digest(manifest)


def push_image(base: str, repo: str, tag: str,
               layers: Iterable[tuple[bytes, Mapping[str, str]]], diff_ids: Iterable[str],
               image_config: Mapping[str, Any] | None = None) -> str:
    """Push a single-platform OCI image under `tag`: the gzip layer blobs, each with its
    descriptor annotations (none for a plain gzip layer), a config for this machine's
    platform with `diff_ids` and `image_config` as its `config` section, and the
    manifest. Returns the manifest's digest."""
    descs: list[dict[str, Any]] = []
    for blob, notes in layers:
        desc: dict[str, Any] = {"mediaType": mt.OCI_LAYER_GZIP,
                                "digest": upload_blob(base, repo, blob), "size": len(blob)}
        if notes:
            desc["annotations"] = dict(notes)
        descs.append(desc)
    _os, arch, variant = host_platform()
    config: dict[str, Any] = {
        "architecture": arch, "os": "linux", "config": dict(image_config or {}),
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}}
    if variant:
        config["variant"] = variant
    config_bytes = json.dumps(config).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG,
                   "digest": upload_blob(base, repo, config_bytes), "size": len(config_bytes)},
        "layers": descs}).encode()
    return put_manifest(base, repo, tag, manifest, mt.OCI_MANIFEST)


def start_registry(base: Path | None = None, *, access_log: bool = False,
                   node: Node | None = None, basic_auth: tuple[str, str] | None = None
                   ) -> DockerRegistry:
    """Start a registry storing under `base` (a new temp dir, removed on stop, if None);
    `access_log` writes one line per request to its log; `node`: run it inside that
    node of tests.support.netns, on its address, port 5000; `basic_auth`: (user,
    password) of htpasswd Basic auth (the upload helpers need `register_access`)."""
    remove_base = base is None
    if base is None:
        base = Path(tempfile.mkdtemp(prefix="peerstar-registry-"))
    registry = DockerRegistry(base=Path(base), remove_base=remove_base, access_log=access_log,
                              basic_auth=basic_auth)
    if node is not None:
        registry.prefix, registry.addr = node.prefix, node.addr
    try:
        return registry.start()
    except BaseException:
        registry.stop()  # also removes the temp dir we made
        raise


def push_layout(base: str, repo: str, tag: str, layout: Path, layout_tag: str = "latest"
                ) -> str:
    """Push the image `layout_tag` of an OCI image layout (single-platform, as
    `build_sample_image` writes) to `repo:tag`; returns the manifest's digest."""
    index = json.loads((layout / "index.json").read_text())
    [desc] = [m for m in index["manifests"] if m.get("annotations", {}).get(
        "org.opencontainers.image.ref.name") == layout_tag]

    def blob(digest: str) -> bytes:
        return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()

    manifest = blob(desc["digest"])
    doc = json.loads(manifest)
    for d in [doc["config"], *doc["layers"]]:
        upload_blob(base, repo, blob(d["digest"]))
    return put_manifest(base, repo, tag, manifest, desc["mediaType"])


def blob_path(registry: DockerRegistry, digest: str) -> Path:
    """Where the registry's filesystem storage keeps blob `digest`."""
    hexd = digest.split(":", 1)[1]
    return (registry.base / "storage" / "docker" / "registry" / "v2" / "blobs" / "sha256" /
            hexd[:2] / hexd / "data")


PRIVATE_PORT = 5000  # inside the registry's own namespace: never collides


@dataclass
class PrivateRegistry(_RegistryLog):
    """docker-registry over HTTPS (certificate for its IP, signed by a test CA) with
    htpasswd basic auth (or the token flow of `token`, whose user `username` pushes), in
    a network namespace reached from the host over a veth. `host` is `10.78.n.2:5000`;
    `ca` the CA certificate clients must trust."""

    base: Path
    username: str
    password: str
    token: TokenServer | None = None
    link: HostLinkedNode | None = None
    process: subprocess.Popen[bytes] | None = None
    ca: Path = Path()

    @property
    def host(self) -> str:
        assert self.link is not None
        return f"{self.link.node.addr}:{PRIVATE_PORT}"

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def access(self) -> RegistryAccess:
        """How `username` reaches it: Basic credentials, or a token to pull and push the
        repositories the token server grants it."""
        if self.token is None:
            return RegistryAccess(str(self.ca), self.username, self.password)
        repos = self.token.grants.get(self.username, ())
        bearer = self.token.token(self.username, [f"repository:{r}:pull,push" for r in repos])
        return RegistryAccess(str(self.ca), authorization=f"Bearer {bearer}")

    def status(self, path: str = "/v2/", *, auth: bool = True, timeout: float = 5.0) -> int:
        """The HTTP status of `GET path` (trusting our CA; with or without credentials)."""
        access = self.access() if auth else RegistryAccess(str(self.ca))
        req = urllib.request.Request(self.url + path, headers=access.headers())
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=access.context()) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def start(self, timeout: float = 30.0) -> PrivateRegistry:
        from tests.support.tls import htpasswd_line, issue_server_cert, make_ca

        binary = require_binaries("docker-registry", "ip")["docker-registry"]
        self.link = HostLinkedNode("registry")
        ca = make_ca(self.base / "pki")
        self.ca = ca.cert
        server = issue_server_cert(ca, self.base / "pki", self.link.node.addr)
        htpasswd = self.base / "htpasswd"
        htpasswd.write_text(htpasswd_line(self.username, self.password))
        storage = self.base / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = self.base / "config.yml"
        config.write_text(json.dumps({
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(storage)},
                        "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": f"{self.link.node.addr}:{PRIVATE_PORT}",
                     "tls": {"certificate": str(server.cert), "key": str(server.key)}},
            "auth": (self.token.registry_auth() if self.token is not None else
                     {"htpasswd": {"realm": "peerstar-test", "path": str(htpasswd)}}),
        }, indent=2))
        with open(self.log_path, "ab") as log:
            self.process = self.link.node.popen(
                [binary, "serve", str(config)], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if self.status(timeout=2) == 200:
                    register_access(self.url, self.access())
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise HarnessError(f"private docker-registry at {self.url} did not answer GET /v2/ "
                           f"with 200; log:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the registry and remove its namespace and directory (idempotent)."""
        if self.link is not None:
            forget_access(self.url)
            self.link.remove()  # kills the registry: it runs in the namespace
        if self.process is not None:
            try:
                self.process.wait(timeout=10)  # `ip netns exec`, ended with its child
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        self.link = None
        shutil.rmtree(self.base, ignore_errors=True)


def start_private_registry(username: str, password: str, token: TokenServer | None = None
                           ) -> PrivateRegistry:
    """A `PrivateRegistry` with one htpasswd user (or `token`'s flow, `username` its
    pusher), in a new temp dir (removed on stop)."""
    reg = PrivateRegistry(Path(tempfile.mkdtemp(prefix="peerstar-privreg-")), username,
                          password, token)
    try:
        return reg.start()
    except BaseException:
        reg.stop()
        raise
