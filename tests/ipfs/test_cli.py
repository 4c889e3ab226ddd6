"""`peerstar ipfs add|cat|gc` as a user runs them: a real process, real files, the real
daemon; bad input gives one line on stderr, a non-zero exit and no traceback."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from peerstar.ipfs import CHUNK_SIZE, compute_cid
from tests.support.cli import assert_one_line_error, run_peerstar
from tests.support.jsipfs import JsIpfs
from tests.support.ports import free_port

DATA = random.Random(8).randbytes(2 * CHUNK_SIZE + 333)


def peerstar(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """`peerstar ipfs ARGS` (HOME etc. come from the conftest)."""
    return run_peerstar("ipfs", *args, input=stdin, text=False, timeout=120)


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    f = tmp_path / "blob"
    f.write_bytes(DATA)
    return f


def test_add_and_cat_embedded(tmp_path: Path, blob: Path) -> None:
    root = tmp_path / "store"
    proc = peerstar("add", str(blob), "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    cid = proc.stdout.decode().strip()
    assert cid == compute_cid(DATA)
    proc = peerstar("cat", cid, "--root", str(root))
    assert proc.stdout == DATA
    proc = peerstar("cat", cid, "--root", str(root), "--offset", str(CHUNK_SIZE - 2),
                    "--length", "5")
    assert proc.stdout == DATA[CHUNK_SIZE - 2 : CHUNK_SIZE + 3]
    proc = peerstar("gc", "--root", str(root))
    assert proc.stdout.decode().startswith("removed 0 blocks")


def test_default_root_is_under_home(blob: Path) -> None:
    proc = peerstar("add", str(blob))
    assert proc.returncode == 0, proc.stderr
    cid = proc.stdout.decode().strip()
    assert (Path.home() / ".local/share/peerstar/pins" / cid).exists()


def test_only_hash_writes_nothing(tmp_path: Path, blob: Path) -> None:
    root = tmp_path / "store"
    proc = peerstar("add", "--only-hash", str(blob), "--root", str(root))
    assert proc.stdout.decode().strip() == compute_cid(DATA)
    assert not (root / "blocks").exists() or not any((root / "blocks").rglob("*"))


def test_add_from_stdin(tmp_path: Path) -> None:
    proc = peerstar("add", "-", "--root", str(tmp_path / "s"), stdin=DATA)
    assert proc.stdout.decode().strip() == compute_cid(DATA)


def test_add_and_cat_through_the_daemon(jsipfs: JsIpfs, blob: Path) -> None:
    proc = peerstar("add", str(blob), "--ipfs-address", jsipfs.api_multiaddr)
    assert proc.returncode == 0, proc.stderr
    cid = proc.stdout.decode().strip()
    assert cid == compute_cid(DATA)
    proc = peerstar("cat", cid, "--ipfs-address", jsipfs.api_url, "--offset", "7",
                    "--length", "100")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == DATA[7:107]


def test_malformed_cid(tmp_path: Path) -> None:
    assert_one_line_error(peerstar("cat", "bafy-not-a-cid", "--root", str(tmp_path)),
                          "not a valid CID")


def test_unknown_cid_on_embedded_store(tmp_path: Path) -> None:
    cid = compute_cid(b"nobody added this")
    assert_one_line_error(peerstar("cat", cid, "--root", str(tmp_path)),
                          f"{cid} is not in the embedded store at {tmp_path}")


def test_daemon_down(blob: Path) -> None:
    addr = f"/ip4/127.0.0.1/tcp/{free_port()}"
    proc = peerstar("add", str(blob), "--ipfs-address", addr, "--retries", "1")
    assert_one_line_error(proc, f"no IPFS API at {addr}: start the daemon or drop "
                                "--ipfs-address to use the embedded store")
    proc = peerstar("cat", compute_cid(b"x"), "--ipfs-address", addr, "--retries", "0")
    assert_one_line_error(proc, "no IPFS API at")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["add", "/nonexistent/file"], "cannot read /nonexistent/file"),
        (["add", "x", "--ipfs-address", "/ip4/1.2.3.4/udp/5"], "unsupported IPFS API multiaddr"),
        (["cat", "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
          "--offset", "-1"], "--offset must be >= 0"),
        (["cat", "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
          "--timeout", "0", "--ipfs-address", "/ip4/127.0.0.1/tcp/1"], "--timeout must be > 0"),
    ],
)
def test_bad_arguments(args: list[str], needle: str) -> None:
    assert_one_line_error(peerstar(*args), needle)


def test_offset_past_end(tmp_path: Path, blob: Path) -> None:
    root = tmp_path / "s"
    cid = peerstar("add", str(blob), "--root", str(root)).stdout.decode().strip()
    assert_one_line_error(peerstar("cat", cid, "--root", str(root), "--offset", str(len(DATA) + 1)),
                          "past the end")
