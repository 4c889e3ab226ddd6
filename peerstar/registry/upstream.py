"""Reads from the IPFS store with the registry's per-read timeout and retries.

Owns: `ReadPolicy` (timeout per read, retries per read), and `read_stream`, which
turns one logical byte range into chunks of the store's ranged read
(`peerstar.ipfs.ContentStore.cat`) while bounding every single read from the daemon: a
read that stalls longer than the timeout is abandoned and the range is re-requested
from the first byte not yet delivered, up to `retries` times in a row. Progress resets
the retry budget, so a long blob survives several independent hiccups, but a daemon
that stays stuck fails in at most (retries + 1) * timeout. Content the store does not
hold (`BlockNotFoundError`) is not retried: it is `ContentNotFound` at once.

Also owns the upstream log (`log_upstream`): one JSON line per IPFS operation of the
registry (range reads, warm-up and fan-out operations) on `peerstar.registry.upstream`,
at INFO when it took long enough to have needed the network, so a benchmark can count
the round trips a workload cost, else at DEBUG.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from peerstar.errors import PeerstarError
from peerstar.ipfs import BlockNotFoundError, ContentStore

log = logging.getLogger("peerstar.registry.upstream")


class UpstreamError(PeerstarError):
    """Reading from IPFS failed after the retries (`timed_out` tells timeout from error)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class ContentNotFound(UpstreamError):
    """The store does not hold (and cannot get) content the read needs: not retried."""


@dataclass(frozen=True)
class ReadPolicy:
    """Per-read timeout (seconds) and the number of retries of a failed/stalled read."""

    timeout: float = 30.0
    retries: int = 3


# Called on every failed attempt with ("timeout" | "error"); the server counts them.
OnFailure = Callable[[str], None]


def log_upstream(kind: str, cid: str, started: float, seconds: float, slow: float,
                 **fields: object) -> None:
    """Log one upstream operation of `kind` on `cid` that began at `started`
    (time.monotonic()) and took `seconds`: INFO when that is at least `slow` (a block the
    node did not hold: a local read answers in a few ms), else DEBUG. Costs one level
    check when that level is off."""
    level = logging.INFO if seconds >= slow else logging.DEBUG
    if not log.isEnabledFor(level):
        return
    wall = time.time() - (time.monotonic() - started)
    log.log(level, json.dumps({"upstream": kind, "cid": cid, "ts": round(wall, 3),
                               "ms": round(seconds * 1000, 1), **fields},
                              separators=(",", ":")))


async def _aclose(agen: AsyncIterator[bytes]) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose is None:
        return
    # Closing an abandoned HTTP stream is local work; bound it anyway so a wedged
    # store cannot wedge the request.
    with contextlib.suppress(Exception, asyncio.TimeoutError):
        async with asyncio.timeout(5):
            await aclose()


def read_stream(store: ContentStore, cid: str, offset: int, length: int,
                policy: ReadPolicy, *, on_failure: OnFailure | None = None,
                ) -> AsyncGenerator[bytes, None]:
    """Yield exactly `length` bytes of `cid` from `offset`, or raise UpstreamError.

    Never yields more than asked (a store returning extra bytes is cut), and a store
    ending early counts as a failed read (retried), so a caller can trust the total.
    """
    return _resumable(store, cid, offset, length, policy, on_failure, to_end=False)


async def _resumable(store: ContentStore, cid: str, offset: int, length: int,
                     policy: ReadPolicy, on_failure: OnFailure | None, *, to_end: bool,
                     ) -> AsyncGenerator[bytes, None]:
    """At most `length` bytes of `cid` from `offset`, every read bounded by the policy's
    timeout and a failed one resumed where it stopped. The content ending before `length`
    is a failure unless `to_end` (the caller does not know the size)."""
    sent = 0
    failures = 0
    while sent < length:
        agen = store.cat(cid, offset + sent, length - sent)
        iterator = agen.__aiter__()
        timed_out = False
        why = ""
        try:
            while sent < length:
                try:
                    async with asyncio.timeout(policy.timeout):
                        chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    if to_end:
                        return
                    why = f"stream ended after {sent} of {length} bytes"
                    break
                if not chunk:
                    continue
                if len(chunk) > length - sent:
                    chunk = chunk[: length - sent]
                failures = 0  # progress: the next stall gets the full retry budget
                sent += len(chunk)
                yield chunk
        except TimeoutError:
            timed_out = True
            why = f"no data for {policy.timeout:g} s"
        except asyncio.CancelledError:
            raise
        except BlockNotFoundError as exc:
            raise ContentNotFound(f"reading {cid} from IPFS: {exc}") from None
        except Exception as exc:  # the store's IPFSError, connection errors, ...
            why = f"{type(exc).__name__}: {exc}"
        finally:
            await _aclose(agen)
        if sent >= length:
            return
        failures += 1
        await _failed_read(policy, failures, cid, offset + sent, why, timed_out, on_failure)


async def _failed_read(policy: ReadPolicy, failures: int, cid: str, at: int, why: str,
                       timed_out: bool, on_failure: OnFailure | None) -> None:
    """After the `failures`-th failed read in a row of `cid` at byte `at`: count and log
    it, then raise UpstreamError once the retries are spent, else back off."""
    if on_failure is not None:
        on_failure("timeout" if timed_out else "error")
    log.warning("ipfs read of %s at %d failed (attempt %d of %d): %s", cid, at,
                failures, policy.retries + 1, why)
    if failures > policy.retries:
        raise UpstreamError(f"reading {cid} from IPFS failed at byte {at}: {why} "
                            f"({failures} attempts)", timed_out=timed_out)
    await asyncio.sleep(min(0.05 * 2 ** failures, 1.0))


async def read_all(store: ContentStore, cid: str, max_bytes: int, policy: ReadPolicy,
                   *, on_failure: OnFailure | None = None) -> bytes:
    """The whole content of a small object `cid` (at most `max_bytes` bytes are read)."""
    # The size is unknown up front: read to the end, resuming where a failed read stopped.
    stream = _resumable(store, cid, 0, max_bytes, policy, on_failure, to_end=True)
    async with contextlib.aclosing(stream):
        return b"".join([chunk async for chunk in stream])
