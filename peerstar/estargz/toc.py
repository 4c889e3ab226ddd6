"""The eStargz TOC: entries, their JSON encoding, parsing and validation.

The JSON is written byte for byte as Go's `json.MarshalIndent(toc, "", "\\t")` writes
the reference's `JTOC` struct (field order, omitempty, Go's string escaping), because
the TOC digest is the sha256 of these bytes and other tools compare it.

Reading is streamed: the JSON arrives in pieces and is parsed one entry at a time, so
neither the whole text nor a tree of JSON objects is ever held. A TOC is refused
when its entries would take more than `TOC_MEMORY_LIMIT` bytes in memory (estimated
by `entry_cost`, the same for readers and the builder), so reading any blob, whatever
it declares, stays within a fixed memory bound.
"""

from __future__ import annotations

import base64
import codecs
import json
import math
import posixpath
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from peerstar.estargz.errors import FormatError

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"

ENTRY_TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk")


@dataclass(eq=False, slots=True)
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
        """Seconds since the epoch (0 when the TOC has no or a malformed modtime), clamped
        to what a file system can show (int64 nanoseconds: years 1678 to 2262)."""
        secs = parse_modtime(self.modtime)
        if secs is None:
            return 0
        return max(-_NS_LIMIT, min(_NS_LIMIT, secs))


# --- times ---------------------------------------------------------------------------

_NS_LIMIT = (1 << 63) // 10**9 - 1
_DAY = 86400
_GO_ZERO_TIME = -62135596800  # 0001-01-01T00:00:00Z, Go's zero time: written as ""
_MODTIME_RE = re.compile(
    r"(-?\d{4,})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.\d+)?"
    r"(?:[Zz]|([+-])(\d\d):(\d\d))", re.ASCII)


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date, for any year."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def utc_fields(secs: int) -> tuple[int, int, int, int, int, int]:
    """(year, month, day, hour, minute, second) in UTC of `secs` since the epoch, for any
    year (datetime stops at 9999)."""
    days, rest = divmod(secs, _DAY)
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    y = yoe + era * 400 + (m <= 2)
    return y, m, d, rest // 3600, rest // 60 % 60, rest % 60


def format_year(y: int) -> str:
    """A year as Go's time.Format writes it: at least four digits, '-' before negatives."""
    return f"-{-y:04d}" if y < 0 else f"{y:04d}"


def parse_modtime(text: str) -> int | None:
    """Seconds since the epoch of an RFC 3339 time (any year, as Go writes them), or
    None when `text` is empty or malformed."""
    m = _MODTIME_RE.fullmatch(text) if text and len(text) < 64 else None
    if m is None:
        return None
    y, mo, d, hh, mm, ss = (int(g) for g in m.groups()[:6])
    if not (1 <= mo <= 12 and 1 <= d <= 31 and hh < 24 and mm < 60 and ss < 60):
        return None
    days = _days_from_civil(y, mo, d)
    if utc_fields(days * _DAY)[2] != d:
        return None  # 31 April, 30 February
    secs = days * _DAY + hh * 3600 + mm * 60 + ss
    if m.group(7):
        offset = int(m.group(8)) * 3600 + int(m.group(9)) * 60
        secs -= offset if m.group(7) == "+" else -offset
    return secs


# --- writing -------------------------------------------------------------------------

_GO_ESCAPE = re.compile('["\\\\\x00-\x1f<>&\u2028\u2029]')
_GO_NAMED = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _go_escape(m: re.Match[str]) -> str:
    ch = m.group()
    named = _GO_NAMED.get(ch)
    return named if named is not None else f"\\u{ord(ch):04x}"


def go_quote(s: str) -> str:
    """A JSON string literal exactly as Go's encoding/json writes it (HTML-safe)."""
    if not s.isascii():
        # Go replaces invalid UTF-8 with U+FFFD; names from tar may carry raw bytes as
        # surrogate escapes (and any other lone surrogate is no character either).
        try:
            s = s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            s = _SURROGATES.sub("\ufffd", s)
    return '"' + _GO_ESCAPE.sub(_go_escape, s) + '"'


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


def _entry_json(e: TOCEntry, last: bool) -> bytes:
    parts = ["\t\t{\n"]
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
    parts.append("\t\t}" + ("" if last else ",") + "\n")
    return "".join(parts).encode("utf-8")


