"""Small tar and blob builders for the eStargz unit tests (independent of peerstar's writer)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Callable

from peerstar.estargz.footer import estargz_footer, parse_footer
from tests.support.tars import Entry, write_tar


def make_tar(entries: list[dict], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """entries: dicts with name, and optional type/data/mode/uid/gid/uname/gname/mtime/
    linkname/devmajor/devminor/pax (written by `tests.support.tars.write_tar`)."""
    return write_tar(Entry(
        spec["name"], spec.get("type", tarfile.REGTYPE), spec.get("data") or b"",
        mode=spec.get("mode", 0o644), uid=spec.get("uid", 0), gid=spec.get("gid", 0),
        uname=spec.get("uname", ""), gname=spec.get("gname", ""),
        mtime=spec.get("mtime", 1_700_000_000), linkname=spec.get("linkname", ""),
        devmajor=spec.get("devmajor", 0), devminor=spec.get("devminor", 0),
        pax=spec.get("pax", {}), format=fmt) for spec in entries)


def all_kinds_tar() -> bytes:
    big = bytes((i * 7 + 3) % 251 for i in range(300_000))
    return make_tar([
        {"name": "./", "type": tarfile.DIRTYPE, "mode": 0o755},
        {"name": "./etc/", "type": tarfile.DIRTYPE, "mode": 0o755},
        {"name": "./etc/hosts", "data": b"127.0.0.1 localhost\n", "uid": 1000, "gid": 1000,
         "uname": "alice", "gname": "staff"},
        {"name": "./etc/empty", "data": b"", "mode": 0o600},
        {"name": "./etc/big.bin", "data": big, "mode": 0o755, "uid": 1000, "uname": "alice"},
        {"name": "./etc/link", "type": tarfile.SYMTYPE, "linkname": "hosts"},
        {"name": "./etc/hard", "type": tarfile.LNKTYPE, "linkname": "./etc/hosts"},
        {"name": "./etc/hard2", "type": tarfile.LNKTYPE, "linkname": "./etc/hard"},
        {"name": "./dev/", "type": tarfile.DIRTYPE, "mode": 0o755},
        {"name": "./dev/null", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3,
         "mode": 0o666},
        {"name": "./dev/sda", "type": tarfile.BLKTYPE, "devmajor": 8, "devminor": 0},
        {"name": "./dev/fifo", "type": tarfile.FIFOTYPE},
        {"name": "./x/", "type": tarfile.DIRTYPE, "pax": {"SCHILY.xattr.user.note": "héllo"}},
        {"name": "./x/.wh.gone", "data": b""},
        {"name": "./x/.wh..wh..opq", "data": b""},
        {"name": "./x/" + "long" * 40, "data": b"long name\n"},
        {"name": "./x/<&>\u2028name", "data": b"odd\n", "mtime": 0},
    ])


def rewrite_toc(blob: bytes, mutate: Callable[[dict], None]) -> bytes:
    """A gzip eStargz blob whose TOC JSON was changed by `mutate` (for lying-TOC tests)."""
    footer = parse_footer(blob[-51:], len(blob))
    toc_member = blob[footer.toc_offset : len(blob) - 51]
    tar_bytes = gzip.decompress(toc_member)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        doc = json.loads(tf.extractfile("stargz.index.json").read())  # type: ignore[union-attr]
    mutate(doc)
    return blob[: footer.toc_offset] + toc_blob(json.dumps(doc).encode()) + estargz_footer(
        footer.toc_offset
    )


def toc_blob(toc_json: bytes) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo("stargz.index.json")
        ti.size = len(toc_json)
        tf.addfile(ti, io.BytesIO(toc_json))
    return gzip.compress(bio.getvalue())
