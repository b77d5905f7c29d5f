"""Pinned facts end to end (docs/protocol.md addition 22): ``memory.*`` frames over both
subprotocols and REST, against real server processes sharing the real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import SIM_FLAGS, ServerProcess, clean_prefix, make_token
from wire import JSON, MSGPACK, expect_error, open_ws, recv, recv_until, send

from protocol import client_frames
from protocol.frames import MAX_FACT_CHARS
from sessions.memory import DEFAULT_MAX_FACTS


def user() -> str:
    return f"mem-{uuid.uuid4().hex[:8]}"


def bearer(user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(user_id)}"}


@pytest.fixture
async def http(sim_server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim_server.base, timeout=30) as client:
        yield client


async def memory_answer(ws) -> dict:
    frames = [f for f in await recv_until(ws, "memory", timeout=10) if f["type"] != "ping"]
    assert [f["type"] for f in frames] == ["memory"], frames
    return frames[-1]


def texts(frame: dict) -> list[str]:
    return [f["text"] for f in frame["facts"]]


@pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
async def test_add_list_delete_over_the_socket(sim_server, subprotocol) -> None:
    ws = await open_ws(sim_server, user=user(), subprotocol=subprotocol)
    try:
        await send(ws, client_frames.memory_list())
        assert (await memory_answer(ws))["facts"] == []

        await send(ws, client_frames.memory_add("I live in Lyon"))
        first = await memory_answer(ws)
        assert texts(first) == ["I live in Lyon"]
        fact = first["facts"][0]
        assert fact["id"].startswith("f_") and isinstance(fact["created_at"], int)

        await send(ws, client_frames.memory_add("My cat is called 味噌 🐈\nand she is old"))
        second = await memory_answer(ws)
        # Every answer is the whole list, oldest first; a fact is one line.
        assert texts(second) == ["I live in Lyon", "My cat is called 味噌 🐈 and she is old"]

        await send(ws, client_frames.memory_add("I live in Lyon"))  # already pinned: no duplicate
        assert (await memory_answer(ws))["facts"] == second["facts"]

        await send(ws, client_frames.memory_delete(fact["id"]))
        assert texts(await memory_answer(ws)) == ["My cat is called 味噌 🐈 and she is old"]
    finally:
        await ws.close()


async def test_bad_memory_frames_are_errors_and_the_socket_stays(sim_server) -> None:
    ws = await open_ws(sim_server, user=user())
    try:
        await send(ws, {"type": "memory.add"})
        assert "text" in (await expect_error(ws, "bad_request"))["message"]
        await send(ws, client_frames.memory_add("   "))
        await expect_error(ws, "bad_request")
        await send(ws, client_frames.memory_add("x" * (MAX_FACT_CHARS + 1)))
        await expect_error(ws, "bad_request")
        await send(ws, {"type": "memory.add", "text": 5})
        await expect_error(ws, "bad_request")
        await send(ws, {"type": "memory.delete"})
        await expect_error(ws, "bad_request")
        await send(ws, client_frames.memory_delete("f_0000000000000000"))
        await expect_error(ws, "not_found")
        await send(ws, client_frames.memory_list())
        assert (await memory_answer(ws))["facts"] == []
    finally:
        await ws.close()


async def test_facts_are_the_users_across_conversations_and_processes(sim_server, sim_server_b) -> None:
    me, other = user(), user()
    ws_a = await open_ws(sim_server, user=me)
    ws_b = await open_ws(sim_server_b, user=me)
    ws_other = await open_ws(sim_server_b, user=other)
    try:
        await send(ws_a, client_frames.turn_start("hello", conversation_id="one"))
        await recv_until(ws_a, "turn.end", timeout=15)
        await send(ws_a, client_frames.memory_add("I am vegetarian"))
        pinned = await memory_answer(ws_a)

        # Another process, another conversation: the same facts.
        await send(ws_b, client_frames.turn_start("hi again", conversation_id="two"))
        await recv_until(ws_b, "turn.end", timeout=15)
        await send(ws_b, client_frames.memory_list())
        assert (await memory_answer(ws_b))["facts"] == pinned["facts"]

        # Not another user's.
        await send(ws_other, client_frames.memory_list())
        assert (await memory_answer(ws_other))["facts"] == []
        await send(ws_other, client_frames.memory_delete(pinned["facts"][0]["id"]))
        await expect_error(ws_other, "not_found")
        await send(ws_b, client_frames.memory_list())
        assert (await memory_answer(ws_b))["facts"] == pinned["facts"]
    finally:
        for ws in (ws_a, ws_b, ws_other):
            await ws.close()


async def test_rest_memory(sim_server, http) -> None:
    me = user()
    headers = bearer(me)
    listed = await http.get("/v1/users/me/memory", headers=headers)
    assert listed.status_code == 200 and listed.json() == {"facts": []}

    added = await http.post("/v1/users/me/memory", headers=headers, json={"text": "I work nights"})
    assert added.status_code == 200, added.text
    body = added.json()
    assert body["fact"]["text"] == "I work nights" and body["facts"] == [body["fact"]]

    again = await http.post("/v1/users/me/memory", headers=headers, json={"text": "I work nights"})
    assert again.json()["fact"] == body["fact"] and len(again.json()["facts"]) == 1

    # The socket sees what REST pinned.
    ws = await open_ws(sim_server, user=me)
    try:
        await send(ws, client_frames.memory_list())
        assert (await memory_answer(ws))["facts"] == body["facts"]
    finally:
        await ws.close()

    gone = await http.delete(f"/v1/users/me/memory/{body['fact']['id']}", headers=headers)
    assert gone.status_code == 200 and gone.json() == {"facts": []}
    missing = await http.delete(f"/v1/users/me/memory/{body['fact']['id']}", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_rest_refuses_bad_input(http) -> None:
    headers = bearer(user())
    for bad in ({}, {"text": ""}, {"text": "  \n"}, {"text": 3}, {"text": "x" * (MAX_FACT_CHARS + 1)}):
        answer = await http.post("/v1/users/me/memory", headers=headers, json=bad)
        assert answer.status_code == 400, (bad, answer.text)
        assert answer.json()["error"]["code"] == "bad_request"
    not_json = await http.post("/v1/users/me/memory", headers=headers, content=b"remember me")
    assert not_json.status_code == 400
    huge = await http.post("/v1/users/me/memory", headers=headers, content=b"{" + b" " * 100_000 + b"}")
    assert huge.status_code == 413
    assert (await http.get("/v1/users/me/memory")).status_code == 401
    assert (await http.get("/v1/users/me/memory", headers=headers)).json() == {"facts": []}


async def test_the_cap_holds(http) -> None:
    headers = bearer(user())
    for i in range(DEFAULT_MAX_FACTS):
        answer = await http.post("/v1/users/me/memory", headers=headers, json={"text": f"fact number {i}"})
        assert answer.status_code == 200, answer.text
    over = await http.post("/v1/users/me/memory", headers=headers, json={"text": "one too many"})
    assert over.status_code == 400 and "at most" in over.json()["error"]["message"]
    facts = (await http.get("/v1/users/me/memory", headers=headers)).json()["facts"]
    assert [f["text"] for f in facts] == [f"fact number {i}" for i in range(DEFAULT_MAX_FACTS)]


async def test_deleting_the_user_removes_the_facts(sim_server, http) -> None:
    me = user()
    headers = bearer(me)
    await http.post("/v1/users/me/memory", headers=headers, json={"text": "forget me"})
    erased = await http.delete("/v1/users/me", headers=headers)
    assert erased.status_code == 200 and erased.json()["deleted_keys"] >= 1
    assert (await http.get("/v1/users/me/memory", headers=headers)).json() == {"facts": []}


@pytest.fixture(scope="module")
def moderated_server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path: Path = tmp_path_factory.mktemp("memory-moderation") / "blocklist.txt"
    path.write_text("forbiddenword\n", encoding="utf-8")
    prefix = f"rapport-test-mem-mod:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[*SIM_FLAGS, "--auth", "dev", "--moderation-list", str(path)]).start()
    yield server
    server.stop()
    clean_prefix(prefix)


async def test_a_blocked_term_cannot_be_pinned(moderated_server) -> None:
    me = user()
    ws = await open_ws(moderated_server, user=me)
    try:
        await send(ws, client_frames.memory_add("remember the FORBIDDENWORD please"))
        await expect_error(ws, "content_filter")
        await send(ws, client_frames.memory_list())
        assert (await memory_answer(ws))["facts"] == []
    finally:
        await ws.close()
    async with httpx.AsyncClient(base_url=moderated_server.base, timeout=30) as client:
        answer = await client.post("/v1/users/me/memory", headers=bearer(me), json={"text": "forbiddenword"})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "content_filter"
        assert (await client.get("/v1/users/me/memory", headers=bearer(me))).json() == {"facts": []}


async def test_ping_still_answers_after_memory_frames(sim_server) -> None:
    ws = await open_ws(sim_server, user=user())
    try:
        await send(ws, client_frames.memory_list())
        await memory_answer(ws)
        await send(ws, client_frames.ping(7))
        frame = await recv(ws)
        while frame["type"] == "ping":
            frame = await recv(ws)
        assert frame == {"type": "pong", "t": 7}
    finally:
        await ws.close()