def iter_toc_json(entries: list[TOCEntry], version: int = 1) -> Iterator[bytes]:
    """The TOC JSON in pieces (one per entry), so a large TOC is never one string."""
    if not entries:
        yield f'{{\n\t"version": {version},\n\t"entries": []\n}}'.encode()
        return
    yield f'{{\n\t"version": {version},\n\t"entries": [\n'.encode()
    for i, e in enumerate(entries):
        yield _entry_json(e, i == len(entries) - 1)
    yield b"\t]\n}"


def marshal_toc(entries: list[TOCEntry], version: int = 1) -> bytes:
    """The TOC JSON as `json.MarshalIndent(JTOC, "", "\\t")` writes it (no trailing newline)."""
    return b"".join(iter_toc_json(entries, version))


def format_modtime(mtime: float) -> str:
    """RFC 3339, UTC, whole seconds, "" for the epoch second and Go's zero time (the
    reference's formatModtime); any year, as Go's time.Format writes it."""
    if not math.isfinite(mtime) or math.floor(mtime) == 0 or mtime == _GO_ZERO_TIME:
        return ""
    if isinstance(mtime, int):
        secs = mtime  # exact, however large (a float would round it)
    else:
        secs = math.floor(mtime + 0.5) if mtime >= 0 else -math.floor(-mtime + 0.5)
    y, mo, d, hh, mm, ss = utc_fields(secs)
    return f"{format_year(y)}-{mo:02d}-{d:02d}T{hh:02d}:{mm:02d}:{ss:02d}Z"


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
_INT_LIMIT = 1 << 63  # the reference's fields are int64
# Narrower where the value must fit the kernel: Linux's makedev takes 32-bit halves.
_FIELD_LIMIT = {"devMajor": 1 << 32, "devMinor": 1 << 32}

# Memory a parsed TOC may take: `entry_cost` estimates each entry (object, index slots,
# strings); readers and the builder refuse TOCs beyond the limit, so a blob that
# peerstar writes is one it reads, and no blob can make a reader hold more.
TOC_MEMORY_LIMIT = 128 << 20
ENTRY_OVERHEAD = 640  # TOCEntry (slots) + its share of the reader's dicts and lists
MAX_TOC_BYTES = 512 << 20  # uncompressed TOC JSON, whatever it holds (whitespace...)
MAX_ENTRY_JSON = 8 << 20  # one entry's JSON text
_STEP = 1 << 16


def entry_cost(e: TOCEntry) -> int:
    """Estimated bytes `e` takes once parsed and indexed (see TOC_MEMORY_LIMIT)."""
    cost = ENTRY_OVERHEAD + sys.getsizeof(e.name)
    for s in (e.link_name, e.digest, e.chunk_digest):
        if s:
            cost += sys.getsizeof(s)
    for k, v in e.xattrs.items():
        cost += 100 + sys.getsizeof(k) + sys.getsizeof(v)
    return cost


def toc_too_large(cost: int, count: int) -> str:
    return (f"TOC is too large: its first {count} entries already need about "
            f"{cost >> 20} MiB of memory, over peerstar's limit of "
            f"{TOC_MEMORY_LIMIT >> 20} MiB (too many files, or huge names or xattrs)")


def clean_name(name: str) -> str:
    """The reference's cleanEntryName: clean("/"+name) without the leading "/"."""
    return posixpath.normpath("/" + name).lstrip("/") if name not in ("", "/") else ""


def _check_name(raw: str, label: str, what: str) -> None:
    if raw.startswith("/"):
        raise FormatError(f"{label}: {what} {raw!r} is an absolute path")
    if ".." in raw.split("/"):
        raise FormatError(f"{label}: {what} {raw!r} has a '..' component")
    if "\x00" in raw:
        raise FormatError(f"{label}: {what} {raw!r} has a NUL byte")


def check_entry(e: TOCEntry, label: str) -> None:
    """The checks on one entry's own fields that every reader makes (and the builder,
    so that it never writes what a reader refuses). `label` names the entry in errors:
    "TOC entry #3 ('a')", "tar entry 'a'"."""
    if e.type not in ENTRY_TYPES:
        raise FormatError(f"{label} has unknown type {e.type!r}")
    for key, attr in _INT_FIELDS.items():
        v = getattr(e, attr)
        if not 0 <= v < _FIELD_LIMIT.get(key, _INT_LIMIT):
            raise FormatError(f"{label}: {key} is {'negative' if v < 0 else 'too large'} ({v})")
    _check_names(e, label)


