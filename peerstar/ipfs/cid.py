"""CID helpers for `peerstar.ipfs`: parse any CID a daemon or a user gives, normalise it to
CIDv1 base32, and build the CIDs of blocks we hash ourselves (sha2-256, raw or dag-pb).

The `multiformats` library does the parsing and multibase encoding; we only keep the
codecs and hash function kubo's `add --cid-version=1` uses.
"""

from __future__ import annotations

import base64
import functools
import hashlib

from multiformats import CID, multihash

from peerstar.ipfs.errors import CIDError

RAW = "raw"
DAG_PB = "dag-pb"
_SUPPORTED_CODECS = (RAW, DAG_PB)


def parse_cid(text: str) -> CID:
    """Parse a CID string (v0 or v1, any multibase) or raise `CIDError` saying why."""
    text = text.strip()
    if text.startswith("ipfs://"):
        text = text[len("ipfs://") :]
    elif text.startswith("/ipfs/"):
        text = text[len("/ipfs/") :]
    if not text:
        raise CIDError("empty CID")
    try:
        cid = CID.decode(text)
    except Exception as exc:  # the library raises several unrelated types
        raise CIDError(f"not a valid CID: {text!r} ({exc})") from None
    return cid


@functools.lru_cache(maxsize=1 << 16)
def normalize_cid(text: str | CID) -> str:
    """Return the CIDv1 base32 form of `text` (bafy.../bafk...), whatever base it came in."""
    cid = text if isinstance(text, CID) else parse_cid(text)
    return str(cid.set(version=1, base="base32"))


def check_supported(cid: CID) -> None:
    """Raise `CIDError` unless peerstar can read and verify blocks of this CID."""
    if cid.codec.name not in _SUPPORTED_CODECS:
        raise CIDError(f"CID {cid} uses codec {cid.codec.name}; only raw and dag-pb are supported")
    if cid.hashfun.name != "sha2-256":
        raise CIDError(f"CID {cid} uses hash {cid.hashfun.name}; only sha2-256 is supported")


def block_cid(codec: str, data: bytes) -> CID:
    """The CIDv1 base32 of a block: sha2-256 of `data` with the given codec."""
    # hashlib directly: this runs once per 256 KiB chunk, keep it cheap.
    digest = hashlib.sha256(data).digest()
    return CID("base32", 1, codec, multihash.wrap(digest, "sha2-256"))


def verify_block(cid: CID, data: bytes) -> bool:
    """True when `data` hashes to the multihash inside `cid`."""
    check_supported(cid)
    return hashlib.sha256(data).digest() == cid.raw_digest


def cid_text(raw: bytes) -> str:
    """CIDv1 base32 text of a binary CID as dag-pb links hold it (a CIDv0, i.e. a bare
    sha2-256 multihash, becomes its CIDv1 dag-pb form), the same text `normalize_cid` gives.

    Written out here because `multiformats` takes ~0.5 ms to decode and re-encode one CID
    and the registry names a leaf or interior node per range read; base32 is RFC 4648
    (stdlib), and a binary CIDv1 is its own multibase payload.
    """
    if len(raw) == 34 and raw[:2] == b"\x12\x20":
        raw = b"\x01\x70" + raw
    elif len(raw) < 4 or raw[0] != 1:
        raise CIDError(f"not a binary CIDv1 or CIDv0: {raw[:8].hex()}...")
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


def is_raw_cid(raw: bytes) -> bool:
    """Whether a binary CIDv1 uses the raw codec (0x55: a leaf, no links below it)."""
    return len(raw) > 1 and raw[0] == 1 and raw[1] == 0x55
