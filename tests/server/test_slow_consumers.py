"""Slow and stuck phones: coalesced deltas with contiguous seqs, and a stuck
socket closed without hurting anyone else (a real server, real sockets)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid

import pytest
from conftest import ServerProcess, clean_prefix
from websockets.asyncio.client import connect
from wire import JSON, open_ws, recv_until, send

from server.outbox import Outbox
from testkit.metrics import scrape_async


def delta(turn: str, seq: int, text: str) -> dict:
    return {"type": "turn.delta", "turn_id": turn, "seq": seq, "text": text}


# ---------------------------------------------------------------- the outbox alone


def test_live_deltas_merge_into_the_tail_with_contiguous_seqs():
    box = Outbox(coalesce=True)
    shared = [delta("t", i, f"w{i} ") for i in range(1, 5)]
    for f in shared:
        box.put(f, live=True)
    assert len(box) == 1 and box.merged == 3
    merged = box.get()
    assert merged == {"type": "turn.delta", "turn_id": "t", "seq_start": 1, "seq": 4, "text": "w1 w2 w3 w4 "}
    # The frames other followers received are untouched.
    assert shared[0] == delta("t", 1, "w1 ")


def test_no_merging_without_opt_in_across_turns_or_for_backlog():
    plain = Outbox(coalesce=False)
    for i in (1, 2):
        plain.put(delta("t", i, "x"), live=True)
    assert len(plain) == 2

    box = Outbox(coalesce=True)
    box.put(delta("a", 1, "x"), live=True)
    box.put(delta("b", 1, "y"), live=True)  # another turn
    box.put(delta("b", 3, "z"), live=True)  # not contiguous
    assert len(box) == 3
    box.put(delta("a", 2, "x2"), live=True)  # joins a's queued delta, past b's
    assert len(box) == 3
    assert box.get() == {"type": "turn.delta", "turn_id": "a", "seq_start": 1, "seq": 2, "text": "xx2"}
    box.put({"type": "turn.end", "turn_id": "b", "seq": 3})
    box.put(delta("b", 4, "late"), live=True)  # after b's end nothing merges backwards
    assert [f["seq"] for f in (box.get(), box.get(), box.get(), box.get())] == [1, 3, 3, 4]
    replay = Outbox(coalesce=True)
    replay.put(delta("t", 1, "x"))  # backlog: never merged into
    replay.put(delta("t", 2, "y"), live=True)
    replay.put(delta("t", 3, "z"))  # backlog
    assert len(replay) == 3


def test_stalled_since_tracks_waiting_frames():
    box = Outbox()
    assert box.stalled_since is None
    box.put({"type": "ping"})
    first = box.stalled_since
    assert first is not None
    box.get()
    assert box.stalled_since is None


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def slow_server():
    prefix = f"rapport-test:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[
        "--engine", "simulated", "--sim-ttft-ms", "20", "--sim-itl-ms", "2", "--sim-reply-tokens", "1000",
        "--max-tokens-limit", "1024", "--auth", "dev", "--stuck-timeout-ms", "1500",
        "--outbox-max-frames", "100000", "--turns-per-minute", "1000", "--socket-send-buffer", "16384",
    ]).start()
    yield server
    server.stop()
    clean_prefix(prefix)


def small_buffer_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def test_a_lagging_socket_gets_merged_deltas_and_every_word(slow_server):
    ws = await connect(slow_server.ws_url, subprotocols=[JSON], sock=small_buffer_socket(slow_server.port),
                       max_queue=1, max_size=None)
    await ws.send(json.dumps({"type": "hello", "user": f"lag-{uuid.uuid4().hex[:6]}", "coalesce": True}))
    assert json.loads(await ws.recv())["type"] == "ready"
    turns = 6
    for i in range(turns):
        await ws.send(json.dumps({"type": "turn.start", "client_turn_id": f"c{i}", "text": "talk",
                                  "conversation_id": f"conv{i}", "options": {"max_tokens": 1000}}))
    await asyncio.sleep(1.0)  # stop reading (for less than the stuck timeout) while replies generate
    held: dict[str, int] = {}
    texts: dict[str, list[str]] = {}
    ends: dict[str, dict] = {}
    merged_frames = 0
    while len(ends) < turns:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if frame["type"] == "turn.delta":
            first = frame.get("seq_start", frame["seq"])
            merged_frames += "seq_start" in frame
            assert first == held.get(frame["turn_id"], 0) + 1, frame  # contiguous, no gap, no repeat
            held[frame["turn_id"]] = frame["seq"]
            texts.setdefault(frame["turn_id"], []).append(frame["text"])
        elif frame["type"] == "turn.end":
            ends[frame["turn_id"]] = frame
    for turn_id, end in ends.items():
        assert held[turn_id] == end["seq"]
        assert "".join(texts[turn_id]) == end["text"]
    assert merged_frames > 0, "the socket lagged but nothing was merged"
    await ws.close()


async def metric(server: ServerProcess, name: str) -> float:
    return (await scrape_async(server.base)).get(name, 0.0)


async def test_a_stuck_socket_is_closed_and_others_stream_on(slow_server):
    before = await metric(slow_server, "rapport_slow_consumer_closes_total")
    stuck_user = f"stuck-{uuid.uuid4().hex[:6]}"
    stuck = await connect(slow_server.ws_url, subprotocols=[JSON], sock=small_buffer_socket(slow_server.port),
                          max_queue=1, max_size=None)
    await stuck.send(json.dumps({"type": "hello", "user": stuck_user}))
    assert json.loads(await stuck.recv())["type"] == "ready"
    await stuck.send(json.dumps({"type": "turn.start", "client_turn_id": "s1", "text": "go",
                                 "options": {"max_tokens": 1000}}))
    accepted = json.loads(await stuck.recv())
    # From now on the stuck phone reads nothing.

    calm = await open_ws(slow_server, user=f"calm-{uuid.uuid4().hex[:6]}")
    started = time.monotonic()
    while time.monotonic() - started < 4.0:
        t0 = time.monotonic()
        await send(calm, {"type": "turn.start", "client_turn_id": uuid.uuid4().hex, "text": "hi",
                          "options": {"max_tokens": 30}})
        frames = await recv_until(calm, "turn.end", timeout=10)
        assert frames[-1]["finish_reason"] == "length"
        assert time.monotonic() - t0 < 5.0  # a bound on correctness, not a performance claim

    deadline = time.monotonic() + 10
    while await metric(slow_server, "rapport_slow_consumer_closes_total") <= before:
        assert time.monotonic() < deadline, "the stuck socket was never closed"
        await asyncio.sleep(0.2)

    # Its turn stays resumable from a new socket: every delta, then the end.
    again = await open_ws(slow_server, user=stuck_user)
    await send(again, {"type": "turn.resume", "turn_id": accepted["turn_id"], "after_seq": 0})
    frames = await recv_until(again, "turn.end", timeout=30)
    deltas = [f for f in frames if f["type"] == "turn.delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["text"] for d in deltas) == frames[-1]["text"]
    await calm.close()
    await again.close()
    stuck.transport.abort()
