"""What the dynamic loader will open after an ELF file: its interpreter (PT_INTERP) and
the libraries it names (DT_NEEDED), looked up as ld.so looks them up, inside one layer.

A container's start is a chain of dependent reads: the kernel reads the binary, then the
interpreter; the interpreter reads each library in turn. Over a swarm each is a round
trip to another node, so the lazy layer starts fetching the whole chain as soon as it has
read the binary's headers (see `LazyLayer`), instead of one library per round trip.

Pure: `parse` reads through a callback and does no I/O of its own; `resolve` walks a
layer's TOC (symlinks followed inside the layer). Hand-written because the standard library
has no ELF reader and three tables do not justify a dependency. Bounded: at most
`MAX_PHDRS` program headers, `MAX_DYNAMIC` bytes of dynamic section and `MAX_STRTAB` bytes
of string table are read, whatever the file declares; anything malformed gives no
dependencies, never an error: this is a guess that only saves time.
"""

from __future__ import annotations

import posixpath
import struct
from collections.abc import Callable
from dataclasses import dataclass

from peerstar.estargz import Reader
from peerstar.estargz.toc import TOCEntry

MAX_PHDRS = 256
MAX_DYNAMIC = 64 << 10
MAX_STRTAB = 1 << 20
MAX_LINKS = 40  # symlinks followed per lookup, as the kernel's ELOOP limit

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 15, 29
# e_machine -> Debian's multiarch directory name
_MULTIARCH = {62: "x86_64-linux-gnu", 183: "aarch64-linux-gnu", 3: "i386-linux-gnu",
              40: "arm-linux-gnueabihf", 21: "powerpc64le-linux-gnu", 22: "s390x-linux-gnu",
              243: "riscv64-linux-gnu"}


@dataclass(frozen=True)
class ElfDeps:
    interp: str | None
    needed: tuple[str, ...]
    search: tuple[str, ...]  # DT_RUNPATH (else DT_RPATH) directories, as written
    multiarch: str | None


def parse(read: Callable[[int, int], bytes], size: int, *,
          needed: bool = True) -> ElfDeps | None:
    """The loader's next files for the ELF file read by `read(offset, length)` (which may
    return fewer bytes at the end), or None if it is not a dynamically linked ELF file.
    With `needed=False` only the program headers are read (the interpreter is known
    before the dynamic section, often at the other end of the file, is fetched)."""
    try:
        return _parse(read, size, needed)
    except (struct.error, ValueError, UnicodeDecodeError):
        return None


