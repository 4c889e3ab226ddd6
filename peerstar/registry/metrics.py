"""Prometheus metrics of the registry: one `CollectorRegistry` per server instance, so
several servers (tests) in one process never collide, exported by `/metrics`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RegistryMetrics:
    """Requests, bytes, latency and upstream failures of one registry server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "peerstar_registry_requests", "HTTP requests answered",
            ["method", "route", "status"], registry=self.registry)
        self.bytes = Counter(
            "peerstar_registry_response_bytes", "Body bytes sent to clients",
            ["route"], registry=self.registry)
        self.latency = Histogram(
            "peerstar_registry_request_duration_seconds",
            "Time from request to the last byte sent", ["route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                     30, 60, 120))
        self.upstream_errors = Counter(
            "peerstar_registry_upstream_errors",
            "Failed IPFS read attempts (kind=timeout|error), retries included",
            ["kind"], registry=self.registry)
        self.upstream_reads = Counter(
            "peerstar_registry_upstream_reads",
            "Range reads sent to IPFS, by the DAG node read (node=root: the blob's own "
            "CID; interior or leaf: the node below it that holds the whole range)",
            ["node"], registry=self.registry)
        self.upstream_bytes = Counter(
            "peerstar_registry_upstream_bytes", "Bytes read from IPFS",
            registry=self.registry)
        self.aborted = Counter(
            "peerstar_registry_aborted_responses",
            "Responses cut off after headers were sent "
            "(reason=upstream|client_slow|client_gone)", ["reason"], registry=self.registry)
        self.tree_cache_images = Gauge(
            "peerstar_registry_tree_cache_images", "Image trees held in the cache",
            registry=self.registry)
        self.tree_walks = Counter(
            "peerstar_registry_tree_walks", "Descriptor-tree walks started (cache misses)",
            registry=self.registry)
