"""End to end against a private registry as users run one: Debian's docker-registry
over HTTPS (a test CA's certificate for its 10.78.n.2 address, in a network namespace
reached over a veth, so the snapshotter's own rule picks HTTPS) with htpasswd basic
auth. The snapshotter gets the credentials from a docker config file (`[remote]
auth_file`, or `$DOCKER_CONFIG`) and the CA from `[remote] ca_file` (or SSL_CERT_FILE);
`ctr-remote image rpull --user --tlscacert` pulls, `ctr run` reads lazily. Wrong or
missing credentials and an untrusted certificate take the fallback path: a log line
naming the host and why, containerd pulls the layers itself, the container still runs.
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerstar.source.sample import SAMPLE_TEXT, SAMPLE_TEXT_PATH
from tests.snapshotter.conftest import SnapshotterProc, Stack, mounts_under, running_stack
from tests.snapshotter.test_lazy_pull import (
    REMOTE_LABEL,
    PushedLayer,
    content_digests,
    our_infos,
    push_image,
)
from tests.support.containerd import HarnessError
from tests.support.registry import PrivateRegistry, start_private_registry

pytestmark = pytest.mark.slow

USER, PASSWORD = "alice-7c1e", "pw-Secret-8f3a"


@pytest.fixture(scope="module")
def private_registry() -> Iterator[PrivateRegistry]:
    try:
        reg = start_private_registry(USER, PASSWORD)
    except HarnessError as exc:
        pytest.fail(f"cannot start the private registry: {exc}", pytrace=False)
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def private_image(private_registry: PrivateRegistry) -> tuple[str, list[PushedLayer]]:
    layers = push_image(private_registry.url, "snap/private", "v1", estargz=True)
    return f"{private_registry.host}/snap/private:v1", layers


@pytest.fixture(autouse=True)
def _no_ambient_trust_or_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The snapshotter inherits our environment: no CA or docker config from the machine
    decides these tests (an empty HOME means no ~/.docker/config.json)."""
    for var in ("SSL_CERT_FILE", "SSL_CERT_DIR", "DOCKER_CONFIG",
                "PEERSTAR_REGISTRY_USERNAME", "PEERSTAR_REGISTRY_PASSWORD",
                "PEERSTAR_REGISTRY_TOKEN", "PEERSTAR_REGISTRY_REFRESH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))


def docker_config(directory: Path, host: str, user: str, password: str) -> Path:
    """A docker config.json as `docker login HOST` writes it (0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}, indent=1))
    path.chmod(0o600)
    return path


def remote_snapshots(stack: Stack) -> dict[str, object]:
    return {i.labels["containerd.io/snapshot/remote/stargz.digest"]: i
            for i in our_infos(stack) if REMOTE_LABEL in i.labels}


def rpull(stack: Stack, reg: PrivateRegistry, ref: str) -> float:
    """`ctr-remote image rpull` with containerd's own credentials and CA; its seconds."""
    t0 = time.monotonic()
    stack.containerd.ctr.remote("image", "rpull", "--snapshotter", "peerstar", "--user",
                                f"{USER}:{PASSWORD}", "--tlscacert", str(reg.ca), ref,
                                timeout=240)
    return time.monotonic() - t0


def run_cat(stack: Stack, ref: str, name: str) -> str:
    return stack.containerd.ctr.text("run", "--snapshotter", "peerstar", "--rm", ref, name,
                                     "cat", SAMPLE_TEXT_PATH)


def assert_lazy(stack: Stack, ref: str, layers: list[PushedLayer]) -> None:
    remote = remote_snapshots(stack)
    assert sorted(remote) == sorted(la.digest for la in layers), stack.snapshotter.log()[-3000:]
    assert len(mounts_under(stack.snapshotter.root)) == len(layers)
    assert not content_digests(stack) & {la.digest for la in layers}
    assert run_cat(stack, ref, "private-cat") == SAMPLE_TEXT.decode()
    # The layer blobs never entered the content store, also after the run.
    assert not content_digests(stack) & {la.digest for la in layers}


def assert_fell_back(stack: Stack, ref: str, layers: list[PushedLayer]) -> str:
    """No remote snapshot, containerd pulled every layer, the container runs; returns the
    snapshotter log's fallback lines."""
    assert remote_snapshots(stack) == {}
    assert {la.digest for la in layers} <= content_digests(stack)
    assert run_cat(stack, ref, "fallback-cat") == SAMPLE_TEXT.decode()
    lines = [ln for ln in stack.snapshotter.log().splitlines() if "falling back" in ln]
    assert len(lines) >= 1, stack.snapshotter.log()[-3000:]
    return "\n".join(lines)


BASE_CONFIG = "[remote]\nprefetch_timeout = 5.0\nbackground_fetch = false\n"


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "python-m"])
def test_private_https_registry_lazy_with_auth_file_and_ca_file(
        private_registry: PrivateRegistry, private_image: tuple[str, list[PushedLayer]],
        tmp_path: Path, zygote: bool) -> None:
    """Both ways a layer daemon starts: forked from the zygote (credentials in the
    request's environment) and `python -m` (its command line is in `ps`)."""
    ref, layers = private_image
    auth = docker_config(tmp_path / "creds", private_registry.host, USER, PASSWORD)
    config = BASE_CONFIG + f'auth_file = "{auth}"\nca_file = "{private_registry.ca}"\n'
    config += f"zygote = {'true' if zygote else 'false'}\n"
    with running_stack(config) as stack:
        rpull(stack, private_registry, ref)
        assert_lazy(stack, ref, layers)
        log = stack.snapshotter.log()
        assert f"mounted lazily from https://{private_registry.host}/v2/snap/private/" in log
        # The secret is in no command line, no log and not in the snapshot database.
        pids = stack.snapshotter.daemon_pids()
        assert len(pids) == len(layers)
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert (b"peerstar.lazyfs.mountd" in cmdline) is not zygote, cmdline
            assert PASSWORD.encode() not in cmdline and USER.encode() not in cmdline
        assert PASSWORD not in log
        for p in (stack.snapshotter.root / "cache" / "mounts").glob("*.log"):
            assert PASSWORD not in p.read_text(errors="replace")
        db = sqlite3.connect(stack.snapshotter.root / "metadata.db")
        try:
            dump = "\n".join(db.iterdump())
        finally:
            db.close()
        assert PASSWORD not in dump
        assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in dump


