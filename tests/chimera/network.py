"""What this machine's loopback offers the tests that need more than 127.0.0.1."""

from __future__ import annotations

import socket


def can_bind(host: str) -> bool:
    """Whether a TCP socket can listen on *host* here (``::1``: IPv6 loopback;
    ``127.0.0.2``: the rest of 127.0.0.0/8, which Linux routes to loopback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as probe:
            probe.bind((host, 0))
    except OSError:
        return False
    return True
