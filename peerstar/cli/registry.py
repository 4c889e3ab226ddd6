"""`peerstar registry serve`: serve images stored in IPFS (nerdctl's format) as a read-only
OCI registry on localhost, for containerd and Kubernetes nodes; with `--mirror`, also
containerd's mirror of upstream registries (docs/mirror.md).

Every flag also reads an environment variable (for container use); the flag wins.
A non-loopback listen address is only accepted when given on the command line with
`--listen` / `--metrics-listen`: the registry has no authentication.

stderr carries the JSON access log and, beside it, one JSON line per IPFS read that
took long enough to have needed the network (`"upstream": KIND`, see
`peerstar.registry.upstream.log_upstream`); `--no-access-log` turns both off.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from peerstar.errors import PeerstarError

if TYPE_CHECKING:
    from peerstar.registry.mirror import MirrorOptions

DEFAULT_LISTEN = "localhost:5050"
_T = TypeVar("_T")

# flag dest -> environment variable
ENV = {
    "listen": "PEERSTAR_REGISTRY_LISTEN",
    "ipfs_address": "PEERSTAR_IPFS_ADDRESS",
    "root": "PEERSTAR_ROOT",
    "read_timeout": "PEERSTAR_REGISTRY_READ_TIMEOUT",
    "read_retry_num": "PEERSTAR_REGISTRY_READ_RETRY_NUM",
    "metrics_listen": "PEERSTAR_REGISTRY_METRICS_LISTEN",
    "cache_size": "PEERSTAR_REGISTRY_CACHE_SIZE",
    "mirror": "PEERSTAR_REGISTRY_MIRRORS",
    "mirror_tag_ttl": "PEERSTAR_REGISTRY_MIRROR_TAG_TTL",
    "mirror_lookup_timeout": "PEERSTAR_REGISTRY_MIRROR_LOOKUP_TIMEOUT",
    "mirror_access_ttl": "PEERSTAR_REGISTRY_MIRROR_ACCESS_TTL",
    "mirror_offline_grace": "PEERSTAR_REGISTRY_MIRROR_OFFLINE_GRACE",
    "mirror_pin_bytes": "PEERSTAR_REGISTRY_MIRROR_PIN_BYTES",
    "mirror_state": "PEERSTAR_REGISTRY_MIRROR_STATE",
    "learn_window": "PEERSTAR_REGISTRY_LEARN_WINDOW",
}

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?)?\s*$", re.IGNORECASE)


def parse_duration(text: str, what: str) -> float:
    """`30s`, `500ms`, `2m`, `1h` or a plain number of seconds -> seconds (> 0)."""
    m = _DURATION_RE.match(text)
    if not m:
        raise PeerstarError(f"{what}: {text!r} is not a duration (examples: 30s, 500ms, 2m)")
    value = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    if value <= 0:
        raise PeerstarError(f"{what}: the duration must be more than zero")
    return value


def parse_size(text: str, what: str) -> int:
    """`64MiB`, `512K`, `1G` or a plain number of bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise PeerstarError(f"{what}: {text!r} is not a size (examples: 64MiB, 512K)")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[unit]


