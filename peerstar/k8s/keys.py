"""Secrets for a private peerstar swarm: the IPFS swarm key and the bootstrap peer's identity.

Owns: generating and parsing the pre-shared swarm key (`/key/swarm/psk/1.0.0/`, base16
encoding, 32 random bytes from `secrets`), and generating a libp2p Ed25519 identity
(the base64 protobuf private key kubo keeps in `Identity.PrivKey`, and the `12D3KooW...`
peer id derived from it). A fixed bootstrap identity lets every node know the bootstrap
peer's id from the Secret, with no side container publishing it at run time.

Ed25519 public-key derivation is done here in pure Python (RFC 8032) so that no crypto
package is needed for a one-off key generation; it is not constant-time, which does not
matter for generating a key once on the operator's machine.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass

from multiformats import multibase

from peerstar.errors import PeerstarError

SWARM_KEY_HEADER = "/key/swarm/psk/1.0.0/\n/base16/\n"
_SWARM_KEY_RE = re.compile(r"\A/key/swarm/psk/1\.0\.0/\n/base16/\n([0-9a-fA-F]{64})\n?\Z")


class IdentityError(PeerstarError):
    """A swarm key or identity that cannot be parsed."""


def generate_swarm_key() -> str:
    """A new swarm key in the text form kubo and js-ipfs read from `swarm.key`."""
    return SWARM_KEY_HEADER + secrets.token_bytes(32).hex() + "\n"


def parse_swarm_key(text: str | bytes) -> bytes:
    """The 32 key bytes of a swarm key file; PeerstarError if it is not one."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    m = _SWARM_KEY_RE.match(text)
    if m is None:
        raise IdentityError(
            "not a swarm key: expected '/key/swarm/psk/1.0.0/', '/base16/' and 64 hex digits "
            "on three lines (generate one with `peerstar swarm-key`)"
        )
    return bytes.fromhex(m.group(1))


# -- Ed25519 (RFC 8032, section 5.1) ---------------------------------------------------------
_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)

_Point = tuple[int, int, int, int]  # extended homogeneous coordinates (X, Y, Z, T)


def _add(p: _Point, q: _Point) -> _Point:
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(s: int, p: _Point) -> _Point:
    q: _Point = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _recover_x(y: int, sign: int) -> int:
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if x & 1 != sign:
        x = _P - x
    return x


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _recover_x(_GY, 0)
_G: _Point = (_GX, _GY, 1, _GX * _GY % _P)


def ed25519_public_key(seed: bytes) -> bytes:
    """The 32-byte Ed25519 public key of a 32-byte private seed."""
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed is 32 bytes")
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    x, y, z, _ = _mul(a, _G)
    zinv = pow(z, _P - 2, _P)
    x, y = x * zinv % _P, y * zinv % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


# -- libp2p identity -------------------------------------------------------------------------
_KEYTYPE_ED25519 = 1


def _key_proto(key_type: int, data: bytes) -> bytes:
    """libp2p crypto.pb PublicKey/PrivateKey: field 1 = KeyType (varint), field 2 = Data."""
    assert len(data) < 128  # one-byte length varint is enough for Ed25519
    return bytes([0x08, key_type, 0x12, len(data)]) + data


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id of an Ed25519 public key: base58btc of the identity multihash of
    the protobuf-encoded key (keys of 42 bytes or less are inlined, not hashed)."""
    proto = _key_proto(_KEYTYPE_ED25519, public_key)
    multihash = bytes([0x00, len(proto)]) + proto
    encoded = multibase.encode(multihash, "base58btc")
    return encoded[1:]  # drop the multibase prefix 'z': peer ids are bare base58btc


@dataclass(frozen=True)
class Identity:
    """A libp2p identity as kubo's config holds it."""

    peer_id: str
    private_key: str  # base64 (std, padded) of the protobuf PrivateKey

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        public = ed25519_public_key(seed)
        proto = _key_proto(_KEYTYPE_ED25519, seed + public)
        return cls(peer_id_from_public_key(public), base64.b64encode(proto).decode("ascii"))

    @classmethod
    def generate(cls) -> Identity:
        return cls.from_seed(secrets.token_bytes(32))

    @classmethod
    def from_private_key(cls, private_key: str) -> Identity:
        """Parse kubo's `Identity.PrivKey`; checks it is an Ed25519 key of the libp2p form."""
        try:
            raw = base64.b64decode(private_key.strip(), validate=True)
        except ValueError as exc:
            raise IdentityError(f"identity private key is not base64: {exc}") from None
        if len(raw) != 68 or raw[:4] != bytes([0x08, _KEYTYPE_ED25519, 0x12, 64]):
            raise IdentityError("identity private key is not a libp2p Ed25519 private key")
        seed, public = raw[4:36], raw[36:]
        if ed25519_public_key(seed) != public:
            raise IdentityError("identity private key is inconsistent (public half does not match)")
        return cls(peer_id_from_public_key(public), private_key.strip())
