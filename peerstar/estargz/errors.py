"""Typed errors for malformed, lying or tampered eStargz / zstd:chunked blobs."""

from peerstar.errors import PeerstarError


class EstargzError(PeerstarError):
    """Any problem with an eStargz blob or the tar it is built from."""


class FormatError(EstargzError):
    """The bytes are not a well-formed blob: footer, TOC or entries are wrong."""


class VerifyError(EstargzError):
    """The bytes are well-formed but a digest does not match: the blob was altered."""
