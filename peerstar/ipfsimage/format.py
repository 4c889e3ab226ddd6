"""nerdctl's on-IPFS image format (REFERENCE.md section 3), pure: bytes in, values out.

The one place that knows the format; push, pull and the registry bridge all use it:
- the image CID (`parse_image_cid`: `ipfs://CID`, `/ipfs/CID` or a bare CID, normalised
  to CIDv1 base32; only the raw / dag-pb sha2-256 CIDs `add --cid-version=1` makes) and
  `ipfs://` URLs on descriptors (`ipfs_url`, `has_ipfs_url`, `cid_of`);
- parsing the descriptor tree: the top descriptor the image CID holds
  (`parse_top_descriptor`), an index's or manifest's children (`document_children`),
  content checked against its descriptor (`content_error`);
- emitting it as nerdctl does: every descriptor gets `urls: ["ipfs://<cid>"]`, replacing
  any it had (`pushed_descriptor`, `with_pushed`); manifests and indexes are rewritten
  with those descriptors and OCI media types (`rewrite_manifest`, `rewrite_index`) and
  serialised as Go's `json.Marshal` would (`emit_document`: struct field order, sorted
  maps, `<>&` escaped); the top descriptor keeps only mediaType/digest/size/urls
  (`top_descriptor`), so the image CID does not depend on a source's tag;
- serving it as an ordinary registry image (`registry_document`): the documents with
  their `ipfs://` URLs removed. containers/image (skopeo, podman, CRI-O) takes any layer
  with `urls` for a foreign layer and does not copy it to destinations that accept those
  (`oci:`, `docker://`); the URLs are how the format finds blobs in IPFS, which the
  registry bridge has already done. The on-IPFS documents themselves never change.
Errors: content that is not an image in this format raises `IPFSImageError`; malformed
descriptors and documents raise `peerstar.oci`'s `ImageFormatError`, a mismatching blob
`BlobError` (all `OCIError`s).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from peerstar.ipfs.cid import check_supported, normalize_cid, parse_cid
from peerstar.ipfs.errors import CIDError
from peerstar.oci import mediatypes as mt
from peerstar.oci.digest import sha256_digest
from peerstar.oci.errors import BlobError, ImageFormatError, OCIError
from peerstar.oci.model import (
    INDEX,
    MANIFEST,
    Descriptor,
    Document,
    check_descriptor,
    index_children,
    kind_of,
    manifest_children,
    parse_document,
    remap_reference,
)

IPFS_SCHEME = "ipfs://"
# The top descriptor is a few hundred bytes; refuse absurd sizes early so a wrong CID
# (a layer's) fails fast instead of being downloaded whole.
MAX_DESCRIPTOR_BYTES = 64 << 10
MAX_DOCUMENT_BYTES = 16 << 20  # a manifest or index
# The fields of the top descriptor nerdctl adds: containerd's image target.
TOP_FIELDS = ("mediaType", "digest", "size", "urls")

# Go's encoding/json struct field order of ocispec.Descriptor / Platform / Manifest / Index.
_DESCRIPTOR_ORDER = ("mediaType", "digest", "size", "urls", "annotations", "data", "platform",
                     "artifactType")
_PLATFORM_ORDER = ("architecture", "os", "os.version", "os.features", "variant", "features")
_DOCUMENT_ORDER = ("schemaVersion", "mediaType", "artifactType", "config", "layers",
                   "manifests", "subject", "annotations")
_MAX_CID_CHARS = 200


class IPFSImageError(OCIError):
    """Content that is not an image in nerdctl's on-IPFS format, or an image that cannot be
    pushed to or pulled from IPFS (the message says which part)."""


# --- the image CID and ipfs:// URLs ------------------------------------------------------


# Cached: multiformats' CID.decode validates types at run time (~1 ms), and every
# registry request names its image by CID. Errors are not cached (lru_cache skips raises).
@functools.lru_cache(maxsize=4096)
def parse_image_cid(text: str) -> str:
    """`ipfs://CID`, `/ipfs/CID` or a bare CID -> CIDv1 base32; `IPFSImageError` otherwise.

    Only raw and dag-pb CIDs hashed with sha2-256 are accepted: that is what `add
    --cid-version=1` produces, and nothing else can hold an image blob.
    """
    value = text.strip()
    if "://" in value and not value.startswith(IPFS_SCHEME):
        raise IPFSImageError(f"{text[:80]!r} is not an IPFS image: give ipfs://CID or a bare "
                             "CID")
    bare = value.removeprefix(IPFS_SCHEME).removeprefix("/ipfs/")
    if not bare or len(bare) > _MAX_CID_CHARS or not bare.isascii() or not bare.isalnum():
        raise IPFSImageError(f"{text[:80]!r} is not an IPFS image reference: not a CID")
    try:
        cid = parse_cid(bare)
        check_supported(cid)
    except CIDError as exc:
        raise IPFSImageError(f"{text[:80]!r} is not an IPFS image reference: {exc}") from None
    return normalize_cid(cid)


def ipfs_url(cid: str) -> str:
    return IPFS_SCHEME + cid


def has_ipfs_url(desc: Descriptor) -> bool:
    """True when `desc` carries an `ipfs://` URL (it was pushed in this format)."""
    urls = desc.get("urls")
    return isinstance(urls, list) and any(isinstance(u, str) and u.startswith(IPFS_SCHEME)
                                          for u in urls)


def cid_of(desc: Descriptor, *, where: str) -> str:
    """The CID of the first `ipfs://` URL of `desc`, or a clear `IPFSImageError`."""
    urls = desc.get("urls")
    for url in urls if isinstance(urls, list) else []:
        if isinstance(url, str) and url.startswith(IPFS_SCHEME):
            try:
                return parse_image_cid(url)
            except IPFSImageError as exc:
                raise IPFSImageError(f"{where}: {desc.get('mediaType')} {desc.get('digest')} "
                                     f"has a bad ipfs:// URL: {exc}") from None
    shown = f" (urls: {str(urls)[:200]})" if urls else ""
    raise IPFSImageError(
        f"{where}: {desc.get('mediaType')} {desc.get('digest')} has no ipfs:// URL{shown}: "
        "the image was not pushed into IPFS with `peerstar push` or `nerdctl push ipfs://`"
    )


# --- parsing the descriptor tree ---------------------------------------------------------


def parse_top_descriptor(data: bytes, *, where: str) -> Descriptor:
    """Check that `data` (what the image CID holds) is an image descriptor as push writes it:
    the descriptor of an index or manifest."""
    hint = ("is not an image descriptor (expected the JSON descriptor whose CID "
            "`peerstar push` / `nerdctl push ipfs://` prints)")
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise IPFSImageError(f"{where} is {len(data)} bytes: too large to be an image "
                             "descriptor (expected the JSON descriptor whose CID "
                             "`peerstar push` prints)")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise IPFSImageError(f"{where} {hint}: its content is not JSON") from None
    if not isinstance(obj, dict) or not {"mediaType", "digest", "size"} <= obj.keys():
        what = "a manifest or index, not its descriptor" if isinstance(obj, dict) and (
            "manifests" in obj or "layers" in obj) else "JSON without mediaType/digest/size"
        raise IPFSImageError(f"{where} {hint}: it is {what}")
    try:
        desc = check_descriptor(obj, where=where)
        kind = kind_of(desc["mediaType"])
    except ImageFormatError as exc:
        raise IPFSImageError(f"{where} {hint}: {exc}") from None
    if kind not in (INDEX, MANIFEST):
        raise IPFSImageError(f"{where} describes a {desc['mediaType']}, not an image manifest "
                             "or index")
    return desc


def document_children(desc: Descriptor, data: bytes, *,
                      where: str) -> tuple[Document, list[Descriptor]]:
    """The parsed index or manifest `data` of `desc` and the descriptors it references,
    each checked: an index's manifests, or a manifest's config then its layers."""
    doc = parse_document(data, where=where)
    if kind_of(desc["mediaType"]) == INDEX:
        return doc, index_children(doc, where=where)
    config, layers = manifest_children(doc, where=where)
    return doc, [config, *layers]


def content_error(desc: Descriptor, cid: str, size: int, digest: str, *,
                  where: str) -> BlobError | None:
    """The error for content read from `cid` for `desc` when it does not match: `size` is
    how many bytes came (reads ask for one more than the descriptor's size, so a longer
    blob shows), `digest` what they hash to; None when they match."""
    want = desc["size"]
    if size == want and digest == desc["digest"]:
        return None
    why = (f"has {'more than ' if size > want else ''}{min(size, want + 1)} bytes, its "
           f"descriptor says {want}" if size != want else f"hashes to {digest}")
    return BlobError(
        f"{where}: {desc['mediaType']} {desc['digest']} fetched from {ipfs_url(cid)} {why}: "
        "rejected (the content in IPFS does not match the image: tampered with, or a wrong "
        "descriptor)")


# --- emitting it -------------------------------------------------------------------------


def _ordered(obj: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    out = {k: obj[k] for k in order if k in obj}
    out.update((k, v) for k, v in obj.items() if k not in out)
    return out


def go_descriptor(desc: Descriptor) -> Descriptor:
    """`desc` with its keys in ocispec.Descriptor's field order (maps sorted)."""
    out = _ordered(desc, _DESCRIPTOR_ORDER)
    if isinstance(out.get("annotations"), dict):
        out["annotations"] = dict(sorted(out["annotations"].items()))
    if isinstance(out.get("platform"), dict):
        out["platform"] = _ordered(out["platform"], _PLATFORM_ORDER)
    return out


