"""`peerstar snapshotter serve`: the containerd remote snapshotter daemon.

Owns the command-line surface only; the daemon lives in `peerstar.snapshotter`.
Defaults: socket /run/peerstar/snapshotter.sock, root /var/lib/peerstar/snapshotter,
config /etc/peerstar/snapshotter.toml (absent is fine). Flags win over the file.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from peerstar.errors import PeerstarError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("snapshotter", help="containerd remote snapshotter (lazy pulls)")
    sub = p.add_subparsers(dest="snapshotter_command", metavar="SUBCOMMAND")
    serve = sub.add_parser(
        "serve", help="serve containerd's snapshots API on a unix socket",
        description="Serve containerd's snapshots v1 API (overlay snapshots, eStargz "
                    "layers mounted lazily). containerd config.toml: [proxy_plugins."
                    "peerstar] type = \"snapshot\" address = \"SOCK\".")
    serve.add_argument("--address", type=Path, default=None,
                       help="unix socket (default /run/peerstar/snapshotter.sock)")
    serve.add_argument("--root", type=Path, default=None,
                       help="state directory (default /var/lib/peerstar/snapshotter)")
    serve.add_argument("--config", type=Path, default=None,
                       help="TOML config (default /etc/peerstar/snapshotter.toml if present)")
    serve.add_argument("--metrics-address", default=None,
                       help="HOST:PORT for Prometheus /metrics (default: config, else off)")
    serve.add_argument("--daemon-cgroup", default=None, metavar="ROOT/NAME",
                       help="cgroup the layer mount daemons move into, out of the "
                            "snapshotter's own (a pod's): ROOT is the host's cgroup "
                            "filesystem (default: config [remote] daemon_cgroup, else stay)")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_serve)
    p.set_defaults(func=lambda _args: (p.print_help(), 2)[1])


def _serve(args: argparse.Namespace) -> int:
    import pyfuse3  # noqa: F401 - lazy mounts need it: say so at start, not per layer

    from peerstar.snapshotter.config import load_config
    from peerstar.snapshotter.service import serve

    cfg = load_config(args.config, address=args.address, root=args.root,
                      metrics_address=args.metrics_address,
                      daemon_cgroup=args.daemon_cgroup)
    level = logging.DEBUG if args.verbose else getattr(logging, args.log_level.upper())
    logging.getLogger().setLevel(level)
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
    try:
        return serve(cfg, ready=lambda: print(f"serving on {cfg.address}", flush=True))
    except OSError as exc:
        raise PeerstarError(f"snapshotter: {exc}") from None
