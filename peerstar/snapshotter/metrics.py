"""Prometheus metrics of the snapshotter, and the `/metrics` endpoint.

Owns: the snapshotter's own metric objects (gRPC calls by method and code and their
latency, remote mounts and fallbacks by reason) in a registry of their own, and the HTTP
endpoint serving them together with every running layer mount daemon's metrics. Each
daemon writes its registry to `<cache>/mounts/<key>.prom` (peerstar.lazyfs.mountd); the
endpoint merges the files of daemons that still run (their `<key>.json` state file
exists) family by family, so one scrape shows every layer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("peerstar.snapshotter.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

OPERATIONS = Counter("peerstar_snapshotter_operations", "snapshotter gRPC calls",
                     ["method", "code"], registry=REGISTRY)
OPERATION_SECONDS = Histogram("peerstar_snapshotter_operation_seconds",
                              "snapshotter gRPC call latency", ["method"], registry=REGISTRY,
                              buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60))
REMOTE_PREPARES = Counter("peerstar_snapshotter_remote_prepares",
                          "Prepare calls for layers: mounted lazily, or why not",
                          ["result"], registry=REGISTRY)
# result: remote | fallback_labels | fallback_mount_failed
RESOLVED_AHEAD = Counter("peerstar_snapshotter_layers_resolved_ahead",
                         "layers whose footer, TOC and prefetch range were fetched before "
                         "their own Prepare (from the image's layer list)",
                         ["result"], registry=REGISTRY)
RESOLVED_AHEAD_BYTES = Counter("peerstar_snapshotter_resolved_ahead_bytes",
                               "blob bytes fetched while resolving layers ahead",
                               registry=REGISTRY)
# result: ok | failed


class _MountDaemonCollector:
    """Merges the `.prom` files of running mount daemons into one exposition."""

    def __init__(self, mounts_dir: Path) -> None:
        self.mounts_dir = mounts_dir

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        for prom in sorted(self.mounts_dir.glob("*.prom")):
            if not prom.with_suffix(".json").exists():
                continue  # that daemon has exited; its last figures are stale
            try:
                text = prom.read_text()
            except OSError:
                continue
            try:
                parsed = list(text_string_to_metric_families(text))
            except ValueError as exc:
                log.debug("skipping unreadable %s: %s", prom, exc)
                continue
            for fam in parsed:
                merged = families.setdefault(fam.name, Metric(fam.name, fam.documentation,
                                                              fam.type, fam.unit))
                for sample in fam.samples:
                    # The same layer in two snapshots: one daemon's sample is enough.
                    ident = (sample.name, tuple(sorted(sample.labels.items())))
                    if ident not in seen:
                        seen.add(ident)
                        merged.samples.append(sample)
        yield from families.values()


def start_metrics_server(address: str, mounts_dir: Path) -> ThreadingHTTPServer:
    """Serve `/metrics` on HOST:PORT in a daemon thread; returns the server."""
    host, _, port = address.rpartition(":")
    daemons = CollectorRegistry(auto_describe=False)
    daemons.register(_MountDaemonCollector(mounts_dir))  # type: ignore[arg-type]  # a Collector by duck type; prometheus_client types register() with its own ABC

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            body = generate_latest(REGISTRY) + generate_latest(daemons)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("metrics: " + format, *args)

    server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server
