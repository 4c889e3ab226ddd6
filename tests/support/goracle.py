"""The Go conformance oracle: build `tests/estargz/goracle/main.go` once and run it.

Owns: locating Go and Debian's stargz-snapshotter sources, building the oracle binary
into a cache directory keyed by the hash of main.go (so a changed oracle is rebuilt and
concurrent sessions share an up-to-date binary), and one Python function per
sub-command. The oracle is the reference implementation (containerd/stargz-snapshotter
estargz v0.12.0) that peerstar's eStargz code is checked against.

A missing toolchain raises `OracleUnavailable`; callers turn it into a test FAILURE
(never a skip: CI must run the conformance suite) whose message says to run
scripts/install.sh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAIN_GO = Path(__file__).resolve().parent.parent / "estargz" / "goracle" / "main.go"
GOPATH = Path("/usr/share/gocode")
ESTARGZ_SRC = GOPATH / "src/github.com/containerd/stargz-snapshotter/estargz"
INSTALL_HINT = (
    "run scripts/install.sh (needs apt packages golang-go and "
    "golang-github-containerd-stargz-snapshotter-dev)"
)


class OracleUnavailable(RuntimeError):
    """Go or the Debian estargz sources are missing, or the oracle does not build."""


class OracleError(RuntimeError):
    """The oracle ran and exited non-zero; `stderr` says why."""

    def __init__(self, args: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"goracle {' '.join(args)} exited {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


def _cache_root() -> Path:
    env = os.environ.get("PEERSTAR_TEST_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / "peerstar-test-cache"


def _go_env(gocache: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Debian ships the sources as a GOPATH tree without go.mod files: module mode cannot
    # resolve them, GOPATH mode can. No proxy: the build must never touch the network.
    env.update(
        GO111MODULE="off",
        GOPATH=str(GOPATH),
        GOPROXY="off",
        GOFLAGS="",
        GOCACHE=str(gocache),
        CGO_ENABLED="0",
    )
    return env


def build_oracle() -> Path:
    """Return the path of the oracle binary, building it first if needed."""
    go = shutil.which("go")
    if go is None:
        raise OracleUnavailable(f"`go` is not on PATH; {INSTALL_HINT}")
    if not (ESTARGZ_SRC / "estargz.go").is_file():
        raise OracleUnavailable(f"{ESTARGZ_SRC} is missing; {INSTALL_HINT}")
    source = MAIN_GO.read_bytes()
    key = hashlib.sha256(source).hexdigest()[:16]
    root = _cache_root()
    binary = root / f"goracle-{key}" / "goracle"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    # Build to a private name then rename: parallel sessions never see half a binary.
    tmp_out = binary.parent / f"goracle.tmp{os.getpid()}"
    proc = subprocess.run(
        [go, "build", "-o", str(tmp_out), "."],
        cwd=MAIN_GO.parent,
        env=_go_env(root / "gocache"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        tmp_out.unlink(missing_ok=True)
        raise OracleUnavailable(
            f"building the Go oracle failed ({INSTALL_HINT}):\n{proc.stderr.strip()}"
        )
    os.replace(tmp_out, binary)
    return binary


@dataclass(frozen=True)
class GoBuild:
    """What `goracle build` reported for a blob it wrote."""

    toc_digest: str
    diff_id: str
    blob_digest: str
    blob_size: int
    uncompressed_size: int
    missed: list[str]
    annotations: dict[str, str]


class GoOracle:
    """Runs the oracle binary; every method maps to one sub-command."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def _run(self, args: list[str], timeout: float = 300) -> bytes:
        env = dict(os.environ)
        # The Go writer divides the layer into GOMAXPROCS parts and its output depends
        # on the split; one thread makes it deterministic.
        env["GOMAXPROCS"] = "1"
        proc = subprocess.run(
            [str(self.binary), *args], env=env, capture_output=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise OracleError(args, proc.returncode, proc.stderr.decode(errors="replace"))
        return proc.stdout

    def _json(self, args: list[str]) -> Any:
        return json.loads(self._run(args))

    def build(
        self,
        tar_path: Path,
        out_path: Path,
        *,
        compression: str = "gzip",
        chunk_size: int | None = None,
        level: int | None = None,
        prioritized: list[str] | tuple[str, ...] = (),
        allow_missing: bool = False,
    ) -> GoBuild:
        """estargz.Build of `tar_path` (plain/gzip/zstd tar) written to `out_path`."""
        args = ["build"]
        if chunk_size is not None:
            args += ["--chunk-size", str(chunk_size)]
        if level is not None:
            args += ["--level", str(level)]
        if compression == "zstd":
            args.append("--zstd")
        elif compression != "gzip":
            raise ValueError(f"unknown compression {compression!r}")
        for p in prioritized:
            args += ["--prioritize", p]
        if allow_missing:
            args.append("--allow-missing")
        args += [str(tar_path), str(out_path)]
        d = self._json(args)
        return GoBuild(
            toc_digest=d["tocDigest"],
            diff_id=d["diffID"],
            blob_digest=d["blobDigest"],
            blob_size=d["blobSize"],
            uncompressed_size=d["uncompressedSize"],
            missed=list(d["missed"] or []),
            annotations=dict(d["annotations"]),
        )

    def toc(self, blob_path: Path) -> bytes:
        """The raw uncompressed TOC JSON bytes, exactly as stored in the blob."""
        return self._run(["toc", str(blob_path)])

    def tocinfo(self, blob_path: Path) -> dict[str, Any]:
        """{"compression","tocOffset","tocSize","tocDigest","blobSize"} per the footer."""
        return self._json(["tocinfo", str(blob_path)])

    def ls(
        self, blob_path: Path, *, toc_digest: str | None = None, contents: bool = True
    ) -> dict[str, Any]:
        """The Go reader's view: {"compression","tocDigest","entries":[...]} sorted by path.

        Each entry: path, name, type, mode (Go FileMode bits), modeString, rawMode, uid,
        gid, uname, gname, size, linkName, devMajor, devMinor, xattrs (base64 values),
        numLink, modtime, modtimeUnix, digest, chunks[{offset,nextOffset,chunkOffset,
        chunkSize,chunkDigest}], contentDigest (sha256 read through OpenFile).
        """
        args = ["ls", str(blob_path)]
        if toc_digest is not None:
            args += ["--toc-digest", toc_digest]
        if not contents:
            args.append("--no-content")
        return self._json(args)

    def cat(self, blob_path: Path, path: str) -> bytes:
        """A file's contents through Reader.OpenFile."""
        return self._run(["cat", str(blob_path), path])

    def verify(self, blob_path: Path, toc_digest: str) -> dict[str, Any]:
        """VerifyTOC and every chunk's digest; raises OracleError on any mismatch."""
        return self._json(["verify", str(blob_path), "--toc-digest", toc_digest])

    def diffid(self, blob_path: Path) -> tuple[str, int]:
        """(DiffID, uncompressed size) of the whole blob, decompressed by Go."""
        d = self._json(["diffid", str(blob_path)])
        return d["diffID"], d["uncompressedSize"]

    def decompress(self, blob_path: Path) -> bytes:
        """The whole blob decompressed by Go (what a non-lazy puller unpacks)."""
        return self._run(["decompress", str(blob_path)])


_ORACLE: GoOracle | None = None


def get_oracle() -> GoOracle:
    """The session's oracle (built on first use). Raises OracleUnavailable."""
    global _ORACLE
    if _ORACLE is None:
        _ORACLE = GoOracle(build_oracle())
    return _ORACLE
