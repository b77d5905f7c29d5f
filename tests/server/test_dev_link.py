"""The development sign-in link (protocol addition 21): printed only when it gives nothing away."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import jwt
import pytest
from conftest import SIM_FLAGS, ServerProcess, clean_prefix
from wire import open_ws, recv_until, send

from protocol.development import DEV_JWT_SECRET
from server.config import Settings
from server.dev_link import (
    ANNOUNCEMENT,
    LINK_TTL_S,
    development_link,
    offers_development_link,
    page_origin,
)

pytestmark = pytest.mark.timeout(120)

LINK = re.compile(re.escape(ANNOUNCEMENT) + r"(http://127\.0\.0\.1:(\d+)/#token=([A-Za-z0-9_.-]+))")


def _links(server: ServerProcess, *, expect: bool, wait_s: float = 10.0) -> list[re.Match[str]]:
    """The links in the server's output; when one is expected, waits for it (it follows start-up)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = list(LINK.finditer(server.log(None)))
        if found or not expect or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


# ---------------------------------------------------------------- the rule, without a server


def test_offered_only_on_loopback_with_the_development_secret():
    assert offers_development_link(Settings(host="127.0.0.1", jwt_secret=DEV_JWT_SECRET))
    assert offers_development_link(Settings(host="::1", jwt_secret=DEV_JWT_SECRET))
    assert not offers_development_link(Settings(host="0.0.0.0", jwt_secret=DEV_JWT_SECRET))
    assert not offers_development_link(Settings(host="10.1.2.3", jwt_secret=DEV_JWT_SECRET))
    assert not offers_development_link(Settings(host="127.0.0.1", jwt_secret="a-secret-of-the-operator-" * 2))
    assert not offers_development_link(Settings(host="127.0.0.1", jwt_secret=""))
    assert not offers_development_link(Settings(host="127.0.0.1", jwt_secret=DEV_JWT_SECRET,
                                                jwks_url="http://127.0.0.1:9/jwks.json"))
    assert development_link(Settings(host="0.0.0.0", jwt_secret=DEV_JWT_SECRET), 8000) is None


def test_link_points_at_the_loopback_page():
    assert page_origin("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert page_origin("localhost", 8000) == "http://127.0.0.1:8000"
    assert page_origin("::1", 8000) == "http://[::1]:8000"
    assert page_origin("[::1]", 8000) == "http://[::1]:8000"
    link = development_link(Settings(host="127.0.0.1", jwt_secret=DEV_JWT_SECRET), 8123)
    assert link is not None and link.startswith("http://127.0.0.1:8123/#token=")
    claims = jwt.decode(link.split("#token=", 1)[1], DEV_JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "dev" and claims["name"] == "Developer"
    assert claims["exp"] - claims["iat"] == LINK_TTL_S


# ---------------------------------------------------------------- real servers


async def test_a_development_server_prints_a_working_link(redis_url):
    prefix = f"rapport-test-devlink:{uuid.uuid4().hex[:10]}:"
    # No --jwt-secret: on loopback the server signs with the development secret.
    server = ServerProcess(prefix=prefix, jwt_secret=None, extra=[*SIM_FLAGS]).start()
    try:
        found = _links(server, expect=True)
        assert len(found) == 1, server.log()
        url, port, token = found[0].groups()
        assert int(port) == server.port
        claims = jwt.decode(token, DEV_JWT_SECRET, algorithms=["HS256"])
        assert claims["sub"] == "dev" and claims["name"] == "Developer"
        assert 0 < claims["exp"] - time.time() <= LINK_TTL_S

        # The token works over REST ...
        async with httpx.AsyncClient(base_url=server.base, timeout=10) as http:
            r = await http.get("/v1/conversations", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
            page = await http.get(url.split("#", 1)[0])
            assert page.status_code == 200 and "<html" in page.text
        # ... and on the WebSocket, as the page sends it (hello.token).
        ws = await open_ws(server, hello=False)
        try:
            await send(ws, {"type": "hello", "token": token})
            ready = (await recv_until(ws, "ready"))[-1]
            assert ready["user_id"] == "dev"
        finally:
            await ws.close()
    finally:
        server.stop()
        clean_prefix(prefix, redis_url)


def test_a_server_with_its_own_secret_prints_no_link(redis_url):
    prefix = f"rapport-test-devlink:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[*SIM_FLAGS]).start()  # the tests' own secret
    try:
        time.sleep(1.0)  # the link would follow start-up at once
        assert _links(server, expect=False) == []
        assert "#token=" not in server.log(None)
    finally:
        server.stop()
        clean_prefix(prefix, redis_url)


def test_workers_print_the_link_once(redis_url):
    prefix = f"rapport-test-devlink:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, jwt_secret=None, extra=[*SIM_FLAGS, "--workers", "2"]).start(
        timeout=90)
    try:
        found = _links(server, expect=True, wait_s=30)
        time.sleep(1.0)  # had a worker printed one too, it would be there by now
        found = _links(server, expect=False)
        assert len(found) == 1, server.log()
        token = found[0].group(3)
        r = httpx.get(server.base + "/v1/conversations", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200, r.text
    finally:
        server.stop()
        clean_prefix(prefix, redis_url)
