"""Waiting in tests for something another process or thread does: `wait_until` polls a
condition until it holds or a timeout passes, and says which; the caller asserts on it,
with the message that explains a failure. `http_ok` is the condition "this server is up".
`stop_process` is the one way a test ends a process it started: signal, wait, kill;
`process_running` whether a pid is still a live process."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path


def wait_until(cond: Callable[[], object], timeout: float = 10.0,
               interval: float = 0.05) -> bool:
    """Poll `cond` every `interval` seconds until it is true or `timeout` seconds have
    passed; whether it became true (it is asked once more at the deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether GET `url` answers 200 right now (no connection, or another status: no)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM,
                 timeout: float = 15.0) -> None:
    """Send `sig` to `proc` if it still runs, wait up to `timeout` s, then SIGKILL it and
    reap it. A process that is already gone is fine."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def process_running(pid: int) -> bool:
    """`pid` exists and is no zombie (a daemon whose starter died is reparented to init,
    which in a container may never reap it: its /proc entry stays)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
