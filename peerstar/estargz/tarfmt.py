"""Tar headers: read them from a layer tar and write them back, keeping raw names.

Hand-written rather than `tarfile` because eStargz records names exactly as the tar
holds them (directories keep their trailing "/", `./` prefixes stay) and keeps the
raw mode bits, both of which `tarfile` normalises away. Reads USTAR, GNU (long names
`L`/`K`, base-256 numbers) and PAX (`x`, `g`) headers; writes USTAR, with a PAX
header in front when a field does not fit.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from peerstar.estargz.errors import FormatError

BLOCK = 512
MAX_META = 1 << 20  # bound on PAX / GNU long-name payloads (Go's archive/tar: 1 MiB)
_MAX_GLOBAL_RECORDS = 256  # each applies to every entry: keep that linear
_INT64 = 1 << 63
_OCTAL = re.compile(rb"[0-7]+")
_DECIMAL = re.compile(r"[+-]?[0-9]{1,19}", re.ASCII)
_PAX_TIME = re.compile(r"([+-]?[0-9]{1,19})(?:\.([0-9]*))?", re.ASCII)

TYPE_NAMES = {
    b"0": "reg",
    b"\x00": "reg",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "char",
    b"4": "block",
    b"5": "dir",
    b"6": "fifo",
}


@dataclass(slots=True)
class TarHeader:
    name: str
    typeflag: bytes
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime: float = 0  # an int unless the PAX mtime has a fraction
    linkname: str = ""
    uname: str = ""
    gname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)  # records to carry (xattrs, ...)
    data_offset: int = 0  # where the payload starts in the source tar

    @property
    def kind(self) -> str | None:
        if self.typeflag == b"\x00" and self.name.endswith("/"):
            return "dir"
        return TYPE_NAMES.get(self.typeflag)

    def xattrs(self) -> dict[str, bytes]:
        p = "SCHILY.xattr."
        return {
            k[len(p) :]: v.encode("utf-8", "surrogateescape")
            for k, v in self.pax.items()
            if k.startswith(p)
        }


def _str(b: bytes) -> str:
    return b.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def parse_number(b: bytes, what: str) -> int:
    """A numeric header field: octal text, or GNU base-256; int64 range, as Go reads them."""
    if b and b[0] & 0x80:
        # GNU base-256: big-endian two's complement with the top bit as a marker.
        v = int.from_bytes(bytes([b[0] & 0x7F]) + b[1:], "big")
        if b[0] & 0x40:
            v -= 1 << (len(b) * 8 - 1)
        if not -_INT64 <= v < _INT64:
            raise FormatError(f"tar header field {what} is out of range ({v})")
        return v
    s = b.split(b"\x00", 1)[0].strip(b" \x00")
    if not s:
        return 0
    if not _OCTAL.fullmatch(s):
        raise FormatError(f"tar header field {what} is not a number: {b!r}")
    return int(s, 8)


def _parse_pax(data: bytes) -> dict[str, str]:
    recs: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        sp = data.find(b" ", pos, pos + 20)
        if sp < 0 or not data[pos:sp].isdigit():
            raise FormatError("malformed PAX record (no length)")
        n = int(data[pos:sp])
        if n <= sp - pos or pos + n > len(data):
            raise FormatError("PAX record length out of range")
        rec = data[sp + 1 : pos + n]
        if not rec.endswith(b"\n") or b"=" not in rec:
            raise FormatError("malformed PAX record")
        k, v = rec[:-1].split(b"=", 1)
        if not k or b"\x00" in k:
            raise FormatError(f"PAX record has an empty key or a NUL in its key {k!r}")
        recs[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
        pos += n
    return recs


def _read_exact(f: BinaryIO, n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise FormatError(f"tar is truncated: wanted {n} bytes, got {len(b)}")
    return b


def iter_headers(f: BinaryIO) -> Iterator[TarHeader]:
    """Yield each entry's header from a seekable tar, skipping payloads (seeks past them).

    A payload that runs past the end of the tar is an error (the tar is truncated, or a
    size lies); the padding of the last payload may be missing.
    """
    pos = f.tell()
    end = f.seek(0, os.SEEK_END)
    f.seek(pos)
    global_pax: dict[str, str] = {}
    pending_pax: dict[str, str] = {}
    meta = {b"x": 0, b"g": 0}  # metadata bytes read: per entry ('x') and in all ('g')
    long_name: str | None = None
    long_link: str | None = None
    while True:
        blk = f.read(BLOCK)
        if len(blk) == 0:
            return  # tolerate a tar without end-of-archive blocks (eStargz payloads)
        if len(blk) != BLOCK:
            raise FormatError(f"tar is truncated: a {len(blk)}-byte header block")
        pos += BLOCK
        if blk == b"\x00" * BLOCK:
            return
        at = pos - BLOCK
        chk = parse_number(blk[148:156], "checksum")
        calc = sum(blk[:148]) + 256 + sum(blk[156:])
        if chk != calc:
            signed = sum((b - 256 if b > 127 else b) for b in blk[:148] + blk[156:]) + 256
            if chk != signed:
                raise FormatError(f"tar header at offset {at} has a bad checksum")
        typeflag = blk[156:157]
        size = parse_number(blk[124:136], "size")
        if size < 0:
            raise FormatError(f"tar header at offset {at} has a negative size")
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > MAX_META:
                raise FormatError(
                    f"tar metadata entry at offset {at} has {size} bytes, more than "
                    f"{MAX_META} (the limit of Go's archive/tar)")
            if typeflag in meta:
                # Records pile up until an entry takes them (or, global ones, for every
                # entry): bound them as one header is bounded.
                meta[typeflag] += size
                if meta[typeflag] > MAX_META:
                    raise FormatError(
                        f"tar has more than {MAX_META} bytes of PAX records "
                        f"{'in all' if typeflag == b'g' else 'for one entry'} (at offset {at})")
            data = _read_exact(f, size)
            pad = (-size) % BLOCK
            f.seek(pad, 1)
            pos += size + pad
            if typeflag == b"x":
                pending_pax.update(_parse_pax(data))
            elif typeflag == b"g":
                global_pax.update(_parse_pax(data))
                if len(global_pax) > _MAX_GLOBAL_RECORDS:
                    raise FormatError(
                        f"tar has more than {_MAX_GLOBAL_RECORDS} global PAX records, which "
                        "apply to every entry")
            elif typeflag == b"L":
                long_name = _str(data)
            else:
                long_link = _str(data)
            continue
        magic = blk[257:263]
        name = _str(blk[0:100])
        if magic == b"ustar\x00" and blk[345] != 0:  # POSIX prefix field
            name = _str(blk[345:500]) + "/" + name
        ustar = magic.startswith(b"ustar")
        h = TarHeader(
            name=name,
            typeflag=typeflag,
            size=size,
            mode=parse_number(blk[100:108], "mode"),
            uid=parse_number(blk[108:116], "uid"),
            gid=parse_number(blk[116:124], "gid"),
            mtime=parse_number(blk[136:148], "mtime"),
            linkname=_str(blk[157:257]),
            uname=_str(blk[265:297]) if ustar else "",
            gname=_str(blk[297:329]) if ustar else "",
            devmajor=parse_number(blk[329:337], "devmajor") if ustar else 0,
            devminor=parse_number(blk[337:345], "devminor") if ustar else 0,
        )
        if long_name is not None:
            h.name = long_name
        if long_link is not None:
            h.linkname = long_link
        _apply_pax(h, {**global_pax, **pending_pax})
        pending_pax, long_name, long_link = {}, None, None
        meta[b"x"] = 0
        # Header-only types carry no payload whatever `size` says (as Go's reader does).
        payload = 0 if h.typeflag in (b"1", b"2", b"3", b"4", b"5", b"6") else h.size
        if payload > end - pos:
            raise FormatError(
                f"tar is truncated inside the payload of {h.name!r}: it has {h.size} bytes "
                f"at offset {pos}, the tar ends at {end}")
        h.data_offset = pos
        skip = min(payload + ((-payload) % BLOCK), end - pos)
        f.seek(skip, 1)
        pos += skip
        yield h


def _pax_int(h: TarHeader, k: str, v: str) -> int:
    if not _DECIMAL.fullmatch(v) or not -_INT64 <= int(v) < _INT64:
        raise FormatError(f"tar entry {h.name!r} has a malformed PAX {k} record {v!r}")
    return int(v)


def _pax_time(h: TarHeader, v: str) -> float:
    """A PAX time as Go's parsePAXTime reads it: decimal seconds, optional fraction."""
    m = _PAX_TIME.fullmatch(v)
    if m is None or not -_INT64 <= int(m.group(1)) < _INT64:
        raise FormatError(f"tar entry {h.name!r} has a malformed PAX mtime record {v!r}")
    if not m.group(2) or not m.group(2).strip("0"):
        return int(m.group(1))
    t = float(v)
    if not math.isfinite(t):
        raise FormatError(f"tar entry {h.name!r} has a malformed PAX mtime record {v!r}")
    return t


