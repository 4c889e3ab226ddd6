"""Error types of `peerstar.ipfs`: everything that module raises for a user to read."""

from __future__ import annotations

import json

from peerstar.errors import PeerstarError


class IPFSError(PeerstarError):
    """An IPFS operation failed (daemon unreachable, timeout, bad CID, missing block...)."""


class IPFSTimeoutError(IPFSError):
    """A daemon call took longer than its per-call timeout, retries included."""


class CIDError(IPFSError):
    """A string is not a valid CID, or names content peerstar cannot read."""


class BlockNotFoundError(IPFSError):
    """The store does not hold a block and cannot get it (the embedded store; a daemon
    that says so): content that is not there, not a transient failure."""


class CorruptBlockError(IPFSError):
    """A stored block does not hash to its CID."""


class OffsetError(IPFSError):
    """A read starts past the end of the file."""


def rpc_error_message(body: bytes) -> str:
    """What a kubo-compatible RPC error body says: its JSON `Message`, else the text."""
    message = body.decode(errors="replace").strip()
    try:
        return json.loads(body).get("Message") or message
    except (ValueError, AttributeError):
        return message
