"""Platforms in OCI terms: this machine's, containerd's `os/arch[/variant]` text, and
matching the `platform` of index entries against them.

One map from `platform.machine()` to OCI architecture and variant, the one containerd
uses: arm64 is variant `v8` (containerd's `platforms.DefaultSpec()`), and an index entry
for arm64 that omits the variant matches it, as images usually omit it.
"""

from __future__ import annotations

import platform as _platform

from peerstar.oci.errors import OCIError

# (os, architecture, variant or None)
Platform = tuple[str, str, str | None]

# platform.machine() -> (OCI architecture, OCI variant)
_MACHINES: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "i386": ("386", None), "i686": ("386", None),
    "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
}
# Architecture names people type that OCI spells differently.
_ARCH_ALIASES = {"x86_64": "amd64", "aarch64": "arm64"}


def host_platform() -> Platform:
    """(os, architecture, variant) of this machine in OCI terms."""
    machine = _platform.machine().lower()
    arch, variant = _MACHINES.get(machine, (machine, None))
    return "linux", arch, variant


def host_arch() -> str:
    """The OCI architecture of this machine (`amd64`, `arm64`, ...)."""
    return host_platform()[1]


def parse_platform(text: str) -> Platform:
    """`os/arch[/variant]` (containerd's syntax) -> (os, arch, variant)."""
    parts = text.strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise OCIError(
            f"--platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm/v7"
        )
    arch = _ARCH_ALIASES.get(parts[1], parts[1])
    return parts[0], arch, parts[2] if len(parts) == 3 else None


def platform_matches(plat: object, want: Platform) -> bool:
    """True when an index entry's `platform` object is the platform `want`."""
    if not isinstance(plat, dict):
        return False
    os_, arch, variant = want
    if plat.get("os") != os_ or plat.get("architecture") != arch:
        return False
    have = plat.get("variant")
    # arm64 images usually omit "v8"; otherwise a requested variant must be there.
    return variant is None or have == variant or (arch == "arm64" and have in (None, "v8")
                                                  and variant == "v8")


def show_platform(plat: object) -> str:
    """`os/arch[/variant]` of a `platform` object, for messages."""
    if not isinstance(plat, dict):
        return "unknown"
    parts = [str(plat.get("os", "?")), str(plat.get("architecture", "?"))]
    if plat.get("variant"):
        parts.append(str(plat["variant"]))
    return "/".join(parts)
