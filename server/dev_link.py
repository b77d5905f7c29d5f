"""The signed-in link a loopback development server prints (protocol addition 21).

Like a notebook server's tokenised URL: ``rapport serve`` on loopback with the
built-in development JWT secret prints, once it accepts connections,

    Open the chat page, signed in as a development user: http://127.0.0.1:8000/#token=<jwt>

The token is signed with that secret, which is public (protocol.development),
so printing it reveals nothing that anyone on this machine could not mint for
themselves. That is also why the link exists only then: with a secret the
operator chose, or an identity provider, a token in the log would be a real
credential, and off loopback the development secret is refused anyway
(server.config). The page reads the token from the URL fragment, which a
browser never sends to the server (RFC 3986 section 3.5), stores it and takes
it out of the address bar.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import jwt

from protocol.development import DEV_JWT_SECRET

from .auth import HMAC_ALGORITHMS
from .config import Settings, is_loopback

DEVELOPMENT_USER = "dev"
DEVELOPMENT_NAME = "Developer"
LINK_TTL_S = 24 * 3600
ANNOUNCEMENT = "Open the chat page, signed in as a development user: "


def offers_development_link(settings: Settings) -> bool:
    """True when this server may print a signed-in link: loopback, the public secret, HMAC tokens."""
    return (is_loopback(settings.host)
            and settings.jwt_secret == DEV_JWT_SECRET
            and not settings.jwks_url
            and settings.jwt_algorithm.upper() in HMAC_ALGORITHMS)


def development_token(settings: Settings, *, now: float | None = None) -> str:
    """A day-long token for the development user, signed with the development secret."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {"sub": DEVELOPMENT_USER, "name": DEVELOPMENT_NAME,
                                 "iat": issued, "exp": issued + LINK_TTL_S}
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience[0]
    return jwt.encode(claims, DEV_JWT_SECRET, algorithm=settings.jwt_algorithm.upper())


def page_origin(host: str, port: int) -> str:
    """``http://<loopback host>:<port>`` as a browser on this machine reaches it."""
    bare = host.strip("[]")
    if ":" in bare:
        return f"http://[{bare}]:{port}"
    if bare in ("", "localhost", "localhost.localdomain"):
        return f"http://127.0.0.1:{port}"
    return f"http://{bare}:{port}"


def development_link(settings: Settings, port: int) -> str | None:
    """The chat page's URL with a development token in its fragment, or None where none may be printed."""
    if not offers_development_link(settings):
        return None
    return f"{page_origin(settings.host, port)}/#token={development_token(settings)}"


def announce_development_link(settings: Settings, port: int, out: TextIO | None = None) -> None:
    """Print the link (to stdout, whatever the log level) when the server may offer one."""
    link = development_link(settings, port)
    if link is not None:
        print(ANNOUNCEMENT + link, file=out or sys.stdout, flush=True)
