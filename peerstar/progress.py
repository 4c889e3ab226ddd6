"""Progress reporting: the one interface long image work reports to.

Converting a layer (`peerstar.convert`), pushing a blob into IPFS and pulling one back
(`peerstar.ipfsimage`) each report `started`, `advanced` and `finished` events for a key
naming that piece of work in the run. Events may come from the event loop or from worker
threads. The CLI's displays (`peerstar.cli.progress`) implement it.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives per-blob progress events."""

    def started(self, key: str, label: str, size: int | None) -> None:
        """Work on `key` began; `label` names it for a person; `size` is the number of
        bytes the `advanced` calls will add up to, None when unknown up front (a
        conversion reports decompressed file bytes)."""

    def advanced(self, key: str, nbytes: int) -> None:
        """`nbytes` more bytes of `key` are done."""

    def finished(self, key: str, label: str | None = None) -> None:
        """Work on `key` ended well; `label`, when given, says how (e.g. "layer ... kept")."""


class NoProgress:
    """A `Progress` that ignores every event."""

    def started(self, key: str, label: str, size: int | None) -> None:
        pass

    def advanced(self, key: str, nbytes: int) -> None:
        pass

    def finished(self, key: str, label: str | None = None) -> None:
        pass
