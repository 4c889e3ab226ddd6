"""The registry bridge's request parsing: any request line, path, query and headers get an
answer the distribution spec and RFC 9110 allow -- never a 500, a dropped connection or a
logged traceback -- and the bytes of a 200/206 are the blob's own.

A real `RegistryServer` over the embedded store serves one stored image (a 600 KiB blob:
three UnixFS leaves, so ranges cross leaf boundaries); requests are built from the routes'
grammar with every part replaceable by junk, and raw request bytes are sent on a socket.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peerstar.ipfs import EmbeddedStore
from peerstar.registry.ranges import RangeNotSatisfiable, RangeRejected, parse_range
from tests.fuzz import fuzz, ran
from tests.registry.harness import ThreadedRegistry
from tests.registry.helpers import parse_multipart, request
from tests.support.ipfsimage import StoredImage, push_blob_image

BLOB = os.urandom(600 * 1024)


class _Errors(logging.Handler):
    """Every ERROR record (aiohttp logs an unhandled exception in a handler as one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def since(self, n: int) -> list[str]:
        return [logging.Formatter().format(r) for r in self.records[n:]]

    def __repr__(self) -> str:
        return f"<{len(self.records)} error records>"


class _Served(tuple):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing case
        return "<registry serving a 600 KiB blob>"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ThreadedRegistry, StoredImage, _Errors]]:
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    with tempfile.TemporaryDirectory(prefix="peerstar-fuzz-registry-") as tmp:
        root = Path(tmp) / "store"
        img = push_blob_image(lambda: EmbeddedStore(root), BLOB)
        with ThreadedRegistry(lambda: EmbeddedStore(root)) as reg:
            yield _Served((reg, img, errors))
    logging.getLogger().removeHandler(errors)


_junk = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e,
                              blacklist_characters="?#%"), max_size=80)
_num = st.integers(0, 700 * 1024).map(str)
_big = st.integers(0, 10**40).map(str)


def _range_header() -> st.SearchStrategy[str]:
    spec = st.one_of(
        st.tuples(_num, _num).map(lambda t: f"{t[0]}-{t[1]}"),
        _num.map(lambda n: f"{n}-"), _num.map(lambda n: f"-{n}"),
        _big.map(lambda n: f"{n}-"), st.tuples(_big, _big).map(lambda t: f"{t[0]}-{t[1]}"),
        _junk)
    unit = st.sampled_from(["bytes=", "bytes = ", "BYTES=", "items=", ""])
    return st.builds(lambda u, specs: u + ",".join(specs), unit,
                     st.lists(spec, min_size=1, max_size=6))


def _paths(img: StoredImage) -> st.SearchStrategy[str]:
    blob, manifest = img.layer_digests[0], img.top_digest
    cid = st.sampled_from([img.root_cid, img.root_cid[:-1] + "a", "Qm" + "z" * 44,
                           "bafy", ""]) | _junk
    ref = st.sampled_from(["latest", manifest, "sha256:" + "0" * 64, "sha256:xyz",
                           "sha512:" + "a" * 128, "md5:00", "LATEST", "a" * 200]) | _junk
    digest = st.sampled_from([blob, manifest, "sha256:" + "f" * 64, "sha256:" + "F" * 64,
                              "sha256:", blob.upper()]) | _junk
    query = st.sampled_from(["", "?n=1", "?n=-1", "?n=99999999999999999999", "?last=zzz",
                             "?ns=docker.io", "?ns=", "?n=abc&last="])
    return st.one_of(
        st.builds(lambda c, r, q: f"/v2/ipfs/{c}/manifests/{r}{q}", cid, ref, query),
        st.builds(lambda c, d, q: f"/v2/ipfs/{c}/blobs/{d}{q}", cid, digest, query),
        st.builds(lambda c, q: f"/v2/ipfs/{c}/tags/list{q}", cid, query),
        st.builds(lambda n, r: f"/v2/{n}/manifests/{r}", _junk, ref),
        st.builds(lambda n, d: f"/v2/{n}/blobs/{d}", _junk, digest),
        st.sampled_from(["/v2/", "/v2", "/", "/v2/_catalog", "/v2/ipfs/", "/metrics",
                         "/v2/ipfs/x/manifests/", "//v2//ipfs", "/v2/../v2/"]),
        _junk.map(lambda j: "/" + j))


