"""JWT verification, the development mode and Bearer parsing (server/auth.py)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest

from protocol.errors import Unauthorized
from server.auth import MAX_USER_ID_CHARS, Authenticator, bearer_token, check_user_id

# 64 bytes: long enough for HS512, so PyJWT never warns about key length.
SECRET = "k" * 64
OTHER_SECRET = "o" * 64

AUTH = Authenticator(secret=SECRET)
DEV = Authenticator(secret=SECRET, dev_mode=True)


def token(claims: dict[str, Any] | None = None, *, secret: str = SECRET, alg: str = "HS256",
          **overrides: Any) -> str:
    # A day: parametrize builds these tokens when the suite is collected, and a
    # whole suite run can take longer than a few minutes.
    body: dict[str, Any] = {"sub": "alice", "exp": int(time.time()) + 86_400}
    body.update(claims or {})
    body.update(overrides)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, secret, algorithm=alg)


def b64(obj: Any) -> str:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unauthorized(auth: Authenticator, tok: str) -> Unauthorized:
    with pytest.raises(Unauthorized) as exc:
        auth.verify(tok)
    assert exc.value.code == "unauthorized"
    return exc.value


# ---------------------------------------------------------------- verify


def test_valid_token_gives_sub() -> None:
    assert AUTH.verify(token()) == "alice"


def test_unicode_sub() -> None:
    assert AUTH.verify(token(sub="用户-😀")) == "用户-😀"


def test_extra_claims_are_fine() -> None:
    assert AUTH.verify(token({"iat": int(time.time()), "name": "Alice", "roles": ["x"]})) == "alice"


def test_expired_token() -> None:
    err = unauthorized(AUTH, token(exp=int(time.time()) - 120))
    assert "expired" in err.message


def test_a_small_clock_skew_is_allowed() -> None:
    # RFC 7519 section 4.1.4: implementers MAY provide for some small leeway (30 s by default).
    assert AUTH.verify(token(exp=int(time.time()) - 10)) == "alice"
    assert AUTH.verify(token(nbf=int(time.time()) + 10)) == "alice"
    unauthorized(Authenticator(secret=SECRET, leeway_s=0), token(exp=int(time.time()) - 10))


def test_wrong_secret() -> None:
    unauthorized(AUTH, token(secret=OTHER_SECRET))


def test_alg_none_token_is_refused() -> None:
    unsigned = jwt.encode({"sub": "alice", "exp": int(time.time()) + 300}, None, algorithm="none")
    unauthorized(AUTH, unsigned)


def test_hand_made_alg_none_token_is_refused() -> None:
    body = {"sub": "alice", "exp": int(time.time()) + 300}
    for alg in ("none", "None", "NONE"):
        for sig in ("", "AAAA"):
            unauthorized(AUTH, f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(body)}.{sig}")


def test_token_signed_with_another_algorithm_is_refused() -> None:
    unauthorized(AUTH, token(alg="HS512"))  # HS256 pinned
    unauthorized(AUTH, token(alg="HS384"))
    pinned_512 = Authenticator(secret=SECRET, algorithm="HS512")
    assert pinned_512.verify(token(alg="HS512")) == "alice"
    unauthorized(pinned_512, token(alg="HS256"))


def test_header_claiming_another_algorithm_with_a_valid_hs256_signature_is_refused() -> None:
    good = token()
    _, payload, sig = good.split(".")
    unauthorized(AUTH, f"{b64({'alg': 'HS512', 'typ': 'JWT'})}.{payload}.{sig}")


def test_missing_exp() -> None:
    unauthorized(AUTH, token(exp=None))


def test_missing_sub() -> None:
    unauthorized(AUTH, token(sub=None))


@pytest.mark.parametrize("sub", ["", "u" * (MAX_USER_ID_CHARS + 1), "a\nb", "a\x00", "tab\there", 42,
                                 ["alice"], {"id": "alice"}])
def test_bad_sub(sub: Any) -> None:
    unauthorized(AUTH, token(sub=sub))


def test_tampered_payload() -> None:
    header, _, sig = token().split(".")
    forged = b64({"sub": "mallory", "exp": int(time.time()) + 300})
    unauthorized(AUTH, f"{header}.{forged}.{sig}")


@pytest.mark.parametrize("tok", ["", "garbage", "a.b.c", "a.b", "....", "Bearer x.y.z"])
def test_garbage_tokens(tok: str) -> None:
    unauthorized(AUTH, tok)


def test_token_not_yet_valid() -> None:
    unauthorized(AUTH, token(nbf=int(time.time()) + 300))


# ---------------------------------------------------------------- issue


def test_issue_round_trip() -> None:
    tok = AUTH.issue("bob")
    assert AUTH.verify(tok) == "bob"
    claims = jwt.decode(tok, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "bob"
    assert 3590 <= claims["exp"] - claims["iat"] <= 3610
    assert jwt.get_unverified_header(tok)["alg"] == "HS256"


def test_issue_uses_the_pinned_algorithm_and_ttl() -> None:
    auth = Authenticator(secret=SECRET, algorithm="HS512")
    tok = auth.issue("bob", ttl_s=60)
    assert jwt.get_unverified_header(tok)["alg"] == "HS512"
    assert auth.verify(tok) == "bob"
    unauthorized(AUTH, tok)


def test_issued_token_with_negative_ttl_is_expired() -> None:
    unauthorized(AUTH, AUTH.issue("bob", ttl_s=-120))


def test_issued_token_is_bound_to_its_secret() -> None:
    unauthorized(Authenticator(secret=OTHER_SECRET), AUTH.issue("bob"))


@pytest.mark.parametrize("user", ["", "u" * (MAX_USER_ID_CHARS + 1), "a\rb"])
def test_issue_refuses_bad_user_ids(user: str) -> None:
    with pytest.raises(Unauthorized):
        AUTH.issue(user)


# ---------------------------------------------------------------- identify


def test_no_credentials() -> None:
    for auth in (AUTH, DEV):
        with pytest.raises(Unauthorized):
            auth.identify(header_token=None, hello_token=None, hello_user=None)
        with pytest.raises(Unauthorized):
            auth.identify(header_token="", hello_token="", hello_user=None)


def test_header_token() -> None:
    assert AUTH.identify(header_token=token(), hello_token=None, hello_user=None) == "alice"


def test_hello_token() -> None:
    assert AUTH.identify(header_token=None, hello_token=token(), hello_user=None) == "alice"


def test_hello_token_wins_over_header_token() -> None:
    assert AUTH.identify(header_token=token(sub="alice"), hello_token=token(sub="bob"),
                         hello_user=None) == "bob"


def test_dev_user_refused_without_dev_mode() -> None:
    with pytest.raises(Unauthorized) as exc:
        AUTH.identify(header_token=None, hello_token=None, hello_user="alice")
    assert "development" in exc.value.message


def test_dev_user_accepted_in_dev_mode() -> None:
    assert DEV.identify(header_token=None, hello_token=None, hello_user="alice") == "alice"
    assert DEV.identify(header_token="", hello_token="", hello_user="alice") == "alice"


def test_token_wins_over_dev_user() -> None:
    assert DEV.identify(header_token=None, hello_token=token(sub="bob"), hello_user="mallory") == "bob"
    assert DEV.identify(header_token=token(sub="bob"), hello_token=None, hello_user="mallory") == "bob"
    assert AUTH.identify(header_token=token(sub="bob"), hello_token=None, hello_user="mallory") == "bob"


def test_invalid_token_is_not_rescued_by_a_dev_user() -> None:
    with pytest.raises(Unauthorized):
        DEV.identify(header_token=None, hello_token=token(secret=OTHER_SECRET), hello_user="alice")
    with pytest.raises(Unauthorized):
        DEV.identify(header_token="garbage", hello_token=None, hello_user="alice")


def test_dev_mode_still_verifies_tokens() -> None:
    assert DEV.verify(token()) == "alice"
    unauthorized(DEV, token(exp=int(time.time()) - 120))


@pytest.mark.parametrize("user", ["", "u" * (MAX_USER_ID_CHARS + 1), "a\nb", "\x00", "x\x1f"])
def test_dev_mode_refuses_bad_user_ids(user: str) -> None:
    with pytest.raises(Unauthorized):
        DEV.identify(header_token=None, hello_token=None, hello_user=user)


# ---------------------------------------------------------------- check_user_id


@pytest.mark.parametrize("user", ["a", "alice", "u" * MAX_USER_ID_CHARS, "用户😀", "a b", "a:b{c}",
                                  "é\u0301"])
def test_good_user_ids(user: str) -> None:
    assert check_user_id(user) == user


@pytest.mark.parametrize("user", [None, 5, b"alice", ["a"], "", "u" * (MAX_USER_ID_CHARS + 1),
                                  "\x00", "a\x01", "line\nbreak", "cr\r", "tab\t", "esc\x1b[0m"])
def test_bad_user_ids(user: Any) -> None:
    with pytest.raises(Unauthorized):
        check_user_id(user)


@pytest.mark.parametrize("user", ["del\x7f", "c1\x85", "csi\x9b"])
def test_other_control_characters_are_refused(user: str) -> None:
    with pytest.raises(Unauthorized):
        check_user_id(user)


# ---------------------------------------------------------------- bearer_token


@pytest.mark.parametrize(("header", "expected"), [
    (None, None),
    ("", None),
    ("Bearer abc.def.ghi", "abc.def.ghi"),
    ("bearer abc", "abc"),
    ("BEARER abc", "abc"),
    ("Bearer   abc  ", "abc"),
    ("Bearer", None),
    ("Bearer ", None),
    ("Bearer    ", None),
    ("Basic dXNlcjpwYXNz", None),
    ("Token abc", None),
    ("Bearerabc", None),
    (" Bearer abc", None),
    ("abc", None),
])
def test_bearer_token(header: str | None, expected: str | None) -> None:
    assert bearer_token(header) == expected


def test_bearer_token_feeds_verify() -> None:
    tok = token()
    assert AUTH.identify(header_token=bearer_token(f"Bearer {tok}"), hello_token=None,
                         hello_user=None) == "alice"


# ---------------------------------------------------------------- claims the attacker's review found


def test_a_sub_with_a_lone_surrogate_is_refused_with_a_clear_reason() -> None:
    # JSON may carry "\ud800" escapes; they decode to a str that no UTF-8 layer
    # (Redis keys, logs, close reasons) can encode.
    tok = token(sub="a\ud800b")
    assert jwt.decode(tok, SECRET, algorithms=["HS256"])["sub"] == "a\ud800b"  # validly signed
    err = unauthorized(AUTH, tok)
    assert "unicode" in err.message.lower()
    err.message.encode("utf-8")  # the reason itself can go into a close frame


@pytest.mark.parametrize("user", ["\ud800", "a\udfffb", "\udc80x"])
def test_user_ids_with_lone_surrogates_are_refused(user: str) -> None:
    with pytest.raises(Unauthorized):
        check_user_id(user)
    with pytest.raises(Unauthorized):
        DEV.identify(header_token=None, hello_token=None, hello_user=user)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["9999999999", "1e10", True, ["9999999999"]])
def test_numeric_date_claims_must_be_json_numbers(claim: str, value: Any) -> None:
    # RFC 7519 section 4.1.4: exp (like nbf and iat) is a NumericDate, a JSON number.
    claims: dict[str, Any] = {"exp": int(time.time()) + 300, "iat": int(time.time()) - 10}
    claims[claim] = value
    unauthorized(AUTH, token(claims))


def test_numeric_dates_may_be_fractional() -> None:
    now = time.time()
    assert AUTH.verify(token({"exp": now + 300.5, "iat": now - 1.25, "nbf": now - 2.5})) == "alice"


# ---------------------------------------------------------------- roles, reasons, the audit hook


def test_roles_from_the_roles_claim() -> None:
    assert AUTH.authenticate_now(token()).roles == {"user"}
    ident = AUTH.authenticate_now(token(roles=["admin", "something-else"]))
    assert ident.roles == {"user", "admin"} and ident.role == "admin"
    assert ident.has("operator") and ident.has("user") and ident.has("admin")
    op = AUTH.authenticate_now(token(roles=["operator"]))
    assert op.has("operator") and not op.has("admin")


def test_a_configurable_roles_claim_and_dotted_paths() -> None:
    cognito = Authenticator(secret=SECRET, roles_claim="cognito:groups")
    assert cognito.authenticate_now(token({"cognito:groups": ["operator"]})).role == "operator"
    keycloak = Authenticator(secret=SECRET, roles_claim="realm_access.roles")
    assert keycloak.authenticate_now(token(realm_access={"roles": ["admin"]})).role == "admin"
    auth0 = Authenticator(secret=SECRET, roles_claim="https://rapport.example/roles")
    assert auth0.authenticate_now(token({"https://rapport.example/roles": ["admin"]})).role == "admin"


@pytest.mark.parametrize("roles", ["admin", {"admin": True}, [1], ["a"] * 65])
def test_a_malformed_roles_claim_is_refused_clearly(roles: Any) -> None:
    err = unauthorized(AUTH, token(roles=roles))
    assert "list of strings" in err.message


def test_development_tokens_are_marked() -> None:
    from protocol.development import DEV_JWT_SECRET

    dev_secret = Authenticator(secret=DEV_JWT_SECRET)
    assert dev_secret.authenticate_now(dev_secret.issue("x", roles=["admin"])).development
    assert not AUTH.authenticate_now(token()).development


def test_issue_with_roles() -> None:
    tok = AUTH.issue("ops", roles=["operator"])
    assert AUTH.authenticate_now(tok).role == "operator"


class _Recorder:
    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def record(self, kind: str, /, **fields: Any) -> None:
        self.entries.append((kind, fields))


@pytest.mark.parametrize(("tok", "reason"), [
    ("garbage", "malformed"),
    (token(secret=OTHER_SECRET), "bad_signature"),
    (token(exp=int(time.time()) - 600), "expired"),
    (token(exp="9999999999"), "claims"),
    (token(sub="a\nb"), "user_id"),
])
def test_every_refusal_is_audited_with_a_reason_code_and_never_the_token(tok: str, reason: str) -> None:
    recorder = _Recorder()
    auth = Authenticator(secret=SECRET, audit=recorder)  # type: ignore[arg-type]
    with pytest.raises(Unauthorized):
        auth.verify(tok)
    assert recorder.entries == [("auth_failure", {"reason": reason})]
    assert tok not in repr(recorder.entries)


def test_missing_credentials_and_refused_dev_users_are_audited() -> None:
    recorder = _Recorder()
    auth = Authenticator(secret=SECRET, audit=recorder)  # type: ignore[arg-type]
    with pytest.raises(Unauthorized):
        auth.identify(header_token=None, hello_token=None, hello_user=None)
    with pytest.raises(Unauthorized):
        auth.identify(header_token=None, hello_token=None, hello_user="alice")
    assert [f["reason"] for _, f in recorder.entries] == ["missing", "dev_user_refused"]
