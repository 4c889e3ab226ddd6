"""The fuzz suite's run in CI: every case file, in one child, held to issue #17's targets.

The child (`python -m tests.fuzz`) runs the hypothesis cases and reports how many ran
and its peak RSS: at least 10,000 generated cases, no failure (no traceback, no wrong
byte, nothing written outside the target) and at most 256 MiB over all of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_fuzz_suite(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", "--report", str(report), "-x"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    result = json.loads(report.read_text())
    assert result["examples"] >= 10_000, result
    assert result["vmhwm_kib"] <= 256 << 10, result
