"""A private containerd for tests, and `Ctr`, a runner for `ctr` / `ctr-remote` against it.

Owns: writing the containerd config (own root, state, gRPC/ttrpc sockets, opt path, CRI
disabled unless asked for, optional proxy snapshotter plugins), starting the daemon,
waiting until it answers `ctr version` (and, with CRI, until the CRI plugin is up), and
a clean shutdown that leaves nothing behind: tasks killed and deleted, containers
removed, the daemon stopped, leftover shims of this daemon killed, and every mount under
its root/state unmounted.

Facts this relies on (docs REFERENCE.md section 5): containerd 1.6 needs
`disabled_plugins = ["io.containerd.grpc.v1.cri"]` (the per-plugin `disable` does not
work); the runc shim keeps its state under /run/containerd/runc/<namespace> whatever our
root is, so every harness uses a namespace unique to its process, which keeps concurrent
test sessions on one machine from colliding.

With `cri=CriOptions(...)` the CRI plugin (built into Debian's containerd 1.6) is left enabled and
configured the way a Kubernetes node is (`[plugins."io.containerd.grpc.v1.cri"]`): its
snapshotter, `disable_snapshot_annotations`, its CNI directories under our base (no CNI
is installed: the plugin logs that the network is not ready, which image pulls do not
need) and a stream server on a random loopback port. CRI is served on the same gRPC
socket (`address`) and always works in containerd namespace `k8s.io`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.waiting import stop_process

# A unix socket path must fit in sockaddr_un.sun_path (108 bytes with the NUL).
_MAX_SOCKET_PATH = 107


class HarnessError(RuntimeError):
    """A real-parts harness could not start or a command it ran failed."""


def require_binaries(*names: str) -> dict[str, str]:
    """Absolute paths of `names` on PATH; HarnessError naming the missing ones otherwise."""
    found = {name: shutil.which(name) for name in names}
    missing = [name for name, where in found.items() if where is None]
    if missing:
        raise HarnessError(
            f"missing binaries: {', '.join(missing)} -- run scripts/install.sh"
        )
    return {name: str(where) for name, where in found.items()}


def _describe(argv: Sequence[str], proc: subprocess.CompletedProcess[bytes] | None,
              why: str) -> str:
    text = f"{' '.join(argv)}: {why}"
    if proc is not None:
        out = proc.stdout.decode(errors="replace").strip()
        err = proc.stderr.decode(errors="replace").strip()
        text += f"\n--- stderr ---\n{err or '(empty)'}"
        if out:
            text += f"\n--- stdout ---\n{out[-4000:]}"
    return text


@dataclass
class Ctr:
    """Runs `ctr` or `ctr-remote` with this daemon's `--address` and `--namespace`.

    `run(...)`/`remote(...)` return the CompletedProcess (bytes); on a non-zero exit they
    raise HarnessError carrying the command line, exit status and stderr, unless
    `check=False`. `text(...)` returns stdout decoded.
    """

    address: str
    namespace: str
    ctr_binary: str = "ctr"
    ctr_remote_binary: str = "ctr-remote"
    timeout: float = 300.0

    def _argv(self, binary: str, args: Sequence[str], namespace: str | None) -> list[str]:
        return [binary, "--address", self.address, "--namespace",
                namespace or self.namespace, *map(str, args)]

    def _exec(self, argv: list[str], *, check: bool, input: bytes | None,
              timeout: float | None) -> subprocess.CompletedProcess[bytes]:
        try:
            proc = subprocess.run(argv, input=input, capture_output=True,
                                  timeout=timeout or self.timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(_describe(argv, None, f"timed out after {exc.timeout} s")
                               ) from None
        except FileNotFoundError:
            raise HarnessError(f"missing binary {argv[0]} -- run scripts/install.sh") from None
        if check and proc.returncode != 0:
            raise HarnessError(_describe(argv, proc, f"exit status {proc.returncode}"))
        return proc

    def run(self, *args: str | os.PathLike[str], check: bool = True,
            input: bytes | None = None, timeout: float | None = None,
            namespace: str | None = None) -> subprocess.CompletedProcess[bytes]:
        """`ctr --address A --namespace N ARGS...`."""
        return self._exec(self._argv(self.ctr_binary, list(map(str, args)), namespace),
                          check=check, input=input, timeout=timeout)

    def push(self, remote: str) -> None:
        """`ctr images push --plain-http REMOTE`, once more if the registry cut an upload
        short ("unexpected EOF", seen about once in a dozen CI runs against Debian's
        docker-registry): a push is content-addressed, so repeating it is safe."""
        try:
            self.run("images", "push", "--plain-http", remote)
        except HarnessError as exc:
            if "unexpected EOF" not in str(exc):
                raise
            self.run("images", "push", "--plain-http", remote)

    def remote(self, *args: str | os.PathLike[str], check: bool = True,
               input: bytes | None = None, timeout: float | None = None,
               namespace: str | None = None) -> subprocess.CompletedProcess[bytes]:
        """`ctr-remote --address A --namespace N ARGS...`."""
        return self._exec(self._argv(self.ctr_remote_binary, list(map(str, args)), namespace),
                          check=check, input=input, timeout=timeout)

    def text(self, *args: str | os.PathLike[str], **kwargs: object) -> str:
        """stdout of `run(*args)`, decoded."""
        return self.run(*args, **kwargs).stdout.decode()  # type: ignore[arg-type]

    def lines(self, *args: str | os.PathLike[str], **kwargs: object) -> list[str]:
        """Non-empty stdout lines of `run(*args)`."""
        return [line for line in self.text(*args, **kwargs).splitlines() if line.strip()]

    def import_oci_layout(self, layout_dir: Path, base_name: str) -> list[str]:
        """`ctr image import --base-name BASE` of an OCI layout dir; then every `BASE:*`.

        A layout's ref names are bare tags, so the images become `BASE:TAG`.
        """
        from peerstar.source.sample import write_oci_archive  # test-only dependency on peerstar

        with tempfile.TemporaryDirectory(prefix="peerstar-import-") as tmp:
            archive = write_oci_archive(Path(layout_dir), Path(tmp) / "image.tar")
            self.run("images", "import", "--base-name", base_name, archive)
        return [line.split()[0] for line in self.lines("images", "ls")
                if line.startswith(base_name + ":")]

    def image_exists(self, ref: str) -> bool:
        return ref in self.lines("images", "ls", "-q")


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


CRI_PLUGIN = "io.containerd.grpc.v1.cri"
CRI_NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin keeps everything in


@dataclass(frozen=True)
class CriOptions:
    """The CRI plugin's settings a test chooses (the rest stay containerd's defaults)."""

    snapshotter: str = "overlayfs"
    # false: CRI passes the layer annotations (cri.image-ref, cri.layer-digest, ...) to the
    # snapshotter as Prepare labels -- what a remote snapshotter needs.
    disable_snapshot_annotations: bool = False
    # The registry hosts directory (containerd's hosts.toml per registry); "" = none.
    config_path: str = ""


def _cri_toml(base: Path, cri: CriOptions) -> list[str]:
    return [
        f'[plugins."{CRI_PLUGIN}"]',
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        "",
        f'[plugins."{CRI_PLUGIN}".containerd]',
        f"  snapshotter = {_toml_str(cri.snapshotter)}",
        "  disable_snapshot_annotations = "
        f"{'true' if cri.disable_snapshot_annotations else 'false'}",
        "",
        f'[plugins."{CRI_PLUGIN}".cni]',
        f"  bin_dir = {_toml_str(str(base / 'cni' / 'bin'))}",
        f"  conf_dir = {_toml_str(str(base / 'cni' / 'net.d'))}",
        "",
        *([f'[plugins."{CRI_PLUGIN}".registry]',
           f"  config_path = {_toml_str(cri.config_path)}", ""] if cri.config_path else []),
    ]


def render_config(base: Path, *, proxy_plugins: Mapping[str, str] | None = None,
                  extra_toml: str = "", cri: CriOptions | None = None) -> str:
    """The containerd config (version 2) for a daemon living entirely under `base`.

    proxy_plugins: name -> unix socket of a snapshotter proxy plugin.
    cri: None disables the CRI plugin (the default); options enable and configure it.
    """
    lines = [
        "version = 2",
        f"root = {_toml_str(str(base / 'root'))}",
        f"state = {_toml_str(str(base / 'state'))}",
    ]
    if cri is None:
        lines.append(f'disabled_plugins = ["{CRI_PLUGIN}"]')
    lines += [
        "",
        "[grpc]",
        f"  address = {_toml_str(str(base / 'containerd.sock'))}",
        "",
        "[ttrpc]",
        f"  address = {_toml_str(str(base / 'containerd.sock.ttrpc'))}",
        "",
        "[debug]",
        '  level = "info"',
        "",
        '[plugins."io.containerd.internal.v1.opt"]',
        f"  path = {_toml_str(str(base / 'opt'))}",
        "",
    ]
    for name, socket in sorted((proxy_plugins or {}).items()):
        lines += [
            f"[proxy_plugins.{_toml_str(name)}]",
            '  type = "snapshot"',
            f"  address = {_toml_str(str(socket))}",
            "",
        ]
    if cri is not None:
        lines += _cri_toml(base, cri)
    if extra_toml:
        lines.append(extra_toml.rstrip() + "\n")
    return "\n".join(lines)


def _mounts_under(prefixes: Sequence[Path]) -> list[str]:
    """Mount points under any of `prefixes`, deepest first."""
    points = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                # Field 5 is the mount point, octal-escaped (\040 for space).
                point = line.split()[4].encode().decode("unicode_escape")
                for prefix in prefixes:
                    if point == str(prefix) or point.startswith(str(prefix) + "/"):
                        points.append(point)
    except OSError:
        return []
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def _shim_pids(address: str) -> list[int]:
    """Pids of containerd shims that serve the daemon at `address` (ours only)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or b"containerd-shim" not in os.path.basename(argv[0]):
            continue
        if address.encode() in argv:
            pids.append(int(entry))
    return pids


