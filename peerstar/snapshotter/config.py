"""Snapshotter settings: defaults, the TOML file, and command-line overrides.

Owns: `SnapshotterConfig` (every knob of `peerstar snapshotter serve`) and `load_config`,
which reads `/etc/peerstar/snapshotter.toml` (or `--config FILE`) with `tomllib`. Flags
given on the command line win over the file; a missing default file is fine, a missing
file named with `--config` is an error, and so is an unknown key (a typo must not be
silently ignored).

File format (every key optional):

    address = "/run/peerstar/snapshotter.sock"
    root = "/var/lib/peerstar/snapshotter"
    metrics_address = "127.0.0.1:9746"   # "" = no metrics endpoint

    [remote]
    enable = true                 # false: every layer takes the fallback path
    prefetch_timeout = 10.0       # seconds a mount waits for prioritized files
    prefetch_size = 0             # bytes to prefetch when a layer has no landmark
    region_size = 50000           # bytes per fetched region
    region_cache_bytes = "10%"    # compressed-region cache bound: bytes, or a share of
                                  # the filesystem holding `root` ("N%"); 0 = unbounded
    chunk_cache_bytes = "10%"     # verified-chunk cache bound, the same way
    background_fetch = true       # fetch the rest of a layer when idle
    verify = true                 # check TOC and chunk digests (false is DANGEROUS)
    request_timeout = 30.0        # seconds per HTTP request
    retries = 3
    mount_timeout = 60.0          # seconds to wait for a layer mount as a whole
    insecure_hosts = []           # extra registries spoken to over plain HTTP
    zygote = true                 # fork layer daemons from a pre-warmed process
                                  # (false: a fresh `python -m` per layer, ~0.3 s slower)
    auth_file = ""                # docker config with registry credentials; "" (default):
                                  # $DOCKER_CONFIG/config.json, else ~/.docker/config.json
    ca_file = ""                  # PEM bundle of CAs trusted for registries besides the
                                  # system's (SSL_CERT_FILE replaces the system's)
    daemon_cgroup = ""            # ROOT/NAME: each layer's mount daemon moves into
                                  # cgroup NAME of the cgroup filesystem mounted at ROOT,
                                  # out of the snapshotter's (a pod's) cgroup; "" = stay
    hosts_dir = "/etc/containerd/certs.d"  # containerd's config_path: a registry's
                                  # <dir>/<host>/hosts.toml names the mirrors its layers
                                  # are read from first ("" = the registry alone)

`auth_file`, `ca_file` and `daemon_cgroup` are checked when the file is loaded: a named file that is
missing or unusable stops the start with a message saying which and why.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from peerstar.errors import PeerstarError

DEFAULT_ADDRESS = Path("/run/peerstar/snapshotter.sock")
DEFAULT_ROOT = Path("/var/lib/peerstar/snapshotter")
DEFAULT_CONFIG = Path("/etc/peerstar/snapshotter.toml")
# Each of the two caches may take this share of the filesystem holding the cache: a
# node's disk is bounded by default, whatever its size.
DEFAULT_CACHE_SHARE = "10%"
_SHARE_RE = re.compile(r"(\d+(?:\.\d+)?)%")


class ConfigError(PeerstarError):
    """The snapshotter config file is unreadable or holds a wrong key/value."""


@dataclass
class RemoteConfig:
    """Lazy-pull settings, handed to each layer's mount daemon."""

    enable: bool = True
    prefetch_timeout: float = 10.0
    prefetch_size: int = 0
    region_size: int = 50_000
    region_cache_bytes: int | str = DEFAULT_CACHE_SHARE  # bytes, or "N%" of the disk
    chunk_cache_bytes: int | str = DEFAULT_CACHE_SHARE
    background_fetch: bool = True
    verify: bool = True
    request_timeout: float = 30.0
    retries: int = 3
    mount_timeout: float = 60.0
    insecure_hosts: list[str] = field(default_factory=list)
    zygote: bool = True
    auth_file: str = ""
    ca_file: str = ""
    daemon_cgroup: str = ""
    hosts_dir: str = "/etc/containerd/certs.d"  # = hosts.DEFAULT_HOSTS_DIR


@dataclass
class SnapshotterConfig:
    address: Path = DEFAULT_ADDRESS
    root: Path = DEFAULT_ROOT
    metrics_address: str = ""
    remote: RemoteConfig = field(default_factory=RemoteConfig)