_ALLOWED = {200, 206, 301, 304, 400, 401, 403, 404, 405, 406, 413, 414, 416, 431, 502, 504}


@fuzz(800)
@given(data=st.data())
def test_any_request_gets_a_sane_answer(served, data: st.DataObject) -> None:
    ran()
    reg, img, errors = served
    path = data.draw(_paths(img))
    method = data.draw(st.sampled_from(["GET", "HEAD", "GET", "POST", "PUT", "DELETE",
                                        "OPTIONS", "PATCH"]))
    headers = {}
    if data.draw(st.booleans()):
        headers["Range"] = data.draw(_range_header())
    if data.draw(st.booleans()):
        headers["If-Range"] = data.draw(st.sampled_from(
            [f'"{img.layer_digests[0]}"', '"x"', "W/\"x\"", "Mon, 01 Jan 2024 00:00:00 GMT"])
            | _junk)
    if data.draw(st.booleans()):
        headers["If-None-Match"] = data.draw(st.sampled_from(
            [f'"{img.layer_digests[0]}"', "*", '"a", "b"']) | _junk)
    if data.draw(st.booleans()):
        headers["Accept"] = data.draw(st.sampled_from(
            ["application/vnd.oci.image.manifest.v1+json", "*/*", "text/html"]) | _junk)
    before = len(errors.records)
    r = request(reg.host, method, path, headers, timeout=30)
    assert r.status in _ALLOWED, (method, path, headers, r.status, r.body[:300])
    assert len(errors.records) == before, errors.since(before)
    if method == "HEAD":
        assert r.body == b""
        return
    if "content-length" in r.headers:
        assert int(r.headers["content-length"]) == len(r.body)
    blob = img.layer_digests[0]
    if r.status not in (200, 206) or f"/blobs/{blob}" not in path \
            or not path.startswith(f"/v2/ipfs/{img.root_cid}/"):
        return
    if r.status == 200:
        assert r.body == BLOB
    elif r.headers.get("content-type", "").startswith("multipart/byteranges"):
        for _, content_range, payload in parse_multipart(r.headers["content-type"], r.body):
            first, last = map(int, content_range.split()[1].split("/")[0].split("-"))
            assert payload == BLOB[first:last + 1]
    else:
        first, last = map(int, r.headers["content-range"].split()[1].split("/")[0].split("-"))
        assert r.body == BLOB[first:last + 1]


_raw_line = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda m, p, v: m + b" " + p + b" " + v,
              st.sampled_from([b"GET", b"HEAD", b"G\x00T", b"", b"GET GET"]),
              st.binary(max_size=120) | st.sampled_from([b"/v2/", b"*", b"http://x/v2/"]),
              st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b""])))
_raw_headers = st.lists(st.one_of(
    st.binary(max_size=100),
    st.builds(lambda k, v: k + b": " + v,
              st.sampled_from([b"Range", b"Host", b"Content-Length", b"Transfer-Encoding",
                               b"If-Range", b"Connection"]),
              st.binary(max_size=60))), max_size=6)


@fuzz(400)
@given(line=_raw_line, headers=_raw_headers)
def test_raw_request_bytes_never_hurt_the_server(served, line: bytes, headers: list[bytes]
                                                 ) -> None:
    ran()
    reg, img, errors = served
    before = len(errors.records)
    raw = b"\r\n".join([line, *headers]) + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", reg.port), timeout=30) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if answer:
        status = answer.split(b"\r\n", 1)[0]
        assert status.startswith(b"HTTP/1."), answer[:200]
        code = int(status.split()[1])
        assert code != 500 and 200 <= code < 600, answer[:300]
    assert len(errors.records) == before, errors.since(before)
    # and the server still answers a good request
    ok = request(reg.host, "GET", f"/v2/ipfs/{img.root_cid}/blobs/{img.layer_digests[0]}",
                 {"Range": "bytes=0-9"})
    assert ok.status == 206 and ok.body == BLOB[:10]


@fuzz(3000)
@given(header=_range_header(), size=st.integers(0, 2**64))
def test_parse_range_keeps_ranges_inside_the_representation(header: str, size: int) -> None:
    ran()
    try:
        ranges = parse_range(header, size)
    except (RangeNotSatisfiable, RangeRejected):
        return
    if ranges is None:
        return
    for r in ranges:
        assert 0 <= r.start <= r.end < size, (header, size, r)
        assert r.length == r.end - r.start + 1
