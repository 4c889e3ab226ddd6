"""Where a mount daemon keeps its state files, and how they are written.

Owns: the per-mount file names under `<cache-dir>/mounts/` (keyed by a hash of the
mountpoint, so the same layer may be mounted at several places), atomic JSON writes,
the mount table lookups (`mount_fstype`, `is_fuse_mounted`, `fuse_mounts_under`), and
how a mount daemon receives its registry credentials: environment variables (never argv,
which `ps` shows to every user), written by `auth_to_env` for the daemon alone and read
there by `auth_from_env`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peerstar.distribution.auth import RegistryAuth

# Registry secrets reach the mount daemon in its environment, never on its command line
# (which `ps` shows to every user).
USERNAME_ENV = "PEERSTAR_REGISTRY_USERNAME"
PASSWORD_ENV = "PEERSTAR_REGISTRY_PASSWORD"
TOKEN_ENV = "PEERSTAR_REGISTRY_TOKEN"  # a bearer token sent as is
REFRESH_TOKEN_ENV = "PEERSTAR_REGISTRY_REFRESH_TOKEN"  # OAuth2 (docker `identitytoken`)
SECRET_ENVS = (USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV, REFRESH_TOKEN_ENV)


def auth_to_env(auth: RegistryAuth) -> dict[str, str]:
    """The credentials `auth` was given (not the tokens obtained with them) as
    `auth_from_env` reads them, for a mount daemon's environment."""
    pairs = ((USERNAME_ENV, auth.username), (PASSWORD_ENV, auth.password),
             (TOKEN_ENV, auth.token), (REFRESH_TOKEN_ENV, auth.refresh_token))
    return {k: v for k, v in pairs if v is not None}


def auth_from_env(username: str | None = None) -> RegistryAuth:
    """The credentials handed to a mount daemon in its environment (`username`, if given
    on its command line by an older starter, wins over the environment's)."""
    from peerstar.distribution.auth import RegistryAuth  # httpx: only the daemon needs it

    env = os.environ
    return RegistryAuth(username or env.get(USERNAME_ENV), env.get(PASSWORD_ENV),
                        env.get(TOKEN_ENV), env.get(REFRESH_TOKEN_ENV))


@dataclass(frozen=True)
class StatePaths:
    state: Path  # {"pid", "mountpoint", "digest", "url", ...} while the daemon runs
    stats: Path  # LazyLayer.stats(), refreshed every 2 s and at exit
    prom: Path  # Prometheus text format of the daemon's metrics
    log: Path  # the daemon's stdout/stderr


def state_paths(cache_dir: Path, mountpoint: Path) -> StatePaths:
    key = hashlib.sha256(str(Path(mountpoint).resolve()).encode()).hexdigest()[:16]
    d = Path(cache_dir) / "mounts"
    d.mkdir(parents=True, exist_ok=True)
    return StatePaths(d / f"{key}.json", d / f"{key}.stats.json", d / f"{key}.prom",
                      d / f"{key}.log")


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_fstype(mountpoint: Path) -> str | None:
    """The filesystem type mounted exactly at `mountpoint` (topmost), or None."""
    target = str(Path(mountpoint).resolve())
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and _unescape(fields[4]) == target:
                    found = right.split()[0]
    except OSError:
        return None
    return found


def fuse_mounts_under(prefix: Path) -> list[Path]:
    """The FUSE mounts at or below `prefix` in this mount namespace."""
    base = str(Path(prefix).resolve())
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                point = _unescape(fields[4]) if len(fields) >= 5 else ""
                if (point == base or point.startswith(base + "/")) and \
                        right.split()[:1] and right.split()[0].startswith("fuse"):
                    found.append(Path(point))
    except OSError:
        return []
    return found


def is_fuse_mounted(mountpoint: Path) -> bool:
    return (mount_fstype(mountpoint) or "").startswith("fuse")