def _apply_pax(h: TarHeader, recs: dict[str, str]) -> None:
    for k, v in recs.items():
        if k in ("path", "linkpath", "uname", "gname") and "\x00" in v:
            raise FormatError(f"tar entry {h.name!r} has a NUL byte in its PAX {k} record")
        if k == "path":
            h.name = v
        elif k == "linkpath":
            h.linkname = v
        elif k == "size":
            h.size = _pax_int(h, k, v)
        elif k == "uid":
            h.uid = _pax_int(h, k, v)
        elif k == "gid":
            h.gid = _pax_int(h, k, v)
        elif k == "uname":
            h.uname = v
        elif k == "gname":
            h.gname = v
        elif k == "mtime":
            h.mtime = _pax_time(h, v)
        elif k.startswith("GNU.sparse."):
            raise FormatError(f"tar entry {h.name!r} is a sparse file, which eStargz lacks")
        elif k.startswith("SCHILY.xattr."):
            h.pax[k] = v
    if h.size < 0:
        raise FormatError(f"tar entry {h.name!r} has a negative size")
    for what in ("mode", "uid", "gid", "devmajor", "devminor"):
        if getattr(h, what) < 0:
            raise FormatError(
                f"tar entry {h.name!r} has a negative {what} ({getattr(h, what)}), which an "
                "eStargz TOC cannot hold")


