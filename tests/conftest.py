"""Session fixtures for the real parts: a private containerd, a private registry, and the
sample image. Missing binaries FAIL the tests that need them (CI must exercise them):
the message says to run scripts/install.sh.

Subdirectory conftest.py files (tests/estargz/, tests/ipfs/, ...) add their own fixtures.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

# peerstar and tests.support are imported from the checkout. `pythonpath = ["."]` in
# pyproject's pytest options does this too; keep plain `pytest` working without it.
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from peerstar.source.sample import SampleImage, build_sample_image  # noqa: E402
from tests.support.containerd import Containerd, HarnessError, start_containerd  # noqa: E402
from tests.support.jsipfs import JsIpfs, start_jsipfs  # noqa: E402
from tests.support.registry import DockerRegistry, start_registry  # noqa: E402

T = TypeVar("T")


def _session_daemon(start: Callable[[], T], what: str) -> Iterator[T]:
    """Start a real part for the session; a start-up failure fails the test with a
    one-line reason (say, "run scripts/install.sh"), never skips it."""
    try:
        daemon = start()
    except HarnessError as exc:
        failure = f"cannot start {what}: {exc}"
    else:
        failure = ""
    if failure:  # outside the except block: no chained traceback in the report
        pytest.fail(failure, pytrace=False)
    try:
        yield daemon
    finally:
        daemon.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def containerd() -> Iterator[Containerd]:
    """A private containerd (CRI off) for the session; `.ctr` runs ctr/ctr-remote on it."""
    yield from _session_daemon(start_containerd, "containerd")


@pytest.fixture(scope="session")
def docker_registry() -> Iterator[DockerRegistry]:
    """A private docker-registry on 127.0.0.1; `.host` is `127.0.0.1:PORT`."""
    yield from _session_daemon(start_registry, "docker-registry")


@pytest.fixture(scope="session")
def jsipfs() -> Iterator[JsIpfs]:
    """One js-ipfs 0.66.1 daemon on free 127.0.0.1 ports, shared by the whole session
    (starting one takes seconds). Tests that stop it (SIGSTOP) resume it; tests that
    kill a daemon start their own."""
    yield from _session_daemon(start_jsipfs, "js-ipfs")


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HOME with no IPFS settings, so no real ~/.ipfs/api or
    ~/.local/share/peerstar on the machine is ever read or written."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("IPFS_PATH", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    return home


@pytest.fixture(scope="session")
def sample_image(tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    """The sample image (tag `latest`, no extra data) as an OCI layout, built once."""
    return build_sample_image(tmp_path_factory.mktemp("sample") / "layout")
