"""The descriptor tree of an image stored in IPFS in nerdctl's format, and its cache.

Owns: reading an image's root CID (the JSON of its top descriptor), walking index ->
manifests (config and layers are recorded, never read), checking each manifest's bytes
against its digest, and an LRU cache of the resulting trees keyed by root CID. Content
under a CID is immutable, so a tree is walked once; concurrent requests for the same CID
share one walk. Failed walks are not cached (the daemon may come back).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from multiformats import CID

from peerstar.oci import mediatypes as mt

# Manifests and indexes are small; a bigger one is refused rather than held in memory.
MAX_MANIFEST_BYTES = 4 << 20
MAX_TREE_NODES = 10_000  # descriptors per image, against a maliciously wide tree
MAX_DEPTH = 8  # nested indexes

_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_SUPPORTED_CODECS = ("raw", "dag-pb")


class TreeError(Exception):
    """The content under a CID is not an image in nerdctl's format (says why)."""


def is_digest(text: str) -> bool:
    """True for a well-formed `sha256:<64 hex>` / `sha512:<128 hex>` digest."""
    return _DIGEST_RE.match(text) is not None


def is_tag(text: str) -> bool:
    """True for a tag as the distribution spec allows it."""
    return _TAG_RE.match(text) is not None


# Cached: multiformats' CID.decode validates types at run time (~1 ms), and every
# request names its image by CID. Errors are not cached (lru_cache skips raises).
@functools.lru_cache(maxsize=4096)
def parse_image_cid(text: str) -> str:
    """Normalise a CID from a URL path to CIDv1 base32; ValueError if it is not one we read.

    Only raw and dag-pb CIDs hashed with sha2-256 are accepted: that is what `add
    --cid-version=1` produces, and nothing else can hold an image blob.
    """
    if not text or len(text) > 200 or not text.isascii() or not text.isalnum():
        raise ValueError(f"{text[:80]!r} is not a CID")
    try:
        cid = CID.decode(text)
    except Exception as exc:  # multiformats raises several unrelated types
        raise ValueError(f"{text[:80]!r} is not a CID ({exc})") from None
    if cid.codec.name not in _SUPPORTED_CODECS or cid.hashfun.name != "sha2-256":
        raise ValueError(f"CID {text[:80]!r} uses {cid.codec.name}/{cid.hashfun.name}; only "
                         "raw or dag-pb with sha2-256 can hold an image")
    return str(cid.set(version=1, base="base32"))


@dataclass(frozen=True)
class BlobRef:
    """Where a digest's bytes live: their CID, size and media type."""

    cid: str
    size: int
    media_type: str


@dataclass
class ImageTree:
    """Everything the registry needs to answer for one image root CID."""

    root_cid: str
    top_digest: str  # the manifest or index `latest` resolves to
    blobs: dict[str, BlobRef] = field(default_factory=dict)
    # digest -> raw bytes of every manifest/index (read during the walk anyway)
    manifests: dict[str, bytes] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # ref.name annotation -> digest

    def cost(self) -> int:
        """Approximate memory held, for the cache bound (bytes)."""
        return (sum(len(m) for m in self.manifests.values())
                + 200 * (len(self.blobs) + len(self.tags)) + 200)

    def resolve_manifest(self, ref: str) -> str | None:
        """The digest of the manifest/index `ref` names, or None.

        A tag an index annotates (org.opencontainers.image.ref.name) resolves to that
        manifest; `latest` and every other tag resolve to the top descriptor: the CID
        already pins one image, the tag adds nothing to find it. A digest must name a
        manifest or index of this image.
        """
        if is_digest(ref):
            return ref if ref in self.manifests else None
        if ref in self.tags:
            return self.tags[ref]
        return self.top_digest


# Reads a whole small object: (cid, max_bytes) -> bytes
ReadSmall = Callable[[str, int], Awaitable[bytes]]


def _cid_of(desc: dict, where: str) -> str:
    urls = desc.get("urls")
    if not isinstance(urls, list):
        raise TreeError(f"{where}: descriptor has no urls (not pushed in nerdctl's format)")
    for url in urls:
        if isinstance(url, str) and url.startswith("ipfs://"):
            try:
                return parse_image_cid(url[len("ipfs://"):])
            except ValueError as exc:
                raise TreeError(f"{where}: bad ipfs url {url[:100]!r}: {exc}") from None
    raise TreeError(f"{where}: descriptor has no ipfs:// url")


