"""The audit log: one Redis Stream per deployment, trimmed by age, never holding text or tokens.

In process against the real Redis (field refusals, trimming, flood bounds,
``rapport audit tail``), then end to end: two gateways, every kind of entry
produced over the WebSocket, REST and the OpenAI endpoint, and a scan of the
stream and of both servers' logs for the message text and the tokens used.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import JWT_SECRET, ROOT, SIM_FLAGS, ServerProcess, clean_prefix, make_token
from wire import expect_close, open_ws, recv, recv_until, send, stream_turn

from protocol import client_frames, close_codes
from server.audit import Audit, peer_address
from sessions.keys import KeySpace


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield r
    await r.aclose()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    p = f"rapport-test-audit:{uuid.uuid4().hex[:10]}:"
    yield p
    clean_prefix(p, redis_url)


# ---------------------------------------------------------------- in process


@pytest.mark.parametrize("name", ["text", "token", "Authorization", "message", "prompt", "kind", "at"])
async def test_fields_that_could_carry_text_or_credentials_are_refused(redis_client: aioredis.Redis,
                                                                        prefix: str, name: str) -> None:
    audit = Audit(redis_client, KeySpace(prefix))
    with pytest.raises(ValueError):
        audit.record("moderation_block", **{name: "x"})
    with pytest.raises(ValueError):
        audit.record("not a kind")


async def test_entries_older_than_the_retention_are_trimmed(redis_client: aioredis.Redis, prefix: str) -> None:
    key = KeySpace(prefix).audit()
    old_ms = int(time.time() * 1000) - 3 * 86_400_000
    await redis_client.xadd(key, {"kind": "auth_failure", "reason": "old"}, id=f"{old_ms}-0")
    audit = Audit(redis_client, KeySpace(prefix), retention_days=2)
    token = peer_address.set("192.0.2.1:5555")
    try:
        audit.record("user_erased", actor="a", target="b", deleted_keys=3)
    finally:
        peer_address.reset(token)
    assert await audit.flush()
    rows = await redis_client.xrange(key)
    assert [f["kind"] for _, f in rows] == ["user_erased"]
    fields = rows[0][1]
    assert fields["peer"] == "192.0.2.1:5555" and fields["deleted_keys"] == "3" and fields["node"]
    assert abs(int(fields["at"]) - time.time() * 1000) < 60_000


async def test_a_flood_of_one_kind_is_bounded_and_counted(redis_client: aioredis.Redis, prefix: str) -> None:
    audit = Audit(redis_client, KeySpace(prefix), rate_per_kind=50, burst_per_kind=5)
    audit.start()
    try:
        for _ in range(25):
            audit.record("auth_failure", reason="bad_signature")
        audit.record("admin_action", actor="x", action="audit.read", status="ok")  # another kind: unaffected
        await asyncio.sleep(0.1)  # the bucket refills a few tokens
        audit.record("auth_failure", reason="expired")
        assert await audit.flush()
    finally:
        await audit.close()
    rows = [f for _, f in await redis_client.xrange(KeySpace(prefix).audit())]
    failures = [f for f in rows if f["kind"] == "auth_failure"]
    assert len(failures) == 6
    assert failures[-1]["reason"] == "expired" and failures[-1]["suppressed"] == "20"
    assert sum(f["kind"] == "admin_action" for f in rows) == 1


async def test_rapport_audit_tail(redis_client: aioredis.Redis, prefix: str, redis_url: str) -> None:
    audit = Audit(redis_client, KeySpace(prefix))
    for i in range(3):
        audit.record("rate_limited", user=f"u{i}", limit=1)
    await audit.flush()
    cmd = [sys.executable, "-m", "rapport.cli", "audit", "tail", "--redis-url", redis_url, "--redis-prefix", prefix]
    out = subprocess.run([*cmd, "-n", "2"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["user"] for e in lines] == ["u1", "u2"]

    follower = subprocess.Popen([*cmd, "-n", "1", "--follow"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None

        async def line() -> dict[str, str]:
            assert follower.stdout is not None
            return json.loads(await asyncio.wait_for(asyncio.to_thread(follower.stdout.readline), 20))

        assert (await line())["user"] == "u2"  # the newest entry: it is following from there
        audit.record("user_erased", actor="admin", target="gone", deleted_keys=1)
        await audit.flush()
        assert (await line())["target"] == "gone"
    finally:
        follower.terminate()
        follower.wait(10)
    out = subprocess.run([*cmd, "--kind", "user_erased"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                         check=True)
    assert [json.loads(x)["kind"] for x in out.stdout.splitlines()] == ["user_erased"]

    bad = subprocess.run([*cmd[:-1], ""], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--redis-prefix" in bad.stderr


# ---------------------------------------------------------------- two gateways, every kind


MARKER = "zebra-quartz-" + uuid.uuid4().hex[:12]


@pytest.fixture
def gateways(redis_url: str) -> Iterator[list[ServerProcess]]:
    p = f"rapport-test-audit-e2e:{uuid.uuid4().hex[:10]}:"
    flags = [*SIM_FLAGS, "--sim-echo", "--auth", "jwt", "--turns-per-minute", "2",
             "--max-connections-per-user", "1"]
    servers = [ServerProcess(prefix=p, extra=flags, log_level="debug", name="rapport-audit") for _ in range(2)]
    try:
        for s in servers:
            s.start(wait_ready=False)
        for s in servers:
            s.wait_ready(60)
        yield servers
    finally:
        for s in servers:
            s.stop()
        clean_prefix(p, redis_url)


async def test_every_kind_is_audited_and_no_text_or_token_reaches_the_stream_or_logs(
        gateways: list[ServerProcess], redis_client: aioredis.Redis) -> None:
    a, b = gateways
    user = f"audited-{uuid.uuid4().hex[:6]}"
    token = make_token(user)
    forged = make_token(f"{MARKER}-mallory", secret="another-secret-" + "y" * 32)
    admin = make_token("root-admin", roles=["admin"])

    # A turn whose text (echoed by the simulated engine) carries the marker, then two more: rate limited.
    ws = await open_ws(a, token=token)
    end = (await stream_turn(ws, f"my secret is {MARKER}"))[-1]
    assert MARKER in end["text"]
    await stream_turn(ws, f"again {MARKER}")
    await send(ws, client_frames.turn_start(f"third {MARKER}"))
    frames = await recv_until(ws, "error")
    assert frames[-1]["code"] == "rate_limited"
    # A second socket for the same user on the other gateway: over the cap of 1.
    second = await open_ws(b, token=token, hello=False)
    await send(second, client_frames.hello(token=token))
    await expect_close(second, close_codes.TOO_MANY_CONNECTIONS)
    await ws.close()

    # Refused credentials on every surface.
    bad = await open_ws(b, hello=False)
    await send(bad, client_frames.hello(token=forged))
    assert (await recv(bad))["code"] == "unauthorized"
    await expect_close(bad, close_codes.UNAUTHORIZED)
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(a.base + "/v1/conversations", headers={"Authorization": f"Bearer {forged}"})
        assert r.status_code == 401
        r = await http.post(b.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {forged}"},
                            json={"messages": [{"role": "user", "content": MARKER}]})
        assert r.status_code == 401
        r = await http.post(a.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                            json={"messages": [{"role": "user", "content": f"openai {MARKER}"}]})
        assert r.status_code in (200, 429)  # the user is rate limited by now: either way no text is kept
        # An admin erases the user; an operator endpoint read.
        r = await http.delete(f"{b.base}/v1/admin/users/{user}", headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 200
        r = await http.get(f"{a.base}/v1/admin/audit", headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 200

    key = KeySpace(a.prefix).audit()
    wanted = {"auth_failure", "rate_limited", "connection_cap", "user_erased", "admin_action"}
    deadline = time.monotonic() + 10
    while True:
        rows = await redis_client.xrange(key)
        kinds = {f["kind"] for _, f in rows}
        if wanted <= kinds or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert wanted <= kinds, kinds
    by_kind: dict[str, list[dict[str, str]]] = {}
    for _, f in rows:
        by_kind.setdefault(f["kind"], []).append(f)
    assert {f["reason"] for f in by_kind["auth_failure"]} == {"bad_signature"}
    assert len(by_kind["auth_failure"]) >= 3
    assert all(f["peer"].startswith("127.0.0.1:") for f in by_kind["auth_failure"])
    assert by_kind["rate_limited"][0]["user"] == user
    assert by_kind["connection_cap"][0]["user"] == user and by_kind["connection_cap"][0]["cap"] == "1"
    assert by_kind["user_erased"][0]["actor"] == "root-admin"
    assert {f["action"] for f in by_kind["admin_action"]} >= {"user.erase", "audit.read"}
    assert len({f["node"] for _, f in rows}) == 2  # both gateways wrote to the one stream

    secrets = [MARKER, token, forged, admin, JWT_SECRET]
    stream_text = json.dumps(rows)
    for s in secrets:
        assert s not in stream_text
    for server in (a, b):
        log = server.log(None)
        assert log, "the server wrote no log at all"
        for s in secrets:
            assert s not in log, f"{server.log_path} holds a secret or the message text"
