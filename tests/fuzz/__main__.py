"""`python -m tests.fuzz [--long | --scale N] [--report FILE] [pytest options]`.

Runs every `cases_*.py` of the fuzz suite with pytest in this process; `--long` runs 20
times the cases of the default run (about 230,000), `--scale N` N times. `--report`
writes, at exit, how many cases ran and the peak RSS of this process (VmHWM, KiB).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

import tests.fuzz as fuzz


def _vmhwm_kib() -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    p.add_argument("--long", action="store_true", help="20x the cases of the default run")
    p.add_argument("--scale", type=int, help="N times the cases of the default run")
    p.add_argument("--report", help="write {examples, vmhwm_kib} as JSON here at the end")
    args, rest = p.parse_known_args()
    fuzz.SCALE = args.scale or (20 if args.long else 1)
    here = Path(__file__).resolve().parent
    cases = sorted(str(f) for f in here.glob("cases_*.py"))
    quiet = ["-W", "ignore::pytest.PytestAssertRewriteWarning", "-W", "ignore::DeprecationWarning"]
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-o", "timeout=0", *quiet, *cases, *rest])
    if args.report:
        Path(args.report).write_text(json.dumps({"examples": fuzz.RAN,
                                                 "vmhwm_kib": _vmhwm_kib()}))
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
