"""Image JSON: index, manifests, configs and docker-archive manifest.json, random and
mutated, through the model's checks and through `convert` of whole images.

Nothing but peerstar's errors may escape; a refused conversion leaves no destination;
an accepted one writes layers that verify.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given

from peerstar.convert import convert
from peerstar.errors import PeerstarError
from peerstar.estargz import Reader
from peerstar.oci.model import (
    check_descriptor,
    index_children,
    kind_of,
    manifest_children,
    parse_document,
)
from peerstar.oci.reference import parse_image_ref
from tests.estargz.hostile import member, sha, tar
from tests.fuzz import fuzz, ran
from tests.fuzz.strategies import integer, json_value, mutate, seeds, text
from tests.oci.conftest import OCI_CONFIG, OCI_GZIP, OCI_INDEX, OCI_MANIFEST, TOC_ANN
from tests.support.content import compact_json as dumps

LAYER = tar(member("etc/", typeflag=b"5", mode=0o755), member("etc/hello", b"hi\n"))
MEDIA_TYPES = [OCI_INDEX, OCI_MANIFEST, OCI_CONFIG, OCI_GZIP,
               "application/vnd.docker.distribution.manifest.v2+json",
               "application/vnd.docker.distribution.manifest.v1+prettyjws",
               "application/vnd.oci.image.layer.v1.tar", "text/plain", ""]
DIGESTS = [sha(LAYER), "sha256:" + "0" * 64, "sha256:xyz", "sha512:" + "a" * 128, "md5:00"]


def _change(rnd: random.Random, doc: Any) -> Any:
    """`doc` with one value somewhere replaced by a random JSON value or a near miss."""
    if isinstance(doc, dict) and doc and rnd.random() < 0.8:
        key = rnd.choice(sorted(doc))
        doc = dict(doc)
        doc[key] = _change(rnd, doc[key])
        return doc
    if isinstance(doc, list) and doc and rnd.random() < 0.8:
        doc = list(doc)
        i = rnd.randrange(len(doc))
        doc[i] = _change(rnd, doc[i])
        return doc
    return rnd.choice([json_value(rnd), integer(rnd), text(rnd), rnd.choice(MEDIA_TYPES),
                       rnd.choice(DIGESTS), None, [], {}])


def _descriptor(rnd: random.Random) -> dict:
    return {"mediaType": rnd.choice(MEDIA_TYPES), "digest": rnd.choice(DIGESTS),
            "size": integer(rnd)}


@fuzz(1500)
@given(seed=seeds)
def test_image_documents(seed: int) -> None:
    ran()
    rnd = random.Random(seed)
    doc = {"schemaVersion": 2, "mediaType": rnd.choice(MEDIA_TYPES),
           "config": _descriptor(rnd), "layers": [_descriptor(rnd) for _ in range(2)],
           "manifests": [_descriptor(rnd)]}
    for _ in range(rnd.randrange(3)):
        doc = _change(rnd, doc)
    raw = json.dumps(doc).encode()
    if rnd.random() < 0.3:
        raw = mutate(rnd, raw)
    if rnd.random() < 0.05:
        raw = b"[" * 100_000 + b"]" * 100_000
    try:
        parsed = parse_document(raw, where="fuzz")
        layers = parsed.get("layers")
        for d in (parsed.get("config"), *(layers[:3] if isinstance(layers, list) else [])):
            try:
                check_descriptor(d, where="fuzz")
                kind_of(d["mediaType"])
            except PeerstarError:
                pass
        try:
            manifest_children(parsed, where="fuzz")
        except PeerstarError:
            pass
        index_children(parsed, where="fuzz")
    except PeerstarError:
        pass


TMP = Path(tempfile.mkdtemp(prefix="peerstar-fuzz-image-"))


def _layout(root: Path, rnd: random.Random) -> None:
    """A one-image OCI layout with a random change to one of its JSON documents (blobs
    stored under their new digests, so the change is what the reader judges)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        (blobs / sha(data)[7:]).write_bytes(data)
        return sha(data)

    import gzip
    layer = gzip.compress(LAYER, mtime=0)
    config: Any = {"architecture": "amd64", "os": "linux",
                   "rootfs": {"type": "layers", "diff_ids": [sha(LAYER)]}}
    which = rnd.choice(["config", "manifest", "index", "layout", "none"])
    if which == "config":
        config = _change(rnd, config)
    cdata = dumps(config)
    manifest: Any = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                     "config": {"mediaType": OCI_CONFIG, "digest": put(cdata),
                                "size": len(cdata)},
                     "layers": [{"mediaType": OCI_GZIP, "digest": put(layer),
                                 "size": len(layer)}]}
    if which == "manifest":
        manifest = _change(rnd, manifest)
    mdata = dumps(manifest)
    index: Any = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": put(mdata), "size": len(mdata),
         "annotations": {"org.opencontainers.image.ref.name": "t"}}]}
    if which == "index":
        index = _change(rnd, index)
    idata = dumps(index)
    if which == "index" and rnd.random() < 0.3:
        idata = mutate(rnd, idata)
    (root / "index.json").write_bytes(idata)
    layout = b'{"imageLayoutVersion": "1.0.0"}'
    if which == "layout":
        layout = mutate(rnd, layout)
    (root / "oci-layout").write_bytes(layout)


