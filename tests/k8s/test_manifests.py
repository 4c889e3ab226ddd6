"""The Kubernetes objects: schema validity (offline, kubernetes-validate's bundled OpenAPI
schemas, strict: unknown fields are errors) and each fix of the seed's defects."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from peerstar.k8s import keys, kubo, manifests
from peerstar.k8s.manifests import Options, bootstrap_secret, render_manifests
from tests.support.cli import run_peerstar

REPO = Path(__file__).resolve().parents[2]
# The oldest Kubernetes still commonly run (kind's defaults are newer) and the newest bundled.
K8S_VERSIONS = ["1.27.0", kubernetes_validate.utils.latest_version()]
KUBO_FIXTURE = Path(__file__).with_name("kubo_server_config.json")


def all_objects(opts: Options | None = None) -> list[dict[str, Any]]:
    return [bootstrap_secret((opts or Options()).namespace), *render_manifests(opts)]


def pod_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objs:
        if o["kind"] in ("Deployment", "DaemonSet"):
            yield o["metadata"]["name"], o["spec"]["template"]["spec"]


def containers(pod: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    return [*(pod.get("initContainers", []) if init else []), *pod["containers"]]


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [i for i in items if i["name"] == name]
    return found


# -- schemas --------------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates(version: str) -> None:
    objs = all_objects(Options(namespace="other", kubo_image="reg.example/kubo:v1",
                               peerstar_image="reg.example/peerstar@sha256:" + "a" * 64,
                               storage_max="200GiB"))
    assert [o["kind"] for o in objs] == ["Secret", "Namespace", "RuntimeClass", "Service",
                                         "Deployment", "DaemonSet"]
    for obj in objs:
        kubernetes_validate.validate(obj, version, strict=True)


def test_validator_is_live() -> None:
    """The same validation rejects a wrong field type and an unknown field."""
    ds = render_manifests()[-1]
    bad = json.loads(json.dumps(ds))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "4001"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = json.loads(json.dumps(ds))
    bad["spec"]["template"]["spec"]["containers"][0]["probe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_cli_output_parses_and_validates() -> None:
    r = run_peerstar("k8s", "manifests", "-n", "ps", "--kubo-image", "kubo:x",
                     "--peerstar-image", "peerstar:y", "--storage-max", "7GB")
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(r.stdout))
    assert [d["kind"] for d in docs] == ["Namespace", "RuntimeClass", "Service", "Deployment",
                                         "DaemonSet"]
    assert docs == render_manifests(Options("ps", "kubo:x", "peerstar:y", "7GB"))
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSIONS[-1], strict=True)
        if d["kind"] not in ("Namespace", "RuntimeClass"):  # the cluster-scoped ones
            assert d["metadata"]["namespace"] == "ps"
    assert docs[0]["metadata"]["name"] == "ps"
    assert docs[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    images = {c["image"] for _, pod in pod_specs(docs) for c in containers(pod)}
    assert images == {"kubo:x", "peerstar:y"}
    assert "--storage-max" in r.stdout and "7GB" in r.stdout

    r = run_peerstar("k8s", "bootstrap", "--namespace", "ps")
    assert r.returncode == 0, r.stderr
    (secret,) = list(yaml.safe_load_all(r.stdout))
    kubernetes_validate.validate(secret, K8S_VERSIONS[-1], strict=True)
    assert secret["metadata"]["namespace"] == "ps"
    key = base64.b64decode(secret["data"]["swarm.key"]).decode()
    assert len(keys.parse_swarm_key(key)) == 32
    # A fresh key every time.
    again = yaml.safe_load(run_peerstar("k8s", "bootstrap").stdout)
    assert again["data"]["swarm.key"] != secret["data"]["swarm.key"]


@pytest.mark.parametrize("args,message", [
    (["k8s", "manifests", "-n", "Bad_NS"], "not a valid namespace"),
    (["k8s", "manifests", "--storage-max", "lots"], "not a size"),
    (["k8s", "bootstrap", "-n", "-x"], "namespace"),
])
def test_cli_rejects_bad_options(args: list[str], message: str) -> None:
    r = run_peerstar(*args)
    assert r.returncode == 2 and message in r.stderr and r.stdout == ""


def test_deploy_copy_is_current() -> None:
    """deploy/kubernetes/peerstar.yaml is the default rendering, listed by kustomize."""
    deployed = list(yaml.safe_load_all((REPO / "deploy/kubernetes/peerstar.yaml").read_text()))
    assert deployed == render_manifests()
    kust = yaml.safe_load((REPO / "deploy/kubernetes/kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization" and "peerstar.yaml" in kust["resources"]
    containerd = (REPO / "deploy/kubernetes/containerd-config.toml").read_text()
    assert containerd == manifests.containerd_config()
    kind = yaml.safe_load((REPO / "deploy/kubernetes/kind-config.yaml").read_text())
    assert kind == manifests.kind_config()
    assert kind["containerdConfigPatches"] == [containerd]
    assert [n["role"] for n in kind["nodes"]] == ["control-plane", "worker", "worker"]


# -- the seed's defects, fixed ---------------------------------------------------------------
def test_secret_holds_key_and_a_consistent_bootstrap_identity() -> None:
    s = bootstrap_secret("ns")
    data = {k: base64.b64decode(v).decode() for k, v in s["data"].items()}
    assert set(data) == {"swarm.key", "bootstrap.id", "bootstrap.key"}
    keys.parse_swarm_key(data["swarm.key"])
    assert keys.Identity.from_private_key(data["bootstrap.key"]).peer_id == data["bootstrap.id"]


def test_swarm_key_only_in_the_secret_read_only_0400() -> None:
    objs = all_objects()
    secret_text = base64.b64decode(objs[0]["data"]["swarm.key"]).decode()
    hex_key = secret_text.splitlines()[2]
    bootstrap_key = base64.b64decode(objs[0]["data"]["bootstrap.key"]).decode()
    for obj in objs[1:]:
        text = yaml.safe_dump(obj)
        assert hex_key not in text and "/key/swarm/psk" not in text
        assert bootstrap_key not in text
    checked = 0
    for _, pod in pod_specs(objs):
        secret_vols = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
        assert secret_vols, "the pods need the swarm key"
        for vol in secret_vols.values():
            assert vol["secretName"] == manifests.SECRET_NAME
            assert vol["defaultMode"] == 0o400
            assert all(item["mode"] == 0o400 for item in vol["items"])
        for c in containers(pod):
            for m in c.get("volumeMounts", []):
                if m["name"] in secret_vols:
                    assert m.get("readOnly") is True, (c["name"], m)
                    checked += 1
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                # Only the (public) peer id is passed through the environment.
                assert ref is None or ref["key"] == "bootstrap.id", e
                assert "/key/swarm" not in e.get("value", "")
    assert checked == 3  # two kubo containers + the bootstrap's identity


def test_kubo_has_pnet_forced_and_the_key_in_its_repo() -> None:
    for name, pod in pod_specs(all_objects()):
        k = by_name(pod["containers"], "kubo")
        env = {e["name"]: e.get("value") for e in k["env"]}
        assert env["LIBP2P_FORCE_PNET"] == "1", name
        mount = by_name(k["volumeMounts"], "swarm-key")
        assert mount["mountPath"] == f"{env['IPFS_PATH']}/swarm.key"
        assert mount["subPath"] == "swarm.key"
        assert k["command"][:2] == ["ipfs", "daemon"]
        # uid 0 without capabilities: reads the root-owned 0400 file, nothing more.
        assert k["securityContext"]["runAsUser"] == 0
        assert k["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_repo_has_one_owner() -> None:
    """Every container mounting the kubo repo runs as uid 0 without capabilities, so none
    writes files another cannot read back (no CAP_DAC_OVERRIDE to paper over it)."""
    seen = 0
    for _, pod in pod_specs(all_objects()):
        for c in containers(pod):
            if any(m["name"] == "ipfs-repo" for m in c.get("volumeMounts", [])):
                assert c["securityContext"]["runAsUser"] == 0, c["name"]
                assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
                seen += 1
    assert seen == 6  # ipfs-init, ipfs-config, kubo in each of the two pods


def test_rpc_port_never_exposed() -> None:
    objs = all_objects()
    for _, pod in pod_specs(objs):
        assert not pod.get("hostNetwork")
        for c in containers(pod):
            for p in c.get("ports", []):
                assert p["containerPort"] != 5001 and p.get("hostPort") != 5001
                if "hostPort" in p:  # only the registry, and only on the node's loopback
                    assert (c["name"], p["hostPort"], p["hostIP"]) == (
                        "registry", 5050, "127.0.0.1")
    (svc,) = [o for o in objs if o["kind"] == "Service"]
    assert [p["port"] for p in svc["spec"]["ports"]] == [4001]
    # Any mention of 5001 is a loopback multiaddr.
    for s in strings(objs):
        if "5001" in s:
            assert "/ip4/127.0.0.1/tcp/5001" in s, s
    # And the repo config the init container writes keeps the API on loopback.
    cfg = kubo.configure_kubo(json.loads(KUBO_FIXTURE.read_text()), bootstrap=[])
    assert cfg["Addresses"]["API"] == "/ip4/127.0.0.1/tcp/5001"
    assert cfg["Addresses"]["Gateway"].startswith("/ip4/127.0.0.1/")


def test_probes_everywhere_and_kubo_probed_by_post() -> None:
    for name, pod in pod_specs(all_objects()):
        for c in pod["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, (name, c["name"])
            for probe in (c["readinessProbe"], c["livenessProbe"]):
                assert probe["timeoutSeconds"] >= 1 and probe["periodSeconds"] >= 5
                if "httpGet" in probe:  # GET is right for the registry's /v2/ only
                    assert c["name"] == "registry" and probe["httpGet"]["path"] == "/v2/"
        k = by_name(pod["containers"], "kubo")
        for probe in (k["readinessProbe"], k["livenessProbe"], k["startupProbe"]):
            # `ipfs --api=... id` POSTs /api/v0/id; no httpGet (kubo answers GET with 405).
            assert probe["exec"]["command"] == ["ipfs", "--api=/ip4/127.0.0.1/tcp/5001", "id"]


def test_resource_requests_on_every_container() -> None:
    for name, pod in pod_specs(all_objects()):
        for c in containers(pod):
            req = c["resources"]["requests"]
            assert req["cpu"] and req["memory"], (name, c["name"])


def test_repo_persists_and_init_only_when_missing(tmp_path: Path) -> None:
    """Run the init container's script with a stand-in `ipfs`: it initialises an empty
    repo once, and on the next start leaves the existing repo (peer id, pins) alone."""
    ds = render_manifests()[-1]
    pod = ds["spec"]["template"]["spec"]
    repo_vol = by_name(pod["volumes"], "ipfs-repo")
    assert repo_vol["hostPath"] == {"path": "/var/lib/peerstar/ipfs",
                                    "type": "DirectoryOrCreate"}
    init = by_name(pod["initContainers"], "ipfs-init")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "ipfs"
    fake.write_text('#!/bin/sh\necho "$*" >> "$IPFS_PATH/../calls"\n'
                    'echo \'{"Identity": {"PeerID": "new"}}\' > "$IPFS_PATH/config"\n')
    fake.chmod(0o755)
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "IPFS_PATH": str(repo)}
    assert [e["value"] for e in init["env"] if e["name"] == "IPFS_PATH"] == [manifests.IPFS_PATH]

    def start() -> None:
        subprocess.run([*init["command"], *init["args"]], env=env, check=True, timeout=30)

    start()
    assert (tmp_path / "calls").read_text() == "init --profile=server --empty-repo\n"
    (repo / "config").write_text('{"Identity": {"PeerID": "kept"}}')
    (repo / "pins").write_text("pinned")
    start()
    start()
    assert (tmp_path / "calls").read_text().count("init") == 1
    assert json.loads((repo / "config").read_text())["Identity"]["PeerID"] == "kept"
    assert (repo / "pins").read_text() == "pinned"


def test_bootstrap_deployment_uses_fixed_identity_no_httpd() -> None:
    objs = render_manifests()
    (dep,) = [o for o in objs if o["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["kubo"]
    assert "busybox" not in yaml.safe_dump(dep) and "8000" not in yaml.safe_dump(objs)
    cfg = by_name(pod["initContainers"], "ipfs-config")
    assert cfg["args"][:3] == ["peerstar", "k8s", "kubo-config"]
    assert "--identity-file" in cfg["args"]
    (svc,) = [o for o in objs if o["kind"] == "Service"]
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]


def test_daemonset_bootstraps_from_the_secret_peer_id() -> None:
    ds = render_manifests(Options(namespace="abc"))[-1]
    cfg = by_name(ds["spec"]["template"]["spec"]["initContainers"], "ipfs-config")
    cmd = cfg["args"]
    assert cmd[cmd.index("--bootstrap-host") + 1] == "peerstar-bootstrap.abc.svc"
    assert cmd[cmd.index("--bootstrap-peer-id") + 1] == "$(BOOTSTRAP_PEER_ID)"
    env = by_name(cfg["env"], "BOOTSTRAP_PEER_ID")
    assert env["valueFrom"]["secretKeyRef"] == {"name": "peerstar-swarm", "key": "bootstrap.id"}


def test_snapshotter_container() -> None:
    pod = render_manifests()[-1]["spec"]["template"]["spec"]
    snap = by_name(pod["containers"], "snapshotter")
    assert snap["securityContext"]["privileged"] is True
    mounts = {m["name"]: m for m in snap["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dev-fuse"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert mounts["dev-fuse"]["mountPath"] == "/dev/fuse"
    root = mounts["snapshotter-root"]
    assert root["mountPropagation"] == "Bidirectional"
    assert vols["snapshotter-root"]["hostPath"]["path"] == root["mountPath"]
    cmd = snap["args"]
    assert cmd[:3] == ["peerstar", "snapshotter", "serve"]
    assert cmd[cmd.index("--metrics-address") + 1] == "0.0.0.0:9151"
    assert snap["ports"] == [{"name": "snap-metrics", "containerPort": 9151, "protocol": "TCP"}]
    # The pod also runs the node's kubo and registry: upgraded node by node, by hand.
    ds = render_manifests()[-1]
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    # The layer mount daemons outlive this container (issue 17): the node's PID namespace,
    # and a cgroup of the node's whole tree, mounted where --daemon-cgroup points.
    assert pod["hostPID"] is True
    cgroup = cmd[cmd.index("--daemon-cgroup") + 1]
    assert cgroup == "/host/sys/fs/cgroup/peerstar-mounts"
    assert vols["host-cgroup"]["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
    assert mounts["host-cgroup"]["mountPath"] == cgroup.rsplit("/", 1)[0]
    assert "mountPropagation" not in mounts["host-cgroup"]
    assert snap["livenessProbe"]["failureThreshold"] * snap["livenessProbe"]["periodSeconds"] >= 120
    assert cmd[cmd.index("--root") + 1] == root["mountPath"]
    sock = cmd[cmd.index("--address") + 1]
    run_dir = vols["run-peerstar"]["hostPath"]["path"]
    assert mounts["run-peerstar"]["mountPath"] == run_dir and sock.startswith(run_dir + "/")
    toml = tomllib.loads(manifests.containerd_config())
    assert toml["proxy_plugins"]["peerstar"] == {"type": "snapshot", "address": sock}
    cri = toml["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["disable_snapshot_annotations"] is False
    # peerstar is the snapshotter of one runtime handler, not the node's default (the
    # snapshotter's own pod could not start if it were): the RuntimeClass names it.
    assert "snapshotter" not in cri
    assert cri["runtimes"]["peerstar"] == {"runtime_type": "io.containerd.runc.v2",
                                           "snapshotter": "peerstar",
                                           "options": {"SystemdCgroup": True}}
    (rc,) = [o for o in render_manifests() if o["kind"] == "RuntimeClass"]
    assert rc["handler"] == "peerstar"
    cgroupfs = tomllib.loads(run_peerstar("k8s", "containerd-config", "--cgroupfs").stdout)
    runtime = cgroupfs["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    assert runtime["peerstar"]["options"]["SystemdCgroup"] is False


def test_registry_container() -> None:
    pod = render_manifests()[-1]["spec"]["template"]["spec"]
    reg = by_name(pod["containers"], "registry")
    cmd = reg["args"]
    assert cmd[:3] == ["peerstar", "registry", "serve"]
    assert cmd[cmd.index("--ipfs-address") + 1] == "/ip4/127.0.0.1/tcp/5001"
    assert cmd[cmd.index("--listen") + 1].endswith(":5050")
    metrics = cmd[cmd.index("--metrics-listen") + 1]
    ports = {p["name"]: p for p in reg["ports"]}
    assert ports["metrics"] == {"name": "metrics", "containerPort": 9150, "protocol": "TCP"}
    assert metrics.endswith(":9150")
    annotations = render_manifests()[-1]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9150"
    assert reg["securityContext"]["runAsNonRoot"] is True


# -- the kubo config edit --------------------------------------------------------------------
def test_configure_kubo_on_a_server_profile_config() -> None:
    original = json.loads(KUBO_FIXTURE.read_text())
    boot = kubo.bootstrap_multiaddr("peerstar-bootstrap.ns.svc", keys.Identity.generate().peer_id)
    cfg = kubo.configure_kubo(original, bootstrap=[boot], storage_max="20GB")
    assert cfg["Addresses"]["NoAnnounce"] == [] and cfg["Swarm"]["AddrFilters"] is None
    assert cfg["Bootstrap"] == [boot] and boot.startswith("/dns4/peerstar-bootstrap.ns.svc/tcp/")
    assert cfg["Addresses"]["Swarm"] == ["/ip4/0.0.0.0/tcp/4001"]  # no QUIC under pnet
    assert cfg["Routing"]["Type"] == "dht"
    assert cfg["Datastore"]["StorageMax"] == "20GB"
    assert cfg["Datastore"]["GCPeriod"] == "1h"  # untouched
    assert cfg["Identity"] == original["Identity"]  # a node keeps its own peer id
    assert original["Swarm"]["AddrFilters"]  # input not modified
    assert kubo.configure_kubo(cfg, bootstrap=[boot], storage_max="20GB") == cfg


def test_cli_kubo_config(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config").write_text(KUBO_FIXTURE.read_text())
    (repo / "config").chmod(0o600)
    ident = keys.Identity.generate()
    idfile = tmp_path / "bootstrap.key"
    idfile.write_text(ident.private_key)
    r = run_peerstar("k8s", "kubo-config", "--repo", str(repo), "--identity-file", str(idfile),
                     "--storage-max", "3GB")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((repo / "config").read_text())
    assert cfg["Identity"] == {"PeerID": ident.peer_id, "PrivKey": ident.private_key}
    assert cfg["Bootstrap"] == [] and cfg["Datastore"]["StorageMax"] == "3GB"
    assert stat.S_IMODE((repo / "config").stat().st_mode) == 0o600
    assert sorted(p.name for p in repo.iterdir()) == ["config"]  # no temp file left

    peer = keys.Identity.generate().peer_id
    r = run_peerstar("k8s", "kubo-config", "--repo", str(repo), "--bootstrap-host", "b.ns.svc",
                     "--bootstrap-peer-id", peer)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((repo / "config").read_text())
    assert cfg["Bootstrap"] == [f"/dns4/b.ns.svc/tcp/4001/p2p/{peer}"]
    assert cfg["Identity"]["PeerID"] == ident.peer_id


@pytest.mark.parametrize("args,message", [
    (["--bootstrap-host", "b.svc", "--bootstrap-peer-id", ""], "go together"),
    (["--bootstrap-host", "b.svc", "--bootstrap-peer-id", "$(BOOTSTRAP_PEER_ID)"],
     "not a peer id"),
    (["--bootstrap-host", "b svc", "--bootstrap-peer-id", "12D3KooW" + "a" * 44],
     "not a DNS name"),
])
def test_cli_kubo_config_errors(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "config").write_text("{}")
    r = run_peerstar("k8s", "kubo-config", "--repo", str(tmp_path), *args)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "config").read_text() == "{}"


def test_cli_kubo_config_missing_repo(tmp_path: Path) -> None:
    r = run_peerstar("k8s", "kubo-config", "--repo", str(tmp_path / "nope"))
    assert r.returncode == 1 and "run `ipfs init` first" in r.stderr


def test_peerstar_containers_keep_the_image_entrypoint() -> None:
    """peerstar containers pass `args` only, so the Dockerfile's tini stays PID 1."""
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in dockerfile
    assert "'.[fuse,grpc]'" in dockerfile and "bookworm" in dockerfile
    seen = 0
    for _, pod in pod_specs(all_objects()):
        for c in containers(pod):
            if c["image"] == manifests.DEFAULT_PEERSTAR_IMAGE:
                assert "command" not in c and c["args"][0] == "peerstar", c["name"]
                seen += 1
    assert seen == 4  # two ipfs-config init containers, registry, snapshotter


