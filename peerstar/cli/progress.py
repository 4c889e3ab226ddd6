"""Progress display shared by the commands: thread-safe rich bars on stderr (a
`peerstar.progress.Progress`), and sizes in human units."""

from __future__ import annotations

import threading
from typing import Any


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Bars:
    """One rich bar per key on stderr (implements `peerstar.progress.Progress`); events may
    come from worker threads."""

    def __init__(self, *, speed: bool = False) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        columns: list[Any] = [TextColumn("{task.description}"), BarColumn(),
                              DownloadColumn(binary_units=True)]
        if speed:
            columns.append(TransferSpeedColumn())
        columns.append(TimeElapsedColumn())
        self._progress = Progress(*columns, console=Console(stderr=True))
        self._tasks: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._progress.start()

    def started(self, key: str, label: str, size: int | None) -> None:
        """`size` None: an indeterminate bar showing the bytes done."""
        with self._lock:
            self._tasks[key] = self._progress.add_task(label, total=size)

    def advanced(self, key: str, nbytes: int) -> None:
        with self._lock:
            task = self._tasks.get(key)
            if task is not None:
                self._progress.advance(task, nbytes)

    def finished(self, key: str, label: str | None = None) -> None:
        """Fill the bar at what was done, relabelled with `label` if given."""
        with self._lock:
            task = self._tasks.get(key)
            if task is not None:
                done = self._progress.tasks[task].completed
                if label is None:
                    self._progress.update(task, total=done, completed=done)
                else:
                    self._progress.update(task, total=done, completed=done, description=label)

    def close(self) -> None:
        self._progress.stop()
