"""`peerstar demo`: the main job on the embedded default, with no daemon and no network.

Builds the sample image locally, converts it to eStargz, verifies every layer (TOC
digest, every chunk digest, DiffID against the config) and reads one file by range.
Then the whole flow: the image is pushed into the embedded IPFS store, served by
`peerstar registry serve` on loopback, mounted lazily with `peerstar mount`, and a file
is read, showing how few of the image's bytes were fetched.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

from peerstar.convert import ConvertOptions, convert
from peerstar.errors import PeerstarError
from peerstar.estargz import TOC_DIGEST_ANNOTATION, Reader
from peerstar.estargz.reader import compute_diff_id
from peerstar.localfile import RangeFile
from peerstar.oci.reference import parse_image_ref
from peerstar.source.sample import SAMPLE_TEXT_PATH, build_sample_image


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a sample image, convert it to eStargz, verify it")
    p.add_argument("--workdir", type=Path, help="where to write the images (default: a new "
                   "temporary directory)")
    p.add_argument("--extra-mib", type=int, default=8, help="MiB of extra files in the sample")
    p.add_argument("--no-mount", action="store_true",
                   help="stop after conversion (no push, registry or FUSE mount)")
    p.set_defaults(func=cmd_demo)


def _blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    return layout / "blobs" / algo / hexpart


def cmd_demo(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    if args.extra_mib < 0:
        raise PeerstarError("--extra-mib must not be negative")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="peerstar-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "sample"
    dst = work / "sample-estargz"
    for d in (src, dst):
        if d.exists() and any(d.iterdir()) and not (d / "oci-layout").exists():
            raise PeerstarError(f"{d} exists and is not an OCI layout: choose another --workdir")
    console.print(f"[bold]1.[/] building the sample image locally in {src}")
    sample = build_sample_image(src, extra_mib=args.extra_mib)
    console.print(f"[bold]2.[/] converting it to eStargz into {dst}")
    report = convert(parse_image_ref(f"oci:{src}:latest"), parse_image_ref(f"oci:{dst}:latest"),
                     ConvertOptions(compression="gzip"))
    manifest_desc = report.manifests[0]
    manifest = json.loads(_blob_path(dst, manifest_desc["digest"]).read_bytes())
    config = json.loads(_blob_path(dst, manifest["config"]["digest"]).read_bytes())
    console.print("[bold]3.[/] verifying every layer (TOC digest, chunk digests, DiffID)")
    table = Table(title=f"sample image {sample.manifest_digest[:19]}… → eStargz "
                  f"{manifest_desc['digest'][:19]}…")
    for col in ("layer", "source", "eStargz", "files", "chunks", "TOC digest", "verified"):
        table.add_column(col, justify="right" if col in ("source", "eStargz", "files",
                                                         "chunks") else "left")
    total = 0
    for i, (layer, diff_id) in enumerate(zip(manifest["layers"], config["rootfs"]["diff_ids"],
                                             strict=True)):
        toc_digest = layer["annotations"][TOC_DIGEST_ANNOTATION]
        with RangeFile(_blob_path(dst, layer["digest"])) as f:
            r = Reader.open(f.read_at, f.size, toc_digest=toc_digest)
            r.verify_all()
            got, _ = compute_diff_id(f.read_at, f.size, r.codec)
            if got != diff_id:
                raise PeerstarError(f"layer {i}: DiffID {got} differs from the config's {diff_id}")
        total += layer["size"]
        table.add_row(
            str(i), f"{sample.layers[i].size:,}", f"{layer['size']:,}",
            str(sum(1 for e in r.entries if e.type == "reg")),
            str(sum(1 for e in r.entries if e.is_data and e.chunk_size)),
            toc_digest[:19] + "…", "[green]ok[/]",
        )
    console.print(table)

    # A lazy reader needs the footer, the TOC and the chunk holding the file.
    top = manifest["layers"][-1]
    fetched = 0
    with RangeFile(_blob_path(dst, top["digest"])) as f:

        def counting_read_at(off: int, n: int) -> bytes:
            nonlocal fetched
            fetched += n
            return f.read_at(off, n)

        r = Reader.open(counting_read_at, f.size,
                        toc_digest=top["annotations"][TOC_DIGEST_ANNOTATION])
        text = r.read(SAMPLE_TEXT_PATH)
    console.print(f"[bold]4.[/] read {SAMPLE_TEXT_PATH} by range: {text.decode().strip()!r}")
    console.print(f"   fetched {fetched:,} bytes of the {top['size']:,}-byte layer "
                  f"({100 * fetched / top['size']:.2f}%); image layers total {total:,} bytes")
    console.print(f"   eStargz image in oci:{dst}:latest")
    if args.no_mount:
        return 0
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        console.print("[yellow]skipping the lazy mount[/]: it needs root and /dev/fuse")
        return 0
    _lazy_flow(console, work, dst)
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lazy_flow(console: Console, work: Path, layout: Path) -> None:
    # Imported here: the FUSE and HTTP stacks are only needed for this part.
    from peerstar.ipfsimage.push import push
    from peerstar.lazyfs.image import image_stats, mount_image, unmount_image
    from peerstar.lazyfs.options import MountOptions, PrefetchOptions

    store = work / "ipfs"
    console.print(f"[bold]5.[/] pushing the eStargz image into the embedded IPFS store {store}")
    cid = push(f"oci:{layout}:latest", root=store).cid
    console.print(f"   image CID: [bold]{cid}[/]")
    port = _free_port()
    log = open(work / "registry.log", "wb")  # noqa: SIM115 - closed in the finally below
    server = subprocess.Popen(
        [sys.executable, "-m", "peerstar", "registry", "serve", "--root", str(store),
         "--listen", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    target = work / "rootfs"
    target.mkdir(exist_ok=True)
    mounted = False
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise PeerstarError(
                        f"the registry did not start; see {work / 'registry.log'}") from None
                time.sleep(0.1)
        ref = f"127.0.0.1:{port}/ipfs/{cid}"
        console.print(f"[bold]6.[/] registry serving {ref}; mounting it lazily at {target}")
        mount_image(ref, target, work_root=work / "mnt", cache_dir=work / "cache",
                    options=MountOptions(prefetch=PrefetchOptions(background=False)))
        mounted = True
        text = (target / SAMPLE_TEXT_PATH.lstrip("/")).read_bytes()
        stats = image_stats(target, work / "mnt")
        console.print(f"[bold]7.[/] read {SAMPLE_TEXT_PATH} through FUSE: "
                      f"{text.decode().strip()!r}")
        fetched, size = int(str(stats["fetchedSize"])), int(str(stats["size"]))
        note = " (the rest came from the cache of an earlier run)" if fetched == 0 else ""
        console.print(f"   fetched {fetched:,} bytes of the image's {size:,} "
                      f"({100 * fetched / max(size, 1):.2f}%) from the registry{note}")
    finally:
        if mounted:
            unmount_image(target, work / "mnt")
        server.terminate()
        server.wait(10)
        log.close()
    console.print("[bold green]done[/]")
