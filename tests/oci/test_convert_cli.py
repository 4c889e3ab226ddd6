"""`peerstar convert` as a user runs it: --json values, summaries, one-line errors."""

from __future__ import annotations

import gzip
import json
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import zstandard

from peerstar.estargz import Reader
from peerstar.source.sample import SampleImage, build_sample_docker_archive
from tests.oci.conftest import (
    TOC_ANN,
    check_image_manifest,
    read_blob,
    tar_files,
    toc_digest_independent,
)
from tests.support.cli import run_peerstar
from tests.support.content import sha256_digest
from tests.support.tars import tar_of_files


def run(*args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        # Simulate a full disk: writes past `fsize` bytes fail with EFBIG.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return run_peerstar("convert", *args, text=False, timeout=120,
                        preexec_fn=limit if fsize is not None else None)


@pytest.fixture
def layer_tar(tmp_path: Path) -> tuple[Path, bytes]:
    big = bytes(range(256)) * 2000
    tar = tar_of_files({"etc/hello.txt": b"hi\n", "opt/big.bin": big, "opt/z": b"z"},
                       dirs=("etc", "opt"))
    p = tmp_path / "layer.tar"
    p.write_bytes(tar)
    return p, tar


@pytest.mark.parametrize("input_kind", ["plain", "gzip", "zstd"])
@pytest.mark.parametrize("fmt", ["--estargz", "--zstdchunked"])
def test_single_layer_json(tmp_path: Path, layer_tar: tuple[Path, bytes], input_kind: str,
                           fmt: str) -> None:
    src, tar = layer_tar
    if input_kind == "gzip":
        src = tmp_path / "layer.tar.gz"
        src.write_bytes(gzip.compress(tar))
    elif input_kind == "zstd":
        src = tmp_path / "layer.tar.zst"
        src.write_bytes(zstandard.ZstdCompressor().compress(tar))
    dst = tmp_path / "out.blob"
    p = run(str(src), str(dst), fmt, "--chunk-size", "64KiB", "--json")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    blob = dst.read_bytes()
    media = ("application/vnd.oci.image.layer.v1.tar+gzip" if fmt == "--estargz"
             else "application/vnd.oci.image.layer.v1.tar+zstd")
    if fmt == "--estargz":
        raw = gzip.decompress(blob)
    else:
        raw = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True).read()
    toc, _ = toc_digest_independent(blob, media)
    assert got == {"tocDigest": toc, "diffID": sha256_digest(raw), "uncompressedSize": len(raw),
                   "blobDigest": sha256_digest(blob), "blobSize": len(blob)}
    assert tar_files(raw) == tar_files(tar)
    r = Reader.from_bytes(blob, toc_digest=toc)
    assert [c.chunk_offset for c in r.chunks("opt/big.bin")] == list(range(0, 512000, 65536))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_single_layer_prioritize_from(tmp_path: Path, layer_tar: tuple[Path, bytes]) -> None:
    src, _ = layer_tar
    lst = tmp_path / "prio.txt"
    lst.write_text("# hot files\nopt/z\n\n/etc/hello.txt\n")
    dst = tmp_path / "out.blob"
    p = run(str(src), str(dst), "--prioritize-from", str(lst), "--level", "1")
    assert p.returncode == 0, p.stderr
    assert b"TOC digest" in p.stdout
    names = [e.name for e in Reader.from_bytes(dst.read_bytes()).entries]
    regs = [n for n in names if n in ("opt/z", "etc/hello.txt", ".prefetch.landmark",
                                      "opt/big.bin")]
    assert regs == ["opt/z", "etc/hello.txt", ".prefetch.landmark", "opt/big.bin"]