def _check_descriptor(desc: object, where: str) -> tuple[str, int, str]:
    if not isinstance(desc, dict):
        raise TreeError(f"{where}: descriptor is not a JSON object")
    digest, size, media_type = desc.get("digest"), desc.get("size"), desc.get("mediaType")
    if not isinstance(digest, str) or not is_digest(digest):
        raise TreeError(f"{where}: invalid digest {str(digest)[:100]!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise TreeError(f"{where}: invalid size {size!r}")
    if not isinstance(media_type, str) or not media_type:
        raise TreeError(f"{where}: missing mediaType")
    return digest, size, media_type


def _digest_of(data: bytes, algo: str) -> str:
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


async def walk_tree(root_cid: str, read_small: ReadSmall) -> ImageTree:
    """Walk the image under `root_cid`: top descriptor -> index/manifests.

    Raises TreeError for content that is not an image; errors of `read_small` (upstream
    failures) propagate unchanged.
    """
    raw = await read_small(root_cid, MAX_MANIFEST_BYTES)
    try:
        top = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise TreeError(f"{root_cid} does not hold a descriptor (not JSON)") from None
    digest, _size, _mt = _check_descriptor(top, "top descriptor")
    tree = ImageTree(root_cid=root_cid, top_digest=digest)
    await _walk(tree, top, read_small, "top descriptor", 0)
    return tree


async def _walk(tree: ImageTree, desc: dict, read_small: ReadSmall, where: str,
                depth: int) -> None:
    digest, size, media_type = _check_descriptor(desc, where)
    cid = _cid_of(desc, where)
    if len(tree.blobs) >= MAX_TREE_NODES:
        raise TreeError(f"image has more than {MAX_TREE_NODES} descriptors")
    tree.blobs[digest] = BlobRef(cid, size, media_type)
    if media_type not in mt.INDEX_TYPES and media_type not in mt.MANIFEST_TYPES:
        return
    if digest in tree.manifests:
        return  # the same manifest listed twice: walked already
    if depth > MAX_DEPTH:
        raise TreeError(f"{where}: indexes nested deeper than {MAX_DEPTH}")
    if size > MAX_MANIFEST_BYTES:
        raise TreeError(f"{where}: manifest of {size} bytes is larger than allowed")
    data = await read_small(cid, size + 1)
    if len(data) != size or _digest_of(data, digest.split(":")[0]) != digest:
        raise TreeError(f"{where}: content of {cid} does not match digest {digest}")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise TreeError(f"{where}: {digest} is not JSON") from None
    if not isinstance(doc, dict):
        raise TreeError(f"{where}: {digest} is not a JSON object")
    tree.manifests[digest] = data
    if media_type in mt.INDEX_TYPES:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise TreeError(f"{where}: index {digest} has no manifests list")
        for i, child in enumerate(children):
            await _walk(tree, child, read_small, f"{digest} manifests[{i}]", depth + 1)
            ann = child.get("annotations") if isinstance(child, dict) else None
            name = ann.get(mt.REF_NAME_ANNOTATION) if isinstance(ann, dict) else None
            if isinstance(name, str) and is_tag(name) and name not in tree.tags:
                tree.tags[name] = child["digest"]
        return
    config = doc.get("config")
    layers = doc.get("layers")
    if config is None or not isinstance(layers, list):
        raise TreeError(f"{where}: manifest {digest} lacks config or layers")
    await _walk(tree, config, read_small, f"{digest} config", depth + 1)
    for i, layer in enumerate(layers):
        await _walk(tree, layer, read_small, f"{digest} layers[{i}]", depth + 1)


class TreeCache:
    """LRU of ImageTrees by root CID, bounded by total cost; one walk per CID at a time."""

    def __init__(self, read_small: ReadSmall, *, max_bytes: int = 64 << 20) -> None:
        self._read_small = read_small
        self._max_bytes = max_bytes
        self._trees: OrderedDict[str, ImageTree] = OrderedDict()
        self._bytes = 0
        self._pending: dict[str, asyncio.Task[ImageTree]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._trees)

    @property
    def bytes(self) -> int:
        return self._bytes

    async def get(self, root_cid: str) -> ImageTree:
        """The tree of `root_cid`, walking it if it is not cached."""
        tree = self._trees.get(root_cid)
        if tree is not None:
            self._trees.move_to_end(root_cid)
            self.hits += 1
            return tree
        task = self._pending.get(root_cid)
        if task is None:
            self.misses += 1
            # The walk runs as its own task: a client hanging up must not cancel the walk
            # other requests for the same CID are waiting on.
            task = asyncio.create_task(self._walk(root_cid))
            self._pending[root_cid] = task
            # mark the exception retrieved even if every requester hung up
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        else:
            self.hits += 1
        return await asyncio.shield(task)

    async def _walk(self, root_cid: str) -> ImageTree:
        try:
            tree = await walk_tree(root_cid, self._read_small)
        finally:
            del self._pending[root_cid]
        self._insert(tree)
        return tree

    def _insert(self, tree: ImageTree) -> None:
        cost = tree.cost()
        if cost > self._max_bytes:
            return  # serve it, but do not let one giant tree flush the cache
        self._trees[tree.root_cid] = tree
        self._bytes += cost
        while self._bytes > self._max_bytes:
            _, old = self._trees.popitem(last=False)
            self._bytes -= old.cost()
