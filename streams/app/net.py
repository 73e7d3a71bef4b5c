"""Loopback ports for processes paysaga starts itself (worker web views, local brokers)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A currently free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