def _check_names(e: TOCEntry, label: str) -> None:
    if e.type != "chunk":
        _check_name(e.name, label, "name")
    if e.type == "hardlink":
        if not e.link_name:
            raise FormatError(f"{label} is a hardlink without a linkName")
        _check_name(e.link_name, label, "hardlink target")


_SURROGATES = re.compile("[\ud800-\udfff]")


def _text(s: str) -> str:
    """`s` with lone surrogates (from \\udXXX escapes) replaced by U+FFFD, as Go decodes
    them: names must be printable and encodable."""
    return s if s.isascii() else _SURROGATES.sub("\ufffd", s)


class _Text:
    """The TOC JSON as text, decoded from UTF-8 pieces as the parser needs it; the text
    already parsed is dropped, so only the current entry's text is held."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self.pos = 0
        self.eof = False

    def more(self, want: int) -> None:
        """Hold at least `want` characters past `pos`, if the input has them."""
        parts = [self.buf[self.pos:]]
        have = len(parts[0])
        while have < want and not self.eof:
            piece = next(self._pieces, None)
            try:
                if piece is None:
                    self.eof = True
                    text = self._decoder.decode(b"", final=True)
                else:
                    text = self._decoder.decode(piece)
            except UnicodeDecodeError as exc:
                raise FormatError(f"TOC is not valid JSON: not UTF-8 ({exc.reason})") from None
            parts.append(text)
            have += len(text)
        self.buf = "".join(parts)
        self.pos = 0

    def peek(self) -> str:
        """The next character that is not JSON whitespace ("" at the end)."""
        while True:
            match = _WS.match(self.buf, self.pos)
            assert match is not None  # the pattern matches the empty string
            self.pos = match.end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return ""
            self.more(_STEP)

    def expect(self, chars: str, what: str) -> str:
        c = self.peek()
        if c == "" or c not in chars:
            found = repr(c) if c else "the end"
            raise FormatError(f"TOC is not valid JSON: expected {what}, found {found}")
        self.pos += 1
        return c

    def value(self, what: str) -> Any:
        """The JSON value at `pos` (after whitespace), decoded."""
        self.peek()
        want = _STEP
        while True:
            try:
                v, end = _SCAN(self.buf, self.pos)
            except (StopIteration, json.JSONDecodeError) as exc:
                # Incomplete, or malformed: only more text can tell.
                if self.eof:
                    why = exc.msg if isinstance(exc, json.JSONDecodeError) else "malformed"
                    raise FormatError(f"TOC is not valid JSON: {what}: {why}") from None
                if len(self.buf) - self.pos >= MAX_ENTRY_JSON:
                    raise FormatError(
                        f"TOC is not valid JSON, or {what} is larger than "
                        f"{MAX_ENTRY_JSON >> 20} MiB") from None
            except (ValueError, RecursionError) as exc:  # huge integers, deep nesting
                raise FormatError(f"TOC is not valid JSON: {what}: {exc}") from None
            else:
                if end < len(self.buf) or self.eof:  # a number may go on past the buffer
                    self.pos = end
                    return v
            want = max(want, len(self.buf) - self.pos) * 2
            self.more(want)


_WS = re.compile(r"[ \t\n\r]*")
# (text, index) -> (value, end); StopIteration if none. Set by JSONDecoder.__init__ (C
# scanner when available); typeshed does not declare it.
_SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # see above


def _pieces(data: bytes | Iterable[bytes]) -> Iterator[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        return (bytes(view[i:i + _STEP]) for i in range(0, len(view), _STEP))
    return iter(data)


def parse_toc(data: bytes | Iterable[bytes]) -> tuple[int, list[TOCEntry]]:
    """Parse and type-check TOC JSON (bytes, or an iterable of pieces, streamed); raise
    FormatError for anything malformed or beyond the memory limit."""
    t = _Text(_pieces(data))
    version: Any = 0
    entries: list[TOCEntry] = []
    if t.peek() != "{":
        if t.peek() == "":
            raise FormatError("TOC is not valid JSON: it is empty")
        raise FormatError("TOC JSON is not an object")
    t.pos += 1
    if t.peek() == "}":
        t.pos += 1
    else:
        while True:
            if t.peek() != '"':
                t.expect('"', "a key")
            key = t.value("a key")
            t.expect(":", "':'")
            if key == "entries" and t.peek() == "[":
                entries = _parse_entries(t)
            else:
                v = t.value(f"TOC field {key!r}")
                if key == "version":
                    version = v
                elif key == "entries":
                    if v is not None:
                        raise FormatError("TOC entries is not a list")
                    entries = []
            if t.expect(",}", "',' or '}'") == "}":
                break
    if t.peek() != "":
        raise FormatError("TOC is not valid JSON: data after the object")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FormatError("TOC version is not an integer")
    return version, entries


def _parse_entries(t: _Text) -> list[TOCEntry]:
    t.pos += 1  # "["
    entries: list[TOCEntry] = []
    if t.peek() == "]":
        t.pos += 1
        return entries
    memo: dict[str, str] = {}  # modtimes, owner names and types repeat: keep one copy
    cost = 0
    while True:
        try:
            raw = t.value("an entry")
        except FormatError as exc:
            raise FormatError(f"{exc} (TOC entry #{len(entries)})") from None
        e = _parse_entry(len(entries), raw, memo)
        cost += entry_cost(e)
        entries.append(e)
        if cost > TOC_MEMORY_LIMIT:
            raise FormatError(toc_too_large(cost, len(entries)))
        c = t.peek()
        t.pos += 1
        if c == "]":
            return entries
        if c != ",":
            raise FormatError(f"TOC is not valid JSON: expected ',' or ']' after entry "
                              f"#{len(entries) - 1}, found {repr(c) if c else 'the end'}")


_INTERNED = frozenset(("modtime", "uname", "gname"))


def _parse_entry(i: int, raw: Any, memo: dict[str, str]) -> TOCEntry:
    if not isinstance(raw, dict):
        raise FormatError(f"TOC entry #{i} is not an object")
    name = raw.get("name", "")
    typ = raw.get("type", "")
    if not isinstance(name, str) or not isinstance(typ, str):
        raise FormatError(f"TOC entry #{i}: name and type must be strings")
    name = _text(name)
    if typ not in ENTRY_TYPES:
        raise FormatError(f"TOC entry #{i} ({name!r}) has unknown type {typ!r}")
    e = TOCEntry(name=name, type=memo.setdefault(typ, typ))
    for key, v in raw.items():
        if v is None:
            continue
        attr = _INT_FIELDS.get(key)
        if attr is not None:
            if type(v) is not int or not 0 <= v < _FIELD_LIMIT.get(key, _INT_LIMIT):
                what = ("not an integer" if type(v) is not int
                        else f"negative ({v})" if v < 0 else f"too large ({v})")
                raise FormatError(f"TOC entry #{i} ({name!r}): {key} is {what}")
            setattr(e, attr, v)
            continue
        attr = _STR_FIELDS.get(key)
        if attr is not None:
            if not isinstance(v, str):
                raise FormatError(f"TOC entry #{i} ({name!r}): {key} is not a string")
            v = _text(v)
            if attr in _INTERNED:
                v = memo.setdefault(v, v)
            setattr(e, attr, v)
        elif key == "xattrs" and v:
            _parse_xattrs(e, v, f"TOC entry #{i} ({name!r})")
    if e.chunk_digest and e.chunk_digest == e.digest:
        e.chunk_digest = e.digest
    if e.type != "chunk" and not _plain_name(e.name) or e.type == "hardlink":
        _check_names(e, f"TOC entry #{i} ({name!r})")
    return e


def _plain_name(name: str) -> bool:
    """True when `name` certainly passes _check_name (the fast path)."""
    return not name.startswith("/") and ".." not in name and "\x00" not in name


def _parse_xattrs(e: TOCEntry, xattrs: Any, label: str) -> None:
    if not isinstance(xattrs, dict):
        raise FormatError(f"{label}: xattrs is not an object")
    for k, v in xattrs.items():
        if not isinstance(v, str):
            raise FormatError(f"{label}: xattr {k!r} is not base64 text")
        try:
            e.xattrs[_text(k)] = base64.b64decode(v, validate=True)
        except ValueError:
            raise FormatError(f"{label}: xattr {k!r} is not valid base64") from None
