"""Text from inputs made safe to print on a terminal, on one line.

Names, paths and messages can come from hostile input: a newline would split an
error into lines that look like our own output, escape sequences would drive the
terminal, bidirectional overrides would reorder what is shown, and lone surrogates
cannot be encoded at all. `printable` writes all of those as Python-style escapes.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _NAMED:
        return _NAMED[ch]
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def printable(text: str) -> str:
    """`text` with control characters, line and paragraph separators, bidirectional
    controls and lone surrogates escaped (`\\n`, `\\x1b`, `\\u202e`, `\\udcff`)."""
    return _UNSAFE.sub(_escape, text)
