"""A private Docker registry (Debian `docker-registry`, distribution 2.8) for tests.

Owns: writing its config (filesystem storage in a temp dir, no auth, delete enabled,
listening on 127.0.0.1 only), starting it on a free port, waiting until `GET /v2/`
answers 200, small HTTP helpers for assertions, and stopping it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.containerd import HarnessError, require_binaries

MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (start-up retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: Path, port: int) -> str:
    # JSON is valid YAML, and json.dumps quotes paths safely.
    return json.dumps({
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}"},
    }, indent=2)


@dataclass
class HTTPResult:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class DockerRegistry:
    """A running registry; `host` is `127.0.0.1:PORT` (use with `--plain-http`)."""

    base: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    remove_base: bool = False

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        return self.base / "registry.log"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

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

    def start(self, timeout: float = 30.0, attempts: int = 3) -> DockerRegistry:
        """Start on a free port and wait until `/v2/` answers 200."""
        binary = require_binaries("docker-registry")["docker-registry"]
        storage = self.base / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        for _attempt in range(attempts):
            self.port = free_port()
            config = self.base / "config.yml"
            config.write_text(_config(storage, self.port))
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [binary, "serve", str(config)], stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break  # most likely lost the port race: try another port
                try:
                    if self.request("GET", "/v2/", timeout=2).status == 200:
                        return self
                except OSError:
                    pass
                time.sleep(0.05)
            self._terminate()
        raise HarnessError(f"docker-registry did not answer GET /v2/ after {attempts} "
                           f"attempts; log:\n{self.log_tail()}")

    def _terminate(self) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
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


def _http(method: str, url: str, data: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, dict(resp.headers.items())


def upload_blob(base: str, repo: str, data: bytes) -> str:
    """A monolithic upload (POST, then PUT ?digest=) of the distribution API to the
    registry at `base` (http://HOST:PORT); returns the blob's digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
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
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


def start_registry(base: Path | None = None) -> DockerRegistry:
    """Start a registry storing under `base` (a new temp dir, removed on stop, if None)."""
    remove_base = base is None
    if base is None:
        base = Path(tempfile.mkdtemp(prefix="peerstar-registry-"))
    registry = DockerRegistry(base=Path(base), remove_base=remove_base)
    try:
        return registry.start()
    except BaseException:
        registry.stop()  # also removes the temp dir we made
        raise
