"""A free TCP port on the loopback interface."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now.

    The socket is closed before the port is used, so another process could in
    principle take it in between; on a test machine that race is rare enough.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
