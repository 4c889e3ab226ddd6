"""Prometheus metrics of the registry: one `CollectorRegistry` per server instance, so
several servers (tests) in one process never collide, exported by `/metrics`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_MAX_CACHED = 64


class RegistryMetrics:
    """Requests, bytes, latency and upstream failures of one registry server.

    `request_done` and `upstream_read` keep the labelled children they update: looking
    one up (`labels`) costs more than the update itself, twice or more per request.
    """

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
            "Responses not completed (reason=upstream: IPFS failed after the headers were "
            "sent; client_slow; client_gone: it hung up or half-closed its side)", ["reason"],
            registry=self.registry)
        self.tree_cache_images = Gauge(
            "peerstar_registry_tree_cache_images", "Image trees held in the cache",
            registry=self.registry)
        self.tree_walks = Counter(
            "peerstar_registry_tree_walks", "Descriptor-tree walks started (cache misses)",
            registry=self.registry)
        self.warmups = Counter(
            "peerstar_registry_warmups",
            "Layer blobs warmed after their image manifest was served (result=estargz: "
            "skeleton, footer, TOC and prioritized range; plain: no eStargz footer, "
            "skeleton only; failed)", ["result"], registry=self.registry)
        self.warmup_failures = Counter(
            "peerstar_registry_warmup_failures",
            "Failed warm-up stages (stage=skeleton|footer|toc|prefetch|learned|bulk|manifest|"
            "internal) "
            "and failed leaf fan-out operations (stage=fanout)", ["stage"],
            registry=self.registry)
        self.warmup_ops = Counter(
            "peerstar_registry_warmup_ops",
            "IPFS operations of the warm-up and the leaf fan-out (kind=warm-node|warm-read|"
            "warm-stat|warm-config|warm-bulk|learn-stat|fanout-stat)", ["kind"],
            registry=self.registry)
        self.warmup_in_flight = Gauge(
            "peerstar_registry_warmup_in_flight",
            "Warm-up and fan-out operations in flight", registry=self.registry)
        self.profiles = Counter(
            "peerstar_registry_profiles",
            "Read profiles of layers (event=recorded: a container read a layer of an image "
            "served here and its window closed with ranges; published; heard: from another "
            "node; applied: a profile's ranges warmed for a served manifest; dropped: a "
            "profile heard that claimed nothing usable for the blob)", ["event"],
            registry=self.registry)
        self.profile_bytes = Counter(
            "peerstar_registry_profile_warmed_bytes",
            "Bytes of the leaves asked of the daemon (block_stat) for learned ranges",
            registry=self.registry)
        self.bulk_deferred = Counter(
            "peerstar_registry_bulk_reads_deferred",
            "Blob reads of kind prefetch or background held until their image's warm-up "
            "TOC phase ended (result=phase_ended|bound: the wait's bound passed first)",
            ["result"], registry=self.registry)
        self._done: dict[tuple[str, str, int], tuple] = {}
        self._reads: dict[str, Counter] = {}

    def request_done(self, method: str, route: str, status: int, seconds: float,
                     sent: int) -> None:
        """Count one answered request: its latency and the body bytes sent."""
        key = (method, route, status)
        children = self._done.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)),
                        self.latency.labels(route), self.bytes.labels(route))
            if len(self._done) < _MAX_CACHED:  # methods are the client's to choose
                self._done[key] = children
        children[0].inc()
        children[1].observe(seconds)
        children[2].inc(sent)

    def upstream_read(self, node: str) -> None:
        """Count one range read sent to IPFS, by the DAG node it reads."""
        child = self._reads.get(node)
        if child is None:
            child = self._reads[node] = self.upstream_reads.labels(node)
        child.inc()
