"""HTTP helpers of the registry tests: one request with http.client (no retries, no
redirects, exact bytes), and a multipart/byteranges body parsed by the stdlib email
parser (an independent implementation of MIME multipart)."""

from __future__ import annotations

import email.parser
import email.policy
import http.client
import json
import re
import urllib.request
from dataclasses import dataclass

MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def without_urls(obj: object) -> object:
    """Parsed JSON with every `urls` key removed: what the registry serves by tag for a
    document in nerdctl's format (the test images' descriptors carry only ipfs:// URLs)."""
    if isinstance(obj, dict):
        return {k: without_urls(v) for k, v in obj.items() if k != "urls"}
    if isinstance(obj, list):
        return [without_urls(v) for v in obj]
    return obj


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)

    def error_code(self) -> str:
        doc = json.loads(self.body)
        [err] = doc["errors"]
        assert isinstance(err["message"], str) and err["message"]
        return err["code"]


def request(host: str, method: str, path: str, headers: dict[str, str] | None = None,
            timeout: float = 30.0) -> Reply:
    h, _, p = host.rpartition(":")
    conn = http.client.HTTPConnection(h, int(p), timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, str, bytes]]:
    """[(Content-Type, Content-Range, payload)] of a multipart/byteranges body."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    assert msg.is_multipart(), content_type
    out = []
    for part in msg.iter_parts():
        payload = part.get_payload(decode=True)
        out.append((part["Content-Type"], part["Content-Range"], payload))
    return out


def upstream_reads(metrics_url: str) -> dict[str, float]:
    """`peerstar_registry_upstream_reads_total` by node (root / interior / leaf) from a
    registry's /metrics."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^peerstar_registry_upstream_reads_total\{node="(\w+)"\} (\S+)$', text, re.M)}