def _cache_bound(key: str, value: Any) -> int | str:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if isinstance(value, str):
        m = _SHARE_RE.fullmatch(value.strip())
        ok = m is not None and 0 < float(m.group(1)) <= 100
    if not ok:
        raise ConfigError(f"config key 'remote.{key}': expected bytes (an integer >= 0, "
                          f"0 = unbounded) or a share of the disk such as \"10%\", "
                          f"got {value!r}")
    return value.strip() if isinstance(value, str) else value


def cache_bound(value: int | str, cache_dir: Path) -> int:
    """A `*_cache_bytes` setting in bytes: a share ("N%") of the size of the filesystem
    holding `cache_dir` (its nearest existing ancestor, before the first mount)."""
    if isinstance(value, int):
        return value
    m = _SHARE_RE.fullmatch(value)
    assert m is not None, value  # checked by parse_config
    d = Path(cache_dir).absolute()
    while not d.exists() and d != d.parent:
        d = d.parent
    st = os.statvfs(d)
    return int(st.f_blocks * st.f_frsize * float(m.group(1)) / 100)


def _typed(section: str, key: str, value: Any, expected: Any) -> Any:
    # bool is an int subclass: check it first so `verify = 1` is refused.
    if isinstance(expected, bool):
        ok = isinstance(value, bool)
    elif isinstance(expected, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(expected, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(expected, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        where = f"{section}.{key}" if section else key
        raise ConfigError(f"config key {where!r}: expected {type(expected).__name__}, "
                          f"got {value!r}")
    return value


def parse_config(data: dict[str, Any], source: str = "config") -> SnapshotterConfig:
    """A `SnapshotterConfig` from parsed TOML; unknown keys and wrong types are errors."""
    cfg = SnapshotterConfig()
    remote = RemoteConfig()
    top = {f.name for f in fields(SnapshotterConfig)} - {"remote"}
    for key, value in data.items():
        if key == "remote":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [remote] must be a table")
            known = {f.name: getattr(remote, f.name) for f in fields(RemoteConfig)}
            for rkey, rvalue in value.items():
                if rkey not in known:
                    raise ConfigError(f"{source}: unknown key 'remote.{rkey}' "
                                      f"(known: {', '.join(sorted(known))})")
                if rkey.endswith("_cache_bytes"):
                    setattr(remote, rkey, _cache_bound(rkey, rvalue))
                else:
                    setattr(remote, rkey, _typed("remote", rkey, rvalue, known[rkey]))
        elif key in top:
            value = _typed("", key, value, "")
            setattr(cfg, key, Path(value) if key in ("address", "root") else value)
        else:
            raise ConfigError(f"{source}: unknown key {key!r} (known: "
                              f"{', '.join(sorted(top | {'remote'}))})")
    cfg.remote = remote
    return cfg


def load_config(path: Path | None, *, address: Path | None = None, root: Path | None = None,
                metrics_address: str | None = None,
                daemon_cgroup: str | None = None) -> SnapshotterConfig:
    """Read `path` (default file if None; absent default is fine), then apply flags."""
    explicit = path is not None
    path = Path(path) if path is not None else DEFAULT_CONFIG
    data: dict[str, Any] = {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    cfg = parse_config(data, str(path))
    if daemon_cgroup is not None:
        cfg.remote.daemon_cgroup = daemon_cgroup
    check_remote_files(cfg.remote, str(path))
    if address is not None:
        cfg.address = Path(address)
    if root is not None:
        cfg.root = Path(root)
    if metrics_address is not None:
        cfg.metrics_address = metrics_address
    return cfg


def check_remote_files(remote: RemoteConfig, source: str = "config") -> None:
    """`ca_file` loads as PEM and `auth_file` reads as a docker config, or ConfigError:
    better to refuse to start than to fall back on every layer later."""
    # Imported here: these pull in ssl/httpx, which a config check needs only with files.
    from peerstar.distribution.tls import TLSConfigError, load_ca_file
    from peerstar.snapshotter.credentials import CredentialsError, Keychain

    if remote.ca_file:
        import ssl

        try:
            load_ca_file(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), remote.ca_file)
        except TLSConfigError as exc:
            raise ConfigError(f"{source}: remote.ca_file: {exc}") from None
    if remote.daemon_cgroup:
        from peerstar.lazyfs.cgroup import hierarchies

        cg = Path(remote.daemon_cgroup)
        if not cg.is_absolute() or not hierarchies(cg.parent):
            raise ConfigError(f"{source}: remote.daemon_cgroup: {cg.parent} is not a cgroup "
                              "filesystem (give ROOT/NAME, ROOT the host's /sys/fs/cgroup "
                              "as mounted here)")
    if remote.auth_file:
        try:
            Keychain(remote.auth_file).check()
        except CredentialsError as exc:
            raise ConfigError(f"{source}: remote.auth_file: {exc}") from None
