"""containerd's filter syntax, as far as snapshot listing needs it.

Owns: parsing `List` filters and matching snapshots against them. A filter string is
selectors joined by `,` (all must hold); several filter strings are alternatives (any may
hold); no filter matches everything. A selector is a field path, optionally followed by
an operator and a value: `name==k`, `parent!=""`, `labels."containerd.io/snapshot.ref"
==sha256:...`, `kind~=^act`, or a bare `labels.foo` (present and non-empty). Field path
components and values may be double-quoted with Go escapes. The fields are containerd's
snapshot adaptor's: `name`, `parent`, `kind` (`active`, `view`, `committed`), `labels.K`.

containerd's metadata layer sends `labels."containerd.io/snapshot.ref"==REF,parent==P`
after a remote Prepare answered ALREADY_EXISTS; it re-checks what we return, but an exact
answer keeps the listing small.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from peerstar.snapshotter.errors import InvalidArgument
from peerstar.snapshotter.metadata import Kind, Snapshot

_OPS = ("==", "!=", "~=")
_BARE = re.compile(r"[A-Za-z0-9_\-/@+:]+")


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str  # "" = presence
    value: str


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, why: str) -> InvalidArgument:
        return InvalidArgument(f"invalid filter {self.text!r} at {self.pos}: {why}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def quoted(self) -> str:
        # A Go-style double-quoted string; JSON's escapes are a superset we accept.
        end = self.pos + 1
        while end < len(self.text):
            if self.text[end] == "\\":
                end += 2
                continue
            if self.text[end] == '"':
                break
            end += 1
        else:
            raise self.error("unterminated quoted string")
        raw = self.text[self.pos:end + 1]
        self.pos = end + 1
        try:
            return json.loads(raw)
        except ValueError:
            raise self.error(f"bad quoted string {raw}") from None

    def field(self) -> str:
        if self.peek('"'):
            return self.quoted()
        m = _BARE.match(self.text, self.pos)
        if not m or not m.group():
            raise self.error("expected a field name")
        self.pos = m.end()
        return m.group()

    def value(self) -> str:
        self.skip_ws()
        if self.peek('"'):
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ", \t":
            self.pos += 1
        return self.text[start:self.pos]


def parse_filter(text: str) -> list[Selector]:
    """The selectors of one filter string (all must match)."""
    sc = _Scanner(text)
    selectors: list[Selector] = []
    while True:
        sc.skip_ws()
        path = [sc.field()]
        while sc.peek("."):
            sc.pos += 1
            path.append(sc.field())
        sc.skip_ws()
        op = next((o for o in _OPS if sc.peek(o)), "")
        value = ""
        if op:
            sc.pos += len(op)
            value = sc.value()
            if op == "~=":
                try:
                    re.compile(value)
                except re.error as exc:
                    raise sc.error(f"bad regular expression: {exc}") from None
        selectors.append(Selector(tuple(path), op, value))
        sc.skip_ws()
        if sc.pos >= len(text):
            return selectors
        if not sc.peek(","):
            raise sc.error("expected ',' between selectors")
        sc.pos += 1


def _field(snap: Snapshot, path: tuple[str, ...]) -> str | None:
    head = path[0]
    if head == "labels":
        if len(path) == 1:
            return None
        return snap.labels.get(".".join(path[1:]))
    if len(path) != 1:
        return None
    if head == "name":
        return snap.key
    if head == "parent":
        return snap.parent
    if head == "kind":
        return {Kind.ACTIVE: "active", Kind.VIEW: "view",
                Kind.COMMITTED: "committed"}.get(snap.kind, "unknown")
    return None


def _matches(snap: Snapshot, sel: Selector) -> bool:
    value = _field(snap, sel.path)
    if sel.op == "":
        return bool(value)
    if sel.op == "==":
        return value is not None and value == sel.value
    if sel.op == "!=":
        return value != sel.value
    return value is not None and re.search(sel.value, value) is not None


def compile_filters(filters: Sequence[str]) -> Callable[[Snapshot], bool]:
    """A predicate: true when any filter string matches (or when there is none)."""
    parsed = [parse_filter(f) for f in filters if f.strip()]
    if not parsed:
        return lambda _snap: True
    return lambda snap: any(all(_matches(snap, s) for s in sels) for sels in parsed)
