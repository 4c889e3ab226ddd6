"""Registry authentication for blob and manifest requests: anonymous or bearer token.

Owns: `RegistryAuth`, an `httpx.Auth` that answers a `401` carrying
`WWW-Authenticate: Bearer realm=...,service=...,scope=...` by fetching a token from the
realm (anonymously, or with basic credentials when given) and retrying once; and
`Basic` challenges when credentials are given. Tokens are kept per scope.
"""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Generator

import httpx

_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="x",service="y"` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_PARAM_RE.findall(rest))


class RegistryAuth(httpx.Auth):
    """Anonymous access with bearer-token (and basic) challenge handling."""

    requires_response_body = True

    def __init__(self, username: str | None = None, password: str | None = None,
                 token: str | None = None) -> None:
        self.username = username
        self.password = password
        self._lock = threading.Lock()
        self._token = token  # the last token obtained (or given); reused until a 401

    def _basic(self) -> str:
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        with self._lock:
            token = self._token
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic" and self.username is not None:
            request.headers["Authorization"] = self._basic()
            yield request
            return
        if scheme != "bearer" or "realm" not in params:
            return
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        token_req = httpx.Request("GET", params["realm"], params=query)
        if self.username is not None:
            token_req.headers["Authorization"] = self._basic()
        token_resp = yield token_req
        if token_resp.status_code != 200:
            return
        try:
            body = token_resp.json()
        except ValueError:
            return
        new = body.get("token") or body.get("access_token")
        if not new:
            return
        with self._lock:
            self._token = new
        request.headers["Authorization"] = f"Bearer {new}"
        yield request
