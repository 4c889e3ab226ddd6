"""`peerstar snapshotter serve` as a process: config file vs flags, the metrics endpoint,
a clean exit on SIGTERM that leaves no socket behind, and a bad config refused."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import grpc

from peerstar.snapshotter._proto import snapshots_pb2 as pb
from peerstar.snapshotter._proto import snapshots_pb2_grpc
from tests.snapshotter.conftest import REPO, start_snapshotter, stop_snapshotter
from tests.support.ports import free_port


def test_flags_win_over_file_and_metrics_served() -> None:
    port = free_port()
    decoy = Path(tempfile.mkdtemp(prefix="pss-decoy-", dir="/tmp"))
    proc = start_snapshotter(
        f'address = "{decoy}/from-file.sock"\nroot = "{decoy}/root-from-file"\n'
        f'metrics_address = "127.0.0.1:{port}"\n[remote]\nprefetch_timeout = 1.5\n')
    try:
        # --address/--root from the command line were used, the file's were not.
        assert proc.address.is_socket() and not (decoy / "from-file.sock").exists()
        assert (proc.root / "metadata.db").is_file()
        assert not (decoy / "root-from-file").exists()
        with grpc.insecure_channel(f"unix://{proc.address}") as ch:
            stub = snapshots_pb2_grpc.SnapshotsStub(ch)
            stub.Prepare(pb.PrepareSnapshotRequest(key="m1"))
            try:
                stub.Stat(pb.StatSnapshotRequest(key="missing"))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
        # metrics_address came from the file (no flag given).
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'peerstar_snapshotter_operations_total{code="OK",method="Prepare"} 1.0' in text
        assert ('peerstar_snapshotter_operations_total{code="NOT_FOUND",method="Stat"} 1.0'
                in text)
    finally:
        stop_snapshotter(proc)
        decoy.rmdir()
    assert proc.process is None and not proc.address.exists()  # SIGTERM: socket removed


def test_bad_config_is_one_line_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[remote]\nverfiy = false\n")
    res = subprocess.run(
        [sys.executable, "-m", "peerstar", "snapshotter", "serve", "--config", str(cfg),
         "--address", str(tmp_path / "s.sock"), "--root", str(tmp_path / "root")],
        capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"peerstar: error: {cfg}: unknown key 'remote.verfiy' (known: auth_file, "
        "background_fetch, ca_file, chunk_cache_bytes, daemon_cgroup, enable, hosts_dir, "
        "insecure_hosts, mount_timeout, prefetch_size, "
        "prefetch_timeout, region_cache_bytes, region_size, request_timeout, retries, verify, "
        "zygote)"]
    assert not (tmp_path / "s.sock").exists()


def test_daemon_cgroup_outside_a_cgroup_filesystem_is_one_line_error(tmp_path: Path) -> None:
    """`[remote] daemon_cgroup` (or `--daemon-cgroup`, which wins) must be ROOT/NAME with
    ROOT a cgroup filesystem: checked at start, one line, nothing served."""
    cfg = tmp_path / "cg.toml"
    cfg.write_text('[remote]\ndaemon_cgroup = "/sys/fs/cgroup/peerstar-test-never"\n')
    for flag in ([], ["--daemon-cgroup", str(tmp_path / "mounts")]):
        if not flag:
            cfg.write_text(f'[remote]\ndaemon_cgroup = "{tmp_path}/mounts"\n')
        res = subprocess.run(
            [sys.executable, "-m", "peerstar", "snapshotter", "serve", *flag,
             "--config", str(cfg), "--address", str(tmp_path / "s.sock"),
             "--root", str(tmp_path / "root")],
            capture_output=True, text=True, cwd=REPO, timeout=60)
        assert res.returncode == 1
        assert res.stderr.strip().splitlines() == [
            f"peerstar: error: {cfg}: remote.daemon_cgroup: {tmp_path} is not a cgroup "
            "filesystem (give ROOT/NAME, ROOT the host's /sys/fs/cgroup as mounted here)"]
        assert not (tmp_path / "s.sock").exists()
