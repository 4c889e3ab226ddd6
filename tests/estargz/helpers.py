"""Blob rewriters for the eStargz unit tests (independent of peerstar's writer): a blob with
a changed TOC, and a TOC member of given JSON. Tars come from `tests.support.tars`."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Callable

from peerstar.estargz.compression import parse_footer
from peerstar.estargz.footer import estargz_footer


def rewrite_toc(blob: bytes, mutate: Callable[[dict], None]) -> bytes:
    """A gzip eStargz blob whose TOC JSON was changed by `mutate` (for lying-TOC tests)."""
    footer = parse_footer(blob[-51:], len(blob))
    toc_member = blob[footer.toc_offset : len(blob) - 51]
    tar_bytes = gzip.decompress(toc_member)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        doc = json.loads(tf.extractfile("stargz.index.json").read())  # type: ignore[union-attr]
    mutate(doc)
    return blob[: footer.toc_offset] + toc_blob(json.dumps(doc).encode()) + estargz_footer(
        footer.toc_offset
    )


def toc_blob(toc_json: bytes) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo("stargz.index.json")
        ti.size = len(toc_json)
        tf.addfile(ti, io.BytesIO(toc_json))
    return gzip.compress(bio.getvalue())
