"""Progress bars appear on a terminal (a pty from `script`), for convert and push."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest

from peerstar.source.sample import build_sample_image


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return build_sample_image(tmp_path_factory.mktemp("progress") / "src", extra_mib=1)


def on_tty(cmd: list[str], tmp_path) -> str:
    assert shutil.which("script"), "util-linux `script` is needed (bsdutils)"
    log = tmp_path / "typescript"
    p = subprocess.run(["script", "-qec", shlex.join(cmd), str(log)], capture_output=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    text = log.read_bytes().decode(errors="replace")
    assert p.returncode == 0, text[-2000:]
    return text


def test_convert_shows_one_bar_per_layer(layout, tmp_path):
    text = on_tty([sys.executable, "-m", "peerstar", "convert", f"oci:{layout.path}:latest",
                   f"oci:{tmp_path / 'dst'}:latest"], tmp_path)
    done = set(re.findall(r"layer ([0-9a-f]{12}) done", text))
    assert done == {d[7:19] for d in layout.layer_digests}


def test_push_shows_transfer_bars(layout, tmp_path):
    text = on_tty([sys.executable, "-m", "peerstar", "push", "--root", str(tmp_path / "s"),
                   f"oci:{layout.path}:latest"], tmp_path)
    assert re.search(r"[0-9.]+ [kMG]?B/s", text)
    assert re.search(r"bafk[a-z2-7]{50,}", text)
