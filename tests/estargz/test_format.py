"""peerstar.estargz: exact bytes, round trips, ordering, determinism and bad input."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest
import zstandard

from peerstar.estargz import (
    EstargzError,
    FormatError,
    Reader,
    VerifyError,
    build,
)
from peerstar.estargz.compression import by_name, parse_footer
from peerstar.estargz.footer import estargz_footer
from peerstar.estargz.reader import compute_diff_id
from peerstar.estargz.toc import TOCEntry, go_quote, marshal_toc
from tests.estargz.helpers import rewrite_toc
from tests.support.content import sha256_digest
from tests.support.tars import BINARY_XATTR, Entry, tar_all_kinds, write_tar

COMPRESSIONS = ["gzip", "zstd"]


def blob_of(tar: bytes, **kw) -> tuple[bytes, object]:
    out = io.BytesIO()
    res = build(tar, out, **kw)
    return out.getvalue(), res


def test_footer_bytes_are_the_reference_layout():
    f = estargz_footer(0x1234ABCD)
    assert f.hex() == (
        "1f8b0804000000000" + "0ff" + "1a00" + "5347" + "1600"
        + b"000000001234abcdSTARGZ".hex() + "010000ffff" + "00" * 8
    )
    assert len(f) == 51
    assert gzip.decompress(f) == b""  # an empty, valid gzip member
    with pytest.raises(FormatError, match="beyond the 151-byte blob"):
        parse_footer(b"\x00" * 100 + f, 151)
    ft = parse_footer(f, 0x1234ABCD + 200)
    assert ft.compression == "gzip" and ft.toc_offset == 0x1234ABCD


def test_go_string_escaping():
    assert go_quote('a<b>&c"\\\n\r\t\x01\u2028\u2029é') == (
        '"a\\u003cb\\u003e\\u0026c\\"\\\\\\n\\r\\t\\u0001\\u2028\\u2029é"'
    )


def test_toc_json_layout_is_go_marshal_indent():
    e = TOCEntry(name="./a", type="reg", size=3, mode=0o644, uid=1, uname="u", offset=10,
                 xattrs={"user.b": b"2", "user.a": b"1"}, digest="sha256:x",
                 chunk_digest="sha256:x")
    out = marshal_toc([e, TOCEntry(name="./a", type="chunk", offset=20, chunk_offset=1)])
    assert out.decode() == (
        '{\n\t"version": 1,\n\t"entries": [\n\t\t{\n\t\t\t"name": "./a",\n'
        '\t\t\t"type": "reg",\n\t\t\t"size": 3,\n\t\t\t"mode": 420,\n\t\t\t"uid": 1,\n'
        '\t\t\t"userName": "u",\n\t\t\t"offset": 10,\n\t\t\t"xattrs": {\n'
        '\t\t\t\t"user.a": "MQ==",\n\t\t\t\t"user.b": "Mg=="\n\t\t\t},\n'
        '\t\t\t"digest": "sha256:x",\n\t\t\t"chunkDigest": "sha256:x"\n\t\t},\n'
        '\t\t{\n\t\t\t"name": "./a",\n\t\t\t"type": "chunk",\n\t\t\t"offset": 20,\n'
        '\t\t\t"chunkOffset": 1\n\t\t}\n\t]\n}'
    )


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_round_trip_every_entry_kind(compression):
    tar = tar_all_kinds()
    blob, res = blob_of(tar, compression=compression, chunk_size=64 << 10)
    r = Reader.from_bytes(blob, toc_digest=res.toc_digest)
    r.verify_all()
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        for m in tf.getmembers():
            path = m.name.lstrip("./") if m.name != "." else ""
            if not path:
                continue
            e = r.lookup(path)
            assert e is not None, path
            if m.isfile():
                assert r.read(path) == tf.extractfile(m).read()
                assert e.uid == m.uid
            if m.issym():
                assert (e.type, e.link_name) == ("symlink", m.linkname)
            if m.ischr():
                assert (e.type, e.dev_major, e.dev_minor) == ("char", m.devmajor, m.devminor)
    # a hardlink, and a hardlink to a hardlink, are the entry they name
    assert r.lookup("bin/big-link") is r.lookup("bin/big-link2") is r.lookup("bin/big-odd")
    assert r.lookup("bin/big-odd").num_link == 3
    assert r.lookup("etc/hostname.hl") is r.lookup("etc/hostname")
    assert r.lookup("bin/big-odd").uname == "bob" and r.lookup("bin/big-odd").gname == "users"
    assert r.lookup("etc/xattr-dir").xattrs == {
        "user.comment": "hello <world> & ☃".encode(), "trusted.overlay.opaque": b"y",
        "user.empty": b""}
    assert r.lookup("bin/ping").xattrs == {"security.capability": BINARY_XATTR}
    assert r.lookup("etc/xattr-dir").num_link == 2 and r.lookup("etc").num_link == 3
    assert r.lookup("run/fifo").type == "fifo"
    assert set(r.listdir("etc")) == {"hostname", "empty", "passwd", "mtab", "hostname.hl",
                                     "xattr-dir"}
    big = r.chunks("bin/big-odd")
    assert [(c.chunk_offset, c.chunk_size) for c in big] == [
        (0, 65536), (65536, 65536), (131072, 65536), (196608, 12345)]
    # the TOC writes chunkSize only while a whole chunk remains
    raw = json.loads(r.toc_json)["entries"]
    big_raw = [x for x in raw if x["name"] == "bin/big-odd"]
    assert [x.get("chunkSize") for x in big_raw] == [65536] * 3 + [None]
    assert r.read("bin/big-odd", 65530, 20) == r.read("bin/big-odd")[65530:65550]
    assert compute_diff_id(lambda o, n: blob[o:o + n], len(blob), by_name(compression)) == (
        res.diff_id, res.uncompressed_size)
    assert res.blob_digest == sha256_digest(blob)
    assert res.blob_size == len(blob)


def test_gzip_members_start_at_each_payload_and_blob_is_plain_tar_gz():
    tar = tar_all_kinds()
    blob, res = blob_of(tar, chunk_size=64 << 10)
    r = Reader.from_bytes(blob, toc_digest=res.toc_digest)
    for e in r.entries:
        if e.is_data and e.chunk_size:
            assert blob[e.offset:e.offset + 3] == b"\x1f\x8b\x08"
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tf:
        names = tf.getnames()
    assert names[0] == ".no.prefetch.landmark"
    assert names[-1] == "stargz.index.json"
    assert r.read(".no.prefetch.landmark") == b"\x0f"


def test_zstd_chunked_layout_and_annotations():
    tar = tar_all_kinds()
    blob, res = blob_of(tar, compression="zstd")
    pos = res.annotations["io.containers.zstd-chunked.manifest-position"]
    off, clen, ulen, typ = (int(x) for x in pos.split(":"))
    assert typ == 1 and blob[off - 8:off - 4] == b"\x50\x2a\x4d\x18"
    ztoc = blob[off:off + clen]
    assert res.annotations["io.containers.zstd-chunked.manifest-checksum"] == sha256_digest(ztoc)
    toc = zstandard.ZstdDecompressor().decompress(ztoc)
    assert len(toc) == ulen and sha256_digest(toc) == res.toc_digest
    assert blob[-8:] == b"GnUlInUx" and blob[-48:-44] == b"\x50\x2a\x4d\x18"


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_output_is_identical_for_any_thread_count(compression):
    tar = tar_all_kinds()
    a, _ = blob_of(tar, compression=compression, chunk_size=50_000, workers=1)
    b, _ = blob_of(tar, compression=compression, chunk_size=50_000, workers=7)
    assert a == b


def test_compressed_inputs_give_the_same_blob():
    tar = tar_all_kinds()
    plain, r1 = blob_of(tar)
    gz, r2 = blob_of(gzip.compress(tar))
    zs, r3 = blob_of(zstandard.ZstdCompressor().compress(tar))
    assert plain == gz == zs and r1.toc_digest == r2.toc_digest == r3.toc_digest


def test_prioritized_files_come_first_with_parents_and_link_targets():
    tar = tar_all_kinds()
    blob, res = blob_of(tar, prioritized=["bin/big-link2", "dev/null"])
    names = [e.name for e in Reader.from_bytes(blob).entries if e.type != "chunk"]
    assert names[:7] == ["", "bin", "bin/big-odd", "bin/big-link", "bin/big-link2", "dev",
                         "dev/null"]
    assert names[7] == ".prefetch.landmark"
    r = Reader.from_bytes(blob)
    assert r.prefetch_end() == r.lookup(".prefetch.landmark").offset
    with pytest.raises(EstargzError, match="nope"):
        blob_of(tar, prioritized=["nope"])
    _, res = blob_of(tar, prioritized=["nope", "etc/hostname"], allow_missing_prioritized=True)
    assert res.missing_prioritized == ["nope"]


def test_later_duplicate_entry_wins_and_old_landmarks_are_dropped():
    tar = write_tar([
        Entry("a", data=b"old"),
        Entry(".prefetch.landmark", data=b"\x0f"),
        Entry("b", data=b"b"),
        Entry("./a", data=b"new"),
    ])
    blob, _ = blob_of(tar)
    r = Reader.from_bytes(blob)
    assert [e.name for e in r.entries] == [".no.prefetch.landmark", "b", "a"]
    assert r.read("a") == b"new"


# --- bad input ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def good():
    blob, res = blob_of(tar_all_kinds(), chunk_size=64 << 10)
    return blob, res


def test_truncated_and_footerless_blobs(good):
    blob, _ = good
    for bad in (blob[:-1], blob[:30], blob[:-51] + b"\x00" * 51, b"", b"x" * 100):
        with pytest.raises(FormatError):
            Reader.from_bytes(bad)


def test_toc_digest_mismatch(good):
    blob, _ = good
    with pytest.raises(VerifyError, match="TOC digest"):
        Reader.from_bytes(blob, toc_digest="sha256:" + "0" * 64)


def test_tampered_chunk_is_caught_on_read(good):
    blob, res = good
    r = Reader.from_bytes(blob)
    e = r.lookup("etc/passwd")
    tampered = bytearray(blob)
    # flip a byte inside the member holding etc/passwd, keep the TOC
    tampered[e.offset + 12] ^= 0xFF
    r2 = Reader.from_bytes(bytes(tampered), toc_digest=res.toc_digest)
    with pytest.raises(VerifyError):
        r2.read("etc/passwd")
    with pytest.raises(VerifyError):
        r2.verify_all()
    assert r2.read("etc/empty") == b""


def test_toc_with_a_wrong_chunk_digest_fails_reads_not_open():
    tar = write_tar([Entry("f", data=b"A" * 1000), Entry("g", data=b"g")])
    blob, res = blob_of(tar)

    def lie(doc):
        for e in doc["entries"]:
            if e["name"] == "f":
                e["chunkDigest"] = "sha256:" + "1" * 64
    bad = rewrite_toc(blob, lie)
    r = Reader.from_bytes(bad)
    assert r.toc_digest != res.toc_digest
    assert r.read("g") == b"g"
    with pytest.raises(VerifyError, match="'f'.*altered"):
        r.read("f", 10, 5)


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda d: d.__setitem__("entries", "x"), "not a list"),
        (lambda d: d["entries"][1].__setitem__("offset", 10**12), "beyond the payload"),
        (lambda d: d["entries"][1].__setitem__("size", -5), "negative"),
        (lambda d: d["entries"][1].__setitem__("type", "weird"), "unknown type"),
        (lambda d: d["entries"][1].__setitem__("name", "../../etc/passwd"), "'..'"),
        (lambda d: d["entries"][1].__setitem__("name", "/etc/passwd"), "absolute"),
        (lambda d: d["entries"].append(dict(d["entries"][0])), "overlaps"),
        (lambda d: d["entries"].insert(0, {"name": "h", "type": "hardlink",
                                           "linkName": "../../x"}), "'..'"),
    ],
)
def test_lying_tocs_are_rejected(mutate, msg):
    tar = write_tar([Entry("a", data=b"aaaa"), Entry("b", data=b"b" * 5000)])
    blob, _ = blob_of(tar)
    bad = rewrite_toc(blob, mutate)
    with pytest.raises(FormatError, match=msg):
        Reader.from_bytes(bad)


def test_decompression_bomb_sizes_are_rejected():
    tar = write_tar([Entry("a", data=b"aaaa"), Entry("b", data=b"b" * 5000)])
    blob, _ = blob_of(tar)

    def bomb(d):
        for e in d["entries"]:
            if e["name"] == "a":
                e["size"] = 1 << 40
                e["chunkSize"] = 1 << 40
    with pytest.raises(FormatError, match="bomb"):
        Reader.from_bytes(rewrite_toc(blob, bomb))


def test_toc_that_is_not_json():
    from peerstar.estargz.footer import estargz_footer as ft
    from tests.estargz.helpers import toc_blob
    bad = toc_blob(b"{not json") + ft(0)
    with pytest.raises(FormatError, match="not valid JSON"):
        Reader.from_bytes(bad)


def test_bad_tar_inputs():
    with pytest.raises(FormatError, match="'..'"):
        blob_of(write_tar([Entry("../evil", data=b"x")]))
    with pytest.raises(FormatError, match="outside"):
        blob_of(write_tar([Entry("h", tarfile.LNKTYPE, linkname="../x")]))
    tar = write_tar([Entry("a", data=b"x" * 5000)])
    with pytest.raises(FormatError, match="truncated"):
        blob_of(tar[:1200])
    with pytest.raises(FormatError, match="decompress"):
        blob_of(gzip.compress(tar)[:40])
    with pytest.raises(EstargzError, match="chunk size"):
        blob_of(tar, chunk_size=0)


def test_symlinks_climbing_out_of_the_root_fail_strict_checks():
    ok = write_tar([Entry("a/b/", tarfile.DIRTYPE),
                    Entry("a/b/up", tarfile.SYMTYPE, linkname="../../etc/x"),
                    Entry("a/abs", tarfile.SYMTYPE, linkname="/etc/passwd")])
    Reader.from_bytes(blob_of(ok)[0]).check_links()
    bad = write_tar([Entry("a/b/", tarfile.DIRTYPE),
                     Entry("a/b/up", tarfile.SYMTYPE, linkname="../../../etc/x")])
    with pytest.raises(FormatError, match="outside the layer root"):
        Reader.from_bytes(blob_of(bad)[0]).check_links()


def test_legacy_stargz_footer_is_read():
    tar = write_tar([Entry("f", data=b"legacy")])
    blob, _ = blob_of(tar)
    ft = parse_footer(blob[-51:], len(blob))
    extra = b"%016xSTARGZ" % ft.toc_offset
    legacy = (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + len(extra).to_bytes(2, "little")
              + extra + b"\x01\x00\x00\xff\xff" + b"\x00" * 8)
    assert len(legacy) == 47
    r = Reader.from_bytes(blob[:-51] + legacy)
    assert r.compression == "gzip-legacy" and r.read("f") == b"legacy"


def test_spool_write_errors_are_not_reported_as_bad_input(monkeypatch, tmp_path):
    import errno
    import tempfile as tf_mod

    real = tf_mod.TemporaryFile

    class Full(io.BufferedRandom):
        def write(self, b):  # noqa: D401 - a disk that fills up at once
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_tmp(*a, **kw):
        f = real(*a, **kw)
        return Full(f.raw)

    monkeypatch.setattr(tf_mod, "TemporaryFile", full_tmp)
    tar = gzip.compress(write_tar([Entry("a", data=b"x" * 5000)]))
    with pytest.raises(EstargzError, match="No space left.*spool directory") as ei:
        blob_of(tar, spool_dir=str(tmp_path))
    assert not isinstance(ei.value, FormatError)
    with pytest.raises(EstargzError, match="cannot create a temporary file"):
        blob_of(tar, spool_dir=str(tmp_path / "missing"))
