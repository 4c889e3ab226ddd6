"""The mount daemon: one process serving one lazy layer over FUSE until it is unmounted.

Run as `python -m peerstar.lazyfs.mountd --url URL --digest D --toc-digest T
--mountpoint DIR --cache-dir DIR [options]` (see `--help`; the options are a
`peerstar.lazyfs.options.MountOptions`, written by its `to_argv`; registry credentials
come in the environment, `peerstar.lazyfs.state.auth_from_env`), or forked from the zygote
(`peerstar.lazyfs.zygote`, which calls `main` with the same arguments). It opens the layer (footer,
TOC, TOC digest check), mounts it (pyfuse3 keeps one session per process, hence one
process per layer), starts prefetching the prioritized files (reads of them wait for it
for at most `--prefetch-timeout` seconds; with `--wait-prefetch` so does readiness),
reports readiness as one JSON line on `--ready-fd` (with the blob's size, which its starter
keeps so that a later mount of the layer needs no request when every byte it reads is
cached: a node starting without the network) and serves until
`umount DIR` (clean exit 0) or SIGTERM/SIGINT (unmounts itself). It runs in its own
session, so the process that started it (the snapshotter, `peerstar mount`) may exit or
restart without taking the mount down; with `--cgroup ROOT/NAME` it first moves itself
into that cgroup (`peerstar.lazyfs.cgroup`), so that neither does killing the starter's
cgroup (a pod's container). While it runs it keeps `<state>.json` (pid,
mountpoint, layer), `<state>.stats.json` (fetched bytes, percent) and `<state>.prom`
(Prometheus text format) up to date under `<cache-dir>/mounts/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pyfuse3
import trio

from peerstar.lazyfs import metrics
from peerstar.lazyfs.cache import DiskCache
from peerstar.lazyfs.fetcher import BlobFetcher
from peerstar.lazyfs.fs import LayerFS
from peerstar.lazyfs.layer import LazyLayer
from peerstar.lazyfs.options import MountOptions
from peerstar.lazyfs.state import (
    PASSWORD_ENV,
    USERNAME_ENV,
    auth_from_env,
    state_paths,
    write_json_atomic,
)

log = logging.getLogger("peerstar.lazyfs.mountd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m peerstar.lazyfs.mountd",
                                description="Serve one eStargz layer lazily over FUSE.")
    p.add_argument("--url", required=True, help="blob URL (http(s)://HOST/v2/REPO/blobs/D)")
    p.add_argument("--digest", required=True, help="the layer blob digest")
    p.add_argument("--toc-digest", default="", help="expected TOC digest (annotation)")
    p.add_argument("--mountpoint", required=True, type=Path)
    p.add_argument("--cache-dir", required=True, type=Path)
    p.add_argument("--size", type=int, default=None, help="blob size if known (skips a request)")
    MountOptions.add_arguments(p)
    p.add_argument("--username", default=None, help=f"registry user (or ${USERNAME_ENV}; "
                   f"password in ${PASSWORD_ENV})")
    p.add_argument("--ready-fd", type=int, default=-1)
    return p


def _report(fd: int, msg: dict[str, object]) -> None:
    if fd < 0:
        print(json.dumps(msg), flush=True)
        return
    try:
        os.write(fd, (json.dumps(msg) + "\n").encode())
    except OSError:
        pass  # the starter went away; the mount itself is still good
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = MountOptions.from_args(args)
    logging.basicConfig(level=logging.DEBUG if opts.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)  # forked from a zygote: its handlers are not ours
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    t0 = time.monotonic()
    mountpoint = args.mountpoint.resolve()
    paths = state_paths(args.cache_dir, mountpoint)
    label = args.digest[:19]
    try:
        if opts.cgroup:  # first: out of the starter's cgroup before the mount exists
            from peerstar.lazyfs.cgroup import enter_cgroup

            enter_cgroup(opts.cgroup)
        regions = DiskCache(args.cache_dir / "regions", opts.cache.region_bytes,
                            async_writes=True, layer=label)
        chunks = DiskCache(args.cache_dir / "chunks", opts.cache.chunk_bytes,
                           async_writes=True, layer=label)
        auth = auth_from_env(args.username)  # credentials come in the environment
        fetcher = BlobFetcher(args.url, digest=args.digest, size=args.size,
                              region_size=opts.fetch.region_size, cache=regions,
                              timeout=opts.fetch.request_timeout,
                              retries=opts.fetch.retries, ca_file=opts.fetch.ca_file,
                              auth=auth)
        layer = LazyLayer.open(fetcher, toc_digest=args.toc_digest or None,
                               chunk_cache=chunks, verify=opts.verify)
        layer.activity_file = Path(args.cache_dir) / "last-on-demand-read"
        # Prefetch starts now and runs on after the mount is reported ready: its fetch
        # overlaps building the inode tree, the FUSE init and the mounts of the image's
        # other layers (containerd prepares them one by one). Reads of prioritized files
        # wait for it, up to the prefetch timeout; it only fills the caches.
        layer.plan_prefetch(opts.prefetch.size)
        threading.Thread(target=layer.prefetch, args=(opts.prefetch.size,),
                         daemon=True, name="prefetch").start()
        fs = LayerFS(layer, prefetch_deadline=t0 + opts.prefetch.timeout)
        options = set(pyfuse3.default_options)  # default_permissions: kernel checks modes
        options |= {"ro", "allow_other", "fsname=peerstar-lazyfs", "subtype=peerstar"}
        pyfuse3.init(fs, str(mountpoint), options)
    except Exception as exc:  # every failure is reported to the starter, then exit 1
        log.error("cannot mount %s at %s: %s", args.digest, mountpoint, exc)
        _report(args.ready_fd, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    write_json_atomic(paths.state, {
        "pid": os.getpid(), "mountpoint": str(mountpoint), "digest": args.digest,
        "url": args.url, "toc_digest": args.toc_digest, "size": fetcher.size,
        "started": time.time(),
    })
    terminated = False
    stats_failing = False

    def write_stats() -> None:
        nonlocal stats_failing
        try:
            write_json_atomic(paths.stats, layer.stats())
            metrics.write_textfile(paths.prom)
        except OSError as exc:
            if not stats_failing:  # every 2 s: one line, not one per try
                log.warning("cannot write stats: %s", exc)
            stats_failing = True
        else:
            stats_failing = False

    async def serve() -> None:
        nonlocal terminated
        async with trio.open_nursery() as nursery:
            async def fuse_main() -> None:
                await pyfuse3.main()
                nursery.cancel_scope.cancel()  # unmounted: stop the helpers too

            async def on_signal() -> None:
                nonlocal terminated
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for signum in sigs:
                        log.info("signal %d: unmounting", signum)
                        terminated = True
                        pyfuse3.terminate()
                        return

            async def stats_loop() -> None:
                while True:
                    await trio.to_thread.run_sync(write_stats)
                    await trio.sleep(2)

            nursery.start_soon(fuse_main)
            nursery.start_soon(on_signal)
            if opts.prefetch.wait:
                with trio.move_on_after(max(0.0, t0 + opts.prefetch.timeout
                                            - time.monotonic())):
                    while not layer.prefetch_done.is_set():
                        await trio.sleep(0.01)
            elapsed = time.monotonic() - t0
            metrics.MOUNT_SECONDS.labels(label).observe(elapsed)
            _report(args.ready_fd, {"ok": True, "pid": os.getpid(),
                                    "size": fetcher.size,
                                    "mount_seconds": round(elapsed, 3),
                                    "prefetch_done": layer.prefetch_done.is_set()})
            log.info("layer %s mounted at %s in %.3fs", args.digest, mountpoint, elapsed)
            if opts.prefetch.background:
                layer.start_background(opts.prefetch.background_idle)
            nursery.start_soon(stats_loop)

    try:
        trio.run(serve)
    finally:
        layer.stop()
        pyfuse3.close(unmount=terminated)
        regions.flush()  # what was fetched stays useful for the next mount
        chunks.flush()
        # After `umount -l` a new daemon may already serve this mountpoint: its state
        # files are not ours to overwrite or remove.
        if _state_is_mine(paths.state):
            write_stats()
            paths.state.unlink(missing_ok=True)
        fetcher.close()
    log.info("layer %s at %s: unmounted", args.digest, mountpoint)
    return 0


def _state_is_mine(path: Path) -> bool:
    try:
        return int(json.loads(path.read_text()).get("pid", -1)) == os.getpid()
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    sys.exit(main())

