"""A registry token service for tests: the Bearer flow of Docker Hub, GHCR or Harbor.

Owns: `TokenServer`, a plain-HTTP server on the host's loopback in a thread that answers
the distribution token protocol -- `GET <realm>?service=...&scope=...` with the caller's
Basic credentials (or none: an anonymous token), and the OAuth2 `POST <realm>`
(`grant_type=password`, what containerd tries first) -- with a JWT (RS256) granting the
requested actions that the user's grants allow (`grants`: user, "" for anonymous ->
repositories it may pull; `pushers` may also push). Wrong credentials get 401 and no
token. `registry_auth()` is the `auth: token:` section of docker-registry's config (realm,
service, issuer, rootcertbundle: the signing key's self-signed certificate; the JWT names
the key by its libtrust key id, `kid`, which the registry computes from that
certificate). `issued` records (user, scope, method) of every token given out.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

SERVICE = "peerstar-test-registry"
ISSUER = "peerstar-test-token-issuer"
TOKEN_TTL = 300


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """docker/libtrust's KeyID: the first 240 bits of the SHA-256 of the DER public key
    (SubjectPublicKeyInfo), base32, in 12 groups of 4 joined by ':'."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(b32[i:i + 4] for i in range(0, 48, 4))


def _basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.startswith("Basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except ValueError:
        return None
    return user, password


@dataclass
class TokenServer:
    """`users`: name -> password; `grants`: user ("" anonymous) -> repositories it may
    pull; `pushers`: users that may also push to their repositories."""

    directory: Path
    users: Mapping[str, str]
    grants: Mapping[str, tuple[str, ...]]
    pushers: tuple[str, ...] = ()
    issued: list[tuple[str, str, str]] = field(default_factory=list)
    refused: int = 0
    cert: Path = field(init=False)
    _key: rsa.RSAPrivateKey = field(init=False)
    _server: ThreadingHTTPServer | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .sign(self._key, hashes.SHA256()))
        self.cert = self.directory / "token-signer.pem"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    # -- tokens ----------------------------------------------------------------------------
    def token(self, user: str, scopes: list[str]) -> str:
        """A signed JWT for `user` ("" anonymous) with what `scopes` ask for and its grants
        allow (`repository:<name>:<actions>`; other scopes get nothing)."""
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or name not in self.grants.get(user, ()):
                continue
            allowed = {"pull"} | ({"push"} if user and user in self.pushers else set())
            granted = [a for a in actions.split(",") if a in allowed]
            if granted:
                access.append({"type": "repository", "name": name, "actions": granted})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256",
                  "kid": libtrust_key_id(self._key.public_key())}
        claims = {"iss": ISSUER, "sub": user, "aud": SERVICE, "exp": now + TOKEN_TTL,
                  "nbf": now - 60, "iat": now, "jti": _b64(hashlib.sha256(
                      f"{user}{now}{time.monotonic_ns()}".encode()).digest()[:12]),
                  "access": access}
        signing_input = (_b64(json.dumps(header).encode()) + "." +
                         _b64(json.dumps(claims).encode()))
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(),
                                   hashes.SHA256())
        return signing_input + "." + _b64(signature)

    def _answer(self, creds: tuple[str, str] | None, scopes: list[str], method: str
                ) -> tuple[int, dict[str, object]]:
        user = ""
        if creds is not None and creds != ("", ""):
            if self.users.get(creds[0]) != creds[1]:
                self.refused += 1
                return 401, {"errors": [{"code": "UNAUTHORIZED",
                                         "message": "wrong user name or password"}]}
            user = creds[0]
        token = self.token(user, scopes)
        self.issued.append((user, " ".join(scopes), method))
        return 200, {"token": token, "access_token": token, "expires_in": TOKEN_TTL,
                     "issued_at": datetime.datetime.now(datetime.UTC).isoformat()}

    # -- serving ---------------------------------------------------------------------------
    @property
    def realm(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def registry_auth(self) -> dict[str, object]:
        """docker-registry's `auth:` config section for this token service."""
        return {"token": {"realm": self.realm, "service": SERVICE, "issuer": ISSUER,
                          "rootcertbundle": str(self.cert)}}

    def start(self) -> TokenServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="peerstar-token"')
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                if url.path != "/token" or query.get("service") != [SERVICE]:
                    self._reply(404, {"errors": [{"code": "NOT_FOUND"}]})
                    return
                creds = _basic(self.headers.get("Authorization"))
                self._reply(*server._answer(creds, query.get("scope", []), "GET"))

            def do_POST(self) -> None:  # noqa: N802
                size = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(size).decode())
                if (urllib.parse.urlsplit(self.path).path != "/token"
                        or form.get("service") != [SERVICE]
                        or form.get("grant_type") != ["password"]):
                    self._reply(400, {"error": "unsupported_grant_type"})
                    return
                creds = (form.get("username", [""])[0], form.get("password", [""])[0])
                scopes = [s for v in form.get("scope", []) for s in v.split(" ") if s]
                self._reply(*server._answer(creds, scopes, "POST"))

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="token-server",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