def test_image_json_summary(sample_image: SampleImage, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = run(f"oci:{sample_image.path}:latest", f"oci:{out}:esgz", "--json")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    index = json.loads((out / "index.json").read_bytes())
    [entry] = index["manifests"]
    assert summary["digest"] == entry["digest"] and summary["tag"] == "esgz"
    checked = check_image_manifest(out, entry)
    assert len(summary["layers"]) == len(sample_image.layers)
    for row, src_digest, desc, diff_id in zip(
            summary["layers"], sample_image.layer_digests, checked.manifest["layers"],
            checked.config["rootfs"]["diff_ids"], strict=True):
        blob = read_blob(out, desc["digest"])
        assert row == {
            "sourceDigest": src_digest, "tocDigest": desc["annotations"][TOC_ANN],
            "diffID": diff_id, "uncompressedSize": len(gzip.decompress(blob)),
            "blobDigest": sha256_digest(blob), "blobSize": len(blob),
            "mediaType": desc["mediaType"], "kept": False,
        }


def test_image_plain_progress_and_summary(tmp_path: Path) -> None:
    image = build_sample_docker_archive(tmp_path / "img.tar")
    out = tmp_path / "out"
    p = run(f"docker-archive:{image.path}", f"oci:{out}")
    assert p.returncode == 0, p.stderr
    # Not a terminal: plain progress lines on stderr, a summary on stdout.
    lines = p.stderr.decode().splitlines()
    assert sum(line.startswith("converting layer") for line in lines) == 2
    assert f"oci:{out} tag latest".encode() in p.stdout
    # Converting the output again keeps every layer (already verified eStargz).
    again = tmp_path / "again"
    p2 = run(f"oci:{out}", f"oci:{again}", "--json")
    assert p2.returncode == 0, p2.stderr
    assert [la["kept"] for la in json.loads(p2.stdout)["layers"]] == [True, True]
    assert (again / "index.json").read_bytes() == (out / "index.json").read_bytes()


def _case(name: str, tmp: Path, sample: SampleImage, layer: Path) -> tuple[list[str], Path, str]:
    """(args, target that must not appear/change, expected words in the error)."""
    out = tmp / "out"
    if name == "missing-file":
        return [str(tmp / "nope.tar"), str(out)], out, "does not exist"
    if name == "not-a-tar":
        bad = tmp / "bad.tar"
        bad.write_bytes(b"this is not a tar archive at all" * 40)
        return [str(bad), str(out)], out, "bad.tar"
    if name == "unknown-transport":
        return ["docker://busybox", f"oci:{out}"], out, "unknown transport 'docker'"
    if name == "dst-not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        return [f"oci:{sample.path}", f"oci:{out}"], out, "not an OCI image layout"
    if name == "dst-is-file":
        out.write_text("mine")
        return [f"oci:{sample.path}", f"oci:{out}"], out, "not a directory"
    if name == "layer-dst-exists":
        out.write_text("mine")
        return [str(layer), str(out)], out, "already exists"
    if name == "src-not-layout":
        return [f"oci:{tmp}", f"oci:{out}"], out, "not an OCI image layout"
    if name == "tag-not-found":
        return [f"oci:{sample.path}:nosuch", f"oci:{out}"], out, "no image tagged 'nosuch'"
    if name == "archive-not-tar":
        bad = tmp / "bad-archive.tar"
        bad.write_bytes(b"\x00garbage" * 100)
        return [f"docker-archive:{bad}", f"oci:{out}"], out, "docker-archive"
    if name == "missing-blob":
        src = tmp / "src"
        shutil.copytree(sample.path, src)
        (src / "blobs" / "sha256" / sample.layer_digests[0][7:]).unlink()
        return [f"oci:{src}", f"oci:{out}"], out, "missing"
    if name == "tampered-blob":
        src = tmp / "src"
        shutil.copytree(sample.path, src)
        victim = src / "blobs" / "sha256" / sample.layer_digests[1][7:]
        victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
        return [f"oci:{src}", f"oci:{out}"], out, sample.layer_digests[1]
    if name == "image-to-file":
        return [f"oci:{sample.path}", str(out)], out, "OCI layout"
    if name == "bad-chunk-size":
        return [str(layer), str(out), "--chunk-size", "lots"], out, "--chunk-size"
    if name == "missing-prioritized":
        return [str(layer), str(out), "--prioritize", "/no/such"], out, "/no/such"
    raise AssertionError(name)


BAD_CASES = ["missing-file", "not-a-tar", "unknown-transport", "dst-not-empty", "dst-is-file",
             "layer-dst-exists", "src-not-layout", "tag-not-found", "archive-not-tar",
             "missing-blob", "tampered-blob", "image-to-file", "bad-chunk-size",
             "missing-prioritized"]


def _error_line(err: str) -> str:
    """The one error line; other stderr lines may only be plain progress lines."""
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("peerstar: error: ")]
    assert len(errors) == 1, err
    others = [line for line in lines if line not in errors]
    assert all(line.startswith(("converting layer ", "layer ")) for line in others), err
    assert lines[-1] == errors[0], err
    return errors[0]


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_input_one_line_error(name: str, tmp_path: Path, sample_image: SampleImage,
                                  layer_tar: tuple[Path, bytes]) -> None:
    args, target, words = _case(name, tmp_path, sample_image, layer_tar[0])
    before = sorted(p.name for p in tmp_path.iterdir())
    target_before = target.read_bytes() if target.is_file() else None
    p = run(*args)
    err = p.stderr.decode()
    assert p.returncode == 1, (p.returncode, err)
    assert "Traceback" not in err
    assert words in _error_line(err)
    assert p.stdout == b""
    # Nothing written: the directory listing is unchanged, the target untouched.
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if target_before is not None:
        assert target.read_bytes() == target_before
    elif target.is_dir():
        assert [x.name for x in target.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("kind", ["layer", "image"])
def test_disk_full_one_line_error_nothing_left(kind: str, tmp_path: Path,
                                               sample_image: SampleImage,
                                               layer_tar: tuple[Path, bytes]) -> None:
    out = tmp_path / "out"
    if kind == "layer":
        args = [str(layer_tar[0]), str(out)]
    else:
        args = [f"oci:{sample_image.path}", f"oci:{out}"]
    before = sorted(p.name for p in tmp_path.iterdir())
    # Below the blob size (the layer's blob is a few KiB, the image's first ~1 MiB).
    p = run(*args, fsize=1_000)
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert "Traceback" not in err and "File too large" in _error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
