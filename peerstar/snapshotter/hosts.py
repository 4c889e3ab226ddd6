"""containerd's registry host configuration (`hosts.toml`), read as containerd reads it.

Owns: finding a registry's directory under containerd's `config_path` (the snapshotter's
`[remote] hosts_dir`, default /etc/containerd/certs.d): `<dir>/<host>`, then
`<dir>/<host with ":port" as "_port_">`, then `<dir>/_default`; parsing its `hosts.toml`
(`parse_hosts`, pure: text in, hosts out) into the hosts a layer is read from, in
containerd's order -- every `[host."URL"]` table in the order the file lists them, then
`server` (the registry itself when there is none) -- and the blob URL on each host
(`RegistryHost.blob_url`), with `?ns=<registry>` on a host that is not the image's own
registry, as containerd's `remotes/docker` resolver sends it (a mirror learns which
upstream is meant; docker.io's own API host gets none).

Supported keys (containerd 1.6 `config/hosts.go`): `server`, `[host."URL"]`; on each,
`capabilities` (default pull, resolve, push; only hosts with `pull` serve layers),
`ca` (a file or a list, relative to the host's directory), `skip_verify`,
`override_path`. A URL without a scheme is HTTPS; `http://` is plain HTTP. `client`
(TLS client certificates) and `header` are read and not applied. A file that does not
parse is ignored with a warning (the registry alone is used), as containerd does.
"""

from __future__ import annotations

import logging
import posixpath
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from peerstar.errors import PeerstarError

log = logging.getLogger("peerstar.snapshotter.hosts")

DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
CAPABILITIES = frozenset({"pull", "resolve", "push"})


class HostsError(PeerstarError):
    """A hosts.toml that cannot be used (the message says which key and why)."""


@dataclass(frozen=True)
class RegistryHost:
    """One host a registry's content can be read from."""

    scheme: str  # "https" or "http"
    host: str  # host[:port]
    path: str = "/v2"  # the API root
    capabilities: frozenset[str] = CAPABILITIES
    ca: tuple[str, ...] = ()  # absolute paths of extra trusted CA files
    skip_verify: bool = False

    def blob_url(self, registry: str, repository: str, digest: str) -> str:
        """The URL of blob `digest` of `registry/repository` on this host."""
        url = f"{self.scheme}://{self.host}{self.path}/{repository}/blobs/{digest}"
        if _is_proxy(self.host, registry):
            url += "?" + urlencode({"ns": registry})
        return url


def _is_proxy(host: str, registry: str) -> bool:
    """containerd's `isProxy`: a host that is not the image's registry (docker.io's API
    host is docker.io's own)."""
    return host != registry and not (registry == DOCKER_HUB and host == DOCKER_HUB_API)


def default_host(registry: str, plain_http: bool) -> RegistryHost:
    """The registry itself, when no hosts.toml names its `server`."""
    if registry == DOCKER_HUB:
        return RegistryHost("https", DOCKER_HUB_API)
    return RegistryHost("http" if plain_http else "https", registry)


def parse_hosts(text: str, registry: str, *, base_dir: str,
                plain_http: bool = False) -> list[RegistryHost]:
    """The hosts `hosts.toml` (`text`, in directory `base_dir`) lists for `registry`, in
    the order containerd tries them: the `[host."URL"]` tables, then `server` (the
    registry itself, with plain HTTP if `plain_http`, when the file names none)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HostsError(f"not valid TOML: {exc}") from None
    tables = data.get("host", {})
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        raise HostsError('"host" must hold [host."URL"] tables')
    hosts = [_host(url, conf, base_dir, f'[host."{url}"]') for url, conf in tables.items()]
    server = data.get("server", "")
    if not isinstance(server, str):
        raise HostsError(f"server: expected a URL string, got {server!r}")
    top = {k: v for k, v in data.items() if k not in ("host", "server")}
    if not server:
        own = default_host(registry, plain_http)
        server = f"{own.scheme}://{own.host}"
    hosts.append(_host(server, top, base_dir, "server"))
    return hosts


def _host(url: str, conf: dict[str, Any], base_dir: str, where: str) -> RegistryHost:
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HostsError(f"{where}: {url!r} is not an http(s) URL")
    override = conf.get("override_path", False)
    if not isinstance(override, bool):
        raise HostsError(f"{where}: override_path must be true or false")
    path = posixpath.normpath(parts.path) if parts.path else ""
    path = "" if path == "/" else path
    if not override and not path.endswith("/v2"):
        path += "/v2"
    caps = conf.get("capabilities")
    if caps is None:
        capabilities = CAPABILITIES
    elif isinstance(caps, list) and all(isinstance(c, str) for c in caps):
        capabilities = frozenset(c.lower() for c in caps)
        unknown = capabilities - CAPABILITIES
        if unknown:
            raise HostsError(f"{where}: unknown capability {sorted(unknown)[0]!r} "
                             "(known: pull, resolve, push)")
    else:
        raise HostsError(f"{where}: capabilities must be a list of strings")
    ca = conf.get("ca", [])
    cas = [ca] if isinstance(ca, str) else ca
    if not isinstance(cas, list) or not all(isinstance(c, str) for c in cas):
        raise HostsError(f"{where}: ca must be a file name or a list of them")
    skip = conf.get("skip_verify", False)
    if not isinstance(skip, bool):
        raise HostsError(f"{where}: skip_verify must be true or false")
    return RegistryHost(parts.scheme, parts.netloc, path, capabilities,
                        tuple(str(Path(base_dir, c)) for c in cas), skip)


def host_dir(hosts_dir: str, registry: str) -> Path | None:
    """The directory of `registry` under `hosts_dir`, as containerd looks it up."""
    names = [registry]
    colon = registry.rfind(":")
    if colon > 0 and not registry.endswith("]"):
        names.append(f"{registry[:colon]}_{registry[colon + 1:]}_")
    names.append("_default")
    for name in names:
        d = Path(hosts_dir, name)
        if d.is_dir():
            return d
    return None


def registry_hosts(hosts_dir: str, registry: str, *, plain_http: bool = False
                   ) -> list[RegistryHost]:
    """The hosts to read `registry`'s layers from (capability pull), mirrors first.

    No `hosts_dir`, no directory or no hosts.toml for the registry: the registry alone.
    A hosts.toml that cannot be read or parsed is logged and ignored (containerd's rule).
    """
    d = host_dir(hosts_dir, registry) if hosts_dir else None
    if d is None:
        return [default_host(registry, plain_http)]
    path = d / "hosts.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [default_host(registry, plain_http)]
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("%s: cannot read it (%s); reading %s from the registry alone", path,
                    exc, registry)
        return [default_host(registry, plain_http)]
    try:
        hosts = parse_hosts(text, registry, base_dir=str(d), plain_http=plain_http)
    except HostsError as exc:
        log.warning("%s: %s; reading %s from the registry alone", path, exc, registry)
        return [default_host(registry, plain_http)]
    return [h for h in hosts if "pull" in h.capabilities]
