"""Content addressing as the tests compute it: the OCI digest of bytes and the compact JSON
encoding of documents whose bytes are digested.

Written with the standard library only, never through peerstar, so a test that checks a
digest or a document peerstar wrote compares against an independent computation.
"""

from __future__ import annotations

import hashlib
import json


def sha256_digest(data: bytes) -> str:
    """The OCI digest of `data`: `sha256:<hex>`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compact_json(obj: object) -> bytes:
    """`obj` as JSON without spaces (what Go's json.Marshal writes for our content)."""
    return json.dumps(obj, separators=(",", ":")).encode()
