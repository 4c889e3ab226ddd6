"""The distribution spec's token challenge, parsed the same way for both registry clients."""

from __future__ import annotations

import pytest

from peerstar.distribution.challenge import parse_challenge, pull_scope, token_of, token_params


def test_a_bearer_challenge_gives_its_scheme_and_parameters() -> None:
    scheme, params = parse_challenge(
        ' Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:library/busybox:pull"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "registry.example",
                      "scope": "repository:library/busybox:pull"}
    assert parse_challenge('Basic realm="r"') == ("basic", {"realm": "r"})
    assert parse_challenge("") == ("", {})


def test_token_params_keep_service_and_scope_and_fill_a_missing_scope() -> None:
    challenge = {"realm": "https://a/t", "service": "s", "error": "insufficient_scope"}
    assert token_params(challenge) == {"service": "s"}
    assert token_params(challenge, "repository:r:pull") == {"service": "s",
                                                            "scope": "repository:r:pull"}
    assert token_params({"scope": "repository:x:pull"}, "repository:r:pull") == {
        "scope": "repository:x:pull"}


@pytest.mark.parametrize(("body", "token"), [
    ({"token": "t1"}, "t1"),
    ({"access_token": "t2"}, "t2"),
    ({"token": "", "access_token": "t3"}, "t3"),
    ({"token": ""}, None),
    ({"token": 5}, None),
    (["token"], None),
    (None, None),
])
def test_the_token_is_read_from_either_field(body: object, token: str | None) -> None:
    assert token_of(body) == token


def test_pull_scope_of_a_repository_request() -> None:
    assert pull_scope("/v2/library/busybox/manifests/latest") == \
        "repository:library/busybox:pull"
    assert pull_scope("/v2/ipfs/bafy/blobs/sha256:ab") == "repository:ipfs/bafy:pull"
    assert pull_scope("/v2/a/tags/list") == "repository:a:pull"
    assert pull_scope("/v2/") is None and pull_scope("/token") is None
