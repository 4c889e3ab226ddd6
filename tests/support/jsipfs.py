"""A real IPFS daemon for tests: js-ipfs 0.66.1 (kubo's HTTP RPC), see REFERENCE.md section 4.

Owns: initialising a js-ipfs repo in a temporary directory, configuring it for an isolated
test (Swarm/API/Gateway/RPC on 127.0.0.1 with free ports, no bootstrap peers unless
given, no MDNS, no delegates, routing "none", optional swarm.key for a private network),
starting it with
`tests/support/jsipfs/start.mjs` (the stock `jsipfs daemon` ignores swarm.key), waiting
until `POST /api/v0/id` answers, `swarm/connect` between daemons, and stopping it.

A daemon can also run inside a network namespace: pass `prefix=["ip", "netns", "exec",
"N"]` and `swarm_host=<the node's address>`; API/Gateway/RPC stay on the namespace's own
loopback, so RPC calls from the harness are then run through the same prefix.

The npm packages live in tests/support/jsipfs/node_modules; install them with
`npm install --prefix tests/support/jsipfs --no-audit --no-fund` (scripts/install.sh).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.containerd import HarnessError
from tests.support.ports import free_port
from tests.support.waiting import stop_process

JSIPFS_DIR = Path(__file__).resolve().parent / "jsipfs"
START_SCRIPT = JSIPFS_DIR / "start.mjs"
JSIPFS_BIN = JSIPFS_DIR / "node_modules" / ".bin" / "jsipfs"
INSTALL_HINT = f"npm install --prefix {JSIPFS_DIR} --no-audit --no-fund (scripts/install.sh)"
READY_MARK = "PEERSTAR-JSIPFS-READY"


def generate_swarm_key() -> bytes:
    """A private-network key in the format kubo and js-ipfs read (`swarm.key`)."""
    return b"/key/swarm/psk/1.0.0/\n/base16/\n" + os.urandom(32).hex().encode() + b"\n"


def _require_install() -> str:
    node = shutil.which("node")
    if node is None:
        raise HarnessError("node is not installed (Node 20 is needed for js-ipfs)")
    if not JSIPFS_BIN.exists():
        raise HarnessError(f"js-ipfs is not installed: run {INSTALL_HINT}")
    return node


@dataclass
class JsIpfs:
    """One js-ipfs daemon. Create with `start_jsipfs()`; `stop()` when done."""

    repo: Path
    api_port: int
    swarm_port: int
    gateway_port: int
    rpc_port: int
    swarm_host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)
    swarm_key: bytes | None = None
    bootstrap: list[str] = field(default_factory=list)  # multiaddrs; none: dial nobody
    owns_repo: bool = True
    proc: subprocess.Popen[bytes] | None = None
    peer_id: str = ""

    # -- addresses --------------------------------------------------------------------
    @property
    def api_multiaddr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.api_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def swarm_multiaddr(self) -> str:
        """The address another daemon dials: `/ip4/H/tcp/P/p2p/<peer id>`."""
        return f"/ip4/{self.swarm_host}/tcp/{self.swarm_port}/p2p/{self.peer_id}"

    # -- lifecycle --------------------------------------------------------------------
    def init(self) -> None:
        node = _require_install()
        env = dict(os.environ, IPFS_PATH=str(self.repo))
        proc = subprocess.run(
            [node, str(JSIPFS_BIN), "init", "--empty-repo"],
            env=env, capture_output=True, timeout=120,
        )
        if proc.returncode != 0:
            raise HarnessError(f"jsipfs init failed: {proc.stderr.decode(errors='replace')}")
        cfg_path = self.repo / "config"
        cfg = json.loads(cfg_path.read_text())
        cfg["Addresses"].update(
            Swarm=[f"/ip4/{self.swarm_host}/tcp/{self.swarm_port}"],
            API=f"/ip4/127.0.0.1/tcp/{self.api_port}",
            Gateway=f"/ip4/127.0.0.1/tcp/{self.gateway_port}",
            RPC=f"/ip4/127.0.0.1/tcp/{self.rpc_port}",
            # Delegates are public HTTPS routers: a test must not talk to them.
            Delegates=[],
            Announce=[],
            NoAnnounce=[],
        )
        cfg["Bootstrap"] = list(self.bootstrap)
        cfg.setdefault("Discovery", {}).setdefault("MDNS", {})["Enabled"] = False
        cfg["Discovery"].setdefault("webRTCStar", {})["Enabled"] = False
        cfg["Routing"] = {"Type": "none"}
        cfg.setdefault("Swarm", {})["DisableNatPortMap"] = True  # no UPnP on the LAN
        cfg_path.write_text(json.dumps(cfg, indent=2))
        if self.swarm_key is not None:
            (self.repo / "swarm.key").write_bytes(self.swarm_key)

    def start(self, timeout: float = 90.0) -> None:
        node = _require_install()
        env = dict(os.environ, IPFS_PATH=str(self.repo))
        env.pop("SWARM_KEY", None)
        self._out = open(self.repo / "daemon.out", "wb")  # noqa: SIM115 - closed in stop()
        self._err = open(self.repo / "daemon.err", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.prefix, node, str(START_SCRIPT)],
            env=env, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL,
            cwd=str(JSIPFS_DIR), start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        out_path = self.repo / "daemon.out"
        while True:
            text = out_path.read_text(errors="replace")
            if READY_MARK in text:
                self.peer_id = text.split(READY_MARK, 1)[1].split()[0]
                break
            if self.proc.poll() is not None:
                err = (self.repo / "daemon.err").read_text(errors="replace")[-4000:]
                self._close_logs()
                raise HarnessError(f"js-ipfs exited with {self.proc.returncode}:\n{err}")
            if time.monotonic() > deadline:
                self.stop()
                raise HarnessError(f"js-ipfs did not start within {timeout} s")
            time.sleep(0.1)
        # The READY line comes after the HTTP API listens; check it as clients will.
        while True:
            try:
                ident = self.rpc("id", timeout=5)
                if ident.get("ID") == self.peer_id:
                    return
            except (OSError, HarnessError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise HarnessError(f"js-ipfs API at {self.api_url} did not answer /api/v0/id")
            time.sleep(0.2)

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a test may have SIGSTOPped it
            stop_process(proc)
        self.proc = None
        self._close_logs()
        if self.owns_repo:
            shutil.rmtree(self.repo, ignore_errors=True)

    def _close_logs(self) -> None:
        for name in ("_out", "_err"):
            f = getattr(self, name, None)
            if f is not None:
                f.close()
                setattr(self, name, None)

    def pause(self) -> None:
        """SIGSTOP the daemon (it keeps its sockets open but answers nothing)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    # -- RPC --------------------------------------------------------------------------
    def rpc(self, path: str, params: Sequence[tuple[str, str]] = (), *,
            timeout: float = 30.0) -> Any:
        """POST /api/v0/<path>?params and return the decoded JSON (through the prefix when
        the daemon lives in a network namespace)."""
        url = f"{self.api_url}/api/v0/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(list(params))
        if self.prefix:
            code = (
                "import sys,urllib.request;"
                "r=urllib.request.urlopen(urllib.request.Request(sys.argv[1],method='POST'),"
                "timeout=float(sys.argv[2]));sys.stdout.buffer.write(r.read())"
            )
            proc = subprocess.run([*self.prefix, sys.executable, "-c", code, url, str(timeout)],
                                  capture_output=True, timeout=timeout + 10)
            if proc.returncode != 0:
                raise HarnessError(f"{path}: {proc.stderr.decode(errors='replace')[-2000:]}")
            body = proc.stdout
        else:
            req = urllib.request.Request(url, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as exc:
                raise HarnessError(f"{path}: HTTP {exc.code}: {exc.read()[:2000]!r}") from None
        return json.loads(body) if body.strip() else None

    def add_bytes(self, data: bytes, params: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        """`add` through the daemon itself (the oracle for CID tests): multipart POST."""
        boundary = "peerstar-" + os.urandom(8).hex()
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"blob\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
        url = f"{self.api_url}/api/v0/add?" + urllib.parse.urlencode(list(params))
        req = urllib.request.Request(
            url, data=body, method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        with urllib.request.urlopen(req, timeout=300) as resp:
            lines = [json.loads(x) for x in resp.read().splitlines() if x.strip()]
        return lines[-1]

    def connect(self, other: JsIpfs) -> None:
        """`swarm/connect` this daemon to `other`."""
        self.rpc("swarm/connect", [("arg", other.swarm_multiaddr)], timeout=60)

    def peers(self) -> list[str]:
        res = self.rpc("swarm/peers") or {}
        return [p.get("Peer", "") for p in res.get("Peers") or []]


def start_jsipfs(
    *,
    swarm_key: bytes | None = None,
    prefix: Sequence[str] = (),
    swarm_host: str = "127.0.0.1",
    ports: tuple[int, int, int, int] | None = None,
    bootstrap: Sequence[str] = (),
    repo: Path | None = None,
    timeout: float = 90.0,
) -> JsIpfs:
    """Init and start a js-ipfs daemon in a fresh temporary repo; HarnessError on failure.

    `ports` = (api, swarm, gateway, rpc); by default free ports on the host's 127.0.0.1
    (inside a namespace pass them, e.g. (5001, 4001, 8080, 5003)). `bootstrap`: the
    multiaddrs of the peers it dials at start.
    """
    owns = repo is None
    repo = Path(tempfile.mkdtemp(prefix="peerstar-jsipfs-")) if repo is None else repo
    if ports is None:
        ports = (free_port(), free_port(), free_port(), free_port())
    daemon = JsIpfs(
        repo=repo, api_port=ports[0], swarm_port=ports[1], gateway_port=ports[2],
        rpc_port=ports[3], swarm_host=swarm_host, prefix=list(prefix), swarm_key=swarm_key,
        bootstrap=list(bootstrap), owns_repo=owns,
    )
    try:
        daemon.init()
        daemon.start(timeout=timeout)
    except BaseException:
        daemon.stop()
        raise
    return daemon
