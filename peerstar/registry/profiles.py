"""What a container start reads from each layer, learned on one node for every other:
the recording window, the profile format, and what a profile heard may claim. Pure: no
I/O, the caller passes the clock.

Why: on a node that has never seen an image, the run phase of a lazy start is a chain of
dependent reads (the loader opens one file after another, then the interpreter its
modules), each a round trip to another node. The first node that starts an image knows
which ranges those were; every other node's bridge can bring them into its IPFS daemon
while the image is being pulled (`warmup.WarmUp`), as for a prioritized image, without
anyone listing files at build time.

- Recording (`Recorder`): for each layer of an image manifest this bridge served
  (`expect`), the ranges a container asked for -- `Peerstar-Read-Kind` `on_demand` or
  `readahead`, or no header (another lazy client, e.g. the Go snapshotter) -- from the
  blob's first such read for `LearnOptions.window` seconds; merged, and capped
  (`max_ranges`, `max_bytes`: a range that would pass a cap is not recorded). `take`
  gives a blob's ranges once per process.
- Format (`encode` / `decode`): `<start hex>+<length hex>` joined by `,`, inline in one
  pubsub message of the directory (`directory.PROFILE_PREFIX` + layer digest -> that
  text): no block to add, pin or fetch, no extra round trip for the reader. A profile
  with more ranges than fit in `MAX_TEXT` characters is coalesced (the ranges separated
  by the smallest gaps merged first), so it covers a little more, never less.
- Trust: a profile is a hint. `decode` never raises: text that does not parse is
  dropped whole, ranges are clipped to the blob's size, merged, and cut at the caps; the
  warm-up only asks the node's own daemon for leaves of the blob's own DAG, and the
  snapshotter still verifies every chunk it reads.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

# [start, end) of a blob
Range = tuple[int, int]

# The read kinds (`Peerstar-Read-Kind`; "" = no header) that a container start waits for.
LEARNED_KINDS = frozenset({"on_demand", "readahead", ""})
# Characters of an encoded profile: with the record's other fields and the sender's
# addresses it stays within the directory's 4 KiB message bound.
MAX_TEXT = 2800
_MAX_BLOBS = 4096  # layers expected or recorded at once
_TOKEN = re.compile(r"\A([0-9a-f]{1,16})\+([0-9a-f]{1,16})\Z")


@dataclass(frozen=True)
class LearnOptions:
    """Tunables of learning (`ServerOptions.learn`; None there turns it off)."""

    # How long after a blob's first container read its reads are recorded (seconds).
    window: float = 20.0
    # How long the warm-up waits for another node to answer for a layer's profile; it
    # runs beside the layer's footer and TOC, never before the manifest (seconds).
    lookup_timeout: float = 0.5
    max_ranges: int = 256
    max_bytes: int = 64 << 20


def merge(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, empty ones dropped, overlapping or touching ones merged."""
    out: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def total(ranges: Iterable[Range]) -> int:
    return sum(end - start for start, end in ranges)


def coalesce(ranges: list[Range], count: int) -> list[Range]:
    """Merged `ranges` cut down to at most `count` (>= 1) by joining the neighbours
    separated by the smallest gaps first: the cover only grows."""
    out = merge(ranges)
    count = max(1, count)
    if len(out) <= count:
        return out
    # the len(out) - count smallest gaps are closed; ties: the earlier gap first
    gaps = sorted(range(1, len(out)), key=lambda i: (out[i][0] - out[i - 1][1], i))
    closed = set(gaps[:len(out) - count])
    joined: list[Range] = [out[0]]
    for i in range(1, len(out)):
        if i in closed:
            joined[-1] = (joined[-1][0], out[i][1])
        else:
            joined.append(out[i])
    return joined


def encode(ranges: list[Range], max_text: int = MAX_TEXT) -> str:
    """The profile's text: merged ranges, coalesced until the text fits `max_text`."""
    out = merge(ranges)
    while True:
        text = ",".join(f"{s:x}+{e - s:x}" for s, e in out)
        if len(text) <= max_text or len(out) <= 1:
            return text
        out = coalesce(out, len(out) * 3 // 4)


def decode(text: object, size: int, options: LearnOptions) -> list[Range]:
    """The ranges a profile heard may warm in a blob of `size` bytes: [] for text that
    does not parse; otherwise clipped to the blob, merged, the first `max_ranges` and
    at most `max_bytes` of them. Never raises."""
    if not isinstance(text, str) or not text or len(text) > MAX_TEXT or size <= 0:
        return []
    ranges: list[Range] = []
    for token in text.split(","):
        m = _TOKEN.match(token)
        if m is None:
            return []
        start, length = int(m.group(1), 16), int(m.group(2), 16)
        ranges.append((min(start, size), min(start + length, size)))
    out: list[Range] = []
    budget = options.max_bytes
    for start, end in merge(ranges)[:max(0, options.max_ranges)]:
        if budget <= 0:
            break
        end = min(end, start + budget)
        out.append((start, end))
        budget -= end - start
    return out


@dataclass
class _Recording:
    started: float
    size: int
    ranges: list[Range] = field(default_factory=list)


class Recorder:
    """The ranges containers read from the layers of the images this bridge served."""

    def __init__(self, options: LearnOptions) -> None:
        self.options = options
        self._expected: OrderedDict[str, int] = OrderedDict()  # layer digest -> size
        self._recording: OrderedDict[str, _Recording] = OrderedDict()
        self._taken: OrderedDict[str, None] = OrderedDict()

    def expect(self, digest: str, size: int) -> None:
        """`digest` (`size` bytes) is a layer of an image manifest this bridge served."""
        if digest in self._taken or digest in self._recording:
            return
        self._expected[digest] = size
        self._expected.move_to_end(digest)
        while len(self._expected) > _MAX_BLOBS:
            self._expected.popitem(last=False)

    def add(self, digest: str, ranges: Iterable[Range], now: float) -> bool:
        """A container read `ranges` of blob `digest` at `now`: recorded if the blob is
        an expected layer within its window and the caps allow. True when this read
        opened the blob's window: the caller `take`s it `window` seconds later."""
        rec = self._recording.get(digest)
        opened = False
        if rec is None:
            size = self._expected.pop(digest, None)
            if size is None:
                return False
            rec = self._recording[digest] = _Recording(now, size)
            while len(self._recording) > _MAX_BLOBS:
                self._recording.popitem(last=False)
            opened = True
        if now - rec.started > self.options.window:
            return opened
        for start, end in ranges:
            candidate = merge([*rec.ranges, (max(0, start), min(end, rec.size))])
            if (len(candidate) <= self.options.max_ranges
                    and total(candidate) <= self.options.max_bytes):
                rec.ranges = candidate
        return opened

    def take(self, digest: str) -> tuple[list[Range], int]:
        """(the blob's recorded ranges, its size), once; ([], 0) afterwards."""
        rec = self._recording.pop(digest, None)
        if rec is None:
            return [], 0
        self._taken[digest] = None
        while len(self._taken) > _MAX_BLOBS:
            self._taken.popitem(last=False)
        return rec.ranges, rec.size
