"""Where the command-line tools connect, and as whom.

``rapport bench`` and ``rapport eval`` both take a server as ``--url`` or
``--target`` in whatever form a user types it, and both act as many users at
once: each user gets a JWT minted here, or (development mode) a name in
``hello.user``.
"""

from __future__ import annotations

import os
import time

import jwt

from protocol.development import DEV_JWT_SECRET

__all__ = ["default_jwt_secret", "mint_token", "normalize_url"]


def normalize_url(url: str) -> str:
    """Accept ``http(s)://host:port`` or a ws URL without path; answer the ``/v1/ws`` URL."""
    if url.startswith("http://"):
        url = "ws://" + url[len("http://"):]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://"):]
    elif "://" not in url:
        url = "ws://" + url
    scheme, rest = url.split("://", 1)
    if "/" not in rest:
        rest += "/v1/ws"
    elif rest.endswith("/"):
        rest += "v1/ws"
    return f"{scheme}://{rest}"


def default_jwt_secret() -> str:
    """``$RAPPORT_JWT_SECRET``, else the secret a loopback development server uses."""
    return os.environ.get("RAPPORT_JWT_SECRET") or DEV_JWT_SECRET


def mint_token(user: str, secret: str, ttl_s: int = 86_400) -> str:
    """An HS256 JWT for ``user`` (``sub``), valid for ``ttl_s`` seconds."""
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + ttl_s}, secret, algorithm="HS256")
