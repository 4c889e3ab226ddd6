"""Tar headers: read them from a layer tar and write them back, keeping raw names.

Hand-written rather than `tarfile` because eStargz records names exactly as the tar
holds them (directories keep their trailing "/", `./` prefixes stay) and keeps the
raw mode bits, both of which `tarfile` normalises away. Reads USTAR, GNU (long names
`L`/`K`, base-256 numbers) and PAX (`x`, `g`) headers; writes USTAR, with a PAX
header in front when a field does not fit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from peerstar.estargz.errors import FormatError

BLOCK = 512
MAX_META = 64 << 20  # bound on PAX / GNU long-name payloads

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


@dataclass
class TarHeader:
    name: str
    typeflag: bytes
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime: float = 0
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


def _num(b: bytes, what: str) -> int:
    if b and b[0] & 0x80:
        # GNU base-256: big-endian two's complement with the top bit as a marker.
        v = int.from_bytes(bytes([b[0] & 0x7F]) + b[1:], "big")
        if b[0] & 0x40:
            v -= 1 << (len(b) * 8 - 1)
        return v
    s = b.split(b"\x00", 1)[0].strip(b" \x00")
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise FormatError(f"tar header field {what} is not a number: {b!r}") from None


def _parse_pax(data: bytes) -> dict[str, str]:
    recs: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise FormatError("malformed PAX record (no length)")
        try:
            n = int(data[pos:sp])
        except ValueError:
            raise FormatError("malformed PAX record length") from None
        if n <= sp - pos or pos + n > len(data):
            raise FormatError("PAX record length out of range")
        rec = data[sp + 1 : pos + n]
        if not rec.endswith(b"\n") or b"=" not in rec:
            raise FormatError("malformed PAX record")
        k, v = rec[:-1].split(b"=", 1)
        recs[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
        pos += n
    return recs


def _read_exact(f: BinaryIO, n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise FormatError(f"tar is truncated: wanted {n} bytes, got {len(b)}")
    return b


def iter_headers(f: BinaryIO) -> Iterator[TarHeader]:
    """Yield each entry's header from a seekable tar, skipping payloads (seeks past them)."""
    pos = f.tell()
    global_pax: dict[str, str] = {}
    pending_pax: dict[str, str] = {}
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
        chk = _num(blk[148:156], "checksum")
        calc = sum(blk[:148]) + 256 + sum(blk[156:])
        if chk != calc:
            signed = sum((b - 256 if b > 127 else b) for b in blk[:148] + blk[156:]) + 256
            if chk != signed:
                raise FormatError(f"tar header at offset {pos - BLOCK} has a bad checksum")
        typeflag = blk[156:157]
        size = _num(blk[124:136], "size")
        if size < 0:
            raise FormatError(f"tar header at offset {pos - BLOCK} has a negative size")
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > MAX_META:
                raise FormatError(f"tar metadata entry of {size} bytes is too large")
            data = _read_exact(f, size)
            pad = (-size) % BLOCK
            f.seek(pad, 1)
            pos += size + pad
            if typeflag == b"x":
                pending_pax.update(_parse_pax(data))
            elif typeflag == b"g":
                global_pax.update(_parse_pax(data))
            elif typeflag == b"L":
                long_name = _str(data)
            else:
                long_link = _str(data)
            continue
        magic = blk[257:263]
        name = _str(blk[0:100])
        if magic == b"ustar\x00" and blk[345] != 0:  # POSIX prefix field
            name = _str(blk[345:500]) + "/" + name
        h = TarHeader(
            name=name,
            typeflag=typeflag,
            size=size,
            mode=_num(blk[100:108], "mode"),
            uid=_num(blk[108:116], "uid"),
            gid=_num(blk[116:124], "gid"),
            mtime=_num(blk[136:148], "mtime"),
            linkname=_str(blk[157:257]),
            uname=_str(blk[265:297]) if magic.startswith(b"ustar") else "",
            gname=_str(blk[297:329]) if magic.startswith(b"ustar") else "",
            devmajor=_num(blk[329:337], "devmajor") if magic.startswith(b"ustar") else 0,
            devminor=_num(blk[337:345], "devminor") if magic.startswith(b"ustar") else 0,
        )
        if long_name is not None:
            h.name = long_name
        if long_link is not None:
            h.linkname = long_link
        recs = {**global_pax, **pending_pax}
        _apply_pax(h, recs)
        pending_pax, long_name, long_link = {}, None, None
        # Header-only types carry no payload whatever `size` says (as Go's reader does).
        payload = 0 if h.typeflag in (b"1", b"2", b"3", b"4", b"5", b"6") else h.size
        h.data_offset = pos
        skip = payload + ((-payload) % BLOCK)
        f.seek(skip, 1)
        pos += skip
        yield h


def _apply_pax(h: TarHeader, recs: dict[str, str]) -> None:
    for k, v in recs.items():
        try:
            if k == "path":
                h.name = v
            elif k == "linkpath":
                h.linkname = v
            elif k == "size":
                h.size = int(v)
            elif k == "uid":
                h.uid = int(v)
            elif k == "gid":
                h.gid = int(v)
            elif k == "uname":
                h.uname = v
            elif k == "gname":
                h.gname = v
            elif k == "mtime":
                h.mtime = float(v)
            elif k.startswith("GNU.sparse."):
                raise FormatError(f"tar entry {h.name!r} is a sparse file, which eStargz lacks")
            elif k.startswith("SCHILY.xattr."):
                h.pax[k] = v
        except ValueError:
            raise FormatError(f"tar entry {h.name!r} has a malformed PAX {k} record") from None
    if h.size < 0:
        raise FormatError(f"tar entry {h.name!r} has a negative size")


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
    for k, v in (("uname", h.uname), ("gname", h.gname)):
        b = v.encode("utf-8", "surrogateescape")
        if len(b) > 32 or not b.isascii():
            pax[k] = v
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
