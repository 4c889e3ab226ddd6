"""containerd's hosts.toml as the snapshotter reads it: host order, defaults, paths,
capabilities, `ns` on mirror URLs, the directory lookup, and files that do not parse."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from peerstar.snapshotter.hosts import (
    CAPABILITIES,
    HostsError,
    RegistryHost,
    default_host,
    host_dir,
    parse_hosts,
    registry_hosts,
)

DIGEST = "sha256:" + "ab" * 32

DOCKER_HUB_TOML = '''
server = "https://registry-1.docker.io"

[host."http://localhost:5050"]
  capabilities = ["pull", "resolve"]

[host."https://mirror.example:8443/base"]
  capabilities = ["pull"]
  ca = "mirror-ca.pem"

[host."push.example"]
  capabilities = ["push"]
'''


def test_hosts_in_file_order_then_server() -> None:
    hosts = parse_hosts(DOCKER_HUB_TOML, "docker.io", base_dir="/etc/certs.d/docker.io")
    assert hosts == [
        RegistryHost("http", "localhost:5050", "/v2", frozenset({"pull", "resolve"})),
        RegistryHost("https", "mirror.example:8443", "/base/v2", frozenset({"pull"}),
                     ("/etc/certs.d/docker.io/mirror-ca.pem",)),
        RegistryHost("https", "push.example", "/v2", frozenset({"push"})),
        RegistryHost("https", "registry-1.docker.io", "/v2", CAPABILITIES),
    ]
    urls = [h.blob_url("docker.io", "library/python", DIGEST) for h in hosts]
    assert urls == [
        f"http://localhost:5050/v2/library/python/blobs/{DIGEST}?ns=docker.io",
        f"https://mirror.example:8443/base/v2/library/python/blobs/{DIGEST}?ns=docker.io",
        f"https://push.example/v2/library/python/blobs/{DIGEST}?ns=docker.io",
        # docker.io's own API host is not a mirror: no ns
        f"https://registry-1.docker.io/v2/library/python/blobs/{DIGEST}",
    ]


def test_server_defaults_and_ns_encoding() -> None:
    text = '[host."http://127.0.0.1:5050"]\ncapabilities = ["pull"]\n'
    hosts = parse_hosts(text, "10.0.0.5:5000", base_dir="/d", plain_http=True)
    assert hosts[-1] == RegistryHost("http", "10.0.0.5:5000")  # no server: the registry
    assert hosts[0].blob_url("10.0.0.5:5000", "app", DIGEST) == \
        f"http://127.0.0.1:5050/v2/app/blobs/{DIGEST}?ns=10.0.0.5%3A5000"
    assert hosts[-1].blob_url("10.0.0.5:5000", "app", DIGEST) == \
        f"http://10.0.0.5:5000/v2/app/blobs/{DIGEST}"
    assert parse_hosts("", "quay.io", base_dir="/d") == [RegistryHost("https", "quay.io")]
    assert default_host("docker.io", True) == RegistryHost("https", "registry-1.docker.io")
    # override_path: the URL's path is the API root as written
    [h, _] = parse_hosts('[host."https://m.example/api/x"]\noverride_path = true\n',
                         "quay.io", base_dir="/d")
    assert h.path == "/api/x"
    [h, _] = parse_hosts('[host."https://m.example/v2"]\n', "quay.io", base_dir="/d")
    assert h.path == "/v2"


@pytest.mark.parametrize(("text", "message"), [
    ("server = [", "not valid TOML"),
    ('[host."http://m"]\ncapabilities = ["pull", "fly"]\n', "unknown capability 'fly'"),
    ('[host."http://m"]\ncapabilities = "pull"\n', "capabilities must be a list"),
    ('[host."ftp://m"]\n', "not an http"),
    ('[host."http://m"]\nskip_verify = "yes"\n', "skip_verify must be true or false"),
    ('[host."http://m"]\nca = 3\n', "ca must be a file name"),
    ("server = 5\n", "server: expected a URL string"),
    ('host = "x"\n', "must hold"),
])
def test_bad_files(text: str, message: str) -> None:
    with pytest.raises(HostsError, match=message):
        parse_hosts(text, "quay.io", base_dir="/d")


def test_directory_lookup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert registry_hosts("", "quay.io") == [RegistryHost("https", "quay.io")]
    assert registry_hosts(str(tmp_path), "127.0.0.1:5000", plain_http=True) == [
        RegistryHost("http", "127.0.0.1:5000")]  # no directory: the registry alone
    # containerd's order: <host:port>, then <host_port_>, then _default
    (tmp_path / "_default").mkdir()
    assert host_dir(str(tmp_path), "127.0.0.1:5000") == tmp_path / "_default"
    (tmp_path / "127.0.0.1_5000_").mkdir()
    assert host_dir(str(tmp_path), "127.0.0.1:5000") == tmp_path / "127.0.0.1_5000_"
    d = tmp_path / "127.0.0.1:5000"
    d.mkdir()
    assert host_dir(str(tmp_path), "127.0.0.1:5000") == d
    # a directory without hosts.toml: the registry alone
    assert registry_hosts(str(tmp_path), "127.0.0.1:5000", plain_http=True) == [
        RegistryHost("http", "127.0.0.1:5000")]
    # only hosts that can pull are returned
    (d / "hosts.toml").write_text('server = "http://127.0.0.1:5000"\n'
                                  '[host."http://127.0.0.1:6000"]\ncapabilities = ["resolve"]\n'
                                  '[host."http://127.0.0.1:7000"]\n')
    assert [h.host for h in registry_hosts(str(tmp_path), "127.0.0.1:5000")] == [
        "127.0.0.1:7000", "127.0.0.1:5000"]
    # a file that does not parse is ignored with a warning, as containerd does
    (d / "hosts.toml").write_text('[host."http://m"]\ncapabilities = ["fly"]\n')
    with caplog.at_level(logging.WARNING, "peerstar.snapshotter.hosts"):
        assert registry_hosts(str(tmp_path), "127.0.0.1:5000", plain_http=True) == [
            RegistryHost("http", "127.0.0.1:5000")]
    assert "unknown capability 'fly' (known: pull, resolve, push); reading 127.0.0.1:5000 " \
        "from the registry alone" in \
        caplog.text
