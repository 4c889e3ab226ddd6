"""Swarm key and bootstrap identity: format, randomness, Ed25519 and libp2p peer ids.

The peer id derivation is checked against RFC 8032's vectors and against js-ipfs, which
computes the peer id itself from a private key given to `jsipfs init --private-key`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from peerstar.k8s import keys
from peerstar.k8s.keys import Identity, IdentityError, ed25519_public_key
from tests.support.cli import run_peerstar

KEY_RE = re.compile(r"\A/key/swarm/psk/1\.0\.0/\n/base16/\n[0-9a-f]{64}\n\Z")
REPO = Path(__file__).resolve().parents[2]

# Checked with js-ipfs 0.66.1 (`jsipfs init --private-key`): it derives this peer id.
KNOWN_PRIVKEY = ("CAESQDE1dQekm3aAfsM/jVo+VXUam1n8QL2jCUX8JccU9z1G6j3PION1RziUfXWfgfUnixRhgE/"
                 "wIRuG3/cbHZS+BSY=")
KNOWN_PEER_ID = "12D3KooWRakEYespFAzhhMEJ9ZpuvTFmTM4VXCAVyJyUHEjW5u9P"


def test_swarm_key_format_and_parse() -> None:
    key = keys.generate_swarm_key()
    assert KEY_RE.match(key), key
    raw = keys.parse_swarm_key(key)
    assert len(raw) == 32 and raw.hex() == key.splitlines()[2]
    assert keys.parse_swarm_key(key.encode()) == raw


@pytest.mark.parametrize("bad", [
    "", "/key/swarm/psk/1.0.0/\n/base16/\n" + "ab" * 31 + "\n",
    "/key/swarm/psk/1.0.0/\n/base64/\n" + "ab" * 32 + "\n",
    "/key/swarm/psk/1.0.0/\n/base16/\n" + "zz" * 32 + "\n",
])
def test_parse_rejects_non_keys(bad: str) -> None:
    with pytest.raises(IdentityError, match="not a swarm key"):
        keys.parse_swarm_key(bad)


def test_swarm_key_comes_from_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys.secrets, "token_bytes", lambda n: bytes(range(n)))
    assert keys.generate_swarm_key().splitlines()[2] == bytes(range(32)).hex()


def test_swarm_keys_are_random() -> None:
    raws = [keys.parse_swarm_key(keys.generate_swarm_key()) for _ in range(400)]
    assert len(set(raws)) == 400
    ones = sum(bin(int.from_bytes(r, "big")).count("1") for r in raws)
    total = 400 * 256
    # Fair bits: mean 0.5, sd 0.0016 over 102400 bits; 0.49..0.51 is more than 6 sd.
    assert 0.49 < ones / total < 0.51
    # Every byte position takes many values (a constant or counter byte would not).
    for i in range(32):
        assert len({r[i] for r in raws}) > 150


def test_cli_swarm_key_prints_a_key() -> None:
    a, b = run_peerstar("swarm-key"), run_peerstar("swarm-key")
    assert a.returncode == 0 and b.returncode == 0, a.stderr
    assert KEY_RE.match(a.stdout) and KEY_RE.match(b.stdout)
    assert a.stdout != b.stdout


def test_cli_swarm_key_output_file(tmp_path: Path) -> None:
    out = tmp_path / "swarm.key"
    r = run_peerstar("swarm-key", "-o", str(out))
    assert r.returncode == 0 and r.stdout == ""
    assert KEY_RE.match(out.read_text())
    assert stat.S_IMODE(out.stat().st_mode) == 0o400
    before = out.read_bytes()
    r = run_peerstar("swarm-key", "-o", str(out))
    assert r.returncode == 1
    assert "refusing to replace" in r.stderr and "Traceback" not in r.stderr
    assert out.read_bytes() == before


# RFC 8032 section 7.1, tests 1-3: secret key -> public key.
@pytest.mark.parametrize("seed,public", [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025"),
])
def test_ed25519_rfc8032(seed: str, public: str) -> None:
    assert ed25519_public_key(bytes.fromhex(seed)).hex() == public


def test_identity_known_value() -> None:
    ident = Identity.from_private_key(KNOWN_PRIVKEY)
    assert ident.peer_id == KNOWN_PEER_ID
    raw = base64.b64decode(KNOWN_PRIVKEY)
    assert Identity.from_seed(raw[4:36]) == ident


def test_identity_generate_is_consistent_and_random() -> None:
    a, b = Identity.generate(), Identity.generate()
    assert a != b
    for ident in (a, b):
        assert ident.peer_id.startswith("12D3KooW") and len(ident.peer_id) == 52
        assert Identity.from_private_key(ident.private_key) == ident


def test_identity_rejects_bad_keys() -> None:
    raw = bytearray(base64.b64decode(KNOWN_PRIVKEY))
    raw[-1] ^= 1  # public half no longer matches the seed
    with pytest.raises(IdentityError, match="inconsistent"):
        Identity.from_private_key(base64.b64encode(bytes(raw)).decode())
    with pytest.raises(IdentityError, match="not a libp2p Ed25519"):
        Identity.from_private_key(base64.b64encode(b"\x08\x00\x12\x40" + bytes(64)).decode())
    with pytest.raises(IdentityError, match="not base64"):
        Identity.from_private_key("not base64!")


def test_peer_id_matches_js_ipfs(tmp_path: Path) -> None:
    """js-ipfs derives the peer id from our private key itself: it must equal ours."""
    from tests.support.jsipfs import JSIPFS_BIN, _require_install

    node = _require_install()
    ident = Identity.generate()
    env = dict(os.environ, IPFS_PATH=str(tmp_path / "repo"))
    proc = subprocess.run([node, str(JSIPFS_BIN), "init", "--empty-repo", "--private-key",
                           ident.private_key], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((tmp_path / "repo" / "config").read_text())
    assert cfg["Identity"]["PeerID"] == ident.peer_id
