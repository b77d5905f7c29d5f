"""Feedback end to end (docs/protocol.md addition 20): ratings over REST and the
WebSocket, choices by ``turn.select``, kept as training snapshots in the real Redis
by a real server process (simulated engine), and what erasing the user leaves."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import ServerProcess, make_token
from wire import open_ws, recv_until, send

from protocol import client_frames
from server.feedback_api import MAX_BODY_BYTES
from sessions.keys import KeySpace
from sessions.training import MAX_REASON_CHARS, Rating, TrainingLog
from sessions.training_export import chosen_and_rejected


@pytest.fixture
async def http(sim_server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim_server.base, timeout=30) as client:
        yield client


@pytest.fixture
async def training(sim_prefix: str, redis_url: str) -> AsyncIterator[TrainingLog]:
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield TrainingLog(redis, KeySpace(sim_prefix))
    finally:
        await redis.aclose()


def bearer(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(user)}"}


async def _turn(ws, frame: dict) -> list[dict]:
    await send(ws, frame)
    frames = [f for f in await recv_until(ws, "turn.end", timeout=15) if f["type"] != "ping"]
    assert frames[0]["type"] == "turn.accepted", frames[0]
    return frames


async def _answer(ws, kind: str) -> dict:
    frames = [f for f in await recv_until(ws, kind, timeout=10) if f["type"] not in ("ping", "turn.delta")]
    assert frames[-1]["type"] == kind, frames
    return frames[-1]


async def _exchange(sim_server: ServerProcess, user: str, conv: str = "rated") -> tuple[object, str, list[str]]:
    """An open socket and an exchange with three alternatives: (ws, exchange_id, [turn ids])."""
    ws = await open_ws(sim_server, user=user)
    first = await _turn(ws, client_frames.turn_start("tell me a story", conversation_id=conv))
    exchange = first[0]["turn_id"]
    turns = [exchange]
    for _ in range(2):
        again = await _turn(ws, client_frames.turn_regenerate(conversation_id=conv, exchange_id=exchange))
        turns.append(again[0]["turn_id"])
    return ws, exchange, turns


async def test_ratings_and_a_choice_keep_the_exchange_for_training(sim_server, http, training) -> None:
    user = f"fb-{uuid.uuid4().hex[:8]}"
    ws, exchange, turns = await _exchange(sim_server, user)

    answer = await http.post("/v1/feedback", headers=bearer(user),
                             json={"turn_id": turns[0], "rating": -1, "reason": "too short"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"turn_id": turns[0], "rating": -1}

    await send(ws, client_frames.turn_select(turns[1], conversation_id="rated"))
    selected = await _answer(ws, "turn.selected")
    assert selected["exchange_id"] == exchange and selected["turn_id"] == turns[1]

    await send(ws, client_frames.feedback(turns[2], 1))
    recorded = await _answer(ws, "feedback.recorded")
    assert recorded == {"type": "feedback.recorded", "turn_id": turns[2], "rating": 1}
    # Rating again replaces the rating.
    replaced = await http.post("/v1/feedback", headers=bearer(user), json={"turn_id": turns[0], "rating": 1})
    assert replaced.status_code == 200 and replaced.json() == {"turn_id": turns[0], "rating": 1}
    await ws.close()

    record = await training.get(user, exchange)
    assert record is not None
    snap = record.snapshot
    assert (snap.user_id, snap.conversation_id, snap.exchange_id) == (user, "rated", exchange)
    assert [a.turn_id for a in snap.alternatives] == turns
    assert all(a.finish_reason for a in snap.alternatives)
    assert snap.selected == turns[1]
    assert snap.prompt[-1].role == "user" and snap.prompt[-1].content == "tell me a story"
    assert {t: (r.rating, r.reason) for t, r in record.ratings.items()} == {turns[0]: (1, None),
                                                                          turns[2]: (1, None)}
    assert all(isinstance(r, Rating) and r.at_ms > 0 for r in record.ratings.values())
    chosen, rejected = chosen_and_rejected(record)
    usable = [a.turn_id for a in snap.alternatives if a.text.strip()]
    assert [a.turn_id for a in chosen] == [t for t in (turns[0], turns[2]) if t in usable]
    assert [a.turn_id for a in rejected] == []  # the selected one is neither rated -1 nor unselected
    assert exchange in [r.snapshot.exchange_id async for r in training.iter_records()]


async def test_the_rest_route_refuses_bad_requests_clearly(sim_server, http) -> None:
    user = f"fb-bad-{uuid.uuid4().hex[:8]}"
    ws, _, turns = await _exchange(sim_server, user, conv="bad")
    await ws.close()
    headers = bearer(user)

    async def refused(status: int, code: str, words: str, **kwargs: object) -> None:
        answer = await http.post("/v1/feedback", **kwargs)  # type: ignore[arg-type]
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert error["code"] == code and words in error["message"], error

    await refused(401, "unauthorized", "Bearer", json={"turn_id": turns[0], "rating": 1})
    await refused(400, "bad_request", "JSON", headers=headers, content=b"{not json")
    await refused(400, "bad_request", "JSON object", headers=headers, json=[1])
    await refused(400, "bad_request", "'turn_id'", headers=headers, json={"rating": 1})
    await refused(400, "bad_request", "'rating' must be -1 or 1", headers=headers, json={"turn_id": turns[0]})
    for rating in (0, 2, True, "1", 1.5):
        await refused(400, "bad_request", "'rating' must be -1 or 1", headers=headers,
                      json={"turn_id": turns[0], "rating": rating})
    await refused(400, "bad_request", "'reason' must be a string", headers=headers,
                  json={"turn_id": turns[0], "rating": 1, "reason": 5})
    await refused(400, "bad_request", f"longer than {MAX_REASON_CHARS}", headers=headers,
                  json={"turn_id": turns[0], "rating": 1, "reason": "x" * (MAX_REASON_CHARS + 1)})
    await refused(413, "too_large", "larger than", headers=headers,
                  content=b'{"turn_id": "' + b"x" * MAX_BODY_BYTES + b'", "rating": 1}')
    await refused(404, "not_found", "", headers=headers, json={"turn_id": "no-such-turn", "rating": 1})
    # Another user's reply does not exist for this one.
    await refused(404, "not_found", "", headers=bearer(f"other-{uuid.uuid4().hex[:6]}"),
                  json={"turn_id": turns[0], "rating": 1})
    # A reason of exactly the limit is fine.
    ok = await http.post("/v1/feedback", headers=headers,
                         json={"turn_id": turns[0], "rating": -1, "reason": "é" * MAX_REASON_CHARS})
    assert ok.status_code == 200, ok.text


async def test_erasing_the_user_removes_their_snapshots_and_export_skips_the_index(sim_server, http,
                                                                                     training) -> None:
    user = f"fb-gone-{uuid.uuid4().hex[:8]}"
    ws, exchange, turns = await _exchange(sim_server, user, conv="gone")
    await ws.close()
    assert (await http.post("/v1/feedback", headers=bearer(user),
                            json={"turn_id": turns[1], "rating": 1})).status_code == 200
    assert await training.get(user, exchange) is not None
    erased = await http.delete("/v1/users/me", headers=bearer(user))
    assert erased.status_code == 200, erased.text
    assert await training.get(user, exchange) is None
    index = training.keys.training_index()
    assert await training.redis.zscore(index, f"{user}\0{exchange}") is not None  # dangling, by design
    assert user not in [r.snapshot.user_id async for r in training.iter_records()]


async def test_the_service_checks_the_rating_first_and_never_fails_a_selection(training) -> None:
    """FeedbackService on its own, with a snapshot source that knows no turn."""
    from protocol.errors import BadRequest, NotFound
    from server.feedback import FeedbackService

    asked: list[tuple[str, str]] = []

    async def unknown(user_id: str, turn_id: str):
        asked.append((user_id, turn_id))
        raise NotFound("turn not found", turn_id=turn_id)

    service = FeedbackService(unknown, training)
    for rating in (0, 2, True):
        with pytest.raises(BadRequest, match="-1 or 1"):
            await service.rate("u", "t", rating, None)
    with pytest.raises(BadRequest, match="longer than"):
        await service.rate("u", "t", 1, "x" * (MAX_REASON_CHARS + 1))
    assert asked == []
    with pytest.raises(NotFound):
        await service.rate("u", "t", 1, None)
    # The selection is already stored and answered: a snapshot that cannot be taken is logged, not raised.
    assert await service.selected("u", "t") is False
    assert asked == [("u", "t"), ("u", "t")]
