"""Registry credentials for lazily mounted layers, found the way the Go stargz-snapshotter's
default keychain finds them: in a docker config file.

Owns: where that file is (`[remote] auth_file` if configured, else
`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`), reading it (re-read when it
changes, so `docker login` / a rotated Secret applies to the next mount without a
restart), and the lookup of one registry host in it, with the docker CLI's rules:

- `auths` entries keyed by host (`10.0.0.5:5000`) or by URL (`https://host/v1/`, the
  key is reduced to its host); Docker Hub (`docker.io`, `registry-1.docker.io`) is
  `https://index.docker.io/v1/`;
- an entry's `auth` is base64 of `user:password`; without it, `username` / `password`;
  `identitytoken` is an OAuth2 refresh token (exchanged at the registry's token
  endpoint), `registrytoken` a bearer token sent as is;
- `credHelpers[host]`, else `credsStore`, names a credential helper: the program
  `docker-credential-NAME get` is asked (server address on stdin, JSON on stdout).

A missing default file means anonymous access; a missing `auth_file`, a file that is not
JSON, or an entry that cannot be decoded is a `CredentialsError` naming the file, the
host and what is wrong. Secrets never appear in a `repr`, a log line or an error.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peerstar.errors import PeerstarError

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
HELPER_TIMEOUT = 10.0  # seconds a credential helper may take


class CredentialsError(PeerstarError):
    """The registry credentials cannot be read; the message names the file and why."""


@dataclass(frozen=True)
class Credentials:
    """What to authenticate to one registry with; `source` says where it came from."""

    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)  # OAuth2 refresh token
    registry_token: str | None = field(default=None, repr=False)  # bearer token as is
    source: str = ""

    @property
    def empty(self) -> bool:
        return not (self.username or self.password or self.identity_token
                    or self.registry_token)


def docker_config_path(auth_file: str = "", environ: dict[str, str] | None = None) -> Path:
    """The file credentials are read from: `auth_file`, `$DOCKER_CONFIG/config.json` or
    `~/.docker/config.json` (the docker CLI's order)."""
    env = os.environ if environ is None else environ
    if auth_file:
        return Path(auth_file)
    if env.get("DOCKER_CONFIG"):
        return Path(env["DOCKER_CONFIG"]) / "config.json"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".docker" / "config.json"


def _key_host(key: str) -> str:
    """The docker CLI's ConvertToHostname: `https://host:5000/v1/` -> `host:5000`."""
    for prefix in ("http://", "https://"):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return key.split("/", 1)[0]


def parse_docker_config(text: str, source: str) -> dict[str, Any]:
    """The JSON object of a docker config file; CredentialsError naming `source`."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CredentialsError(f"registry credentials file {source} is not valid JSON "
                               f"({exc}); fix or remove it") from None
    if not isinstance(data, dict):
        raise CredentialsError(f"registry credentials file {source}: expected a JSON "
                               f"object, got {type(data).__name__}")
    for key in ("auths", "credHelpers"):
        if key in data and not isinstance(data[key], dict):
            raise CredentialsError(f"registry credentials file {source}: {key!r} must be an "
                                   f"object mapping registry hosts to entries")
    if "credsStore" in data and not isinstance(data["credsStore"], str):
        raise CredentialsError(f"registry credentials file {source}: 'credsStore' must be "
                               f"a string")
    return data


def _decode_entry(entry: Any, host: str, source: str) -> Credentials:
    where = f"registry credentials file {source}, entry for {host}"
    if not isinstance(entry, dict):
        raise CredentialsError(f"{where}: expected an object, got {type(entry).__name__}")
    for k in ("auth", "username", "password", "identitytoken", "registrytoken"):
        if entry.get(k) is not None and not isinstance(entry[k], str):
            raise CredentialsError(f"{where}: {k!r} must be a string")
    username, password = entry.get("username") or None, entry.get("password") or None
    if entry.get("auth"):
        try:
            raw = base64.b64decode(entry["auth"], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsError(f"{where}: 'auth' is not base64 of \"user:password\"; "
                                   f"log in again (docker login / ctr --user)") from None
        username, sep, password = raw.partition(":")
        if not sep:
            raise CredentialsError(f"{where}: 'auth' decodes to no \"user:password\" pair")
    return Credentials(username or None, password or None,
                       entry.get("identitytoken") or None, entry.get("registrytoken") or None,
                       source=f"{source} (auths)")


def _run_helper(name: str, server: str, source: str) -> Credentials | None:
    """`docker-credential-NAME get`: None when it knows no credentials for `server`."""
    program = f"docker-credential-{name}"
    path = shutil.which(program)
    if path is None:
        raise CredentialsError(f"credential helper {program} (named in {source}) is not "
                               f"installed or not on PATH")
    try:
        proc = subprocess.run([path, "get"], input=server.encode(), capture_output=True,
                              timeout=HELPER_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise CredentialsError(f"credential helper {program} gave no answer for {server} "
                               f"within {HELPER_TIMEOUT:.0f} s") from None
    out = proc.stdout.decode(errors="replace").strip()
    if proc.returncode != 0:
        if "credentials not found" in out.lower():
            return None  # the helpers' own word for "nothing stored for this server"
        err = (proc.stderr.decode(errors="replace").strip() or out)[-300:]
        raise CredentialsError(f"credential helper {program} failed for {server} "
                               f"(exit status {proc.returncode}): {err}")
    try:
        data = json.loads(out)
        user, secret = data.get("Username") or "", data.get("Secret") or ""
    except (ValueError, AttributeError):
        raise CredentialsError(f"credential helper {program} answered for {server} with "
                               f"no JSON object") from None
    src = f"credential helper {program}"
    if user == "<token>":  # the helpers' way of storing an identity token
        return Credentials(identity_token=secret or None, source=src)
    return Credentials(user or None, secret or None, source=src)


def lookup(config: dict[str, Any], host: str, source: str) -> Credentials | None:
    """The credentials `config` (a parsed docker config) holds for registry `host`."""
    hub = host in _DOCKER_HUB_HOSTS
    server = DOCKER_HUB_KEY if hub else host
    helpers = config.get("credHelpers") or {}
    helper = helpers.get(server) or helpers.get(host) or config.get("credsStore") or ""
    if helper:
        if not isinstance(helper, str):
            raise CredentialsError(f"registry credentials file {source}: credHelpers entry "
                                   f"for {host} must be a string")
        found = _run_helper(helper, server, source)
        if found is not None and not found.empty:
            return found
    auths = config.get("auths") or {}
    wanted = {_key_host(DOCKER_HUB_KEY), *_DOCKER_HUB_HOSTS} if hub else {host}
    entry = auths.get(server)
    if entry is None:
        for key, value in auths.items():
            if _key_host(key) in wanted:
                entry = value
                break
    if entry is None:
        return None
    creds = _decode_entry(entry, host, source)
    return None if creds.empty else creds


class Keychain:
    """Credentials per registry host from one docker config file, re-read when it
    changes (size or mtime); thread-safe."""

    def __init__(self, auth_file: str = "") -> None:
        self.explicit = bool(auth_file)
        self.path = docker_config_path(auth_file)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._config: dict[str, Any] = {}

    def _load(self) -> dict[str, Any]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self.explicit:
                raise CredentialsError(f"registry credentials file {self.path} (auth_file) "
                                       f"does not exist") from None
            return {}  # no docker login on this node: anonymous, as the Go keychain
        except OSError as exc:
            raise CredentialsError(f"registry credentials file {self.path}: "
                                   f"{exc.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp == self._stamp:
                return self._config
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialsError(f"registry credentials file {self.path}: "
                                   f"{getattr(exc, 'strerror', None) or exc}") from None
        config = parse_docker_config(text, str(self.path))
        with self._lock:
            self._stamp, self._config = stamp, config
        return config

    def check(self) -> None:
        """Read the file now (at start-up): CredentialsError if it is unusable."""
        self._load()

    def lookup(self, host: str) -> Credentials | None:
        """The credentials for registry `host` (`HOST[:PORT]`), None for anonymous."""
        return lookup(self._load(), host, str(self.path))