def parse_listen(text: str, what: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` -> (host, port). The host must be spelled out."""
    text = text.strip()
    m = re.match(r"^\[([0-9A-Fa-f:.%a-z]+)\]:(\d+)$", text) or re.match(
        r"^([^:\[\]]*):(\d+)$", text)
    if not m:
        raise PeerstarError(f"{what}: {text!r} is not HOST:PORT (e.g. localhost:5050)")
    host, port = m.group(1), int(m.group(2))
    if not host:
        raise PeerstarError(f"{what}: {text!r} has no host; write localhost:{port}, or "
                            f"0.0.0.0:{port} to listen on every interface")
    if not 0 <= port <= 65535:
        raise PeerstarError(f"{what}: port {port} is out of range")
    return host, port


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help="serve IPFS-stored images as an OCI registry")
    s = p.add_subparsers(dest="registry_command", metavar="SUBCOMMAND", required=True)
    serve = s.add_parser(
        "serve", help="read-only OCI registry: pull localhost:PORT/ipfs/<CID>",
        description="Serve images stored in IPFS in nerdctl's format as a read-only OCI "
                    "distribution registry (GET/HEAD, Range). Pull them as "
                    "HOST:PORT/ipfs/<CID>.")
    serve.add_argument("--listen", help=f"HOST:PORT to serve on (default {DEFAULT_LISTEN}; "
                       f"${ENV['listen']}); a non-loopback host must be given with this flag")
    store = serve.add_mutually_exclusive_group()
    store.add_argument("--ipfs-address", help="IPFS daemon API (multiaddr or URL; "
                       f"${ENV['ipfs_address']}; default $IPFS_PATH/api, ~/.ipfs/api)")
    store.add_argument("--root", help="use the embedded store under DIR instead of a daemon "
                       f"(${ENV['root']})")
    serve.add_argument("--read-timeout", help="timeout of each IPFS read, e.g. 30s "
                       f"(default 30s; ${ENV['read_timeout']})")
    serve.add_argument("--read-retry-num", help="retries of a failed or stalled IPFS read "
                       f"(default 3; ${ENV['read_retry_num']})")
    serve.add_argument("--metrics-listen", help="HOST:PORT for Prometheus /metrics (off "
                       f"unless set; ${ENV['metrics_listen']})")
    serve.add_argument("--cache-size", help="memory bound of the descriptor-tree cache "
                       f"(default 64MiB; ${ENV['cache_size']})")
    serve.add_argument("--no-access-log", action="store_true",
                       help="do not write the JSON access log (and the log of IPFS reads "
                       "that needed the network) to stderr")
    serve.add_argument("--no-warm-up", action="store_true",
                       help="do not warm an image's layers (DAG skeleton, footer, TOC, "
                       "prioritized files) in the IPFS daemon when its manifest is served")
    serve.add_argument("--no-learn", action="store_true",
                       help="do not record which ranges containers read from each layer, "
                       "share them with the cluster, nor warm those other nodes learned "
                       "(docs/learning.md)")
    serve.add_argument("--learn-window", help="how long after a layer's first container "
                       "read its reads are recorded (default 20s; "
                       f"${ENV['learn_window']})")
    serve.add_argument("--no-subdag", action="store_true",
                       help="cat every range from the blob's own CID instead of the deepest "
                       "DAG node holding it (for comparisons; slower)")
    serve.add_argument("--mirror", action="append", metavar="[NS=]URL",
                       help="also act as containerd's registry mirror for this upstream "
                       "(repeatable; NS defaults to URL's host[:port], e.g. "
                       "docker.io=https://registry-1.docker.io; "
                       f"${ENV['mirror']}, comma-separated); see docs/mirror.md")
    serve.add_argument("--mirror-tag-ttl", help="how long a tag resolved at an upstream is "
                       f"reused (default 30s; ${ENV['mirror_tag_ttl']})")
    serve.add_argument("--mirror-lookup-timeout", help="how long to wait for a node of the "
                       "cluster to name a digest before going upstream (default 50ms; "
                       f"${ENV['mirror_lookup_timeout']})")
    serve.add_argument("--mirror-access-ttl", help="how long the upstream's answer that a "
                       "request's credentials may pull a digest is reused (default 30s; "
                       f"${ENV['mirror_access_ttl']})")
    serve.add_argument("--mirror-offline-grace", help="how long such a grant still serves "
                       "content from the cluster while the upstream cannot be reached "
                       f"(default 10m; ${ENV['mirror_offline_grace']})")
    serve.add_argument("--mirror-pin-bytes", help="bound of the content the mirror keeps "
                       "pinned; past it the least recently served is unpinned for the "
                       f"IPFS GC (default 20GiB, 0 = unbounded; ${ENV['mirror_pin_bytes']})")
    serve.add_argument("--mirror-state", metavar="FILE", help="where the mirror records "
                       "what it pinned, so that a restarted bridge still bounds it "
                       "(default ROOT/mirror-pins.json with --root, else none; "
                       f"${ENV['mirror_state']})")
    serve.set_defaults(func=cmd_serve)


def _setting(args: argparse.Namespace, dest: str) -> tuple[str | None, bool]:
    """(value, from_flag): the flag if given, else the environment variable."""
    value = getattr(args, dest, None)
    if value is not None:
        return value, True
    env = os.environ.get(ENV[dest])
    return (env if env else None), False


def cmd_serve(args: argparse.Namespace) -> int:
    from peerstar.registry import LearnOptions, ReadPolicy, ServerOptions

    listen_text, listen_flag = _setting(args, "listen")
    host, port = parse_listen(listen_text or DEFAULT_LISTEN, "--listen")
    metrics_text, metrics_flag = _setting(args, "metrics_listen")
    metrics = parse_listen(metrics_text, "--metrics-listen") if metrics_text else None
    timeout_text, _ = _setting(args, "read_timeout")
    timeout = parse_duration(timeout_text or "30s", "--read-timeout")
    retries_text, _ = _setting(args, "read_retry_num")
    try:
        retries = int(retries_text or "3")
    except ValueError:
        raise PeerstarError(f"--read-retry-num: {retries_text!r} is not a number") from None
    if not 0 <= retries <= 100:
        raise PeerstarError("--read-retry-num must be between 0 and 100")
    cache_text, _ = _setting(args, "cache_size")
    cache = parse_size(cache_text or "64MiB", "--cache-size")
    ipfs_address, _ = _setting(args, "ipfs_address")
    root, root_flag = _setting(args, "root")
    if ipfs_address and root and root_flag:
        ipfs_address = None  # --root on the command line beats the environment's daemon
    elif ipfs_address and root:
        root = None

    if not args.no_access_log:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        for name in ("peerstar.registry.access", "peerstar.registry.upstream"):
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
            logger.propagate = False

    window_text, _ = _setting(args, "learn_window")
    learn = None if args.no_learn else LearnOptions(
        window=parse_duration(window_text or "20s", "--learn-window"))
    options = ServerOptions(policy=ReadPolicy(timeout=timeout, retries=retries),
                            cache_bytes=cache, warm_up=not args.no_warm_up,
                            subdag=not args.no_subdag,
                            mirror=_mirror_options(args, timeout, root), learn=learn)
    return _run_loop(_serve(
        ipfs_address, Path(root) if root else None, options, host, port,
        allow_remote=listen_flag, metrics=metrics, metrics_remote=metrics_flag,
        timeout=timeout))


def _mirror_options(args: argparse.Namespace, timeout: float,
                    root: str | None) -> MirrorOptions | None:
    """The mirror's options from --mirror (or the comma-separated environment variable);
    None when no upstream is named."""
    from peerstar.registry.mirror import DEFAULT_PIN_BYTES, MirrorOptions
    from peerstar.registry.origin import parse_mirror

    specs: list[str] = args.mirror or [
        s for s in os.environ.get(ENV["mirror"], "").split(",") if s.strip()]
    if not specs:
        return None
    upstreams = tuple(parse_mirror(s) for s in specs)
    seen = [u.ns for u in upstreams]
    dup = sorted({ns for ns in seen if seen.count(ns) > 1})
    if dup:
        raise PeerstarError(f"--mirror: {', '.join(dup)} named more than once")
    ttl_text, _ = _setting(args, "mirror_tag_ttl")
    lookup_text, _ = _setting(args, "mirror_lookup_timeout")
    access_text, _ = _setting(args, "mirror_access_ttl")
    grace_text, _ = _setting(args, "mirror_offline_grace")
    pin_text, _ = _setting(args, "mirror_pin_bytes")
    state, _ = _setting(args, "mirror_state")
    if state is None and root:
        state = str(Path(root) / "mirror-pins.json")
    return MirrorOptions(
        upstreams=upstreams,
        tag_ttl=parse_duration(ttl_text or "30s", "--mirror-tag-ttl"),
        lookup_timeout=parse_duration(lookup_text or "50ms", "--mirror-lookup-timeout"),
        access_ttl=parse_duration(access_text or "30s", "--mirror-access-ttl"),
        offline_grace=parse_duration(grace_text or "10m", "--mirror-offline-grace"),
        pin_bytes=parse_size(pin_text, "--mirror-pin-bytes") if pin_text else
        DEFAULT_PIN_BYTES,
        pin_state=state or "",
        upstream_timeout=timeout)


def _run_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """Run on uvloop when it is installed: it halves the per-request event-loop cost,
    which is most of the registry's latency over a direct `cat`."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def _serve(ipfs_address: str | None, root: Path | None, options, host: str,
                 port: int, *, allow_remote: bool, metrics: tuple[str, int] | None,
                 metrics_remote: bool, timeout: float) -> int:
    from peerstar.ipfs import EmbeddedStore, open_store
    from peerstar.registry import RegistryServer, check_bind_address

    check_bind_address(host, allow_remote)
    if metrics is not None:
        check_bind_address(metrics[0], metrics_remote)
    # The store's own retries are off: the registry retries each read itself
    # (ReadPolicy), so a stalled daemon costs (retries + 1) * timeout, not its square.
    store = EmbeddedStore(root) if root is not None else open_store(
        ipfs_address, timeout=timeout, retries=0)
    server = RegistryServer(store, options)
    try:
        await server.start(host, port, allow_remote=allow_remote,
                           metrics_host=metrics[0] if metrics else None,
                           metrics_port=metrics[1] if metrics else None)
        where = ", ".join(f"{h}:{p}" for h, p in server.addresses)
        print(f"peerstar registry listening on {where}" + (
            f"; metrics on {server.metrics_addresses[0][0]}:{server.metrics_addresses[0][1]}"
            if server.metrics_addresses else ""), file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await server.stop()
        await store.close()
    return 0
