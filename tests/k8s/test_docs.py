"""docs/kubernetes.md: its YAML validates like the manifests, and it names real commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

from peerstar.k8s import manifests

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "kubernetes.md"


def test_yaml_blocks_validate_and_use_the_runtime_class() -> None:
    text = DOC.read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert blocks
    version = kubernetes_validate.utils.latest_version()
    (deployment,) = [d for b in blocks for d in yaml.safe_load_all(b)]
    kubernetes_validate.validate(deployment, version, strict=True)
    pod = deployment["spec"]["template"]
    assert pod["spec"]["runtimeClassName"] == manifests.RUNTIME_HANDLER
    assert pod["metadata"]["annotations"] == {
        manifests.RUNTIME_HANDLER_ANNOTATION: manifests.RUNTIME_HANDLER}
    assert pod["spec"]["containers"][0]["image"] == "localhost:5050/ipfs/CID"


def test_commands_in_the_doc_exist() -> None:
    text = DOC.read_text()
    used = set(re.findall(r"peerstar k8s ([a-z-]+)", text))
    assert {"bootstrap", "manifests", "kind-config", "containerd-config", "kubo-config"} <= used
    for sub in used:
        r = subprocess.run([sys.executable, "-m", "peerstar", "k8s", sub, "--help"],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 0, (sub, r.stderr)
    for path in re.findall(r"`(deploy/kubernetes/[a-z.-]+)`", text):
        assert (REPO / path).is_file(), path
