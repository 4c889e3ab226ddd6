"""`peerstar demo`: the main job on the embedded default, with no daemon and no network.

Builds the sample image locally, converts it to eStargz, verifies every layer (TOC
digest, every chunk digest, DiffID against the config) and reads one file by range,
showing how few of the blob's bytes a lazy reader needs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from peerstar.errors import PeerstarError
from peerstar.estargz import TOC_DIGEST_ANNOTATION, Reader
from peerstar.estargz.reader import compute_diff_id
from peerstar.localfile import RangeFile
from peerstar.oci.convert import ConvertOptions, convert
from peerstar.oci.reference import parse_image_ref
from peerstar.sample import SAMPLE_TEXT_PATH, build_sample_image


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a sample image, convert it to eStargz, verify it")
    p.add_argument("--workdir", type=Path, help="where to write the images (default: a new "
                   "temporary directory)")
    p.add_argument("--extra-mib", type=int, default=8, help="MiB of extra files in the sample")
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
            got, _ = compute_diff_id(f.read_at, f.size, r.compression)
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
    console.print(f"[bold green]done[/]: eStargz image in oci:{dst}:latest")
    return 0