@dataclass
class Containerd:
    """A running private containerd. Use `start()` then `stop()` (or as a context manager)."""

    base: Path
    namespace: str
    proxy_plugins: dict[str, str] = field(default_factory=dict)
    extra_toml: str = ""
    cri: CriOptions | None = None  # None: the CRI plugin is disabled
    remove_base: bool = False  # delete `base` after stop (set when the harness made it)
    # Run the daemon behind this command, e.g. `nsenter --net=/run/netns/N` to put it in a
    # node's network namespace (it must exec containerd); empty: on the host.
    prefix: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    ctr: Ctr = field(init=False)

    def __post_init__(self) -> None:
        self.base = Path(self.base)
        self.ctr = Ctr(self.address, self.namespace)

    @property
    def address(self) -> str:
        return str(self.base / "containerd.sock")

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def config_path(self) -> Path:
        return self.base / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.base / "containerd.log"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def start(self, timeout: float = 30.0) -> Containerd:
        """Write the config, start containerd and wait until `ctr version` answers."""
        bins = require_binaries("containerd", "ctr", "runc")
        if os.geteuid() != 0:
            raise HarnessError("containerd tests must run as root (they mount overlayfs and "
                               "start runc)")
        if len(self.address) + len(".ttrpc") > _MAX_SOCKET_PATH:
            raise HarnessError(f"socket path too long for a unix socket: {self.address}; use "
                               "a shorter base directory")
        self.base.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_config(
            self.base, proxy_plugins=self.proxy_plugins, extra_toml=self.extra_toml,
            cri=self.cri))
        # The child keeps its own copy of the log fd; ours can close right away.
        with open(self.log_path, "ab") as log:
            # Own session: a Ctrl-C in the test runner does not kill it before cleanup.
            self.process = subprocess.Popen(
                [*self.prefix, bins["containerd"], "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HarnessError(f"containerd exited with status {self.process.returncode} "
                                   f"during start-up; log:\n{self.log_tail()}")
            if os.path.exists(self.address):
                proc = self.ctr.run("version", check=False, timeout=10)
                if proc.returncode == 0 and b"Server:" in proc.stdout:
                    if self.cri is None or self._cri_ready():
                        return self
                    last = "the CRI plugin is not loaded yet"
                else:
                    last = proc.stderr.decode(errors="replace")
            time.sleep(0.05)
        self.stop()
        raise HarnessError(f"containerd did not answer `ctr version` within {timeout} s "
                           f"({last.strip()}); log:\n{self.log_tail()}")

    def _cri_ready(self) -> bool:
        """The CRI plugin loaded ("ok" in `ctr plugins ls`); HarnessError if it failed."""
        for line in self.ctr.lines("plugins", "ls", check=False, timeout=10):
            fields = line.split()
            if len(fields) >= 2 and fields[1] == "cri":
                if fields[-1] == "error":
                    error = HarnessError("containerd's CRI plugin failed to load; log:\n"
                                         f"{self.log_tail()}")
                    self.stop()
                    raise error
                return fields[-1] == "ok"
        return False

    def _cleanup_namespace(self, ns: str) -> None:
        for task_line in self.ctr.lines("tasks", "ls", "-q", namespace=ns, check=False):
            task = task_line.split()[0]
            self.ctr.run("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False,
                         timeout=20)
            for _ in range(50):
                if self.ctr.run("tasks", "delete", task, namespace=ns, check=False,
                                timeout=20).returncode == 0:
                    break
                time.sleep(0.1)
        for container in self.ctr.lines("containers", "ls", "-q", namespace=ns, check=False):
            self.ctr.run("containers", "delete", container, namespace=ns, check=False,
                         timeout=20)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop everything this daemon started, unmount, and stop the daemon. Idempotent."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            try:
                namespaces = self.ctr.lines("namespaces", "ls", "-q", check=False, timeout=20)
                for ns in namespaces:
                    self._cleanup_namespace(ns)
            except HarnessError:
                pass  # a hung daemon: the kill below still runs
            stop_process(proc, timeout=timeout)
        # Shims outlive a killed daemon; only the ones bound to our socket are ours.
        for pid in _shim_pids(self.address):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for point in _mounts_under([self.root, self.state]):
            subprocess.run(["umount", point], capture_output=True, check=False)
            if os.path.ismount(point):
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        self.process = None
        # runc keeps per-namespace state outside our root; drop the dir once it is empty.
        for ns in {self.namespace, *([CRI_NAMESPACE] if self.cri is not None else [])}:
            try:
                os.rmdir(f"/run/containerd/runc/{ns}")
            except OSError:
                pass
        if self.remove_base and not _mounts_under([self.base]):
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Containerd:
        # `start_containerd` hands out a running daemon: a second start would orphan it.
        if self.process is not None and self.process.poll() is None:
            return self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_containerd(base: Path | None = None, *, namespace: str | None = None,
                     proxy_plugins: Mapping[str, str] | None = None,
                     extra_toml: str = "", cri: CriOptions | None = None,
                     prefix: Sequence[str] = ()) -> Containerd:
    """Start a private containerd under `base` (a new short temp dir if None); `cri`
    enables the CRI plugin with those options; `prefix` runs it behind a command (e.g.
    `nsenter --net=...`)."""
    remove_base = base is None
    if base is None:
        # /tmp keeps socket paths well under the sun_path limit.
        base = Path(tempfile.mkdtemp(prefix="peerstar-ctrd-", dir="/tmp"))
    daemon = Containerd(
        base=base,
        namespace=namespace or f"peerstar-test-{os.getpid()}",
        proxy_plugins=dict(proxy_plugins or {}),
        extra_toml=extra_toml,
        cri=cri,
        remove_base=remove_base,
        prefix=list(prefix),
    )
    try:
        return daemon.start()
    except BaseException:
        daemon.stop()  # also removes the temp dir we made
        raise
