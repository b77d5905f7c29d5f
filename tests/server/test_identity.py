"""Identity providers: a real JWK Set served over HTTP on 127.0.0.1, rotated mid-test.

In-process, against :class:`server.identity.JwksKeys` and the authenticator;
then end to end, two gateway processes verifying RS256 tokens over the
WebSocket, REST and the OpenAI-compatible endpoint while the provider rotates
its keys, and tokens with made-up key ids counted at the provider.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from conftest import SIM_FLAGS, ServerProcess, clean_prefix
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from wire import open_ws, recv, send, stream_turn

from protocol import client_frames
from protocol.errors import Unauthorized
from server.auth import Authenticator, AuthFailure
from server.config import ConfigError, settings_from
from server.identity import JwksKeys, parse_jwks

ISSUER = "https://issuer.example.test/"
AUDIENCE = "rapport-test-app"


class SigningKey:
    """A private key and its public JWK, as a provider holds them."""

    def __init__(self, alg: str = "RS256", kid: str | None = None) -> None:
        self.alg = alg
        self.kid = kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
        private: Any
        if alg.startswith("RS"):
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
        elif alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
        else:
            private = ed25519.Ed25519PrivateKey.generate()
            jwk = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
        self.private = private
        self.jwk = {**jwk, "kid": self.kid, "alg": alg, "use": "sig"}

    def token(self, sub: str = "alice", *, kid: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": kid or self.kid})


class JwksServer:
    """A JWK Set on 127.0.0.1 that counts its hits; :meth:`publish` rotates it."""

    def __init__(self, *keys: SigningKey) -> None:
        self.document: dict[str, Any] = {"keys": [k.jwk for k in keys]}
        self.hits = 0
        self.status = 200
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer._lock:
                    outer.hits += 1
                    body = json.dumps(outer.document).encode()
                    status = outer.status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="jwks server", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/.well-known/jwks.json"

    def publish(self, *keys: SigningKey) -> None:
        with self._lock:
            self.document = {"keys": [k.jwk for k in keys]}

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


@pytest.fixture(scope="module")
def rsa_a() -> SigningKey:
    return SigningKey("RS256")


@pytest.fixture(scope="module")
def rsa_b() -> SigningKey:
    return SigningKey("RS256")


@pytest.fixture
def provider(rsa_a: SigningKey) -> Iterator[JwksServer]:
    server = JwksServer(rsa_a)
    yield server
    server.close()


@pytest.fixture
async def authn(provider: JwksServer) -> AsyncIterator[Authenticator]:
    keys = JwksKeys(provider.url, algorithms={"RS256", "ES256", "EdDSA"}, refresh_s=600, min_refetch_s=0.5)
    await keys.start()
    yield Authenticator(algorithms=("RS256", "ES256", "EdDSA"), keys=keys, issuer=ISSUER, audience=(AUDIENCE,),
                        leeway_s=30)
    await keys.close()


def b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


async def refused(auth: Authenticator, token: str) -> AuthFailure:
    with pytest.raises(AuthFailure) as info:
        await auth.authenticate(token)
    return info.value


# ---------------------------------------------------------------- in process


async def test_a_token_of_the_provider_is_accepted(authn: Authenticator, rsa_a: SigningKey) -> None:
    identity = await authn.authenticate(rsa_a.token("alice", roles=["operator"]))
    assert identity.user_id == "alice"
    assert identity.roles == {"user", "operator"}
    assert not identity.development
    assert authn.verify(rsa_a.token("bob")) == "bob"  # the sync path, key already held


async def test_rotation_is_picked_up_without_a_restart(authn: Authenticator, provider: JwksServer,
                                                       rsa_a: SigningKey, rsa_b: SigningKey) -> None:
    assert provider.hits == 1
    provider.publish(rsa_b)  # A withdrawn, B published
    await asyncio.sleep(0.6)  # past the refetch interval
    assert (await authn.authenticate(rsa_b.token("carol"))).user_id == "carol"
    assert provider.hits == 2
    # A is gone from the set now: its tokens stop being accepted.
    assert (await refused(authn, rsa_a.token())).reason == "unknown_kid"


async def test_forged_kids_refetch_at_most_once_per_interval(authn: Authenticator, provider: JwksServer,
                                                             rsa_a: SigningKey) -> None:
    await asyncio.sleep(0.6)
    before = provider.hits
    forged = [rsa_a.token(kid=f"forged-{i}") for i in range(40)]
    results = await asyncio.gather(*(authn.authenticate(t) for t in forged), return_exceptions=True)
    assert all(isinstance(r, AuthFailure) and r.reason == "unknown_kid" for r in results)
    for tok in forged[:10]:  # and one after another, within the interval
        with pytest.raises(Unauthorized):
            authn.verify(tok)
        await refused(authn, tok)
    assert provider.hits - before == 1
    await asyncio.sleep(0.6)
    await refused(authn, forged[0])
    assert provider.hits - before == 2


async def test_the_sync_path_schedules_the_refetch(authn: Authenticator, provider: JwksServer,
                                                   rsa_a: SigningKey, rsa_b: SigningKey) -> None:
    provider.publish(rsa_a, rsa_b)
    await asyncio.sleep(0.6)
    with pytest.raises(AuthFailure) as info:
        authn.verify(rsa_b.token())  # never waits: refused, the refetch starts
    assert "retry" in info.value.message
    for _ in range(50):
        await asyncio.sleep(0.02)
        if authn.keys is not None and rsa_b.kid in authn.keys.kids:
            break
    assert authn.verify(rsa_b.token("dave")) == "dave"


async def test_ec_and_eddsa_keys(provider: JwksServer) -> None:
    es, ed, rs = SigningKey("ES256"), SigningKey("EdDSA"), SigningKey("RS256")
    provider.publish(es, ed, rs)
    keys = JwksKeys(provider.url, algorithms={"ES256", "EdDSA"}, min_refetch_s=5)
    await keys.start()
    try:
        auth = Authenticator(algorithms=("ES256", "EdDSA"), keys=keys, issuer=ISSUER, audience=(AUDIENCE,))
        assert (await auth.authenticate(es.token("e"))).user_id == "e"
        assert (await auth.authenticate(ed.token("f"))).user_id == "f"
        assert (await refused(auth, rs.token())).reason == "algorithm"  # RS256 not accepted here
    finally:
        await keys.close()


async def test_iss_aud_exp_nbf(authn: Authenticator, rsa_a: SigningKey) -> None:
    now = int(time.time())
    assert (await refused(authn, rsa_a.token(iss="https://evil.example/"))).reason == "issuer"
    assert (await refused(authn, rsa_a.token(iss=None))).reason == "claims"
    assert (await refused(authn, rsa_a.token(aud="another-app"))).reason == "audience"
    assert (await refused(authn, rsa_a.token(aud=None))).reason == "claims"
    assert (await authn.authenticate(rsa_a.token(aud=["x", AUDIENCE]))).user_id == "alice"
    # RFC 7519 section 4.1.4: a small leeway for clock skew, no more.
    assert (await authn.authenticate(rsa_a.token(exp=now - 10))).user_id == "alice"
    assert (await refused(authn, rsa_a.token(exp=now - 120))).reason == "expired"
    assert (await authn.authenticate(rsa_a.token(nbf=now + 10))).user_id == "alice"
    assert (await refused(authn, rsa_a.token(nbf=now + 120))).reason == "not_yet_valid"
    assert (await refused(authn, rsa_a.token(exp=str(now + 300)))).reason == "claims"
    assert (await refused(authn, rsa_a.token(exp=None))).reason == "claims"


async def test_an_hmac_token_signed_with_the_public_key_is_refused(authn: Authenticator,
                                                                  rsa_a: SigningKey) -> None:
    # The classic algorithm confusion: HS256 with the public key as the secret.
    # (signed by hand: PyJWT itself refuses to use a public key as an HMAC secret).
    public_pem = rsa_a.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    now = int(time.time())
    header = b64({"alg": "HS256", "typ": "JWT", "kid": rsa_a.kid})
    payload = b64({"sub": "mallory", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 300})
    mac = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    assert (await refused(authn, forged)).reason == "algorithm"
    unsigned = jwt.encode({"sub": "mallory", "exp": now + 300}, None, algorithm="none",
                          headers={"kid": rsa_a.kid})
    assert (await refused(authn, unsigned)).reason == "algorithm"


async def test_a_token_without_kid_is_refused(authn: Authenticator, rsa_a: SigningKey) -> None:
    tok = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, rsa_a.private, algorithm="RS256")
    err = await refused(authn, tok)
    assert err.reason == "malformed" and "kid" in err.message


async def test_a_failing_provider_keeps_the_keys_held(authn: Authenticator, provider: JwksServer,
                                                      rsa_a: SigningKey) -> None:
    provider.status = 500
    await asyncio.sleep(0.6)
    await refused(authn, rsa_a.token(kid="unknown"))  # triggers a refetch that fails
    assert (await authn.authenticate(rsa_a.token("still"))).user_id == "still"


def test_parse_jwks_skips_what_cannot_sign(rsa_a: SigningKey) -> None:
    doc = {"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {**rsa_a.jwk, "kid": "enc", "use": "enc"},
        {**rsa_a.jwk, "kid": "ps", "alg": "PS512"},
        {k: v for k, v in rsa_a.jwk.items() if k != "kid"},
        {"kty": "RSA", "kid": "broken", "n": "x"},
        "not a key",
        rsa_a.jwk,
    ]}
    assert list(parse_jwks(doc, algorithms={"RS256"})) == [rsa_a.kid]


@pytest.mark.parametrize("doc", [[], {"keys": "x"}, "keys", None])
def test_parse_jwks_refuses_what_is_not_a_jwk_set(doc: Any) -> None:
    from server.identity import JwksError

    with pytest.raises(JwksError):
        parse_jwks(doc, algorithms={"RS256"})


# ---------------------------------------------------------------- configuration


def load(*argv: str) -> Any:
    import argparse

    from server.config import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return settings_from(parser.parse_args(list(argv)), environ={})


def test_config_identity_provider() -> None:
    s = load("--jwks-url", "https://idp.example/jwks.json", "--jwt-algorithms", "RS256,ES256",
             "--jwt-algorithms", "EdDSA", "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE,
             "--host", "0.0.0.0")
    assert s.jwt_algorithms == ["RS256", "ES256", "EdDSA"]
    assert s.jwt_secret == ""  # no secret needed
    assert load("--jwks-url", "http://127.0.0.1:9/jwks").accepted_jwt_algorithms() == ["RS256"]
    assert load().accepted_jwt_algorithms() == ["HS256"]
    assert load("--jwt-algorithm", "HS512").accepted_jwt_algorithms() == ["HS512"]


@pytest.mark.parametrize(("argv", "needle"), [
    (["--jwks-url", "http://idp.example/jwks"], "https"),
    (["--jwks-url", "ftp://idp.example/jwks"], "https"),
    (["--jwks-url", "https://idp.example/jwks", "--jwt-algorithms", "HS256"], "public-key"),
    (["--jwt-algorithms", "RS256"], "--jwks-url"),
    (["--jwt-algorithms", "none"], "none"),
    (["--jwks-url", "https://idp.example/jwks", "--host", "0.0.0.0", "--jwt-issuer", ISSUER], "audience"),
    (["--jwt-leeway-s", "3600"], "leeway"),
    (["--jwks-min-refetch-s", "0"], "positive"),
    (["--roles-claim", " "], "roles"),
    (["--audit-retention-days", "0"], "retention"),
])
def test_config_identity_errors(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(*argv)
    assert needle in info.value.message


# ---------------------------------------------------------------- two gateways


@pytest.fixture
def gateways(provider: JwksServer, redis_url: str) -> Iterator[list[ServerProcess]]:
    prefix = f"rapport-test-idp:{uuid.uuid4().hex[:10]}:"
    flags = [*SIM_FLAGS, "--auth", "jwt", "--jwks-url", provider.url, "--jwt-issuer", ISSUER,
             "--jwt-audience", AUDIENCE, "--jwks-min-refetch-s", "1", "--turns-per-minute", "1000"]
    servers = [ServerProcess(prefix=prefix, extra=flags, name="rapport-idp") for _ in range(2)]
    try:
        for s in servers:
            s.start(wait_ready=False)
        for s in servers:
            s.wait_ready(60)
        yield servers
    finally:
        for s in servers:
            s.stop()
        clean_prefix(prefix)


async def hello(server: ServerProcess, token: str) -> dict[str, Any]:
    ws = await open_ws(server, hello=False)
    await send(ws, client_frames.hello(token=token))
    frame = await recv(ws)
    if frame["type"] == "ready":
        await stream_turn(ws, "hi")
    await ws.close()
    return frame


async def test_two_gateways_follow_a_key_rotation(gateways: list[ServerProcess], provider: JwksServer,
                                                  rsa_a: SigningKey, rsa_b: SigningKey) -> None:
    a, b = gateways
    assert provider.hits == 2  # one fetch at each start
    async with httpx.AsyncClient(timeout=30) as http:
        def bearer(tok: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {tok}"}

        tok_a = rsa_a.token("rotating-user")
        assert (await hello(a, tok_a))["user_id"] == "rotating-user"
        r = await http.get(b.base + "/v1/conversations", headers=bearer(tok_a))
        assert r.status_code == 200 and r.json()["conversations"]
        r = await http.post(a.base + "/v1/chat/completions", headers=bearer(tok_a),
                            json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text

        provider.publish(rsa_a, rsa_b)  # the provider rotates: B signs from now on
        await asyncio.sleep(1.1)  # past --jwks-min-refetch-s since the start-up fetch
        tok_b = rsa_b.token("rotating-user")
        assert (await hello(a, tok_b))["user_id"] == "rotating-user"  # the WebSocket waits for the refetch
        r = await http.get(b.base + "/v1/conversations", headers=bearer(tok_b))  # so does REST
        assert r.status_code == 200
        r = await http.post(b.base + "/v1/chat/completions", headers=bearer(tok_b),
                            json={"messages": [{"role": "user", "content": "hi again"}]})
        assert r.status_code == 200, r.text
        assert provider.hits == 4  # one refetch per process

        # Made-up key ids: at most one refetch per process per interval, however many.
        await asyncio.sleep(1.1)
        before = provider.hits
        forged = [rsa_b.token(kid=f"forged-{i}") for i in range(15)]
        for tok in forged:
            for server in (a, b):
                r = await http.get(server.base + "/v1/conversations", headers=bearer(tok))
                assert r.status_code == 401
        frame = await hello(a, forged[0])
        assert frame["type"] == "error" and frame["code"] == "unauthorized"
        assert provider.hits - before <= 2