def _convert_checked(source: str, out: Path) -> None:
    """Convert `source` to `out`: refused with nothing left there, or a valid layout."""
    try:
        convert(source, parse_image_ref(f"oci:{out}"))
    except PeerstarError:
        assert not out.exists()
        return
    _check_converted(out)


def _check_converted(out: Path) -> None:
    """Every layer the output's manifests annotate with a TOC digest verifies."""
    def blob(digest: str) -> bytes:
        return (out / "blobs" / "sha256" / digest[7:]).read_bytes()

    todo = json.loads((out / "index.json").read_bytes())["manifests"]
    while todo:
        doc = json.loads(blob(todo.pop()["digest"]))
        todo.extend(doc.get("manifests", []))
        for layer in doc.get("layers", []):
            toc = (layer.get("annotations") or {}).get(TOC_ANN)
            if toc:
                Reader.from_bytes(blob(layer["digest"]), toc_digest=toc).verify()


@fuzz(300)
@given(seed=seeds)
def test_oci_layouts_convert_or_fail(seed: int) -> None:
    ran()
    rnd = random.Random(seed)
    work = Path(tempfile.mkdtemp(dir=TMP))
    try:
        _layout(work / "src", rnd)
        _convert_checked(f"oci:{work / 'src'}", work / "out")
    finally:
        shutil.rmtree(work)


def _archive(rnd: random.Random) -> bytes:
    config = dumps({"architecture": "amd64", "os": "linux",
                    "rootfs": {"type": "layers", "diff_ids": [sha(LAYER)]}})
    entries: Any = [{"Config": "config.json", "RepoTags": ["x:1"], "Layers": ["layer.tar"]}]
    entries = _change(rnd, entries) if rnd.random() < 0.8 else entries
    manifest = json.dumps(entries).encode()
    if rnd.random() < 0.2:
        manifest = mutate(rnd, manifest)
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w") as tf:
        for name, data in (("manifest.json", manifest), ("config.json", config),
                           ("layer.tar", LAYER)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return bio.getvalue()


@fuzz(300)
@given(seed=seeds)
def test_docker_archives_convert_or_fail(seed: int) -> None:
    ran()
    rnd = random.Random(seed)
    work = Path(tempfile.mkdtemp(dir=TMP))
    try:
        src = work / "image.tar"
        src.write_bytes(_archive(rnd))
        _convert_checked(f"docker-archive:{src}", work / "out")
    finally:
        shutil.rmtree(work)
