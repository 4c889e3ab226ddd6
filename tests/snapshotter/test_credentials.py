"""Registry credentials from docker config files (peerstar.snapshotter.credentials), the
`auth_file` / `ca_file` config keys, and the credentials `LayerMounter` hands to
`lazyfs.mount_layer` (never argv, never the snapshot's persisted JSON)."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from peerstar.lazyfs import MountError
from peerstar.lazyfs.state import PASSWORD_ENV, USERNAME_ENV, auth_to_env
from peerstar.snapshotter.config import ConfigError, RemoteConfig, load_config, parse_config
from peerstar.snapshotter.credentials import (
    Credentials,
    CredentialsError,
    Keychain,
    docker_config_path,
    lookup,
    parse_docker_config,
)
from peerstar.snapshotter.remote import LayerMounter, RemoteLayer
from tests.support.tls import make_ca


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# -- the file and its parsing ------------------------------------------------------------


def test_config_path_order() -> None:
    assert docker_config_path("/etc/x.json", {"DOCKER_CONFIG": "/d", "HOME": "/h"}) == \
        Path("/etc/x.json")
    assert docker_config_path("", {"DOCKER_CONFIG": "/d", "HOME": "/h"}) == \
        Path("/d/config.json")
    assert docker_config_path("", {"HOME": "/h"}) == Path("/h/.docker/config.json")


def test_auth_field_and_username_password_fields() -> None:
    cfg = {"auths": {"reg.example:5000": {"auth": b64("alice:pa:ss")},
                     "other.example": {"username": "bob", "password": "pw"}}}
    a = lookup(cfg, "reg.example:5000", "F")
    assert a is not None and (a.username, a.password) == ("alice", "pa:ss")
    b = lookup(cfg, "other.example", "F")
    assert b is not None and (b.username, b.password) == ("bob", "pw")
    assert lookup(cfg, "unknown.example", "F") is None
    assert lookup({}, "reg.example:5000", "F") is None


def test_url_keys_and_docker_hub() -> None:
    cfg = {"auths": {"https://reg.example:5000/v1/": {"auth": b64("u:p")},
                     "https://index.docker.io/v1/": {"auth": b64("hub:secret")}}}
    found = lookup(cfg, "reg.example:5000", "F")
    assert found is not None and found.username == "u"
    for host in ("registry-1.docker.io", "docker.io"):
        hub = lookup(cfg, host, "F")
        assert hub is not None and (hub.username, hub.password) == ("hub", "secret")
    # A key for another port is another registry.
    assert lookup(cfg, "reg.example", "F") is None


def test_identity_and_registry_tokens() -> None:
    cfg = {"auths": {"a.example": {"identitytoken": "refresh-1"},
                     "b.example": {"registrytoken": "bearer-1"},
                     "c.example": {"auth": ""}}}
    a = lookup(cfg, "a.example", "F")
    assert a is not None and a.identity_token == "refresh-1" and a.username is None
    b = lookup(cfg, "b.example", "F")
    assert b is not None and b.registry_token == "bearer-1"
    assert lookup(cfg, "c.example", "F") is None  # an empty entry: anonymous


def test_secrets_never_in_repr() -> None:
    c = Credentials("alice", "hunter2", "tok", "bear", source="F")
    assert "hunter2" not in repr(c) and "tok" not in repr(c) and "bear" not in repr(c)


@pytest.mark.parametrize("text, want", [
    ('{"auths": {', "is not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"auths": []}', "'auths' must be an object"),
    ('{"credsStore": 3}', "'credsStore' must be a string"),
])
def test_bad_file_names_the_file(text: str, want: str) -> None:
    with pytest.raises(CredentialsError) as exc:
        parse_docker_config(text, "/etc/peerstar/creds.json")
    assert "/etc/peerstar/creds.json" in str(exc.value) and want in str(exc.value)


@pytest.mark.parametrize("entry, want", [
    ({"auth": "%%%not base64"}, "'auth' is not base64"),
    ({"auth": b64("no-colon")}, "no \"user:password\" pair"),
    ({"username": 5}, "'username' must be a string"),
    ("text", "expected an object"),
])
def test_bad_entry_names_file_and_host(entry: object, want: str) -> None:
    with pytest.raises(CredentialsError) as exc:
        lookup({"auths": {"reg.example": entry}}, "reg.example", "/x/config.json")
    text = str(exc.value)
    assert "/x/config.json" in text and "reg.example" in text and want in text


# -- the keychain ------------------------------------------------------------------------


def test_keychain_default_missing_is_anonymous(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    kc = Keychain()
    kc.check()
    assert kc.path == tmp_path / ".docker" / "config.json"
    assert kc.lookup("reg.example") is None


def test_keychain_reads_docker_config_env_and_rereads_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "d"))
    path = write(tmp_path / "d" / "config.json", {"auths": {"r.example": {"auth": b64("a:1")}}})
    kc = Keychain()
    first = kc.lookup("r.example")
    assert first is not None and first.password == "1"
    assert first.source == f"{path} (auths)"
    write(path, {"auths": {"r.example": {"auth": b64("a:22")}}})  # a new size
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    second = kc.lookup("r.example")
    assert second is not None and second.password == "22"


def test_keychain_explicit_file_must_exist_and_parse(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="auth_file.*does not exist"):
        Keychain(str(tmp_path / "missing.json")).check()
    bad = write(tmp_path / "bad.json", "{not json")
    with pytest.raises(CredentialsError) as exc:
        Keychain(str(bad)).lookup("r.example")
    assert str(bad) in str(exc.value) and "not valid JSON" in str(exc.value)


def _helper(bindir: Path, name: str, body: str) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / f"docker-credential-{name}"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_credential_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    # Answers with the server it was asked about, read from stdin.
    _helper(bindir, "fake", 'read s; [ "$1" = get ] || exit 2\n'
            'case "$s" in nothing*) echo "credentials not found in native keychain"; exit 1;;'
            ' esac\nprintf \'{"ServerURL":"%s","Username":"h-%s","Secret":"pw"}\' "$s" "$s"\n')
    _helper(bindir, "token", 'read s\nprintf \'{"Username":"<token>","Secret":"idt"}\'\n')
    _helper(bindir, "broken", 'echo "boom" >&2; exit 3\n')
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    cfg = {"credsStore": "fake", "credHelpers": {"t.example": "token",
                                                 "x.example": "broken",
                                                 "m.example": "missing"},
           "auths": {"nothing.example": {"auth": b64("from:auths")}}}
    a = lookup(cfg, "r.example:5000", "F")
    assert a is not None and (a.username, a.password) == ("h-r.example:5000", "pw")
    assert a.source == "credential helper docker-credential-fake"
    hub = lookup(cfg, "registry-1.docker.io", "F")
    assert hub is not None and hub.username == "h-https://index.docker.io/v1/"
    t = lookup(cfg, "t.example", "F")
    assert t is not None and t.identity_token == "idt" and t.username is None
    # The store knows nothing for this server: the auths entry is used.
    n = lookup(cfg, "nothing.example", "F")
    assert n is not None and (n.username, n.password) == ("from", "auths")
    with pytest.raises(CredentialsError, match="docker-credential-broken failed.*boom"):
        lookup(cfg, "x.example", "F")
    with pytest.raises(CredentialsError, match="docker-credential-missing .* not on PATH"):
        lookup(cfg, "m.example", "F")


# -- config keys -------------------------------------------------------------------------


def test_config_keys(tmp_path: Path) -> None:
    cfg = parse_config({"remote": {"auth_file": "/a.json", "ca_file": "/ca.pem"}})
    assert (cfg.remote.auth_file, cfg.remote.ca_file) == ("/a.json", "/ca.pem")
    assert (RemoteConfig().auth_file, RemoteConfig().ca_file) == ("", "")
    with pytest.raises(ConfigError, match="remote.ca_file"):
        parse_config({"remote": {"ca_file": 1}})


def test_load_config_checks_the_named_files(tmp_path: Path) -> None:
    conf = tmp_path / "s.toml"
    bad = write(tmp_path / "creds.json", '{"auths": ')
    conf.write_text(f'[remote]\nauth_file = "{bad}"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(conf)
    assert f"{conf}: remote.auth_file: " in str(exc.value) and str(bad) in str(exc.value)
    conf.write_text(f'[remote]\nca_file = "{tmp_path / "none.pem"}"\n')
    with pytest.raises(ConfigError, match="remote.ca_file: CA file .*none.pem does not exist"):
        load_config(conf)
    pem = write(tmp_path / "ca.pem", "garbage\n")
    conf.write_text(f'[remote]\nca_file = "{pem}"\n')
    with pytest.raises(ConfigError, match="holds no usable PEM certificate"):
        load_config(conf)
    good = write(tmp_path / "good.json", {"auths": {}})
    ca = make_ca(tmp_path / "pki")
    conf.write_text(f'[remote]\nauth_file = "{good}"\nca_file = "{ca.cert}"\n')
    loaded = load_config(conf).remote
    assert (loaded.auth_file, loaded.ca_file) == (str(good), str(ca.cert))


# -- what LayerMounter hands to lazyfs ---------------------------------------------------


LAYER = RemoteLayer("r.example:5000/app:v1", "sha256:" + "a" * 64, "sha256:" + "b" * 64,
                    "https://r.example:5000/v2/app/blobs/sha256:" + "a" * 64)


def _capture(monkeypatch: pytest.MonkeyPatch, fail: str = "") -> dict[str, Any]:
    from peerstar import lazyfs

    seen: dict[str, Any] = {}

    def fake_mount_layer(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs, options=args[5])
        raise lazyfs.MountError(fail or "stop here")

    monkeypatch.setattr(lazyfs, "mount_layer", fake_mount_layer)
    return seen


def test_mounter_passes_credentials_of_the_layers_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = write(tmp_path / "c.json", {"auths": {
        "r.example:5000": {"auth": b64("alice:pw1")}, "o.example": {"auth": b64("x:y")}}})
    seen = _capture(monkeypatch, "HTTP 401")
    mounter = LayerMounter(RemoteConfig(auth_file=str(auth), zygote=False), tmp_path / "c")
    with pytest.raises(MountError) as exc:
        mounter.mount(LAYER, tmp_path)
    # All of them, as the daemon gets them: no bearer or refresh token besides.
    assert auth_to_env(seen["auth"]) == {USERNAME_ENV: "alice", PASSWORD_ENV: "pw1"}
    assert f"credentials for r.example:5000 from {auth} (auths)" in str(exc.value)
    assert "pw1" not in str(exc.value)
    assert "pw1" not in json.dumps(LAYER.to_json())


def test_mounter_without_credentials_says_so(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    auth = write(tmp_path / "c.json", {"auths": {}})
    seen = _capture(monkeypatch)
    mounter = LayerMounter(RemoteConfig(auth_file=str(auth), zygote=False), tmp_path / "c")
    with pytest.raises(MountError, match=f"no credentials for r.example:5000 in {auth}"):
        mounter.mount(LAYER, tmp_path)
    assert auth_to_env(seen["auth"]) == {}


def test_mounter_bad_credentials_file_fails_the_mount(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = write(tmp_path / "c.json", {"auths": {}})
    mounter = LayerMounter(RemoteConfig(auth_file=str(auth), zygote=False), tmp_path / "c")
    seen = _capture(monkeypatch)
    auth.write_text("{broken")  # edited badly after the start
    with pytest.raises(MountError) as exc:
        mounter.mount(LAYER, tmp_path)
    assert "registry credentials for r.example:5000" in str(exc.value)
    assert str(auth) in str(exc.value) and "not valid JSON" in str(exc.value)
    assert seen == {}  # no daemon was started


def test_mounter_passes_the_ca_file_as_an_option(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`[remote] ca_file` reaches the mount as an option (absolute: the daemon may run
    elsewhere), with the rest of `[remote]`; the process environment is left alone."""
    environ = dict(os.environ)
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "ca.pem", "x")
    seen = _capture(monkeypatch)
    auth = write(tmp_path / "c.json", {"auths": {}})
    cfg = RemoteConfig(ca_file="ca.pem", auth_file=str(auth), zygote=False,
                       region_size=1234, retries=7,
                       prefetch_size=99, background_fetch=False, mount_timeout=12.5)
    mounter = LayerMounter(cfg, tmp_path / "c")
    with pytest.raises(MountError):
        mounter.mount(RemoteLayer(**{**LAYER.to_json(), "prefetch_size": 4096}), tmp_path)
    opts = seen["options"]
    assert opts.fetch.ca_file == str((tmp_path / "ca.pem").resolve())
    assert (opts.fetch.region_size, opts.fetch.retries) == (1234, 7)
    assert (opts.prefetch.size, opts.prefetch.background) == (4096, False)  # the layer's
    assert opts.open_timeout == 12.5 and mounter.options.prefetch.size == 99
    assert dict(os.environ) == environ
