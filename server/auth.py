"""Who is on the other end: JWT verification and the loopback-only development mode.

The algorithm is pinned by configuration (RFC 8725 section 3.1: never let the
token choose, never accept ``none``); ``exp`` and ``sub`` are required.
``exp``, ``nbf`` and ``iat`` must be JSON numbers (RFC 7519 section 2,
"NumericDate"), and a user id must be a string every layer below can carry
(valid Unicode, no control characters).
"""

from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass

import jwt

from protocol.errors import Unauthorized

MAX_USER_ID_CHARS = 128
#: RFC 7519 section 4.1: the registered claims whose values are NumericDates.
NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")


@dataclass(frozen=True, slots=True)
class Authenticator:
    secret: str
    algorithm: str = "HS256"
    dev_mode: bool = False

    def verify(self, token: str) -> str:
        """The user id (``sub``) of a valid token; raises Unauthorized otherwise."""
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=[self.algorithm],
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        for name in NUMERIC_DATE_CLAIMS:
            value = claims.get(name)
            # PyJWT converts with int(), so "9999999999" would pass as a date; RFC 7519
            # section 4.1.4 makes exp a NumericDate, which is a JSON number. bool is an
            # int in Python but not a number in JSON.
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise Unauthorized(f"invalid token: the {name} claim must be a number (a NumericDate)")
        return check_user_id(claims.get("sub"))

    def identify(self, *, header_token: str | None, hello_token: str | None,
                 hello_user: str | None) -> str:
        """Pick the credentials of a connection: a token wins over a development user."""
        token = hello_token or header_token
        if token:
            return self.verify(token)
        if hello_user is not None:
            if not self.dev_mode:
                raise Unauthorized("hello.user is only accepted in development mode; send a token")
            return check_user_id(hello_user)
        raise Unauthorized("missing credentials: send a Bearer token or hello.token")

    def issue(self, user_id: str, ttl_s: int = 3600) -> str:
        now = int(time.time())
        return jwt.encode({"sub": check_user_id(user_id), "iat": now, "exp": now + ttl_s},
                          self.secret, algorithm=self.algorithm)


def check_user_id(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_USER_ID_CHARS:
        raise Unauthorized(f"the user id must be a string of 1..{MAX_USER_ID_CHARS} characters")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise Unauthorized("the user id must not contain control characters")
    try:
        # A JSON "\ud800" escape decodes to a lone surrogate: a str that Redis keys,
        # logs and WebSocket close reasons (UTF-8, RFC 6455 section 5.5.1) cannot carry.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Unauthorized("the user id must be valid Unicode (it holds a lone surrogate)") from None
    return value


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
