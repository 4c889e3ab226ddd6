"""Generators of hostile values for the fuzz cases, driven by a seed.

Hypothesis draws one seed per case (`seeds`) and the case is built from it with
`random.Random`: drawing a structured case value by value through hypothesis costs
tens of milliseconds here, a seed about one, and a failing seed reproduces its case
exactly. The pools below hold what an attacker writes: controls, NUL, separators,
bidi controls, lone surrogates, surrogate escapes of raw bytes, non-BMP characters,
numbers at every boundary, JSON of the wrong type.
"""

from __future__ import annotations

import random

from hypothesis import strategies as st

seeds = st.integers(0, 2**64 - 1)

CHARS = list("ab./ -\n\r\t\x00\x1b\x7f\x85é\u2028\u202e\ufeff\ud800\udcff\U0001f600")
NAME_PARTS = ["a", "b", "d", ".", "..", "", "x y", "\n", "é", "\udcff", "stargz.index.json",
              ".prefetch.landmark", ".no.prefetch.landmark", ".wh..wh..opq"]
ODD_NAMES = ["", ".", "./", "/", "//", "a/", "/etc/passwd", "a\x00b", "d" * 300,
             "/".join(["d"] * 300), "../x", "a/../../b"]
SPECIAL_INTS = [0, 1, -1, 511, 512, 513, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64,
                -(2**63), 10**30, -(10**30)]
ODD_JSON = [None, True, False, 1.5, -0.0, "7", "", [], {}, [[[]]], {"a": {"b": [1, "x"]}},
            10**400]


def text(rnd: random.Random, most: int = 10) -> str:
    return "".join(rnd.choice(CHARS) for _ in range(rnd.randrange(most + 1)))


def name(rnd: random.Random) -> str:
    k = rnd.random()
    if k < 0.6:
        return "/".join(rnd.choice(NAME_PARTS) for _ in range(rnd.randrange(5)))
    if k < 0.8:
        return rnd.choice(ODD_NAMES)
    return text(rnd)


def integer(rnd: random.Random) -> int:
    k = rnd.random()
    if k < 0.7:
        return rnd.randrange(-5, 70_000)
    if k < 0.9:
        return rnd.choice(SPECIAL_INTS)
    return rnd.getrandbits(rnd.randrange(1, 200)) * rnd.choice([1, -1])


def json_value(rnd: random.Random, depth: int = 2) -> object:
    k = rnd.random()
    if depth > 0 and k < 0.15:
        return [json_value(rnd, depth - 1) for _ in range(rnd.randrange(4))]
    if depth > 0 and k < 0.3:
        return {text(rnd): json_value(rnd, depth - 1) for _ in range(rnd.randrange(4))}
    if k < 0.5:
        return integer(rnd)
    if k < 0.7:
        return text(rnd)
    return rnd.choice(ODD_JSON)


def maybe(rnd: random.Random, value: object, odd: float = 0.1) -> object:
    """`value`, or (with probability `odd`) a JSON value of another type."""
    return rnd.choice(ODD_JSON) if rnd.random() < odd else value


def mutate(rnd: random.Random, data: bytes, edits: int = 4) -> bytes:
    """`data` with a few random replacements, insertions, deletions or a truncation."""
    for _ in range(rnd.randrange(1, edits + 1)):
        at = rnd.randrange(len(data) + 1)
        k = rnd.random()
        if k < 0.4 and data:
            at = min(at, len(data) - 1)
            data = data[:at] + bytes([rnd.randrange(256)]) + data[at + 1:]
        elif k < 0.7:
            data = data[:at] + rnd.randbytes(rnd.randrange(1, 8)) + data[at:]
        elif k < 0.9:
            data = data[:at] + data[at + rnd.randrange(1, 16):]
        else:
            data = data[:at]
    return data
