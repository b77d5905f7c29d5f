"""An identity provider's signing keys: a JWK Set fetched over HTTPS and cached.

An identity provider (Firebase, Auth0, Cognito, Keycloak, Supabase...) publishes
the public keys it signs tokens with as a JWK Set (RFC 7517 section 5) at a URL;
each key carries a key id (``kid``, RFC 7517 section 4.5) that the token's
header names (RFC 7515 section 4.1.4). :class:`JwksKeys` holds those keys:

* fetched once at start and again every ``refresh_s`` by a background task it
  owns, so keys the provider publishes ahead of a rotation are known before
  the first token signed with them arrives;
* refetched when a token names a ``kid`` it does not know (a rotation it has
  not seen yet), but at most once every ``min_refetch_s``: tokens with made-up
  key ids cannot make the gateway hammer the provider (every fetch, periodic
  or not, restarts that interval);
* never fetched on the caller's stack in a blocking way: :meth:`key` awaits
  the one fetch in flight (shared by every caller), :meth:`cached` never waits
  and at most schedules a refetch.

A failed fetch keeps the keys already held; a successful one replaces them, so
a key the provider withdrew stops being accepted. Symmetric (``oct``) keys and
keys meant for encryption (``use`` other than ``sig``) are ignored: a public
key set must never feed an HMAC verification (RFC 8725 section 3.1).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx
import jwt

log = logging.getLogger("rapport.identity")

#: A JWK Set larger than this is refused (providers publish a handful of keys).
MAX_JWKS_BYTES = 256 * 1024
#: A ``kid`` longer than this is not looked up (RFC 7517 leaves it unbounded; nobody needs more).
MAX_KID_CHARS = 256
#: The asymmetric JWS algorithms (RFC 7518 section 3.1, RFC 8037 section 3.1) a JWK Set may serve.
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                   "ES256", "ES384", "ES512", "EdDSA"})


class JwksError(Exception):
    """A JWK Set could not be fetched or holds no usable key."""


def parse_jwks(document: Any, *, algorithms: frozenset[str] | set[str]) -> dict[str, jwt.PyJWK]:
    """The usable signing keys of a JWK Set document, by ``kid``.

    Raises :class:`JwksError` when the document is not a JWK Set (RFC 7517
    section 5: an object whose ``keys`` member is an array). Individual keys
    that cannot serve (no ``kid``, symmetric, for encryption, an algorithm not
    accepted, a type this build cannot load) are skipped with a debug line.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise JwksError("not a JWK Set: expected an object with a 'keys' array (RFC 7517 section 5)")
    keys: dict[str, jwt.PyJWK] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, Mapping):
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS:
            log.debug("JWK without a usable kid skipped")
            continue
        if jwk.get("kty") == "oct":
            log.debug("symmetric JWK %r skipped", kid)
            continue
        if jwk.get("use", "sig") != "sig":
            log.debug("JWK %r is not for signatures; skipped", kid)
            continue
        alg = jwk.get("alg")
        if alg is not None and alg not in algorithms:
            log.debug("JWK %r is for %r, which is not accepted; skipped", kid, alg)
            continue
        try:
            keys[kid] = jwt.PyJWK(dict(jwk))
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            log.debug("JWK %r cannot be loaded: %s", kid, exc)
    return keys


class JwksKeys:
    """The signing keys published at ``url``; see the module docstring."""

    def __init__(self, url: str, *, algorithms: frozenset[str] | set[str], refresh_s: float = 600.0,
                 min_refetch_s: float = 30.0, timeout_s: float = 5.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if refresh_s <= 0 or min_refetch_s <= 0:
            raise ValueError("refresh_s and min_refetch_s must be positive")
        self.url = url
        self.algorithms = frozenset(algorithms)
        self.refresh_s = float(refresh_s)
        self.min_refetch_s = float(min_refetch_s)
        self.timeout_s = float(timeout_s)
        self._transport = transport
        self._keys: dict[str, jwt.PyJWK] = {}
        self._last_attempt = -float("inf")  # monotonic time of the last fetch started
        self._client: httpx.AsyncClient | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._refresher: asyncio.Task[None] | None = None
        #: Fetches started so far (periodic, on an unknown kid, at start).
        self.fetches = 0

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Fetch once (a failure is logged: tokens refetch later), then refresh every ``refresh_s``."""
        self._client = httpx.AsyncClient(timeout=self.timeout_s, transport=self._transport,
                                         follow_redirects=False, headers={"Accept": "application/json"})
        await self._fetch_shared()
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop(),
                                                                     name="jwks refresh")

    async def close(self) -> None:
        tasks = [t for t in (self._refresher, self._inflight) if t is not None]
        self._refresher = self._inflight = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self._fetch_shared()

    # -- lookups ---------------------------------------------------------------

    def cached(self, kid: str) -> jwt.PyJWK | None:
        """The key ``kid`` if held; otherwise None, and a refetch is scheduled if one is due."""
        key = self._keys.get(kid)
        if key is None:
            self._refetch_if_due()
        return key

    async def key(self, kid: str) -> jwt.PyJWK | None:
        """The key ``kid``, refetching the set first if it is unknown and a refetch is due."""
        key = self._keys.get(kid)
        if key is not None:
            return key
        task = self._refetch_if_due()
        if task is None and self._inflight is not None:
            task = self._inflight  # a fetch already under way may bring it
        if task is not None:
            # asyncio.wait: a caller that gives up (its socket closed) does not cancel the fetch others await.
            await asyncio.wait([task])
        return self._keys.get(kid)

    @property
    def kids(self) -> list[str]:
        return sorted(self._keys)

    # -- fetching ----------------------------------------------------------------

    def _refetch_if_due(self) -> asyncio.Task[bool] | None:
        if self._inflight is not None and not self._inflight.done():
            return None
        if time.monotonic() - self._last_attempt < self.min_refetch_s or self._client is None:
            return None
        self._last_attempt = time.monotonic()
        self._inflight = asyncio.get_running_loop().create_task(self._fetch(), name="jwks fetch")
        return self._inflight

    async def _fetch_shared(self) -> bool:
        task = self._inflight
        if task is None or task.done():
            self._last_attempt = time.monotonic()
            task = self._inflight = asyncio.get_running_loop().create_task(self._fetch(), name="jwks fetch")
        await asyncio.wait([task])
        return not task.cancelled() and task.result()

    async def _fetch(self) -> bool:
        """One fetch; True when the keys were replaced. Failures are logged, never raised."""
        self.fetches += 1
        try:
            keys = await self._download()
        except JwksError as exc:
            log.warning("JWK Set %s: %s; keeping the %d keys held", self.url, exc, len(self._keys))
            return False
        added = sorted(set(keys) - set(self._keys))
        removed = sorted(set(self._keys) - set(keys))
        if added or removed:
            log.info("JWK Set %s: %d keys (new %s, withdrawn %s)", self.url, len(keys), added, removed)
        self._keys = keys
        return True

    async def _download(self) -> dict[str, jwt.PyJWK]:
        if self._client is None:
            raise JwksError("not started")
        try:
            async with self._client.stream("GET", self.url) as resp:
                if resp.status_code != 200:
                    raise JwksError(f"answered HTTP {resp.status_code}")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise JwksError(f"larger than {MAX_JWKS_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise JwksError(f"cannot be fetched: {exc!r}") from None
        try:
            document = json.loads(body)
        except ValueError:
            raise JwksError("is not JSON") from None
        keys = parse_jwks(document, algorithms=self.algorithms)
        if not keys:
            raise JwksError("holds no usable signing key")
        return keys
