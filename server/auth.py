"""Who is on the other end: JWT verification, roles, and the loopback-only development mode.

Tokens are verified one of two ways:

* with an HMAC secret (``--jwt-secret``; HS256 by default): development and
  simple setups where one service mints the tokens;
* with an identity provider's public keys (``--jwks-url``): the token's
  header names its key (``kid``, RFC 7515 section 4.1.4) in the provider's JWK
  Set (RFC 7517 section 5), held by :class:`server.identity.JwksKeys`.

The accepted algorithms are pinned by configuration (RFC 8725 section 3.1:
never let the token choose, never accept ``none``), and the two ways never mix:
a public key set never feeds an HMAC verification. ``exp`` and ``sub`` are
required (RFC 7519 sections 4.1.4 and 4.1.2); ``iss`` and ``aud`` are checked
when configured (sections 4.1.1 and 4.1.3); ``exp`` and ``nbf`` allow a small
clock-skew leeway (section 4.1.4: "MAY provide for some small leeway").
``exp``, ``nbf`` and ``iat`` must be JSON numbers (RFC 7519 section 2,
"NumericDate"), and a user id must be a string every layer below can carry
(valid Unicode, no control characters).

Roles come from one claim (``--roles-claim``, default ``roles``): a list of
strings, of which ``operator`` and ``admin`` mean something here (see
:data:`ROLES`); everyone authenticated is a ``user``.

Every refusal is an :class:`AuthFailure` with a fixed ``reason`` code, which is
what the audit log records (never the token).
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt

from protocol.development import DEV_JWT_SECRET
from protocol.errors import Unauthorized

if TYPE_CHECKING:
    from .audit import Audit
    from .config import Settings
    from .identity import JwksKeys

MAX_USER_ID_CHARS = 128
#: RFC 7519 section 4.1: the registered claims whose values are NumericDates.
NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")
#: The roles, weakest first: each includes the ones before it.
ROLES = ("user", "operator", "admin")
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
MAX_ROLES = 64


class AuthFailure(Unauthorized):
    """Refused credentials, with a fixed ``reason`` code for the audit log.

    Reasons: ``missing``, ``dev_user_refused``, ``malformed``, ``algorithm``,
    ``unknown_kid``, ``bad_signature``, ``expired``, ``not_yet_valid``,
    ``issuer``, ``audience``, ``claims``, ``user_id``, ``roles``, ``invalid``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller: the user id and what the token lets them do."""

    user_id: str
    roles: frozenset[str] = frozenset({"user"})
    #: Vouched for by the public development secret or a development ``hello.user``:
    #: anyone could have made it, so it never reaches admin endpoints off loopback.
    development: bool = False
    #: The token's ``name`` claim (OpenID Connect's display name), if any: what
    #: a character calls the user (``{{user}}``, docs/protocol.md addition 18).
    name: str | None = None

    def has(self, role: str) -> bool:
        """Whether the caller holds ``role`` or a stronger one."""
        rank = ROLES.index(role)
        return any(ROLES.index(r) >= rank for r in self.roles if r in ROLES)

    @property
    def role(self) -> str:
        """The strongest role held."""
        return max((r for r in self.roles if r in ROLES), key=ROLES.index, default="user")


@dataclass(frozen=True, slots=True)
class Authenticator:
    secret: str = ""
    algorithm: str = "HS256"
    dev_mode: bool = False
    #: Accepted algorithms; empty: just ``algorithm``.
    algorithms: tuple[str, ...] = ()
    #: The identity provider's keys; None: HMAC with ``secret``.
    keys: JwksKeys | None = None
    issuer: str = ""
    audience: tuple[str, ...] = ()
    leeway_s: float = 30.0
    roles_claim: str = "roles"
    audit: Audit | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, audit: Audit | None = None) -> Authenticator:
        """The authenticator the configuration describes (its key set, if any, not started yet)."""
        keys = None
        if settings.jwks_url:
            from .identity import JwksKeys

            keys = JwksKeys(settings.jwks_url, algorithms=set(settings.accepted_jwt_algorithms()),
                            refresh_s=settings.jwks_refresh_s, min_refetch_s=settings.jwks_min_refetch_s)
        return cls(secret=settings.jwt_secret, algorithm=settings.jwt_algorithm, dev_mode=settings.auth == "dev",
                   algorithms=tuple(settings.accepted_jwt_algorithms()), keys=keys, issuer=settings.jwt_issuer,
                   audience=tuple(settings.jwt_audience), leeway_s=settings.jwt_leeway_s,
                   roles_claim=settings.roles_claim, audit=audit)

    @property
    def accepted(self) -> list[str]:
        return list(self.algorithms or (self.algorithm,))

    # -- one token -------------------------------------------------------------

    def verify(self, token: str) -> str:
        """The user id (``sub``) of a valid token; raises Unauthorized otherwise.

        Never waits: with an identity provider, a token whose key is not held
        yet is refused (and the key set refetched, if one is due); the async
        :meth:`authenticate` waits for that refetch instead.
        """
        return self.authenticate_now(token).user_id

    def authenticate_now(self, token: str) -> Identity:
        """:meth:`verify`, with the roles."""
        try:
            return self._claims_identity(self._decode(token, self._key_now(token)))
        except AuthFailure as exc:
            self._audit_failure(exc)
            raise

    async def authenticate(self, token: str) -> Identity:
        """The identity of a valid token, fetching the provider's keys if its ``kid`` is new."""
        try:
            return self._claims_identity(self._decode(token, await self._key(token)))
        except AuthFailure as exc:
            self._audit_failure(exc)
            raise

    # -- a connection's credentials --------------------------------------------

    def identify(self, *, header_token: str | None, hello_token: str | None,
                 hello_user: str | None) -> str:
        """Pick the credentials of a connection: a token wins over a development user."""
        token = hello_token or header_token
        if token:
            return self.verify(token)
        return self._dev_identity(hello_user).user_id

    async def resolve(self, *, header_token: str | None, hello_token: str | None,
                      hello_user: str | None) -> Identity:
        """:meth:`identify` with roles, waiting for a key refetch when the token needs one."""
        token = hello_token or header_token
        if token:
            return await self.authenticate(token)
        return self._dev_identity(hello_user)

    def missing(self, message: str) -> AuthFailure:
        """The refusal of a request that carries no credentials at all, audited; the caller raises it."""
        exc = AuthFailure(message, reason="missing")
        self._audit_failure(exc)
        return exc

    def _dev_identity(self, hello_user: str | None) -> Identity:
        try:
            if hello_user is not None:
                if not self.dev_mode:
                    raise AuthFailure("hello.user is only accepted in development mode; send a token",
                                      reason="dev_user_refused")
                return Identity(check_user_id(hello_user), development=True)
            raise AuthFailure("missing credentials: send a Bearer token or hello.token", reason="missing")
        except AuthFailure as exc:
            self._audit_failure(exc)
            raise

    def issue(self, user_id: str, ttl_s: int = 3600, roles: Sequence[str] = ()) -> str:
        """An HMAC-signed token (``rapport token``); identity-provider deployments mint their own."""
        now = int(time.time())
        claims: dict[str, Any] = {"sub": check_user_id(user_id), "iat": now, "exp": now + ttl_s}
        if roles:
            claims[self.roles_claim] = list(roles)
        if self.issuer:
            claims["iss"] = self.issuer
        if self.audience:
            claims["aud"] = self.audience[0]
        return jwt.encode(claims, self.secret, algorithm=self.algorithm)

    # -- the steps ---------------------------------------------------------------

    def _kid(self, token: str) -> str:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthFailure(f"invalid token: {exc}", reason="malformed") from None
        if header.get("alg") not in self.accepted:
            raise AuthFailure(f"invalid token: the algorithm must be one of {', '.join(self.accepted)}",
                              reason="algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthFailure("invalid token: its header names no key (kid)", reason="malformed")
        return kid

    def _key_now(self, token: str) -> str | jwt.PyJWK:
        if self.keys is None:
            return self.secret
        jwk = self.keys.cached(self._kid(token))
        if jwk is None:
            raise _unknown_kid()
        return jwk

    async def _key(self, token: str) -> str | jwt.PyJWK:
        if self.keys is None:
            return self.secret
        jwk = await self.keys.key(self._kid(token))
        if jwk is None:
            raise _unknown_kid()
        return jwk

    def _decode(self, token: str, key: str | jwt.PyJWK) -> dict[str, Any]:
        required = ["exp", "sub"] + (["iss"] if self.issuer else []) + (["aud"] if self.audience else [])
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self.accepted,
                # Without a configured audience an aud claim is not checked (RFC 7519
                # section 4.1.3 leaves it to the application); with one it must match.
                options={"require": required, "verify_aud": bool(self.audience)},
                issuer=self.issuer or None,
                audience=list(self.audience) or None,
                leeway=self.leeway_s,
            )
        except jwt.ExpiredSignatureError:
            raise AuthFailure("token expired", reason="expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthFailure("invalid token: not valid yet (nbf or iat in the future)",
                              reason="not_yet_valid") from None
        except jwt.InvalidIssuerError:
            raise AuthFailure("invalid token: wrong issuer (iss)", reason="issuer") from None
        except jwt.InvalidAudienceError:
            raise AuthFailure("invalid token: not meant for this service (aud)", reason="audience") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthFailure(f"invalid token: {exc}", reason="claims") from None
        except jwt.InvalidAlgorithmError as exc:
            raise AuthFailure(f"invalid token: {exc}", reason="algorithm") from None
        except jwt.InvalidSignatureError:
            raise AuthFailure("invalid token: Signature verification failed", reason="bad_signature") from None
        except jwt.DecodeError as exc:
            raise AuthFailure(f"invalid token: {exc}", reason="malformed") from None
        except jwt.InvalidTokenError as exc:
            raise AuthFailure(f"invalid token: {exc}", reason="invalid") from None
        for name in NUMERIC_DATE_CLAIMS:
            value = claims.get(name)
            # PyJWT converts with int(), so "9999999999" would pass as a date; RFC 7519
            # section 4.1.4 makes exp a NumericDate, which is a JSON number. bool is an
            # int in Python but not a number in JSON.
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise AuthFailure(f"invalid token: the {name} claim must be a number (a NumericDate)",
                                  reason="claims")
        return claims

    def _claims_identity(self, claims: dict[str, Any]) -> Identity:
        try:
            user_id = check_user_id(claims.get("sub"))
        except Unauthorized as exc:
            raise AuthFailure(exc.message, reason="user_id") from None
        roles = {"user", *(r for r in self._roles(claims) if r in ROLES)}
        development = self.keys is None and self.secret == DEV_JWT_SECRET
        return Identity(user_id, frozenset(roles), development=development, name=display_name(claims))

    def _roles(self, claims: Mapping[str, Any]) -> list[str]:
        """The roles claim: looked up by its exact name, else as a dotted path
        (Keycloak's ``realm_access.roles``); absent means none."""
        value: Any = claims.get(self.roles_claim)
        if value is None and "." in self.roles_claim:
            value = claims
            for part in self.roles_claim.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
        if value is None:
            return []
        if (not isinstance(value, list) or len(value) > MAX_ROLES
                or not all(isinstance(r, str) for r in value)):
            raise AuthFailure(f"invalid token: the {self.roles_claim!r} claim must be a list of strings",
                              reason="roles")
        return value

    def _audit_failure(self, exc: AuthFailure) -> None:
        if self.audit is not None:
            self.audit.record("auth_failure", reason=exc.reason)


def _unknown_kid() -> AuthFailure:
    return AuthFailure("invalid token: its signing key (kid) is not one of the identity provider's keys; "
                       "if the provider just rotated its keys, retry shortly", reason="unknown_kid")


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


#: The longest display name a character may call the user by.
MAX_DISPLAY_NAME_CHARS = 64


def display_name(claims: Mapping[str, Any]) -> str | None:
    """The ``name`` claim, stripped of control characters and bounded; None if unusable.

    It ends up inside prompts, so it is plain text of one line: a name with a
    newline could otherwise smuggle a fake turn into the character's text.
    """
    value = claims.get("name")
    if not isinstance(value, str):
        return None
    cleaned = "".join(ch for ch in value if ch.isprintable()).strip()[:MAX_DISPLAY_NAME_CHARS]
    return cleaned or None
