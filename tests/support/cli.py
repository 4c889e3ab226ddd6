"""The `peerstar` command as a user runs it, from the checkout under test.

Owns: `run_peerstar` (`python -m peerstar ...` with the checkout as working directory
and on PYTHONPATH, output captured), `last_line` (where a command prints its result,
e.g. a CID), `assert_one_line_error`, the check that a failure is reported as the CLI
promises: a non-zero exit, one `peerstar: error: ...` line on stderr, no traceback; and
`serving_registry`, `peerstar registry serve` running for the length of a `with`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.containerd import HarnessError
from tests.support.waiting import stop_process, wait_until

REPO = Path(__file__).resolve().parents[2]


def _env(env: Mapping[str, str] | None) -> dict[str, str]:
    return {**(os.environ if env is None else env), "PYTHONPATH": str(REPO)}


def run_peerstar(*args: str | os.PathLike[str], text: bool = True, timeout: float = 300.0,
                 env: Mapping[str, str] | None = None,
                 **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """`python -m peerstar ARGS` in `env` (default: this process's environment) with
    stdout and stderr captured, as UTF-8 text or, with `text=False`, bytes. Other
    `kwargs` (input, preexec_fn, cwd...) go to `subprocess.run`."""
    kwargs.setdefault("cwd", REPO)
    return subprocess.run(
        [sys.executable, "-m", "peerstar", *map(str, args)], capture_output=True,
        env=_env(env), encoding="utf-8" if text else None, timeout=timeout, **kwargs)


@contextmanager
def serving_registry(*args: str | os.PathLike[str], log: Path,
                     env: Mapping[str, str] | None = None, prefix: Sequence[str] = (),
                     timeout: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    """`peerstar registry serve ARGS` behind `prefix` (e.g. a node's `ip netns exec`),
    its stderr (the start line, then the access log) written to `log`; yielded once it
    says it is listening, and stopped on exit (SIGTERM, then SIGKILL)."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "peerstar", "registry", "serve", *map(str, args)],
            cwd=REPO, env=_env(env), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=err)

    def listening() -> bool:
        return "listening on" in log.read_text(errors="replace")

    try:
        if not wait_until(lambda: proc.poll() is not None or listening(), timeout) \
                or not listening():
            raise HarnessError(f"peerstar registry serve {' '.join(map(str, args))} did not "
                               f"start: {log.read_text(errors='replace')[-2000:]}")
        yield proc
    finally:
        stop_process(proc)


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The last non-empty line of stdout ("" if there is none)."""
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def assert_one_line_error(proc: subprocess.CompletedProcess[Any], *needles: str) -> str:
    """`proc` exited non-zero and wrote exactly one line to stderr, `peerstar: error: ...`
    holding every needle, and no traceback; that line."""
    err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    line = err.rstrip("\n")
    assert line.startswith("peerstar: error: "), err
    for needle in needles:
        assert needle in line, line
    return line
