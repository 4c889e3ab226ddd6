"""Where the IPFS HTTP RPC API is: parse `--ipfs-address` (multiaddr or URL) or find the
running daemon's `api` file, as kubo's own client and nerdctl do.

Lookup order: an explicit address; else the `api` file of the IPFS repo, which is
`$IPFS_PATH` when that is set and `~/.ipfs` otherwise (kubo's rule: `$IPFS_PATH`
replaces `~/.ipfs`, it is not searched before it); else none (embedded store).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from peerstar.ipfs.errors import IPFSError


@dataclass(frozen=True)
class APIAddress:
    url: str  # http://host:port, no trailing slash
    shown: str  # as the user or the api file wrote it, for messages
    source: str  # "--ipfs-address" or the api file's path


def parse_api_address(text: str) -> str:
    """`/ip4/127.0.0.1/tcp/5001` or `http://127.0.0.1:5001` -> `http://127.0.0.1:5001`."""
    text = text.strip()
    if not text:
        raise IPFSError("empty IPFS API address")
    if text.startswith("/"):
        return _multiaddr_to_url(text)
    if "://" not in text:
        text = "http://" + text  # host:port, as kubo also accepts
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise IPFSError(f"not an IPFS API address: {text!r} (use /ip4/HOST/tcp/PORT or a URL)")
    try:
        port = parts.port
    except ValueError:
        raise IPFSError(f"bad port in IPFS API address {text!r}") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port or 5001}"


def _multiaddr_to_url(addr: str) -> str:
    parts = addr.strip("/").split("/")
    host = port = None
    scheme = "http"
    i = 0
    try:
        while i < len(parts):
            proto = parts[i]
            if proto in ("ip4", "dns", "dns4", "dns6"):
                host = parts[i + 1]
                i += 2
            elif proto == "ip6":
                host = f"[{parts[i + 1]}]"
                i += 2
            elif proto == "tcp":
                port = int(parts[i + 1])
                i += 2
            elif proto in ("http", "https"):
                scheme = proto
                i += 1
            elif proto == "tls":
                scheme = "https"
                i += 1
            else:
                raise IPFSError(
                    f"unsupported IPFS API multiaddr {addr!r}: expected /ip4|ip6|dns/HOST/tcp/PORT"
                )
    except (IndexError, ValueError):
        raise IPFSError(f"malformed IPFS API multiaddr {addr!r}") from None
    if host is None or port is None:
        raise IPFSError(f"IPFS API multiaddr {addr!r} lacks a host or a TCP port")
    return f"{scheme}://{host}:{port}"


def repo_path() -> Path:
    env = os.environ.get("IPFS_PATH")
    return Path(env) if env else Path.home() / ".ipfs"


def find_api(ipfs_address: str | None) -> APIAddress | None:
    """The API to use, or None when no daemon is configured (use the embedded store)."""
    if ipfs_address:
        return APIAddress(parse_api_address(ipfs_address), ipfs_address, "--ipfs-address")
    api_file = repo_path() / "api"
    try:
        text = api_file.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IPFSError(f"cannot read IPFS API file {api_file}: {exc.strerror}") from None
    return APIAddress(parse_api_address(text), text, str(api_file))