# -- the registry mirror (docs/mirror.md) ----------------------------------------------------
def test_mirror_flags_reach_the_bridge_and_containerd(tmp_path: Path) -> None:
    r = run_peerstar("k8s", "manifests", "--mirror", "docker.io=https://registry-1.docker.io",
                     "--mirror", "http://10.0.0.5:5000")
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(r.stdout))
    kubernetes_validate.validate(docs[-1], K8S_VERSIONS[-1], strict=True)
    args = by_name(docs[-1]["spec"]["template"]["spec"]["containers"], "registry")["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--mirror"] == [
        "docker.io=https://registry-1.docker.io", "10.0.0.5:5000=http://10.0.0.5:5000"]
    assert "/etc/containerd/certs.d/10.0.0.5:5000/hosts.toml" in r.stdout
    # The mirror's pins: 40 % of kubo's StorageMax (50GB), the ledger on the node (it
    # outlives the pod, as the repo holding the pins does), owned by the registry's user.
    assert args[args.index("--mirror-pin-bytes") + 1] == str(20 * 10**9)
    state = args[args.index("--mirror-state") + 1]
    pod = docs[-1]["spec"]["template"]["spec"]
    registry = by_name(pod["containers"], "registry")
    [mount] = registry["volumeMounts"]
    assert state.startswith(mount["mountPath"] + "/")
    assert by_name(pod["volumes"], mount["name"]) == {
        "name": mount["name"],
        "hostPath": {"path": "/var/lib/peerstar/registry", "type": "DirectoryOrCreate"}}
    owner = by_name(pod["initContainers"], "registry-state-owner")
    uid = registry["securityContext"]["runAsUser"]
    assert owner["command"] == ["chown", f"{uid}:{uid}", mount["mountPath"]]
    assert owner["volumeMounts"] == [mount]
    assert owner["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    # Without --mirror nothing changes (the deploy/ copy stays current).
    assert "--mirror" not in str(render_manifests())

    r = run_peerstar("k8s", "containerd-config", "--mirror", "http://10.0.0.5:5000",
                     "--bridge", "http://127.0.0.1:5050", "--hosts-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    config = tomllib.loads(r.stdout)
    assert config["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == \
        "/etc/containerd/certs.d"
    hosts = tomllib.loads((tmp_path / "10.0.0.5:5000" / "hosts.toml").read_text())
    assert hosts == {"server": "http://10.0.0.5:5000", "host": {
        "http://127.0.0.1:5050": {"capabilities": ["pull", "resolve"]}}}
    assert [p.name for p in tmp_path.iterdir()] == ["10.0.0.5:5000"]  # no temp file left

    for bad, message in ((["--mirror", "ftp://x"], "must be http(s)://"),
                         (["--hosts-dir", str(tmp_path)], "needs at least one --mirror")):
        r = run_peerstar("k8s", "containerd-config", *bad)
        assert r.returncode == 1 and message in r.stderr and r.stdout == "", r.stderr


def test_kubo_has_pubsub_for_the_mirror_directory() -> None:
    assert kubo.configure_kubo({}, bootstrap=[])["Pubsub"]["Enabled"] is True
