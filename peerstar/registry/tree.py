"""The descriptor tree of an image stored in IPFS in nerdctl's format, and its cache.

Owns: walking an image from its root CID (the JSON of its top descriptor) through index
-> manifests (config and layers are recorded, never read), with the bounds a server
needs (descriptors per image, nesting, manifest size), and an LRU cache of the resulting
trees keyed by root CID. What the bytes mean (the image CID, `ipfs://` URLs, top
descriptor, children, content checks) is `peerstar.ipfsimage.format`, the same code
`peerstar push` / `pull` use, so content is refused here with the same `OCIError`s.
Each index and manifest is also kept as the registry serves it by tag
(`format.registry_document`: without its `ipfs://` URLs, which containers/image takes
for foreign layers it does not copy), under its own digest; the original digests keep
answering with the original bytes. Content under a CID is immutable, so a tree is walked
once; concurrent requests for the same CID share one walk. Failed walks are not cached
(the daemon may come back).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from peerstar.ipfsimage.format import (
    MAX_DESCRIPTOR_BYTES,
    IPFSImageError,
    cid_of,
    content_error,
    document_children,
    ipfs_url,
    parse_top_descriptor,
    registry_document,
)
from peerstar.oci import mediatypes as mt
from peerstar.oci.digest import hasher_for, is_digest
from peerstar.oci.model import INDEX, MANIFEST, Descriptor, check_descriptor, kind_of
from peerstar.oci.reference import is_tag

# Manifests and indexes are small; a bigger one is refused rather than held in memory.
MAX_MANIFEST_BYTES = 4 << 20
MAX_TREE_NODES = 10_000  # descriptors per image, against a maliciously wide tree
MAX_DEPTH = 8  # nested indexes


@dataclass(frozen=True)
class BlobRef:
    """Where a digest's bytes live: their CID, size and media type. A document the
    bridge derived (`ImageTree.served`) has no CID: it is served from `manifests`."""

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
    # original digest -> digest of the document served for it by tag (those changed)
    served: dict[str, str] = field(default_factory=dict)

    def cost(self) -> int:
        """Approximate memory held, for the cache bound (bytes)."""
        return (sum(len(m) for m in self.manifests.values())
                + 200 * (len(self.blobs) + len(self.tags)) + 200)

    def resolve_manifest(self, ref: str) -> str | None:
        """The digest of the manifest/index `ref` names, or None.

        A tag an index annotates (org.opencontainers.image.ref.name) resolves to that
        manifest; `latest` and every other tag resolve to the top descriptor: the CID
        already pins one image, the tag adds nothing to find it. A tag resolves to the
        document served for it (`served`). A digest must name a manifest or index of
        this image, as stored or as served.
        """
        if is_digest(ref):
            return ref if ref in self.manifests else None
        digest = self.tags.get(ref, self.top_digest)
        return self.served.get(digest, digest)


# Reads a whole small object: (cid, max_bytes) -> bytes
ReadSmall = Callable[[str, int], Awaitable[bytes]]


async def walk_tree(root_cid: str, read_small: ReadSmall) -> ImageTree:
    """Walk the image under `root_cid`: top descriptor -> index/manifests.

    Raises an `OCIError` for content that is not an image; errors of `read_small`
    (upstream failures) propagate unchanged.
    """
    where = ipfs_url(root_cid)
    raw = await read_small(root_cid, MAX_DESCRIPTOR_BYTES + 1)
    top = parse_top_descriptor(raw, where=where)
    tree = ImageTree(root_cid=root_cid, top_digest=top["digest"])
    await _walk(tree, top, read_small, f"{where} top descriptor", 0)
    return tree


async def _walk(tree: ImageTree, desc: Descriptor, read_small: ReadSmall, where: str,
                depth: int) -> None:
    desc = check_descriptor(desc, where=where)
    digest, size, media_type = desc["digest"], desc["size"], desc["mediaType"]
    cid = cid_of(desc, where=where)
    if len(tree.blobs) >= MAX_TREE_NODES:
        raise IPFSImageError(f"image has more than {MAX_TREE_NODES} descriptors")
    tree.blobs[digest] = BlobRef(cid, size, media_type)
    kind = kind_of(media_type)
    if kind not in (INDEX, MANIFEST):
        return
    if digest in tree.manifests:
        return  # the same manifest listed twice: walked already
    if depth > MAX_DEPTH:
        raise IPFSImageError(f"{where}: indexes nested deeper than {MAX_DEPTH}")
    if size > MAX_MANIFEST_BYTES:
        raise IPFSImageError(f"{where}: manifest of {size} bytes is larger than allowed")
    data = await read_small(cid, size + 1)
    hasher = hasher_for(digest)
    hasher.update(data)
    error = content_error(desc, cid, len(data), f"{digest.split(':')[0]}:{hasher.hexdigest()}",
                          where=where)
    if error is not None:
        raise error
    _, children = document_children(desc, data, where=f"{where}: {digest}")
    tree.manifests[digest] = data
    if kind == INDEX:
        for i, child in enumerate(children):
            await _walk(tree, child, read_small, f"{digest} manifests[{i}]", depth + 1)
            ann = child.get("annotations")
            name = ann.get(mt.REF_NAME_ANNOTATION) if isinstance(ann, dict) else None
            if isinstance(name, str) and is_tag(name) and name not in tree.tags:
                tree.tags[name] = child["digest"]
    else:
        config, *layers = children
        await _walk(tree, config, read_small, f"{digest} config", depth + 1)
        for i, layer in enumerate(layers):
            await _walk(tree, layer, read_small, f"{digest} layers[{i}]", depth + 1)
    _add_served(tree, desc, data, where=f"{where}: {digest}")


def _add_served(tree: ImageTree, desc: Descriptor, data: bytes, *, where: str) -> None:
    """Record the document served for `desc` by tag, when it differs from `data`."""
    served = ({d: {"digest": s, "size": tree.blobs[s].size} for d, s in tree.served.items()}
              if kind_of(desc["mediaType"]) == INDEX else {})  # only an index points at them
    rewritten = registry_document(desc, data, served, where=where)
    if rewritten is None:
        return
    body, digest = rewritten
    tree.served[desc["digest"]] = digest
    tree.manifests[digest] = body
    tree.blobs.setdefault(digest, BlobRef("", len(body), desc["mediaType"]))


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
