"""The distribution spec's token authentication as pure functions (no I/O).

Owns: reading a `WWW-Authenticate` challenge (`Bearer realm="...",service="...",scope="..."`),
the token request's parameters (the challenge's service and scope; a default scope when
it names none) and the token in the token service's JSON answer (`token`, or OAuth2's
`access_token`), and the pull scope of a request to a repository.
`peerstar.distribution.auth.RegistryAuth` makes the requests.
"""

from __future__ import annotations

import re

_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="x",service="y"` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_PARAM_RE.findall(rest))


def token_params(challenge: dict[str, str], default_scope: str | None = None
                 ) -> dict[str, str]:
    """What a token request carries: the challenge's `service` and `scope`, and
    `default_scope` when the challenge asks for none."""
    params = {k: v for k, v in challenge.items() if k in ("service", "scope")}
    if default_scope and "scope" not in params:
        params["scope"] = default_scope
    return params


def token_of(body: object) -> str | None:
    """The token in a token service's decoded JSON answer, or None if it holds none."""
    if not isinstance(body, dict):
        return None
    token = body.get("token") or body.get("access_token")
    return token if isinstance(token, str) and token else None


_REPO_PATH_RE = re.compile(r"^/v2/(.+)/(?:manifests|blobs|tags)/[^/]*$")


def pull_scope(path: str) -> str | None:
    """`/v2/REPO/(manifests|blobs|tags)/X` -> `repository:REPO:pull`; None for other paths."""
    m = _REPO_PATH_RE.match(path)
    return f"repository:{m.group(1)}:pull" if m else None
