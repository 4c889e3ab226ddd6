"""TOCs: random and mutated TOC JSON over a real payload, gzip and zstd.

Opening, listing, verifying and reading must raise nothing but peerstar's errors, a
verified blob's files must hash to their digests, and a read never returns a length
other than the file's size.
"""

from __future__ import annotations

import hashlib
import json
import random

import zstandard
from hypothesis import given

from peerstar.estargz import EstargzError, Reader
from peerstar.estargz.toc import ENTRY_TYPES, parse_toc
from tests.estargz.hostile import gzip_blob, gzip_member, sha, zstd_blob
from tests.fuzz import fuzz, ran
from tests.fuzz.strategies import integer, json_value, maybe, mutate, name, seeds, text

DATA = [b"hello\n", bytes(range(256)) * 40, b"", b"z" * 70_000]
MEMBERS = {"gzip": [gzip_member(d) for d in DATA],
           "zstd": [zstandard.compress(d) for d in DATA]}
PAYLOAD = {c: b"".join(m) for c, m in MEMBERS.items()}


def _offsets(members: list[bytes]) -> list[int]:
    out, at = [], 0
    for m in members:
        out.append(at)
        at += len(m)
    return out


OFFSETS = {c: _offsets(m) for c, m in MEMBERS.items()}
DIGESTS = [sha(d) for d in DATA] + [sha(d[:5000]) for d in DATA] + [sha(DATA[1][5000:])]
TYPES = [*ENTRY_TYPES, "bogus", ""]
MODTIMES = ["2023-01-01T00:00:00Z", "10000-01-01T00:00:00Z", "0000-01-01T00:00:00Z",
            "-0001-01-01T00:00:00+23:59", "2023-02-30T00:00:00Z", "yesterday"]


def _entry(rnd: random.Random, compression: str) -> dict:
    e: dict = {"name": maybe(rnd, name(rnd), 0.03), "type": maybe(rnd, rnd.choice(TYPES), 0.03)}
    sizes = [len(d) for d in DATA] + [5000]
    pools = {
        "size": lambda: rnd.choice(sizes) if rnd.random() < 0.6 else integer(rnd),
        "offset": lambda: (rnd.choice(OFFSETS[compression]) if rnd.random() < 0.7
                           else integer(rnd)),
        "chunkOffset": lambda: rnd.choice([0, 5000]) if rnd.random() < 0.6 else integer(rnd),
        "chunkSize": lambda: rnd.choice([0, 5000]) if rnd.random() < 0.6 else integer(rnd),
        "mode": lambda: integer(rnd), "uid": lambda: integer(rnd), "gid": lambda: integer(rnd),
        "devMajor": lambda: integer(rnd), "devMinor": lambda: integer(rnd),
        "modtime": lambda: rnd.choice(MODTIMES) if rnd.random() < 0.7 else text(rnd),
        "linkName": lambda: name(rnd), "userName": lambda: text(rnd),
        "groupName": lambda: text(rnd),
        "digest": lambda: rnd.choice(DIGESTS) if rnd.random() < 0.8 else text(rnd),
        "chunkDigest": lambda: rnd.choice(DIGESTS) if rnd.random() < 0.8 else text(rnd),
        "xattrs": lambda: {text(rnd): rnd.choice(["", "YQ==", "!!", "AAAA", 5])
                           for _ in range(rnd.randrange(3))},
    }
    for key, pool in pools.items():
        if rnd.random() < 0.35:
            e[key] = maybe(rnd, pool(), 0.03)
    return e


def _exercise(blob: bytes) -> None:
    try:
        r = Reader.from_bytes(blob)
    except EstargzError:
        return
    try:
        r.verify()
        verified = True
    except EstargzError:
        verified = False
    for path, e in r.walk():
        r.lookup(path)
        if e.type == "reg":
            try:
                data = r.read(path)
            except EstargzError:
                assert not verified
                continue
            assert len(data) == e.size
            if verified and e.digest:  # verify checked every chunk and the whole file
                assert "sha256:" + hashlib.sha256(data).hexdigest() == e.digest


def _blob(toc: bytes, compression: str) -> bytes:
    make = gzip_blob if compression == "gzip" else zstd_blob
    return make(toc, PAYLOAD[compression])


@fuzz(2000)
@given(seed=seeds)
def test_random_tocs(seed: int) -> None:
    ran()
    rnd = random.Random(seed)
    compression = rnd.choice(["gzip", "zstd"])
    k = rnd.random()
    if k < 0.45:  # the valid TOC with a few fields changed, entries added or moved
        entries = json.loads(VALID[compression])["entries"]
        for _ in range(rnd.randrange(1, 4)):
            extra = _entry(rnd, compression)
            j = rnd.random()
            if j < 0.6:
                key = rnd.choice(sorted(extra))
                rnd.choice(entries)[key] = extra[key]
            elif j < 0.8:
                entries.insert(rnd.randrange(len(entries) + 1), extra)
            else:
                entries.insert(rnd.randrange(len(entries) + 1), rnd.choice(entries))
    elif k < 0.8:
        entries = [_entry(rnd, compression) for _ in range(rnd.randrange(9))]
    elif k < 0.95:
        entries = [json_value(rnd) for _ in range(rnd.randrange(5))]
    else:
        entries = json_value(rnd)
    doc = {"version": maybe(rnd, 1, 0.05), "entries": entries}
    _exercise(_blob(json.dumps(doc).encode(), compression))


def _valid_toc(compression: str) -> bytes:
    off = OFFSETS[compression]
    es = [{"name": "d/", "type": "dir"},
          {"name": "d/a", "type": "reg", "size": len(DATA[0]), "offset": off[0],
           "digest": sha(DATA[0]), "chunkDigest": sha(DATA[0])},
          {"name": "d/b", "type": "reg", "size": len(DATA[1]), "offset": off[1],
           "digest": sha(DATA[1]), "chunkSize": 5000, "chunkDigest": sha(DATA[1][:5000])},
          {"name": "d/b", "type": "chunk", "offset": off[3], "chunkOffset": 5000,
           "chunkDigest": sha(DATA[1][5000:])},
          {"name": "l", "type": "hardlink", "linkName": "d/a"},
          {"name": "s", "type": "symlink", "linkName": "d/../d/a"}]
    return json.dumps({"version": 1, "entries": es}, indent="\t").encode()


VALID = {c: _valid_toc(c) for c in ("gzip", "zstd")}


@fuzz(2000)
@given(seed=seeds)
def test_mutated_tocs(seed: int) -> None:
    ran()
    rnd = random.Random(seed)
    compression = rnd.choice(["gzip", "zstd"])
    toc = mutate(rnd, VALID[compression])
    try:
        parse_toc(toc)
    except EstargzError:
        pass
    _exercise(_blob(toc, compression))