def go_json(obj: Any) -> bytes:
    """Compact JSON as Go's json.Marshal writes it: no spaces, `<>&` and U+2028/9 escaped.

    Only strings can hold those characters, so replacing them in the text is exact.
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text.encode()


def emit_document(doc: Document) -> bytes:
    """The bytes of an index or manifest, with Go's field order."""
    return go_json(_ordered(doc, _DOCUMENT_ORDER))


def pushed_descriptor(media_type: str, digest: str, size: int, cid: str) -> Descriptor:
    """The descriptor of a blob added to IPFS under `cid`."""
    return {"mediaType": media_type, "digest": digest, "size": size, "urls": [ipfs_url(cid)]}


def with_pushed(old: Descriptor, new: Descriptor) -> Descriptor:
    """`old` (annotations, platform, ...) with the pushed type, digest, size and urls."""
    out = dict(old)
    out.update(mediaType=new["mediaType"], digest=new["digest"], size=new["size"],
               urls=list(new["urls"]))
    return out


def rewrite_index(doc: Document, children: list[Descriptor],
                  pushed: list[Descriptor]) -> Document:
    """The OCI index of `doc` whose entries `children` were pushed as `pushed`."""
    remap = {c["digest"]: p["digest"] for c, p in zip(children, pushed, strict=True)}
    entries = []
    for child, new in zip(children, pushed, strict=True):
        entry = with_pushed(child, new)
        remap_reference(entry, remap)
        entries.append(go_descriptor(entry))
    return dict(doc, schemaVersion=2, mediaType=mt.OCI_INDEX, manifests=entries)


