"""Fixtures of the registry tests: an in-memory-store registry, a js-ipfs daemon, and
registries over both real backends (js-ipfs daemon and the embedded store)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from peerstar.registry import ReadPolicy, ServerOptions
from tests.registry.harness import ThreadedRegistry
from tests.registry.memstore import MemoryStore
from tests.support.jsipfs import JsIpfs


@pytest.fixture
def mem_registry() -> Iterator[ThreadedRegistry]:
    """A registry over a fresh MemoryStore; short timeouts so fault tests stay fast. No
    warm-up: these tests count the reads requests make (test_warmup.py has its own)."""
    options = ServerOptions(policy=ReadPolicy(timeout=1.0, retries=1), write_timeout=3.0,
                            header_timeout=3.0, warm_up=False)
    with ThreadedRegistry(MemoryStore, options, metrics=True) as reg:
        yield reg


@pytest.fixture(scope="session")
def jsipfs_daemon(jsipfs: JsIpfs) -> JsIpfs:
    return jsipfs


def open_backend(kind: str, daemon: JsIpfs | None, root: Path, *, timeout: float = 30.0):
    """A store factory for `kind` ("jsipfs" or "embedded")."""
    from peerstar.ipfs import EmbeddedStore, open_store

    if kind == "jsipfs":
        assert daemon is not None
        # retries=0: the registry's ReadPolicy does the retrying, per read
        return lambda: open_store(daemon.api_multiaddr, timeout=timeout, retries=0)
    # not open_store(None, root): that would pick up a daemon from ~/.ipfs/api
    return lambda: EmbeddedStore(root)


@pytest.fixture(params=["jsipfs", "embedded"])
def backend_registry(request: pytest.FixtureRequest, tmp_path: Path
                     ) -> Iterator[ThreadedRegistry]:
    """A registry over each real backend in turn."""
    daemon = request.getfixturevalue("jsipfs_daemon") if request.param == "jsipfs" else None
    factory = open_backend(request.param, daemon, tmp_path / "store")
    with ThreadedRegistry(factory) as reg:
        yield reg