def _parse(read: Callable[[int, int], bytes], size: int, want_needed: bool) -> ElfDeps | None:
    ident = read(0, 64)
    if len(ident) < 52 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) \
            or ident[5] not in (1, 2):
        return None
    wide = ident[4] == 2
    end = "<" if ident[5] == 1 else ">"
    machine = struct.unpack_from(end + "H", ident, 18)[0]
    if wide:
        phoff, = struct.unpack_from(end + "Q", ident, 32)
        phentsize, phnum = struct.unpack_from(end + "HH", ident, 54)
        ph_fmt, word = end + "IIQQQQ", end + "qQ"
    else:
        phoff, = struct.unpack_from(end + "I", ident, 28)
        phentsize, phnum = struct.unpack_from(end + "HH", ident, 42)
        ph_fmt, word = end + "IIIIII", end + "iI"
    if phnum == 0 or phnum > MAX_PHDRS or phentsize < struct.calcsize(ph_fmt) \
            or phoff + phentsize * phnum > size:
        return None
    table = read(phoff, phentsize * phnum)
    loads: list[tuple[int, int, int]] = []  # (vaddr, filesz, offset)
    interp = None
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        if (i + 1) * phentsize > len(table):
            return None
        f = struct.unpack_from(ph_fmt, table, i * phentsize)
        # 64-bit: type, flags, offset, vaddr, paddr, filesz; 32-bit: type, offset, vaddr,
        # paddr, filesz, memsz
        p_type, p_offset, p_vaddr, p_filesz = ((f[0], f[2], f[3], f[5]) if wide
                                               else (f[0], f[1], f[2], f[4]))
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_filesz, p_offset))
        elif p_type == PT_INTERP and 0 < p_filesz <= 4096 and p_offset + p_filesz <= size:
            interp = read(p_offset, p_filesz).split(b"\0", 1)[0].decode() or None
        elif p_type == PT_DYNAMIC and p_offset < size:
            dynamic = (p_offset, min(p_filesz, MAX_DYNAMIC, size - p_offset))
    if dynamic is None or not want_needed:
        return ElfDeps(interp, (), (), _MULTIARCH.get(machine)) \
            if interp or dynamic is not None else None
    raw = read(*dynamic)
    step = struct.calcsize(word)
    needed: list[int] = []
    paths: dict[int, int] = {}
    strtab = strsz = None
    for pos in range(0, len(raw) - step + 1, step):
        tag, val = struct.unpack_from(word, raw, pos)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            needed.append(val)
        elif tag == DT_STRTAB:
            strtab = val
        elif tag == DT_STRSZ:
            strsz = val
        elif tag in (DT_RPATH, DT_RUNPATH):
            paths[tag] = val
    if strtab is None or not strsz:
        return ElfDeps(interp, (), (), _MULTIARCH.get(machine))
    off = next((strtab - v + o for v, n, o in loads if v <= strtab < v + n), None)
    if off is None or off >= size:
        return ElfDeps(interp, (), (), _MULTIARCH.get(machine))
    strings = read(off, min(strsz, MAX_STRTAB, size - off))

    def string(at: int) -> str | None:
        if at >= len(strings):
            return None
        z = strings.find(b"\0", at)
        return strings[at:z if z >= 0 else None].decode() or None

    names = tuple(n for n in (string(v) for v in needed) if n)
    rp = paths.get(DT_RUNPATH, paths.get(DT_RPATH))
    search = tuple(p for p in (string(rp) or "").split(":") if p) if rp is not None else ()
    return ElfDeps(interp, names, search, _MULTIARCH.get(machine))


def lookup(reader: Reader, path: str) -> TOCEntry | None:
    """The regular file at absolute or layer-relative `path` in this layer, symlinks
    (of the file and of its directories) followed inside the layer; None when the path
    leaves what this layer holds."""
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        e = reader.lookup("/".join(done + [part]))
        if e is None:
            return None
        if e.type == "symlink":
            links += 1
            if links > MAX_LINKS:
                return None
            target = [p for p in e.link_name.split("/") if p and p != "."]
            if e.link_name.startswith("/"):
                done = []
            parts = target + parts
            continue
        done.append(part)
    e = reader.lookup("/".join(done)) if done else None
    return e if e is not None and e.type == "reg" else None


def resolve(reader: Reader, origin: str, deps: ElfDeps) -> list[TOCEntry]:
    """The files of this layer the loader will read for `deps` (found in `origin`, the
    ELF file's path): the interpreter, then each needed library at the first directory
    of its search path that holds it in this layer. Libraries a lower layer holds are
    not found here; their own layer fetches them when read."""
    found: list[TOCEntry] = []
    if deps.interp:
        e = lookup(reader, deps.interp)
        if e is not None:
            found.append(e)
    here = posixpath.dirname("/" + origin.lstrip("/"))
    dirs = [d.replace("$ORIGIN", here).replace("${ORIGIN}", here) for d in deps.search]
    arch = [f"/lib/{deps.multiarch}", f"/usr/lib/{deps.multiarch}"] if deps.multiarch else []
    dirs += arch + ["/lib64", "/usr/lib64", "/lib", "/usr/lib", "/usr/local/lib"]
    for name in deps.needed:
        candidates = [name] if "/" in name else [f"{d}/{name}" for d in dirs]
        for c in candidates:
            e = lookup(reader, c)
            if e is not None:
                found.append(e)
                break
    return found
