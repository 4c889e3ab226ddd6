"""The file tree a TOC describes: parents made, hardlinks resolved, link counts set.

`Tree(entries)` indexes entries whose names are already cleaned (`toc.clean_name`),
as the reference's initFields does: a later entry of a name replaces an earlier one,
missing parent directories are made, each hardlink is resolved to the entry it names
(through chains of hardlinks), and link counts are computed. It raises FormatError for
what cannot be a tree: a non-directory used as a directory, a root that is not a
directory, a hardlink that is missing its target, loops or names a directory.
`check_links` refuses relative symlinks that climb above the root.

Readers build one for every blob they open; the builder builds one over the entries
it is about to write, so it refuses exactly what a reader would. Every step is linear
in the number of entries and path components (no recursion: a path may have
thousands of components).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

from peerstar.estargz.errors import FormatError
from peerstar.estargz.toc import TOCEntry, clean_name


class Tree:
    """Index of a TOC's entries by cleaned name, with each directory's children."""

    def __init__(self, entries: list[TOCEntry]) -> None:
        self.by_name: dict[str, TOCEntry] = {}
        self.children: dict[str, dict[str, TOCEntry]] = {}
        self._sources: dict[int, TOCEntry] = {}  # id(hardlink entry) -> its source
        for e in entries:
            if e.type == "chunk":
                continue
            if e.type == "dir":
                e.num_link += 1  # the parent's entry for it
            self.by_name[e.name] = e
        root = self.by_name.setdefault("", TOCEntry(name="", type="dir", mode=0o755, num_link=2))
        if root.type != "dir":
            raise FormatError("the TOC's root entry is not a directory")
        self.children[""] = {}
        for e in entries:
            if e.type == "chunk" or e.name == "":
                continue
            if self.by_name.get(e.name) is not e:
                continue  # a later entry of the same name replaced this one
            parent = self._dir(posixpath.dirname(e.name))
            target = e
            e.num_link += 1
            if e.type == "hardlink":
                target = self.source(e)
                target.num_link += 1
            if target.type == "dir":
                parent.num_link += 1
            self.children[parent.name][posixpath.basename(e.name)] = target

    def _dir(self, name: str) -> TOCEntry:
        """The directory `name`, made (with its missing parents) if the TOC lacks it."""
        e = self.by_name.get(name)
        if e is None:
            missing = []
            while e is None:
                missing.append(name)
                name = posixpath.dirname(name)
                e = self.by_name.get(name)
            for made in reversed(missing):
                if e.type != "dir":
                    raise FormatError(f"{e.name!r} is used as a directory but is a {e.type}")
                self.children.setdefault(e.name, {})
                child = TOCEntry(name=made, type="dir", mode=0o755, num_link=2)
                self.by_name[made] = child
                e.num_link += 1
                self.children[e.name][posixpath.basename(made)] = child
                e = child
        elif e.type != "dir":
            raise FormatError(f"{name!r} is used as a directory but is a {e.type}")
        self.children.setdefault(e.name, {})
        return e

    def source(self, e: TOCEntry) -> TOCEntry:
        """The entry hardlink `e` finally names (`e` itself if not a hardlink). Each
        hardlink is resolved once, so a chain of n links costs O(n) in all."""
        if e.type != "hardlink":
            return e
        known = self._sources.get(id(e))
        if known is not None:
            return known
        chain: list[TOCEntry] = []
        seen: set[int] = set()
        first = e
        while e.type == "hardlink":
            known = self._sources.get(id(e))
            if known is not None:
                e = known
                break
            if id(e) in seen:
                raise FormatError(f"hardlink loop at {e.name!r}")
            seen.add(id(e))
            chain.append(e)
            target = self.by_name.get(clean_name(e.link_name))
            if target is None:
                raise FormatError(f"{e.name!r} is a hardlink to {e.link_name!r}, which is missing")
            e = target
        if e.type == "dir":
            raise FormatError(
                f"{first.name!r} is a hardlink to directory {e.name!r} (only files can be "
                "hardlinked)")
        for link in chain:
            self._sources[id(link)] = e
        return e

    def walk(self) -> Iterator[tuple[str, TOCEntry]]:
        """Every path in the tree (depth first, sorted), with its (resolved) entry."""
        stack = [""]
        while stack:
            d = stack.pop()
            kids = sorted(self.children.get(d, {}).items())
            for base, e in reversed(kids):
                if e.type == "dir":
                    stack.append(f"{d}/{base}" if d else base)
            for base, e in kids:
                yield (f"{d}/{base}" if d else base), e

    def check_links(self) -> None:
        """Reject relative symlinks whose target climbs above the layer root.

        Absolute targets are fine: runtimes resolve them inside the container's root.
        A relative target with more `..` than the link has parent directories can only
        mean to reach outside the tree (an extractor that follows it writes outside the
        target), so strict readers refuse the layer.
        """
        for path, e in self.walk():
            if e.type != "symlink" or e.link_name.startswith("/"):
                continue
            depth = path.count("/")
            for part in e.link_name.split("/"):
                if part == "..":
                    depth -= 1
                    if depth < 0:
                        raise FormatError(
                            f"symlink {path!r} -> {e.link_name!r} points outside the layer root"
                        )
                elif part not in ("", "."):
                    depth += 1