# --- writing -------------------------------------------------------------------------


def _octal(v: int, width: int) -> bytes | None:
    """`width`-byte octal field (NUL-terminated), or None if it does not fit."""
    if v < 0 or v >= 8 ** (width - 1):
        return None
    return b"%0*o" % (width - 1, v) + b"\x00"


def _pax_record(k: str, v: str) -> bytes:
    body = b" " + k.encode("utf-8", "surrogateescape") + b"=" + v.encode(
        "utf-8", "surrogateescape"
    ) + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _ustar_block(
    name: bytes, prefix: bytes, typeflag: bytes, size: int, h: TarHeader, link: bytes
) -> bytes:
    def num(v: int, w: int) -> bytes:
        o = _octal(v, w)
        return o if o is not None else b"\x00" * w

    blk = bytearray(BLOCK)
    blk[0 : len(name)] = name
    blk[100:108] = num(h.mode & 0o7777777, 8)
    blk[108:116] = num(h.uid, 8)
    blk[116:124] = num(h.gid, 8)
    blk[124:136] = num(size, 12)
    mt = int(h.mtime)
    blk[136:148] = num(mt if mt >= 0 else 0, 12)
    blk[148:156] = b" " * 8
    blk[156:157] = typeflag
    blk[157 : 157 + len(link)] = link
    blk[257:265] = b"ustar\x0000"
    un = h.uname.encode("utf-8", "surrogateescape")[:32]
    gn = h.gname.encode("utf-8", "surrogateescape")[:32]
    blk[265 : 265 + len(un)] = un
    blk[297 : 297 + len(gn)] = gn
    blk[329:337] = num(h.devmajor, 8)
    blk[337:345] = num(h.devminor, 8)
    blk[345 : 345 + len(prefix)] = prefix
    blk[148:156] = b"%06o\x00 " % sum(blk)
    return bytes(blk)


def _split_ustar_name(name: bytes) -> tuple[bytes, bytes] | None:
    if len(name) <= 100:
        return name, b""
    for i in range(min(len(name) - 1, 155), 0, -1):
        if name[i : i + 1] == b"/" and len(name) - i - 1 <= 100 and i <= 155:
            return name[i + 1 :], name[:i]
    return None


def write_header(h: TarHeader) -> bytes:
    """The header block(s) for `h`: USTAR, preceded by a PAX header when needed."""
    name = h.name.encode("utf-8", "surrogateescape")
    link = h.linkname.encode("utf-8", "surrogateescape")
    pax: dict[str, str] = {}
    split = _split_ustar_name(name)
    if split is None or not name.isascii():
        pax["path"] = h.name
        split = (name[:100], b"")
    if len(link) > 100 or not link.isascii():
        pax["linkpath"] = h.linkname
        link = link[:100]
    for k, v, w in (("size", h.size, 12), ("uid", h.uid, 8), ("gid", h.gid, 8)):
        if _octal(v, w) is None:
            pax[k] = str(v)
    if int(h.mtime) < 0 or _octal(int(h.mtime), 12) is None:
        pax["mtime"] = str(int(h.mtime))
    for k, owner in (("uname", h.uname), ("gname", h.gname)):
        raw = owner.encode("utf-8", "surrogateescape")
        if len(raw) > 32 or not raw.isascii():
            pax[k] = owner
    for k in sorted(h.pax):
        pax[k] = h.pax[k]
    out = b""
    if pax:
        data = b"".join(_pax_record(k, v) for k, v in pax.items())
        pname = ("PaxHeaders.0/" + h.name.rstrip("/").rsplit("/", 1)[-1])[:99].encode(
            "utf-8", "surrogateescape"
        )[:99]
        ph = TarHeader(name="", typeflag=b"x")
        out += _ustar_block(pname, b"", b"x", len(data), ph, b"")
        out += data + b"\x00" * ((-len(data)) % BLOCK)
    return out + _ustar_block(split[0], split[1], h.typeflag, h.size, h, link)


def padding(size: int) -> bytes:
    return b"\x00" * ((-size) % BLOCK)