def test_docker_config_env_and_ssl_cert_file(
        private_registry: PrivateRegistry, private_image: tuple[str, list[PushedLayer]],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No config keys: `$DOCKER_CONFIG/config.json` and SSL_CERT_FILE, as the Go
    snapshotter reads them."""
    ref, layers = private_image
    docker_config(tmp_path / "docker", private_registry.host, USER, PASSWORD)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("SSL_CERT_FILE", str(private_registry.ca))
    with running_stack(BASE_CONFIG) as stack:
        rpull(stack, private_registry, ref)
        assert_lazy(stack, ref, layers)


@pytest.mark.parametrize("case", ["wrong-password", "no-entry"])
def test_wrong_or_missing_credentials_fall_back(
        private_registry: PrivateRegistry, private_image: tuple[str, list[PushedLayer]],
        tmp_path: Path, case: str) -> None:
    ref, layers = private_image
    host = private_registry.host
    if case == "wrong-password":
        auth = docker_config(tmp_path / "creds", host, USER, "not-the-password")
    else:  # credentials for another registry only
        auth = docker_config(tmp_path / "creds", "registry.example:5000", USER, PASSWORD)
    config = BASE_CONFIG + f'auth_file = "{auth}"\nca_file = "{private_registry.ca}"\n'
    with running_stack(config) as stack:
        seconds = rpull(stack, private_registry, ref)
        lines = assert_fell_back(stack, ref, layers)
        assert f"HTTP 401 Unauthorized: credentials missing or rejected by registry {host}" \
            in lines, lines
        used = (f"credentials for {host} from {auth}" if case == "wrong-password"
                else f"no credentials for {host} in {auth}")
        assert used in lines, lines
        assert "not-the-password" not in stack.snapshotter.log()
        assert seconds < 60, f"rpull took {seconds:.1f} s: a 401 must not be retried"


def test_untrusted_certificate_falls_back_quickly(
        private_registry: PrivateRegistry, private_image: tuple[str, list[PushedLayer]],
        tmp_path: Path) -> None:
    """No ca_file, no SSL_CERT_FILE: the registry's certificate is not trusted by the
    snapshotter (containerd is given the CA): fallback at once, a clear line, no hang."""
    ref, layers = private_image
    auth = docker_config(tmp_path / "creds", private_registry.host, USER, PASSWORD)
    # Retries with a long backoff: only the no-retry rule for certificates keeps it short.
    config = BASE_CONFIG + f'auth_file = "{auth}"\nretries = 5\n'
    with running_stack(config) as stack:
        seconds = rpull(stack, private_registry, ref)
        lines = assert_fell_back(stack, ref, layers)
        assert f"TLS certificate of {private_registry.host} not trusted" in lines, lines
        assert "add its CA to [remote] ca_file or SSL_CERT_FILE" in lines
        assert seconds < 60, f"rpull took {seconds:.1f} s"


def test_bad_ca_file_or_auth_file_stops_the_start(tmp_path: Path) -> None:
    """A named file that cannot be used is a one-line start-up error, not a fallback on
    every layer later."""
    bad_json = tmp_path / "config.json"
    bad_json.write_text('{"auths": {')
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    for key, path, want in (("auth_file", bad_json, f"{bad_json} is not valid JSON"),
                            ("ca_file", not_pem, f"CA file {not_pem} holds no usable PEM"),
                            ("auth_file", tmp_path / "nope.json", "does not exist")):
        base = Path(tempfile.mkdtemp(prefix="pss-", dir="/tmp"))
        try:
            with pytest.raises(HarnessError) as exc:
                SnapshotterProc(base, f'[remote]\n{key} = "{path}"\n').start()
        finally:
            shutil.rmtree(base, ignore_errors=True)
        text = str(exc.value)
        assert f"remote.{key}" in text and want in text, text
        assert "Traceback" not in text, text