def rewrite_manifest(doc: Document, config: Descriptor, layers: list[Descriptor],
                     pushed: list[Descriptor]) -> Document:
    """The OCI manifest of `doc` whose config and layers were pushed as `pushed` (config
    first)."""
    new_doc = dict(doc, schemaVersion=2, mediaType=mt.OCI_MANIFEST)
    new_doc["config"] = go_descriptor(with_pushed(config, pushed[0]))
    new_doc["layers"] = [go_descriptor(with_pushed(d, p))
                         for d, p in zip(layers, pushed[1:], strict=True)]
    return new_doc


def top_descriptor(desc: Descriptor) -> Descriptor:
    """The descriptor whose JSON is added last: its CID names the image."""
    return {k: desc[k] for k in TOP_FIELDS}


# --- serving it as an ordinary registry image --------------------------------------------


def without_ipfs_urls(desc: Descriptor) -> Descriptor:
    """`desc` without its `ipfs://` URLs (without `urls` when none other is left); the
    other fields keep their order."""
    urls = desc.get("urls")
    if not isinstance(urls, list):
        return desc
    kept = [u for u in urls if not (isinstance(u, str) and u.startswith(IPFS_SCHEME))]
    return {k: (kept if k == "urls" else v) for k, v in desc.items()
            if k != "urls" or kept}


def registry_document(desc: Descriptor, data: bytes, served: dict[str, Descriptor], *,
                      where: str) -> tuple[bytes, str] | None:
    """The index or manifest `data` (of `desc`) as the registry bridge serves it by tag:
    every descriptor without its `ipfs://` URLs, and an index's entries re-pointed (digest,
    size, buildx's reference annotation) at the documents served for them (`served`:
    original digest -> served descriptor, so documents are rewritten bottom-up). Returns
    (bytes, sha256 digest), or None when nothing changes (`data` is served as it is)."""
    doc, _children = document_children(desc, data, where=where)
    new_doc = dict(doc)
    if kind_of(desc["mediaType"]) == INDEX:
        remap = {d: s["digest"] for d, s in served.items()}
        entries = []
        for entry in doc["manifests"]:
            new = dict(without_ipfs_urls(entry))
            target = served.get(entry["digest"])
            if target is not None:
                new = dict(new, digest=target["digest"], size=target["size"])
            remap_reference(new, remap)
            entries.append(new)
        new_doc["manifests"] = entries
    else:
        new_doc["config"] = without_ipfs_urls(doc["config"])
        new_doc["layers"] = [without_ipfs_urls(d) for d in doc["layers"]]
    if new_doc == doc:
        return None
    try:
        out = go_json(new_doc)
    except UnicodeEncodeError:  # a lone surrogate escape: no UTF-8 for it, serve as is
        return None
    return out, sha256_digest(out)
