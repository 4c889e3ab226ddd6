"""The eStargz TOC: entries, their JSON encoding, parsing and validation.

The JSON is written byte for byte as Go's `json.MarshalIndent(toc, "", "\\t")` writes
the reference's `JTOC` struct (field order, omitempty, Go's string escaping), because
the TOC digest is the sha256 of these bytes and other tools compare it.
"""

from __future__ import annotations

import base64
import json
import math
import posixpath
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from peerstar.estargz.errors import FormatError

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"

ENTRY_TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk")


@dataclass(eq=False)
class TOCEntry:
    """One TOC entry. Field names follow the JSON keys in snake case."""

    name: str
    type: str
    size: int = 0
    modtime: str = ""
    link_name: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    offset: int = 0
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str = ""
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""
    # Computed by readers, never written.
    num_link: int = 0
    next_offset: int = 0

    @property
    def is_data(self) -> bool:
        return self.type in ("reg", "chunk")

    def mtime(self) -> int:
        """Seconds since the epoch (0 when the TOC has no modtime)."""
        if not self.modtime:
            return 0
        try:
            return int(datetime.fromisoformat(self.modtime.replace("Z", "+00:00")).timestamp())
        except ValueError:
            return 0


# --- writing -------------------------------------------------------------------------

_HEX = "0123456789abcdef"


def go_quote(s: str) -> str:
    """A JSON string literal exactly as Go's encoding/json writes it (HTML-safe)."""
    # Go replaces invalid UTF-8 with U+FFFD; names from tar may carry raw bytes as
    # surrogate escapes.
    s = s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif o < 0x20 or ch in "<>&":
            out.append("\\u00" + _HEX[o >> 4] + _HEX[o & 0xF])
        elif o in (0x2028, 0x2029):
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _entry_fields(e: TOCEntry) -> list[tuple[str, str]]:
    f: list[tuple[str, str]] = [("name", go_quote(e.name)), ("type", go_quote(e.type))]
    ints = (("size", e.size),)
    for k, v in ints:
        if v:
            f.append((k, str(v)))
    if e.modtime:
        f.append(("modtime", go_quote(e.modtime)))
    if e.link_name:
        f.append(("linkName", go_quote(e.link_name)))
    for k, v in (("mode", e.mode), ("uid", e.uid), ("gid", e.gid)):
        if v:
            f.append((k, str(v)))
    if e.uname:
        f.append(("userName", go_quote(e.uname)))
    if e.gname:
        f.append(("groupName", go_quote(e.gname)))
    for k, v in (("offset", e.offset), ("devMajor", e.dev_major), ("devMinor", e.dev_minor)):
        if v:
            f.append((k, str(v)))
    if e.xattrs:
        f.append(("xattrs", None))  # type: ignore[arg-type]  # rendered as an object below
    if e.digest:
        f.append(("digest", go_quote(e.digest)))
    for k, v in (("chunkOffset", e.chunk_offset), ("chunkSize", e.chunk_size)):
        if v:
            f.append((k, str(v)))
    if e.chunk_digest:
        f.append(("chunkDigest", go_quote(e.chunk_digest)))
    return f


def marshal_toc(entries: list[TOCEntry], version: int = 1) -> bytes:
    """The TOC JSON as `json.MarshalIndent(JTOC, "", "\\t")` writes it (no trailing newline)."""
    parts = [f'{{\n\t"version": {version},\n\t"entries": ']
    if not entries:
        parts.append("[]\n}")
        return "".join(parts).encode()
    parts.append("[\n")
    for i, e in enumerate(entries):
        parts.append("\t\t{\n")
        fields = _entry_fields(e)
        for j, (k, v) in enumerate(fields):
            sep = "," if j < len(fields) - 1 else ""
            if k == "xattrs":
                parts.append('\t\t\t"xattrs": {\n')
                keys = sorted(e.xattrs, key=lambda x: x.encode("utf-8", "surrogateescape"))
                for n, xk in enumerate(keys):
                    xv = base64.b64encode(e.xattrs[xk]).decode()
                    xsep = "," if n < len(keys) - 1 else ""
                    parts.append(f"\t\t\t\t{go_quote(xk)}: \"{xv}\"{xsep}\n")
                parts.append("\t\t\t}" + sep + "\n")
            else:
                parts.append(f'\t\t\t"{k}": {v}{sep}\n')
        parts.append("\t\t}" + ("," if i < len(entries) - 1 else "") + "\n")
    parts.append("\t]\n}")
    return "".join(parts).encode("utf-8")


