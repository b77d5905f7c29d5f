"""Signatures of webhook deliveries (docs/protocol.md addition 23), for the
server that signs them and for the receiver that checks them.

The scheme is Stripe's (``Stripe-Signature``), which GitHub's and many others'
resemble: the header ``Rapport-Signature: t=<unix seconds>,v1=<hex>`` where
``<hex>`` is HMAC-SHA256 (RFC 2104) keyed with the deployment's webhook secret
over ``"<t>." + body``. Signing the timestamp with the body lets a receiver
refuse replays of an old delivery: it accepts only a ``t`` within a tolerance
of its own clock. A header may carry several ``v1`` values (the secret being
rotated); one match is enough.

Pure: no I/O, no clock of its own (``now`` is passed in), so an app can copy
this one file next to its receiver.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["DEFAULT_TOLERANCE_S", "DEVELOPMENT_SECRET", "EVENT_ID_HEADER", "SIGNATURE_HEADER", "sign",
           "signature_header", "verify"]

#: The header that carries ``t=...,v1=...``.
SIGNATURE_HEADER = "Rapport-Signature"
#: The header that carries the event's id, the same on every attempt (receivers dedupe on it).
EVENT_ID_HEADER = "Rapport-Event-Id"
#: Stripe's default tolerance: five minutes between signing and checking.
DEFAULT_TOLERANCE_S = 300.0
#: The secret a loopback development server signs with when none is configured
#: (like ``protocol.development.DEV_JWT_SECRET``, public; refused off loopback).
DEVELOPMENT_SECRET = "rapport-development-webhook-secret"


def sign(secret: str, t: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``"<t>." + body`` keyed with ``secret``."""
    payload = str(int(t)).encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), payload, hashlib.sha256).hexdigest()


def signature_header(secret: str, t: int, body: bytes) -> str:
    """The value of :data:`SIGNATURE_HEADER` for ``body`` signed at ``t``."""
    return f"t={int(t)},v1={sign(secret, t, body)}"


def verify(secret: str, header: str | None, body: bytes, tolerance_s: float = DEFAULT_TOLERANCE_S,
           now: float = 0.0) -> bool:
    """Whether ``header`` signs exactly ``body`` with ``secret``, at a time within
    ``tolerance_s`` of ``now`` (unix seconds).

    A missing or malformed header, a timestamp out of tolerance, or no ``v1``
    that matches is False. The comparison takes constant time, so a caller
    cannot learn a valid signature byte by byte.
    """
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            if timestamp is not None or not value.isascii() or not value.isdigit():
                return False
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
        # Other schemes (v0, a future v2) are ignored, as Stripe's libraries do.
    if timestamp is None or not candidates:
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).encode("ascii")
    return any(hmac.compare_digest(expected, candidate.encode("utf-8")) for candidate in candidates)
