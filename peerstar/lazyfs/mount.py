"""The mount API: start a mount daemon for one layer, wait until it is ready, end it.

Owns: `mount_layer` (forks the mount daemon from a zygote -- `peerstar.lazyfs.zygote` --
or, without one, spawns `python -m peerstar.lazyfs.mountd`; in its own session either
way; hands it its settings, a `peerstar.lazyfs.options.MountOptions`, as arguments and
its registry credentials in its environment; and waits for its readiness line),
`LayerMount` (`unmount()`, `stats()`, `alive`), and `find_mount` (re-attach to a daemon
that survived a restart of the starting process).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from peerstar.errors import PeerstarError
from peerstar.lazyfs.options import MountOptions
from peerstar.lazyfs.state import (
    SECRET_ENVS,
    StatePaths,
    auth_to_env,
    is_fuse_mounted,
    state_paths,
)

if TYPE_CHECKING:  # imported late: `python -m peerstar.lazyfs.zygote` must load it first
    from peerstar.distribution.auth import RegistryAuth
    from peerstar.lazyfs.zygote import Zygote

log = logging.getLogger("peerstar.lazyfs.mount")

DEFAULT_OPTIONS = MountOptions()


class MountError(PeerstarError):
    """The layer could not be mounted (fetch, TOC verification, FUSE); the message says why."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # os.kill(0 or -1, ...) would mean a whole group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class LayerMount:
    """A running mount daemon serving one layer at `mountpoint`."""

    mountpoint: Path
    digest: str
    pid: int
    paths: StatePaths
    mount_seconds: float = 0.0
    prefetch_done: bool = False
    size: int | None = None  # the blob's size, as the daemon learnt it
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return _pid_alive(self.pid)

    @property
    def mounted(self) -> bool:
        return is_fuse_mounted(self.mountpoint)

    def stats(self) -> dict[str, object]:
        """Fetch statistics, live from the mount's hidden stats file (or the last saved)."""
        live = self.mountpoint / ".peerstar-lazyfs" / f"{self.digest}.json"
        for p in (live, self.paths.stats):
            try:
                return json.loads(p.read_text())
            except (OSError, ValueError):
                continue
        return {}

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                return True
            time.sleep(0.02)
        return not self.alive

    def unmount(self, *, timeout: float = 10.0, lazy: bool = False) -> None:
        """`umount` the mountpoint (the daemon then exits by itself); escalate to SIGTERM
        and SIGKILL if it does not. `lazy` detaches a busy mount (`umount -l`)."""
        if self.mounted:
            cmd = ["umount", "-l", str(self.mountpoint)] if lazy else [
                "umount", str(self.mountpoint)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0 and self.mounted:
                raise MountError(f"cannot unmount {self.mountpoint}: "
                                 f"{res.stderr.strip() or res.returncode}")
        if self._wait_exit(timeout):
            self._reap()
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.pid <= 0:
                break
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                break
            if self._wait_exit(5.0):
                break
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def mount_layer(
    url: str,
    digest: str,
    toc_digest: str,
    mountpoint: Path,
    cache_dir: Path,
    options: MountOptions = DEFAULT_OPTIONS,
    *,
    size: int | None = None,
    auth: RegistryAuth | None = None,
    zygote: Zygote | None = None,
) -> LayerMount:
    """Mount the eStargz layer at `url` read-only at `mountpoint`; return when it is ready.

    Ready means: TOC fetched and verified against `toc_digest` and FUSE mounted; the
    prioritized files are being prefetched, and reads of them wait for that for up to
    `options.prefetch.timeout` seconds from the start (with `options.prefetch.wait`, so
    does this call). Raises `MountError` with the daemon's reason otherwise (nothing is
    left mounted). `size` is the blob size if known (saves a request); `auth` holds the
    registry credentials (anonymous without), which reach the daemon in its environment
    only, never on its command line.

    With `zygote` (a running `peerstar.lazyfs.zygote.Zygote`) the daemon is forked from
    it (milliseconds) instead of started as `python -m peerstar.lazyfs.mountd` (the
    interpreter and imports: ~0.3-0.4 s); if the zygote is unavailable, the latter.
    Either way the daemon runs in its own session and outlives its starter.
    """
    mountpoint = Path(mountpoint).resolve()
    cache_dir = Path(cache_dir).resolve()  # the daemon may run in another cwd
    if not mountpoint.is_dir():
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if is_fuse_mounted(mountpoint):
        raise MountError(f"{mountpoint} is already a FUSE mount")
    if options.verify and not toc_digest:
        raise MountError(f"layer {digest} has no TOC digest: cannot verify it")
    paths = state_paths(cache_dir, mountpoint)
    args = ["--url", url, "--digest", digest, "--toc-digest", toc_digest,
            "--mountpoint", str(mountpoint), "--cache-dir", str(cache_dir),
            *options.to_argv()]
    if size is not None:
        args += ["--size", str(size)]
    secrets = auth_to_env(auth) if auth is not None else {}
    open_timeout = options.open_timeout
    rfd, wfd = os.pipe()
    proc: subprocess.Popen[bytes] | None = None
    pid = 0
    lost = ""  # the zygote got the request but gave no pid: the ready pipe will tell
    try:
        with open(paths.log, "ab") as logf:
            if zygote is not None:
                from peerstar.lazyfs.zygote import ZygoteError, ZygoteLost

                try:
                    pid = zygote.spawn(args, ready_fd=wfd, log_fd=logf.fileno(),
                                       env=secrets, timeout=min(30.0, open_timeout))
                except ZygoteLost as exc:
                    # Maybe a daemon runs: starting another could mount twice here.
                    lost = str(exc)
                    log.warning("mount of %s: %s", digest, exc)
                except ZygoteError as exc:
                    log.warning("mount of %s: zygote unavailable (%s); starting the "
                                "daemon with python -m", digest, exc)
            if not pid and not lost:
                proc = _popen_daemon(args, wfd, logf.fileno(), secrets)
                pid = proc.pid
    finally:
        os.close(wfd)
    try:
        line = _read_line(rfd, open_timeout + options.prefetch.timeout)
    finally:
        os.close(rfd)
    msg: dict[str, object] = {}
    if line:
        try:
            msg = json.loads(line)
        except ValueError:
            msg = {}
    if not pid:
        pid = int(str(msg.get("pid") or 0))
    if not msg.get("ok"):
        _stop_failed(pid, proc)
        reason = (msg.get("error") or _tail(paths.log) or lost
                  or "the mount daemon exited without a word")
        raise MountError(f"cannot mount layer {digest} at {mountpoint}: {reason}")
    return LayerMount(mountpoint, digest, pid, paths,
                      mount_seconds=float(str(msg.get("mount_seconds", 0.0))),
                      prefetch_done=bool(msg.get("prefetch_done")),
                      size=_int_or_none(msg.get("size")), _proc=proc)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _popen_daemon(args: list[str], ready_fd: int, log_fd: int,
                  secrets: dict[str, str]) -> subprocess.Popen[bytes]:
    """The fallback start: a fresh interpreter running the mount daemon."""
    # Exactly the credentials given to mount_layer, as the zygote does: none of ours.
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENVS}
    env.update(secrets)
    # The daemon imports peerstar from wherever this process did.
    pkg_root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get(
        "PYTHONPATH") else "")
    return subprocess.Popen(
        [sys.executable, "-m", "peerstar.lazyfs.mountd", *args, "--ready-fd", str(ready_fd)],
        stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
        pass_fds=(ready_fd,), env=env,
        start_new_session=True)  # survives the starter's restart and its signals


def _stop_failed(pid: int, proc: subprocess.Popen[bytes] | None) -> None:
    """End a daemon that did not report success (it may still be trying)."""
    if proc is not None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return
    if pid <= 0:
        return  # unknown (os.kill(0, ...) would signal our own process group)
    # Forked by the zygote: not our child, so poll its pid instead of waiting on it.
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if not _pid_alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


def find_mount(mountpoint: Path, cache_dir: Path) -> LayerMount | None:
    """The daemon serving `mountpoint`, from its state file, if it still runs and the
    mount is still there (used after a restart of the process that started it)."""
    mountpoint = Path(mountpoint).resolve()
    paths = state_paths(cache_dir, mountpoint)
    try:
        st = json.loads(paths.state.read_text())
    except (OSError, ValueError):
        return None
    pid = int(st.get("pid", 0))
    if not pid or not _pid_alive(pid) or not is_fuse_mounted(mountpoint):
        return None
    return LayerMount(mountpoint, str(st.get("digest", "")), pid, paths, prefetch_done=True,
                      size=_int_or_none(st.get("size")))


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        piece = os.read(fd, 4096)
        if not piece:
            break
        buf += piece
    return buf.decode(errors="replace").strip()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])
