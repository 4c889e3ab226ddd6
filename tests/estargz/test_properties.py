"""Property-based tests, for each compression: random trees round-trip; random damage
never escapes as a crash."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerstar.estargz import EstargzError, Reader, build
from peerstar.estargz.compression import WRITABLE
from peerstar.estargz.footer import ZSTD_CHUNKED_MAGIC, ZSTD_SKIPPABLE_MAGIC
from tests.support.tars import Entry, write_tar

COMPRESSIONS = sorted(WRITABLE)  # every property holds for each

names = st.text(alphabet="abcxyz.-_é", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh") and "landmark" not in s
)
files = st.dictionaries(
    st.lists(names, min_size=1, max_size=3).map("/".join),
    st.binary(max_size=3000)
    | st.integers(0, 200_000).map(lambda n: bytes(i % 251 for i in range(n))),
    min_size=0,
    max_size=12,
)


def _tree_tar(tree: dict[str, bytes]) -> tuple[bytes, dict[str, bytes]]:
    entries, seen_dirs, expect = [], set(), {}
    for path in sorted(tree):
        parts = path.split("/")
        clash = any("/".join(parts[:i]) in tree for i in range(1, len(parts)))
        if clash or path in seen_dirs:
            continue
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in seen_dirs:
                seen_dirs.add(d)
                entries.append(Entry(d + "/", tarfile.DIRTYPE, mode=0o755))
        entries.append(Entry(path, data=tree[path]))
        expect[path] = tree[path]
    return write_tar(entries), expect


@pytest.mark.parametrize("compression", COMPRESSIONS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=files, chunk=st.integers(1000, 70_000), level=st.integers(1, 9))
def test_random_trees_round_trip(tree, chunk, compression, level):
    tar, expect = _tree_tar(tree)
    out = io.BytesIO()
    res = build(tar, out, compression=compression, chunk_size=chunk, level=level)
    r = Reader.from_bytes(out.getvalue(), toc_digest=res.toc_digest)
    r.verify_all()
    for path, data in expect.items():
        assert r.read(path) == data
        if data:
            assert r.read(path, len(data) // 3, 777) == data[len(data) // 3:len(data) // 3 + 777]
    listed = {p for p, e in r.walk() if e.type == "reg"} - {".no.prefetch.landmark"}
    assert listed == set(expect)


def _blob(compression: str) -> bytes:
    tar = write_tar([Entry("d/", tarfile.DIRTYPE),
                     Entry("d/a", data=b"hello" * 300),
                     Entry("d/b", data=bytes(range(256)) * 40)])
    out = io.BytesIO()
    build(tar, out, compression=compression, chunk_size=4000)
    return out.getvalue()


BLOBS = {c: _blob(c) for c in COMPRESSIONS}


@pytest.mark.parametrize("compression", COMPRESSIONS)
@settings(max_examples=300, deadline=None)
@given(at=st.integers(0, 1 << 30), val=st.integers(0, 255), cut=st.integers(0, 60))
def test_damaged_blobs_fail_cleanly(compression, at, val, cut):
    blob = BLOBS[compression]
    data = bytearray(blob)
    data[at % len(blob)] = val
    data = bytes(data[: len(data) - cut])
    try:
        r = Reader.from_bytes(data)
        r.verify_all()
    except EstargzError:
        return


# What each compression's footer starts with, so random bytes after it reach its parser.
_FOOTER_STARTS = {"gzip": b"\x1f\x8b\x08\x04", "zstd": ZSTD_SKIPPABLE_MAGIC}
_FOOTER_ENDS = {"gzip": b"", "zstd": ZSTD_CHUNKED_MAGIC}


@pytest.mark.parametrize("compression", COMPRESSIONS)
@settings(max_examples=200, deadline=None)
@given(tail=st.binary(min_size=0, max_size=120))
def test_random_footers_fail_cleanly(compression, tail):
    try:
        Reader.from_bytes(_FOOTER_STARTS[compression] + tail + _FOOTER_ENDS[compression])
    except EstargzError:
        pass
