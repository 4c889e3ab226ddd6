"""`peerstar registry serve` as a user runs it: flags and environment variables, both
backends, the access log on stderr, /metrics, refusal of non-loopback addresses, and a
clean exit on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from peerstar.errors import PeerstarError
from peerstar.source.sample import SampleImage
from tests.registry.helpers import MANIFEST_ACCEPT, request
from tests.support.cli import assert_one_line_error, run_peerstar, serving_registry
from tests.support.ipfsimage import StoredImage, push_blob_image, push_layout
from tests.support.jsipfs import JsIpfs
from tests.support.ports import free_port
from tests.support.waiting import http_ok, wait_until

REPO = Path(__file__).resolve().parents[2]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERSTAR_")}
    env["IPFS_PATH"] = "/nonexistent-peerstar-test"  # never pick up a stray daemon
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _check_serves(host: str, img: StoredImage) -> None:
    r = request(host, "GET", f"/v2/ipfs/{img.root_cid}/manifests/{img.top_digest}",
                {"Accept": MANIFEST_ACCEPT})
    assert r.status == 200 and r.headers["docker-content-digest"] == img.top_digest
    layer = img.layer_digests[1]
    r = request(host, "GET", f"/v2/ipfs/{img.root_cid}/blobs/{layer}",
                {"Range": "bytes=10-29"})
    assert r.status == 206 and r.body == img.content[layer][10:30]


def test_serve_embedded_with_flags(tmp_path: Path, sample_image: SampleImage) -> None:
    from peerstar.ipfs import EmbeddedStore

    root = tmp_path / "store"
    img = push_layout(lambda: EmbeddedStore(root), sample_image.path)
    port, mport = free_port(), free_port()
    log_path = tmp_path / "registry.log"
    with serving_registry("--root", root, "--listen", f"127.0.0.1:{port}", "--metrics-listen",
                          f"127.0.0.1:{mport}", "--read-timeout", "5s", "--read-retry-num",
                          "1", log=log_path, env=_clean_env()) as proc:
        _check_serves(f"127.0.0.1:{port}", img)
        metrics = request(f"127.0.0.1:{mport}", "GET", "/metrics").body.decode()
        assert ('peerstar_registry_requests_total{method="GET",route="blob",status="206"} 1.0'
                in metrics)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        log = [json.loads(line) for line in log_path.read_text().splitlines()
               if line.startswith("{")]
    assert [(e["method"], e["status"]) for e in log] == [("GET", 200), ("GET", 206)]
    assert log[1]["bytes"] == 20 and log[1]["range"] == "bytes=10-29"


@pytest.mark.slow
def test_serve_daemon_from_environment(jsipfs_daemon: JsIpfs, sample_image: SampleImage,
                                       tmp_path: Path) -> None:
    from peerstar.ipfs import open_store

    img = push_layout(lambda: open_store(jsipfs_daemon.api_multiaddr), sample_image.path)
    port = free_port()
    env = _clean_env(PEERSTAR_IPFS_ADDRESS=jsipfs_daemon.api_multiaddr,
                     PEERSTAR_REGISTRY_LISTEN=f"127.0.0.1:{port}",
                     PEERSTAR_REGISTRY_READ_TIMEOUT="10s")
    with serving_registry("--no-access-log", log=tmp_path / "registry.log", env=env):
        _check_serves(f"127.0.0.1:{port}", img)

    # which DAG node a range of a multi-leaf blob is read from: a leaf, unless --no-subdag
    blob = os.urandom(1 << 20)
    big = push_blob_image(lambda: open_store(jsipfs_daemon.api_multiaddr), blob)
    path = f"/v2/ipfs/{big.root_cid}/blobs/{big.layer_digests[0]}"
    for flags, node in (([], "leaf"), (["--no-subdag"], "root")):
        port, mport = free_port(), free_port()
        env = _clean_env(PEERSTAR_IPFS_ADDRESS=jsipfs_daemon.api_multiaddr)
        with serving_registry("--no-access-log", "--listen", f"127.0.0.1:{port}",
                              "--metrics-listen", f"127.0.0.1:{mport}", *flags,
                              log=tmp_path / "registry2.log", env=env):
            # the first reads learn the DAG in the background; later ones use it
            deadline = time.monotonic() + 20
            reads = _range_reads_by_node(port, mport, path, blob)
            while reads.get(node, 0) < 5 and time.monotonic() < deadline:
                reads = _range_reads_by_node(port, mport, path, blob)
        assert reads.get(node, 0) >= 5, (flags, reads)
        if node == "root":
            assert set(reads) == {"root"}, reads


def _range_reads_by_node(port: int, mport: int, path: str, blob: bytes) -> dict[str, float]:
    """Read bytes 300000-300099 of `blob` through the registry; its IPFS reads by node."""
    r = request(f"127.0.0.1:{port}", "GET", path, {"Range": "bytes=300000-300099"})
    assert r.status == 206 and r.body == blob[300000:300100]
    metrics = request(f"127.0.0.1:{mport}", "GET", "/metrics").body.decode()
    prefix = 'peerstar_registry_upstream_reads_total{node="'
    return {line[len(prefix):].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines() if line.startswith(prefix)}


@pytest.mark.parametrize(("args", "env", "message"), [
    ([], {"PEERSTAR_REGISTRY_LISTEN": "0.0.0.0:5999"}, "refusing to listen on non-loopback"),
    (["--listen", ":5999"], {}, "has no host"),
    (["--listen", "localhost"], {}, "is not HOST:PORT"),
    (["--read-timeout", "soon"], {}, "is not a duration"),
    (["--read-retry-num", "-1"], {}, "between 0 and 100"),
    (["--metrics-listen", "0.0.0.0:5998"], {}, "refusing to listen on non-loopback"),
    (["--mirror", "ftp://example.com"], {}, "must be http(s)://HOST[:PORT]"),
    (["--mirror", "docker.io=https://registry-1.docker.io/v2"], {}, "must be http(s)://"),
    (["--mirror", "bad ns=http://x:5000"], {}, "is not a registry host"),
    (["--mirror", "http://a:1", "--mirror", "a:1=http://b:2"], {}, "named more than once"),
    ([], {"PEERSTAR_REGISTRY_MIRRORS": "http://a:1,nope"}, "must be http(s)://"),
    (["--mirror", "http://a:1", "--mirror-tag-ttl", "never"], {}, "is not a duration"),
    (["--mirror", "http://a:1", "--mirror-lookup-timeout", "0ms"], {}, "more than zero"),
    (["--mirror", "http://a:1", "--mirror-access-ttl", "later"], {}, "is not a duration"),
    ([], {"PEERSTAR_REGISTRY_MIRRORS": "http://a:1",
          "PEERSTAR_REGISTRY_MIRROR_OFFLINE_GRACE": "0s"}, "more than zero"),
    (["--learn-window", "0s"], {}, "--learn-window: the duration must be more than zero"),
    ([], {"PEERSTAR_REGISTRY_LEARN_WINDOW": "soon"}, "--learn-window: 'soon' is not a duration"),
])
def test_bad_settings_fail_cleanly(tmp_path: Path, args: list[str], env: dict[str, str],
                                   message: str) -> None:
    proc = run_peerstar("registry", "serve", "--root", str(tmp_path), *args,
                        env=_clean_env(**env), timeout=30)
    assert proc.returncode == 1
    assert_one_line_error(proc, message)


def test_non_loopback_allowed_with_explicit_listen(tmp_path: Path) -> None:
    port = free_port()
    with serving_registry("--root", tmp_path, "--listen", f"0.0.0.0:{port}", "--no-access-log",
                          log=tmp_path / "registry.log", env=_clean_env()):
        assert wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/v2/"), 5, 0.1)


def test_parsers() -> None:
    from peerstar.cli.registry import parse_duration, parse_listen, parse_size

    assert parse_duration("30s", "x") == 30
    assert parse_duration("500ms", "x") == 0.5
    assert parse_duration("2m", "x") == 120
    assert parse_duration("1.5", "x") == 1.5
    for bad in ("0s", "-1s", "1d", ""):
        with pytest.raises(PeerstarError):
            parse_duration(bad, "x")
    assert parse_size("64MiB", "x") == 64 << 20
    assert parse_size("512K", "x") == 512 << 10
    assert parse_size("100", "x") == 100
    assert parse_listen("localhost:5050", "x") == ("localhost", 5050)
    assert parse_listen("[::1]:5050", "x") == ("::1", 5050)
    with pytest.raises(PeerstarError):
        parse_listen("localhost:99999", "x")


def test_mirrors_from_the_environment(tmp_path: Path) -> None:
    port = free_port()
    env = _clean_env(PEERSTAR_REGISTRY_MIRRORS="up.example:5000=http://127.0.0.1:9, "
                     "http://127.0.0.1:8", PEERSTAR_REGISTRY_LISTEN=f"127.0.0.1:{port}")
    with serving_registry("--root", tmp_path, "--no-access-log", log=tmp_path / "reg.log",
                          env=env):
        host = f"127.0.0.1:{port}"
        r = request(host, "GET", "/v2/team/app/manifests/1?ns=docker.io")
        assert (r.status, r.error_code()) == (404, "NAME_UNKNOWN")
        assert "127.0.0.1:8, up.example:5000" in r.body.decode()
        # a configured upstream that does not answer: a clear 502, not a hang
        r = request(host, "GET", "/v2/team/app/manifests/1?ns=up.example:5000")
        assert (r.status, r.error_code()) == (502, "UNAVAILABLE")
