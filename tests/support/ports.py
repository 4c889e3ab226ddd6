"""Loopback ports for test servers: `free_port` picks one nothing listens on."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago: a server started on it may
    lose a race for it (harnesses that can, retry on another), and a client that
    connects to it finds nothing listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
