"""The TLS trust of every registry client: what containerd trusts, plus an extra CA file.

Owns `tls_context(ca_file)`: SSL_CERT_FILE / SSL_CERT_DIR if set (httpx's rule), else
certifi's bundle plus the system's (a node's private CA is installed there, and Go's
containerd trusts it), plus the PEM bundle `ca_file` (the snapshotter's `[remote]
ca_file`, `peerstar mount --ca-file`). One context per CA file per process: building
one loads the CA bundle (~25 ms), and mount daemons forked from the zygote inherit it.
"""

from __future__ import annotations

import os
import ssl
import threading

import httpx

from peerstar.errors import PeerstarError

_tls_lock = threading.Lock()
_tls: dict[str, ssl.SSLContext] = {}


class TLSConfigError(PeerstarError):
    """The extra CA file cannot be used (missing, unreadable, not PEM)."""


def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """The TLS context for `ca_file` ("" for none), built once per process. Trust:
    SSL_CERT_FILE or SSL_CERT_DIR when set, else certifi plus the system store; plus the
    PEM bundle `ca_file` (TLSConfigError if it cannot be used)."""
    with _tls_lock:
        ctx = _tls.get(ca_file)
        if ctx is None:
            ctx = httpx.create_ssl_context(verify=True, trust_env=True)
            if not (os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR")):
                # httpx trusts only certifi; containerd (Go) trusts the system store, and
                # a node's private CA is installed there (update-ca-certificates).
                ctx.load_default_certs()
            if ca_file:
                load_ca_file(ctx, ca_file)
            _tls[ca_file] = ctx
        return ctx


def load_ca_file(ctx: ssl.SSLContext, ca_file: str) -> None:
    """Add the PEM bundle `ca_file` to `ctx`'s trust; TLSConfigError saying why not."""
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except FileNotFoundError:
        raise TLSConfigError(f"CA file {ca_file} does not exist") from None
    except ssl.SSLError as exc:  # an OSError too: caught first
        raise TLSConfigError(f"CA file {ca_file} holds no usable PEM certificate "
                             f"({exc.reason or exc})") from None
    except OSError as exc:
        raise TLSConfigError(f"CA file {ca_file}: {exc.strerror or exc}") from None


def cert_error(exc: BaseException) -> str | None:
    """The verification failure behind a transport error, if a certificate was refused."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return e.verify_message or str(e)
        e = e.__cause__ or e.__context__
    text = str(exc)
    return text if "CERTIFICATE_VERIFY_FAILED" in text else None
