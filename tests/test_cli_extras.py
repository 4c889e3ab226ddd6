"""A clean install without extras (`pip install peerstar`): every command either works or
says in one line which extra to install, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("bare-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           str(REPO)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for module in ("pyfuse3", "grpc"):  # really without the extras
        assert subprocess.run([str(py), "-c", f"import {module}"],
                              capture_output=True).returncode != 0
    return venv


@pytest.mark.parametrize(("argv", "extra"), [
    (["snapshotter", "serve", "--address", "/nonexistent/s.sock"], "fuse"),
    (["mount", "localhost:1/ipfs/x", "/nonexistent"], "fuse"),
])
def test_commands_name_the_missing_extra(bare_venv: Path, argv: list[str], extra: str) -> None:
    proc = subprocess.run([str(bare_venv / "bin" / "peerstar"), *argv], capture_output=True,
                          text=True, timeout=120, cwd="/")
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc, f"pip install 'peerstar[{extra}]'")


def test_commands_without_extras_work(bare_venv: Path, tmp_path: Path) -> None:
    exe = str(bare_venv / "bin" / "peerstar")
    assert subprocess.run([exe, "--help"], capture_output=True, timeout=120).returncode == 0
    f = tmp_path / "blob"
    f.write_bytes(b"hello")
    proc = subprocess.run([exe, "ipfs", "add", "--only-hash", str(f)], capture_output=True,
                          text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1].startswith("bafkrei")
