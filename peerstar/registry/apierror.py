"""The registry's distribution-spec errors: `ApiError` (status, code, message, detail,
extra headers) and its JSON answer, raised by the server's handlers and the mirror alike."""

from __future__ import annotations

import json

from aiohttp import web

from peerstar.errors import PeerstarError

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")


class ApiError(PeerstarError):
    """A request answered with a distribution-spec error (`{"errors": [...]}`)."""

    def __init__(self, status: int, code: str, message: str, detail: object = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def response(self) -> web.Response:
        err: dict[str, object] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            err["detail"] = self.detail
        body = json.dumps({"errors": [err]}).encode()
        headers = {"Content-Type": "application/json", API_VERSION_HEADER[0]:
                   API_VERSION_HEADER[1], **self.headers}
        return web.Response(status=self.status, body=body, headers=headers)