def format_modtime(mtime: float) -> str:
    """RFC 3339, UTC, whole seconds, "" for the epoch second (the reference's formatModtime)."""
    if math.floor(mtime) == 0:
        return ""
    secs = math.floor(mtime + 0.5) if mtime >= 0 else -math.floor(-mtime + 0.5)
    try:
        return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return ""


# --- reading -------------------------------------------------------------------------

_INT_FIELDS = {
    "size": "size",
    "mode": "mode",
    "uid": "uid",
    "gid": "gid",
    "offset": "offset",
    "devMajor": "dev_major",
    "devMinor": "dev_minor",
    "chunkOffset": "chunk_offset",
    "chunkSize": "chunk_size",
}
_STR_FIELDS = {
    "modtime": "modtime",
    "linkName": "link_name",
    "userName": "uname",
    "groupName": "gname",
    "digest": "digest",
    "chunkDigest": "chunk_digest",
}
MAX_TOC_ENTRIES = 10_000_000


def clean_name(name: str) -> str:
    """The reference's cleanEntryName: clean("/"+name) without the leading "/"."""
    return posixpath.normpath("/" + name).lstrip("/") if name not in ("", "/") else ""


def _check_name(raw: str, what: str) -> None:
    if raw.startswith("/"):
        raise FormatError(f"TOC entry {raw!r}: {what} is an absolute path")
    if ".." in raw.split("/"):
        raise FormatError(f"TOC entry {raw!r}: {what} has a '..' component")
    if "\x00" in raw:
        raise FormatError(f"TOC entry {raw!r}: {what} has a NUL byte")


def parse_toc(data: bytes) -> tuple[int, list[TOCEntry]]:
    """Parse and type-check TOC JSON; raise FormatError for anything malformed."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"TOC is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FormatError("TOC JSON is not an object")
    version = doc.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise FormatError("TOC version is not an integer")
    raw_entries = doc.get("entries")
    if raw_entries is None:
        raw_entries = []
    if not isinstance(raw_entries, list):
        raise FormatError("TOC entries is not a list")
    if len(raw_entries) > MAX_TOC_ENTRIES:
        raise FormatError(f"TOC has {len(raw_entries)} entries, more than {MAX_TOC_ENTRIES}")
    entries = []
    for i, raw in enumerate(raw_entries):
        entries.append(_parse_entry(i, raw))
    return version, entries


def _parse_entry(i: int, raw: Any) -> TOCEntry:
    if not isinstance(raw, dict):
        raise FormatError(f"TOC entry #{i} is not an object")
    name = raw.get("name", "")
    typ = raw.get("type", "")
    if not isinstance(name, str) or not isinstance(typ, str):
        raise FormatError(f"TOC entry #{i}: name and type must be strings")
    if typ not in ENTRY_TYPES:
        raise FormatError(f"TOC entry #{i} ({name!r}) has unknown type {typ!r}")
    e = TOCEntry(name=name, type=typ)
    for key, attr in _INT_FIELDS.items():
        if key in raw and raw[key] is not None:
            v = raw[key]
            if not isinstance(v, int) or isinstance(v, bool):
                raise FormatError(f"TOC entry {name!r}: {key} is not an integer")
            if v < 0:
                raise FormatError(f"TOC entry {name!r}: {key} is negative ({v})")
            if v >= 1 << 63:
                raise FormatError(f"TOC entry {name!r}: {key} is too large ({v})")
            setattr(e, attr, v)
    for key, attr in _STR_FIELDS.items():
        if key in raw and raw[key] is not None:
            v = raw[key]
            if not isinstance(v, str):
                raise FormatError(f"TOC entry {name!r}: {key} is not a string")
            setattr(e, attr, v)
    xattrs = raw.get("xattrs")
    if xattrs:
        if not isinstance(xattrs, dict):
            raise FormatError(f"TOC entry {name!r}: xattrs is not an object")
        for k, v in xattrs.items():
            if not isinstance(v, str):
                raise FormatError(f"TOC entry {name!r}: xattr {k!r} is not base64 text")
            try:
                e.xattrs[k] = base64.b64decode(v, validate=True)
            except ValueError:
                raise FormatError(f"TOC entry {name!r}: xattr {k!r} is not valid base64") from None
    if typ != "chunk":
        _check_name(name, "name")
    if typ == "hardlink":
        if not e.link_name:
            raise FormatError(f"TOC entry {name!r} is a hardlink without a linkName")
        _check_name(e.link_name, "hardlink target")
    return e
