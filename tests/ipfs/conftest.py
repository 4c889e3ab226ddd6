"""Fixtures for peerstar.ipfs tests: one real js-ipfs daemon for the session (the RPC
client is only ever tested against it), and `store`, parametrized over both backends.

Tests must not see the developer's own IPFS daemon or data: HOME, IPFS_PATH and
XDG_DATA_HOME point at temporary directories for every test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from peerstar.ipfs import ContentStore, EmbeddedStore, open_store

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def _isolated_env(isolated_home: Path) -> None:
    """Every test here runs with a fresh HOME (see tests/conftest.py)."""


@pytest.fixture(params=["rpc", "embedded"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """(name, open_store kwargs) for each backend."""
    if request.param == "rpc":
        daemon = request.getfixturevalue("jsipfs")
        return "rpc", {"ipfs_address": daemon.api_multiaddr, "timeout": 30.0, "retries": 2}
    return "embedded", {"root": tmp_path / "store"}


def make_store(backend: tuple[str, dict[str, Any]]) -> ContentStore:
    store = open_store(**backend[1])
    assert isinstance(store, EmbeddedStore) == (backend[0] == "embedded")
    return store
