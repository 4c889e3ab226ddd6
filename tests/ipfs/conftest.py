"""Fixtures for peerstar.ipfs tests: one real js-ipfs daemon for the session (the RPC
client is only ever tested against it), and `store`, parametrized over both backends.

Tests must not see the developer's own IPFS daemon or data: HOME, IPFS_PATH and
XDG_DATA_HOME point at temporary directories for every test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from peerstar.ipfs import ContentStore, EmbeddedStore, open_store
from tests.support.containerd import HarnessError
from tests.support.jsipfs import JsIpfs, start_jsipfs

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("IPFS_PATH", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)


@pytest.fixture(scope="session")
def jsipfs() -> Iterator[JsIpfs]:
    """A js-ipfs 0.66.1 daemon on free 127.0.0.1 ports for the whole session."""
    try:
        daemon = start_jsipfs()
    except HarnessError as exc:
        failure = f"cannot start js-ipfs: {exc}"
    else:
        failure = ""
    if failure:
        pytest.fail(failure, pytrace=False)
    try:
        yield daemon
    finally:
        daemon.stop()


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
