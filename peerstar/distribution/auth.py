"""Registry authentication for blob and manifest requests: anonymous, basic, or bearer.

Owns: `RegistryAuth`, an `httpx.Auth` that answers a `401` carrying
`WWW-Authenticate: Bearer realm=...,service=...,scope=...` by fetching a token from the
realm (anonymously, with basic credentials, or -- given an OAuth2 refresh token, which is
what a docker config's `identitytoken` is -- by the `grant_type=refresh_token` POST
containerd's authorizer makes) and retrying once; and `Basic` challenges when
credentials are given. A challenge naming no scope gets the pull scope of the request's
repository. When the token service refuses, the response handed back is its answer,
marked with `AUTH_FAILURE` (the sentence saying what failed) in `response.extensions`.
Tokens are kept per auth object and shared by every request made with it; one object
serves `httpx.Client` and `httpx.AsyncClient` alike (sync, asyncio, and trio through
anyio).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import AsyncGenerator, Generator

import httpx

from peerstar.distribution.challenge import parse_challenge, pull_scope, token_of, token_params

# Set in `response.extensions` when authentication failed before the registry answered
# (a token service refused, gave no token, a bad challenge): the sentence saying so.
AUTH_FAILURE = "peerstar.auth_failure"

_TOKEN = "peerstar.token_request"  # marks requests to a token service

# The client id containerd sends with refresh-token grants; registries only log it.
OAUTH_CLIENT_ID = "peerstar"


class RegistryAuth(httpx.Auth):
    """Anonymous access with bearer-token (and basic) challenge handling."""

    # Only the token service's answers are read here (`sync_auth_flow`); the registry's
    # stay unread, so a blob can still be streamed.
    requires_response_body = False

    def __init__(self, username: str | None = None, password: str | None = None,
                 token: str | None = None, refresh_token: str | None = None) -> None:
        self.username = username or None
        self.password = password
        self.refresh_token = refresh_token or None
        self.token = token  # as given (a bearer token sent as is)
        self._lock = threading.Lock()
        self._token = token  # the last token obtained (or given); reused until a 401
        # Set once the registry asked for Basic and accepted ours: from then on every
        # request carries it, instead of one 401 round trip per range read.
        self._basic_accepted = False

    @property
    def anonymous(self) -> bool:
        return not (self.username or self._token or self.refresh_token)

    def _basic(self) -> str:
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def sync_auth_flow(self, request: httpx.Request
                       ) -> Generator[httpx.Request, httpx.Response, None]:
        flow = self.auth_flow(request)
        request = next(flow)
        while True:
            response = yield request
            if response.request.extensions.get(_TOKEN):
                response.read()
            try:
                request = flow.send(response)
            except StopIteration:
                break

    async def async_auth_flow(self, request: httpx.Request
                              ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self.auth_flow(request)
        request = next(flow)
        while True:
            response = yield request
            if response.request.extensions.get(_TOKEN):
                await response.aread()
            try:
                request = flow.send(response)
            except StopIteration:
                break

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        with self._lock:
            token = self._token
            basic = self._basic_accepted
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        elif basic:
            request.headers["Authorization"] = self._basic()
        response = yield request
        if response.status_code != 401:
            return
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic" and self.username is not None:
            if basic:
                return  # ours was sent and refused: the 401 stands
            request.headers["Authorization"] = self._basic()
            retried = yield request
            if retried.status_code != 401:
                with self._lock:
                    self._basic_accepted = True
            return
        if scheme != "bearer" or "realm" not in params:
            return
        realm = params["realm"]
        if not realm.startswith(("http://", "https://")):
            response.extensions[AUTH_FAILURE] = f"registry sent a bad auth challenge {realm!r}"
            return
        query = token_params(params, pull_scope(request.url.path))
        if self.refresh_token:
            # OAuth2 refresh-token grant (docker config `identitytoken`), as containerd.
            form = {"grant_type": "refresh_token", "refresh_token": self.refresh_token,
                    "client_id": OAUTH_CLIENT_ID}
            form.update(query)
            token_req = httpx.Request("POST", realm, data=form, extensions={_TOKEN: True})
        else:
            token_req = httpx.Request("GET", realm, params=query, extensions={_TOKEN: True})
            if self.username is not None:
                token_req.headers["Authorization"] = self._basic()
        token_resp = yield token_req
        # On failure the token service's answer is what the caller gets: marked, so that
        # it is not taken for the registry's.
        if token_resp.status_code != 200:
            token_resp.extensions[AUTH_FAILURE] = (
                f"token service {realm} refused access (HTTP {token_resp.status_code})")
            return
        try:
            new = token_of(token_resp.json())
        except ValueError:
            new = None
        if new is None:
            token_resp.extensions[AUTH_FAILURE] = f"token service {realm} returned no token"
            return
        with self._lock:
            self._token = new
        request.headers["Authorization"] = f"Bearer {new}"
        yield request
