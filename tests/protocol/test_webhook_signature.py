"""protocol/webhook_signature.py: Stripe's ``t=...,v1=...`` scheme, signed and checked."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from protocol.webhook_signature import DEFAULT_TOLERANCE_S, sign, signature_header, verify

SECRET = "whsec-" + "s" * 32
BODY = '{"type":"turn.completed","text_preview":"caf\u00e9 \U0001f600"}'.encode()
T = 1_800_000_000


def test_the_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    # Computed independently of the module: HMAC-SHA256(secret, "<t>." + body), hex.
    expected = hmac.new(SECRET.encode(), f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, T, BODY) == expected
    assert signature_header(SECRET, T, BODY) == f"t={T},v1={expected}"


def test_a_fresh_signature_verifies() -> None:
    assert verify(SECRET, signature_header(SECRET, T, BODY), BODY, now=T)
    assert verify(SECRET, signature_header(SECRET, T, BODY), BODY, tolerance_s=10, now=T + 10)
    assert verify(SECRET, signature_header(SECRET, T, BODY), BODY, tolerance_s=10, now=T - 10)


@pytest.mark.parametrize("skew", [DEFAULT_TOLERANCE_S + 1, -(DEFAULT_TOLERANCE_S + 1)])
def test_a_timestamp_outside_the_tolerance_is_refused(skew: float) -> None:
    """A captured delivery replayed later (or stamped in the future) fails."""
    assert not verify(SECRET, signature_header(SECRET, T, BODY), BODY, now=T + skew)


@pytest.mark.parametrize("body", [BODY + b" ", BODY.replace(b"completed", b"Completed"), b""])
def test_a_tampered_body_is_refused(body: bytes) -> None:
    assert not verify(SECRET, signature_header(SECRET, T, BODY), body, now=T)


def test_another_secret_or_a_changed_timestamp_is_refused() -> None:
    assert not verify("another-secret", signature_header(SECRET, T, BODY), BODY, now=T)
    forged = f"t={T + 1},v1={sign(SECRET, T, BODY)}"  # the signature does not cover the new t
    assert not verify(SECRET, forged, BODY, now=T)


@pytest.mark.parametrize("header", [
    None, "", "garbage", f"v1={sign(SECRET, T, BODY)}", f"t={T}", f"t={T},v1=", f"t=abc,v1={sign(SECRET, T, BODY)}",
    f"t=-{T},v1={sign(SECRET, T, BODY)}", f"t={T},t={T},v1={sign(SECRET, T, BODY)}",
    f"t={T},v1={sign(SECRET, T, BODY)[:-1]}", f"t={T},v1={sign(SECRET, T, BODY)}\u00e9", "t=\u0661\u0662,v1=ab",
    f"t={T},v0={sign(SECRET, T, BODY)}",
])
def test_a_bad_header_is_refused_without_raising(header: str | None) -> None:
    assert not verify(SECRET, header, BODY, now=T)


def test_any_of_several_v1_values_may_match_while_a_secret_rotates() -> None:
    header = f"t={T},v1={sign('old-secret', T, BODY)},v1={sign(SECRET, T, BODY)}"
    assert verify(SECRET, header, BODY, now=T)
    assert verify("old-secret", header, BODY, now=T)
    assert not verify("third-secret", header, BODY, now=T)


def test_spaces_around_parts_and_unknown_schemes_are_tolerated() -> None:
    header = f"t={T}, v0=ignored, v1={sign(SECRET, T, BODY)}"
    assert verify(SECRET, header, BODY, now=T)
