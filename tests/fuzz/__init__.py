"""Fuzz suite (hypothesis) over the footer, TOC, tar reader, blobs, convert, image JSON and
the registry bridge's request parsing.

The cases live in `cases_*.py` (not collected by a plain `pytest` run): `test_fuzz.py`
runs them all in one child (`python -m tests.fuzz`), which holds the whole run to the
targets of issue #17: no exception but peerstar's own errors (no traceback), no wrong
byte read back, nothing written outside the target, at least 10,000 generated cases,
and a peak RSS of at most 256 MiB over all of them. A longer run is
`python -m tests.fuzz --long` (20x the cases) or `--scale N`.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

SCALE = 1  # set by `python -m tests.fuzz --long/--scale` before the cases are imported
RAN = 0  # examples run so far (each case body calls `ran()`)


def ran() -> None:
    global RAN
    RAN += 1


def fuzz(examples: int) -> settings:
    """Hypothesis settings for a case: `examples` per default run, times SCALE."""
    return settings(max_examples=examples * SCALE, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
