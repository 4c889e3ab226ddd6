"""The compression interface (`peerstar.estargz.compression`): lookups, and an existing
blob described exactly as its build reported it, for each compression."""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import asdict, fields

import pytest
import zstandard

from peerstar.estargz import EstargzError, LayerInfo, Reader, build
from peerstar.estargz.compression import (
    GZIP,
    LEGACY_GZIP,
    WRITABLE,
    ZSTD_CHUNKED,
    by_media_type,
    by_name,
    sniff,
    writable,
)
from peerstar.oci import mediatypes as mt
from tests.support.tars import Entry, write_tar

TAR = write_tar([Entry("d/", tarfile.DIRTYPE), Entry("d/a", data=b"hello" * 3000),
                 Entry("d/b", data=bytes(range(256)) * 400)])


@pytest.mark.parametrize("compression", sorted(WRITABLE))
def test_describe_gives_what_build_reported(compression):
    out = io.BytesIO()
    res = build(TAR, out, compression=compression, chunk_size=10_000)
    info = Reader.from_bytes(out.getvalue(), toc_digest=res.toc_digest).describe()
    want = {f.name: getattr(res, f.name) for f in fields(LayerInfo)}
    assert asdict(info) == want
    assert list(info.annotations) == list(res.annotations)  # same order in manifests
    assert info.media_type == writable(compression).media_type


def test_lookups():
    assert by_name("gzip") is GZIP and by_name("gzip-legacy") is LEGACY_GZIP
    assert by_name("zstd") is ZSTD_CHUNKED
    assert set(WRITABLE) == {"gzip", "zstd"}
    for bad in ("gzip-legacy", "zstd:chunked", "xz"):
        with pytest.raises(EstargzError, match="use 'gzip' or 'zstd'"):
            writable(bad)
    assert by_media_type(mt.DOCKER_LAYER_GZIP) is GZIP
    assert by_media_type(mt.OCI_LAYER_ND_ZSTD) is ZSTD_CHUNKED
    assert by_media_type(mt.OCI_LAYER_TAR) is None
    assert sniff(gzip.compress(b"x")[:4]) is GZIP
    assert sniff(zstandard.compress(b"x")[:4]) is ZSTD_CHUNKED
    assert sniff(TAR[:4]) is None and sniff(b"") is None


@pytest.mark.parametrize("compression, level, match", [
    ("gzip", 10, "gzip level must be 0..9, not 10"),
    ("zstd", 0, "zstd level must be 1..22, not 0"),
])
def test_levels(compression, level, match):
    assert writable(compression).check_level(None) == {"gzip": 9, "zstd": 3}[compression]
    with pytest.raises(EstargzError, match=match):
        build(TAR, io.BytesIO(), compression=compression, level=level)
