"""Operator and admin endpoints under /v1/admin/: roles enforced, every action audited."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import SIM_FLAGS, ServerProcess, clean_prefix, make_token
from wire import open_ws, stream_turn

from protocol.development import DEV_JWT_SECRET
from server.app import create_app
from server.auth import Authenticator
from server.config import add_arguments, settings_from
from sessions.keys import KeySpace

FLAGS = [*SIM_FLAGS, "--auth", "jwt", "--turns-per-minute", "1000"]


@pytest.fixture(scope="module")
def admin_server(redis_url: str) -> Iterator[ServerProcess]:
    prefix = f"rapport-test-admin:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=FLAGS, name="rapport-admin").start()
    yield server
    server.stop()
    clean_prefix(prefix)


@pytest.fixture
async def http(admin_server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=admin_server.base, timeout=30) as client:
        yield client


def bearer(user: str, *roles: str) -> dict[str, str]:
    extra = {"roles": list(roles)} if roles else {}
    return {"Authorization": f"Bearer {make_token(user, **extra)}"}


async def audit_entries(server: ServerProcess) -> list[dict[str, str]]:
    r = aioredis.Redis.from_url(server.redis_url, decode_responses=True)
    try:
        rows = await r.xrange(KeySpace(server.prefix).audit())
    finally:
        await r.aclose()
    return [{"id": i, **f} for i, f in rows]


async def test_roles_are_enforced(admin_server: ServerProcess, http: httpx.AsyncClient) -> None:
    target = f"target-{uuid.uuid4().hex[:6]}"
    ws = await open_ws(admin_server, token=make_token(target))
    await stream_turn(ws, "hello there", conversation_id="c1")
    await ws.close()
    paths = [("GET", f"/v1/admin/users/{target}/conversations"), ("DELETE", f"/v1/admin/users/{target}"),
             ("GET", "/v1/admin/audit")]

    for method, path in paths:
        assert (await http.request(method, path)).status_code == 401
        assert (await http.request(method, path, headers={"Authorization": "Bearer nope"})).status_code == 401
        r = await http.request(method, path, headers=bearer("plain-user"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text

    ops = bearer("ops-1", "operator")
    r = await http.get(f"/v1/admin/users/{target}/conversations", headers=ops)
    assert r.status_code == 200
    assert [c["conversation_id"] for c in r.json()["conversations"]] == ["c1"]
    assert "text" not in r.text  # ids and times only
    assert (await http.get("/v1/admin/audit", headers=ops)).status_code == 200
    r = await http.delete(f"/v1/admin/users/{target}", headers=ops)
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"]

    r = await http.delete(f"/v1/admin/users/{target}", headers=bearer("root-1", "admin"))
    assert r.status_code == 200 and r.json()["deleted"] is True and r.json()["deleted_keys"] > 0
    r = await http.get(f"/v1/admin/users/{target}/conversations", headers=ops)
    assert r.json()["conversations"] == []

    actions = [(e["actor"], e["action"], e.get("target"), e["status"])
               for e in await audit_entries(admin_server) if e["kind"] == "admin_action"]
    assert ("plain-user", "user.erase", target, "forbidden") in actions
    assert ("ops-1", "conversations.list", target, "ok") in actions
    assert ("ops-1", "user.erase", target, "forbidden") in actions
    assert ("root-1", "user.erase", target, "ok") in actions
    erased = [e for e in await audit_entries(admin_server) if e["kind"] == "user_erased"]
    assert erased and erased[-1]["actor"] == "root-1" and erased[-1]["target"] == target


async def test_a_user_id_with_slashes_and_unicode(admin_server: ServerProcess, http: httpx.AsyncClient) -> None:
    user = f"org/ü-{uuid.uuid4().hex[:4]}"
    r = await http.get(f"/v1/admin/users/{quote(user, safe='')}/conversations", headers=bearer("o", "operator"))
    assert r.status_code == 200 and r.json()["user_id"] == user
    r = await http.get("/v1/admin/users/a%01b/conversations", headers=bearer("o", "operator"))
    assert r.status_code == 400


async def test_reading_the_audit_log(admin_server: ServerProcess, http: httpx.AsyncClient) -> None:
    for _ in range(3):
        await http.get("/v1/conversations", headers={"Authorization": "Bearer bad"})
    ops = bearer("ops-2", "operator")
    r = await http.get("/v1/admin/audit", params={"kind": "auth_failure", "limit": 2}, headers=ops)
    body = r.json()
    assert r.status_code == 200 and len(body["entries"]) == 2
    assert all(e["kind"] == "auth_failure" and e["reason"] == "malformed" for e in body["entries"])
    assert body["entries"][0]["id"] > body["entries"][1]["id"]  # newest first
    older = await http.get("/v1/admin/audit", params={"kind": "auth_failure", "limit": 2,
                                                       "before": body["next_before"]}, headers=ops)
    assert older.status_code == 200 and older.json()["entries"]
    assert older.json()["entries"][0]["id"] < body["entries"][-1]["id"]
    for bad in ({"limit": "0"}, {"limit": "x"}, {"before": "x"}, {"kind": "A B"}):
        r = await http.get("/v1/admin/audit", params=bad, headers=ops)
        assert r.status_code == 400, bad


async def test_development_tokens_reach_admin_endpoints_only_from_loopback(redis_url: str) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    prefix = f"rapport-test-admin-dev:{uuid.uuid4().hex[:10]}:"
    settings = settings_from(parser.parse_args(["--engine", "simulated", "--redis-url", redis_url,
                                                "--redis-prefix", prefix]), environ={})
    assert settings.jwt_secret == DEV_JWT_SECRET  # loopback without a secret
    app = create_app(settings)
    token = Authenticator(secret=DEV_JWT_SECRET).issue("root", roles=["admin"])
    headers = {"Authorization": f"Bearer {token}"}
    try:
        for peer, status in ((("203.0.113.9", 40000), 403), (("127.0.0.1", 40000), 200)):
            transport = httpx.ASGITransport(app=app, client=peer)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                r = await client.get("/v1/admin/audit", headers=headers)
                assert r.status_code == status, r.text
        entries = r.json()["entries"]  # read from loopback, after the refusal
        assert any(e.get("status") == "forbidden_development_token" and e.get("peer") == "203.0.113.9:40000"
                   for e in entries)
    finally:
        await app.state.audit.redis.aclose()
        await app.state.runtime.redis.aclose()
        await app.state.runtime.blocking_redis.aclose()
        clean_prefix(prefix, redis_url)
