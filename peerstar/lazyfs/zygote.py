"""A fork server for mount daemons: a layer mount costs a fork, not a Python start-up.

Owns: the zygote process (`python -m peerstar.lazyfs.zygote --control-fd N [--ca-file
F]`), which imports everything `peerstar.lazyfs.mountd` needs (pyfuse3, trio, httpx, the
estargz reader, the lazyfs modules), builds the TLS context its daemons will use (with
the extra CA file the owner names, `FetchOptions.ca_file`), freezes the GC, and then
waits on a unix SEQPACKET socket shared with its owner; and `Zygote`, the owner's handle
(`start`, `spawn`, `close`).

Why: pyfuse3 allows one FUSE session per process, so each layer needs its own daemon,
and containerd prepares layers one after the other. A fresh `python -m
peerstar.lazyfs.mountd` spends ~0.3-0.4 s on the interpreter and imports before it can
fetch a byte; a fork of a warm process takes milliseconds.

Protocol (one request at a time; the owner serialises them): the owner sends one
datagram `{"argv": [...mountd args...], "env": {...}, "cwd": "..."}` with two file
descriptors attached (SCM_RIGHTS): the write end of the ready pipe and the log file.
The zygote double-forks: the intermediate child calls `setsid()` and forks the daemon,
then exits at once, so the daemon is nobody's child but init's (or the nearest
subreaper's) and in its own session -- it survives the zygote, the owner, and their
signals exactly like a daemon started with `start_new_session=True`. The zygote replies
`{"pid": DAEMON_PID}` (or `{"error": ...}`); the daemon then runs `mountd.main(argv +
["--ready-fd", FD])` with stdin /dev/null and stdout/stderr on the log file, and
reports readiness on the ready pipe as always. The zygote exits when the socket reaches
EOF (the owner closed it or died): it never outlives its owner.

Fork safety: the zygote starts no thread and opens no event loop (it checks the thread
count before serving), never runs FUSE or any network code itself, and the daemon
closes the zygote's socket and restores default signal handlers before `main`.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from peerstar.errors import PeerstarError

log = logging.getLogger("peerstar.lazyfs.zygote")

MAX_MSG = 1 << 20  # a request is a few hundred bytes; this bounds a broken owner
_FDS_PER_REQUEST = 2  # ready pipe (write end), log file


class ZygoteError(PeerstarError):
    """The zygote is not available (not started, dead): the request was not sent, so
    starting the daemon another way is safe."""


class ZygoteLost(ZygoteError):
    """The request was sent but no pid came back (the zygote died, hung, or could not
    fork): a daemon may or may not run. Do not start another one for the same mount;
    its ready pipe tells (a daemon reports there; EOF means there is none)."""


# --- owner side ------------------------------------------------------------------------


class Zygote:
    """Handle on a zygote process; thread-safe. `spawn` returns the daemon's pid."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self._sock = sock
        self._lock = threading.Lock()
        self._ready = False
        self._closed = False

    @classmethod
    def start(cls, *, stderr: int | None = None, env: dict[str, str] | None = None,
              ca_file: str = "") -> Zygote:
        """Start a zygote; returns at once (the first `spawn` waits for its imports).
        `ca_file`: the `FetchOptions.ca_file` of the mounts to come, whose TLS context
        it builds ahead (a daemon with another one builds its own)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        environ = dict(os.environ if env is None else env)
        # Registry secrets travel per request, never in the zygote's environment.
        from peerstar.lazyfs.state import SECRET_ENVS
        for k in SECRET_ENVS:
            environ.pop(k, None)
        pkg_root = str(Path(__file__).resolve().parent.parent.parent)
        environ["PYTHONPATH"] = pkg_root + (os.pathsep + environ["PYTHONPATH"] if environ.get(
            "PYTHONPATH") else "")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "peerstar.lazyfs.zygote", "--control-fd",
                 str(theirs.fileno()), *(["--ca-file", ca_file] if ca_file else [])],
                stdin=subprocess.DEVNULL, stderr=stderr, pass_fds=(theirs.fileno(),),
                env=environ)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(proc, ours)

    @property
    def alive(self) -> bool:
        return not self._closed and self.proc.poll() is None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the zygote's imports to finish; ZygoteError if it does not."""
        with self._lock:
            self._wait_ready_locked(timeout)

    def _wait_ready_locked(self, timeout: float) -> None:
        if self._ready:
            return
        if self._closed:
            raise ZygoteError("the zygote was closed")
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(MAX_MSG)
        except OSError as exc:
            raise ZygoteError(f"the zygote did not start: {exc}") from None
        finally:
            self._sock.settimeout(None)
        try:
            msg = json.loads(data) if data else {}
        except ValueError:
            msg = {}
        if not msg.get("ready"):
            raise ZygoteError(f"the zygote did not start: {msg.get('error') or 'it exited'}")
        self._ready = True

    def spawn(self, argv: list[str], *, ready_fd: int, log_fd: int,
              env: dict[str, str] | None = None, cwd: str | None = None,
              timeout: float = 30.0) -> int:
        """Fork a mount daemon running `mountd.main(argv + ["--ready-fd", FD])`, where FD
        is a copy of `ready_fd`; its stdout/stderr go to `log_fd`. Returns its pid.
        Raises ZygoteError if the zygote cannot do it (the caller falls back)."""
        req = json.dumps({"argv": list(argv), "env": dict(env or {}),
                          "cwd": cwd or os.getcwd()}).encode()
        fds = array.array("i", [ready_fd, log_fd])
        with self._lock:
            if not self.alive:
                raise ZygoteError("the zygote is not running")
            self._wait_ready_locked(timeout)
            self._sock.settimeout(timeout)
            try:
                self._sock.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            except OSError as exc:
                self._sock.settimeout(None)
                raise ZygoteError(f"zygote request failed: {exc}") from None
            try:
                data = self._sock.recv(MAX_MSG)
            except OSError as exc:
                # A late answer would be read as the next request's: this zygote is
                # done for (its daemons, if any, are not its children and stay).
                self._break_locked()
                raise ZygoteLost(f"no answer from the zygote: {exc}") from None
            finally:
                if not self._closed:
                    self._sock.settimeout(None)
            if not data:
                self._break_locked()
                raise ZygoteLost("the zygote exited before answering")
        try:
            msg = json.loads(data)
        except ValueError:
            msg = {}
        if not msg.get("pid"):
            raise ZygoteLost(f"the zygote could not fork: {msg.get('error') or data!r}")
        return int(msg["pid"])

    def _break_locked(self) -> None:
        self._closed = True
        self._sock.close()
        with contextlib.suppress(OSError):
            self.proc.kill()

    def close(self, timeout: float = 5.0) -> None:
        """Close the control socket: the zygote exits (its daemons do not)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sock.close()
            if not self._ready:
                # Still importing, never forked anything: no need to wait for it.
                self.proc.kill()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- zygote side -----------------------------------------------------------------------


def _recv_request(sock: socket.socket) -> tuple[dict[str, object], list[int]] | None:
    """One request and its fds; None at EOF (the owner is gone)."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(
        MAX_MSG, socket.CMSG_SPACE(_FDS_PER_REQUEST * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return json.loads(data), list(fds)


def _run_daemon(sock: socket.socket, req: dict[str, object], ready_fd: int,
                log_fd: int) -> int:
    """In the forked daemon: become a clean mountd process and run its main."""
    sock.close()  # only the zygote talks to the owner; EOF must reach it when it dies
    # The zygote ignores SIGINT (its owner's terminal); a daemon wants Python's defaults.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    from peerstar.lazyfs.state import SECRET_ENVS
    for k in SECRET_ENVS:
        os.environ.pop(k, None)
    env = req.get("env") or {}
    assert isinstance(env, dict)
    os.environ.update({str(k): str(v) for k, v in env.items()})
    cwd = req.get("cwd")
    if isinstance(cwd, str):
        try:
            os.chdir(cwd)
        except OSError:
            os.chdir("/")
    argv_in = req.get("argv") or []
    assert isinstance(argv_in, list)
    argv = [str(a) for a in argv_in]
    sys.argv = ["peerstar.lazyfs.mountd", *argv]
    from peerstar.lazyfs import mountd

    return mountd.main([*argv, "--ready-fd", str(ready_fd)])


def _fork_daemon(sock: socket.socket, req: dict[str, object], fds: list[int]) -> int:
    """Double fork (intermediate: setsid, fork, exit); returns the daemon's pid."""
    ready_fd, log_fd = fds
    rpid, wpid = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # intermediate child: never returns into the zygote's loop
        code = 1
        try:
            os.close(rpid)
            os.setsid()  # a new session: the owner's and zygote's signals do not reach it
            daemon = os.fork()
            if daemon == 0:
                code = 1
                try:
                    os.close(wpid)
                    code = _run_daemon(sock, req, ready_fd, log_fd)
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    import traceback
                    traceback.print_exc()
                finally:
                    # No return into the zygote's stack: flush what Python buffers, exit.
                    logging.shutdown()
                    for f in (sys.stdout, sys.stderr):
                        try:
                            f.flush()
                        except Exception:
                            pass
                    os._exit(code)
            os.write(wpid, str(daemon).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wpid)
    data = b""
    while chunk := os.read(rpid, 64):
        data += chunk
    os.close(rpid)
    os.waitpid(pid, 0)  # the intermediate exits right after the fork
    if not data:
        raise OSError("the intermediate child failed to fork the daemon")
    return int(data)


def serve(control_fd: int, ca_file: str = "") -> int:
    """The zygote's loop: import, report ready, fork a daemon per request until EOF."""
    sock = socket.socket(fileno=control_fd)
    # Ctrl-C on the owner's terminal is the owner's business: it closes the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import gc

        import peerstar.lazyfs.mountd  # noqa: F401 - the point: import it once, here
        from peerstar.distribution.tls import tls_context

        tls_context(ca_file)  # what every daemon would compute again
        if threading.active_count() != 1:
            raise RuntimeError(f"{threading.active_count()} threads after imports: "
                               "forking would be unsafe")
        gc.collect()
        gc.freeze()  # imported modules stay shared (copy-on-write) with every daemon
    except Exception as exc:
        with contextlib.suppress(OSError):
            sock.send(json.dumps({"ready": False, "error": f"{type(exc).__name__}: "
                                  f"{exc}"}).encode())
        return 1
    try:
        sock.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())
    except OSError:
        return 0  # the owner went away during our imports
    while True:
        try:
            got = _recv_request(sock)
        except (OSError, ValueError) as exc:
            print(f"peerstar zygote: bad request: {exc}", file=sys.stderr, flush=True)
            return 1
        if got is None:
            return 0  # the owner closed the socket or died
        req, fds = got
        try:
            if len(fds) != _FDS_PER_REQUEST:
                raise ValueError(f"expected {_FDS_PER_REQUEST} fds, got {len(fds)}")
            t0 = time.monotonic()
            pid = _fork_daemon(sock, req, fds)
            reply: dict[str, object] = {"pid": pid,
                                        "fork_seconds": round(time.monotonic() - t0, 4)}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)  # the daemon has its copies
        try:
            sock.send(json.dumps(reply).encode())
        except OSError:
            return 0  # the owner is gone


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m peerstar.lazyfs.zygote",
                                description="Fork server for lazyfs mount daemons.")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--ca-file", default="", help="the extra CA file of the daemons to come")
    args = p.parse_args(argv)
    return serve(args.control_fd, args.ca_file)


if __name__ == "__main__":
    sys.exit(main())
