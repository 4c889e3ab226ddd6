"""`peerstar estargz verify|ls|cat` as a user runs them: output, exit codes, one-line errors."""

from __future__ import annotations

import io
import json

import pytest

from peerstar.estargz import Reader, build
from tests.support.cli import assert_one_line_error, run_peerstar
from tests.support.tars import tar_all_kinds


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    out = io.BytesIO()
    res = build(tar_all_kinds(), out, chunk_size=64 << 10)
    p = tmp_path_factory.mktemp("cli") / "layer.esgz"
    p.write_bytes(out.getvalue())
    return p, res


def test_verify_ls_cat(blob):
    p, res = blob
    v = run_peerstar("estargz", "verify", str(p), "--toc-digest", res.toc_digest, "--diff-id",
                     res.diff_id, text=False)
    assert v.returncode == 0, v.stderr
    assert b"OK" in v.stdout and res.toc_digest.encode() in v.stdout
    ls = run_peerstar("estargz", "ls", str(p), "--json", text=False)
    rows = [json.loads(line) for line in ls.stdout.splitlines()]
    big = next(r for r in rows if r["path"] == "bin/big-odd")
    assert big["size"] == 3 * 65536 + 12345 and big["chunks"][1] == [65536, 65536]
    cat = run_peerstar("estargz", "cat", str(p), "etc/hostname", text=False)
    assert cat.stdout == b"peerstar\n"
    part = run_peerstar("estargz", "cat", str(p), "bin/big-odd", "--offset", "65530", "--length",
                        "10", text=False)
    assert part.stdout == Reader.from_bytes(p.read_bytes()).read("bin/big-odd", 65530, 10)


@pytest.mark.parametrize("case", ["wrong-toc", "tampered", "missing", "not-a-blob", "no-path",
                                  "wrong-diffid"])
def test_errors_are_one_line(blob, tmp_path, case):
    p, res = blob
    args = ["estargz", "verify", str(p)]
    if case == "wrong-toc":
        args += ["--toc-digest", "sha256:" + "0" * 64]
    elif case == "tampered":
        data = bytearray(p.read_bytes())
        e = Reader.from_bytes(bytes(data)).lookup("etc/passwd")
        data[e.offset + 12] ^= 0xFF
        bad = tmp_path / "bad.esgz"
        bad.write_bytes(bytes(data))
        args = ["estargz", "verify", str(bad)]
    elif case == "missing":
        args = ["estargz", "ls", str(tmp_path / "nope")]
    elif case == "not-a-blob":
        junk = tmp_path / "junk"
        junk.write_bytes(b"hello world" * 20)
        args = ["estargz", "ls", str(junk)]
    elif case == "no-path":
        args = ["estargz", "cat", str(p), "etc/nothing"]
    elif case == "wrong-diffid":
        args += ["--diff-id", "sha256:" + "1" * 64]
    r = run_peerstar(*args, text=False)
    assert r.returncode == 1
    assert_one_line_error(r)
