"""Session fixtures for the real parts: a private containerd, a private registry, and the
sample image. Missing binaries FAIL the tests that need them (CI must exercise them):
the message says to run scripts/install.sh.

Subdirectory conftest.py files (tests/estargz/, tests/ipfs/, ...) add their own fixtures.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# peerstar and tests.support are imported from the checkout. `pythonpath = ["."]` in
# pyproject's pytest options does this too; keep plain `pytest` working without it.
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from peerstar.sample import SampleImage, build_sample_image  # noqa: E402
from tests.support.containerd import Containerd, HarnessError, start_containerd  # noqa: E402
from tests.support.registry import DockerRegistry, start_registry  # noqa: E402


@pytest.fixture(scope="session")
def containerd() -> Iterator[Containerd]:
    """A private containerd (CRI off) for the session; `.ctr` runs ctr/ctr-remote on it."""
    try:
        daemon = start_containerd()
    except HarnessError as exc:
        failure = f"cannot start containerd: {exc}"
    else:
        failure = ""
    if failure:  # outside the except block: no chained traceback in the report
        pytest.fail(failure, pytrace=False)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def docker_registry() -> Iterator[DockerRegistry]:
    """A private docker-registry on 127.0.0.1; `.host` is `127.0.0.1:PORT`."""
    try:
        registry = start_registry()
    except HarnessError as exc:
        failure = f"cannot start docker-registry: {exc}"
    else:
        failure = ""
    if failure:
        pytest.fail(failure, pytrace=False)
    try:
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def sample_image(tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    """The sample image (tag `latest`, no extra data) as an OCI layout, built once."""
    return build_sample_image(tmp_path_factory.mktemp("sample") / "layout")
