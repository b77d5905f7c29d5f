"""The fan-out limit of Rapport's own stack: a plain endpoint that only encodes and sends deltas.

Starlette on uvicorn with uvloop, httptools and websockets-sansio (what
``rapport serve`` runs), permessage-deflate off, no Redis, no auth, no
history. It speaks just enough of the protocol for ``rapport bench``'s load
generator to drive it like a gateway: ``hello`` is answered ``ready``,
``turn.start`` with ``turn.accepted``; one step loop (a continuously
batching engine's schedule: first token after ``--ttft-ms``, then one every
``--itl-ms``) gives every running turn one delta per step, encoded per frame
with the stdlib ``json`` (or ``msgpack``) and written straight to its socket;
after ``--reply-tokens`` deltas comes ``turn.end`` with the text. The CPU this
process spends per delta is the floor a gateway on this stack can reach.

``bench/cpu_cost.py`` starts it as a child process::

    python bench/plain_fanout.py --port 8123
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

JSON_SUBPROTOCOL = "rapport.v1.json"
MSGPACK_SUBPROTOCOL = "rapport.v1.msgpack"
WORDS = ("soft", "rain", "on", "the", "window", "tonight", "and", "warm", "tea")


def _encode_json(frame: dict[str, Any]) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


def _encode_msgpack(frame: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(frame, use_bin_type=True)
    return packed


class Stream:
    """One running turn: its socket, how to encode, what it has sent so far."""

    __slots__ = ("ws", "binary", "encode", "turn_id", "seq", "parts")

    def __init__(self, ws: WebSocket, binary: bool, turn_id: str) -> None:
        self.ws = ws
        self.binary = binary
        self.encode: Callable[[dict[str, Any]], str | bytes] = _encode_msgpack if binary else _encode_json
        self.turn_id = turn_id
        self.seq = 0
        self.parts: list[str] = []

    async def send(self, frame: dict[str, Any]) -> None:
        data = self.encode(frame)
        if self.binary:
            await self.ws.send_bytes(data)  # type: ignore[arg-type]
        else:
            await self.ws.send_text(data)  # type: ignore[arg-type]


class Engine:
    """A step loop over every running turn; new turns join at the next step."""

    def __init__(self, ttft_ms: float, itl_ms: float, reply_tokens: int) -> None:
        self.ttft_s = ttft_ms / 1000.0
        self.itl_s = itl_ms / 1000.0
        self.reply_tokens = reply_tokens
        self.running: list[Stream] = []
        self.joining: list[Stream] = []
        self.wake = asyncio.Event()

    def add(self, stream: Stream) -> None:
        self.joining.append(stream)
        self.wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        due: float | None = None
        while True:
            if not self.running and not self.joining:
                due = None
                self.wake.clear()
                await self.wake.wait()
                continue
            start = loop.time() if due is None else due
            # A step that admits new turns takes the time to first token, like the simulated engine's.
            step = self.ttft_s if self.joining else self.itl_s
            self.running.extend(self.joining)
            self.joining.clear()
            due = start + step
            await asyncio.sleep(max(0.0, due - loop.time()))
            still: list[Stream] = []
            for s in self.running:
                s.seq += 1
                text = WORDS[s.seq % len(WORDS)] if s.seq == 1 else " " + WORDS[s.seq % len(WORDS)]
                s.parts.append(text)
                try:
                    await s.send({"type": "turn.delta", "turn_id": s.turn_id, "seq": s.seq, "text": text})
                    if s.seq >= self.reply_tokens:
                        await s.send({"type": "turn.end", "turn_id": s.turn_id, "seq": s.seq,
                                      "finish_reason": "stop", "text": "".join(s.parts),
                                      "usage": {"prompt_tokens": 0, "completion_tokens": s.seq}, "timings": {}})
                        continue
                except (WebSocketDisconnect, RuntimeError, OSError):
                    continue  # the socket went away: the turn goes with it
                still.append(s)
            self.running = still


def create_app(engine: Engine) -> Starlette:
    async def ws_endpoint(ws: WebSocket) -> None:
        offered = list(ws.scope.get("subprotocols") or [])
        subprotocol = next((p for p in offered if p in (JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL)), None)
        await ws.accept(subprotocol=subprotocol)
        binary = subprotocol == MSGPACK_SUBPROTOCOL
        reply = Stream(ws, binary, "")
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes") if binary else message.get("text")
                if data is None:
                    continue
                frame = msgpack.unpackb(data, raw=False) if binary else json.loads(data)
                kind = frame.get("type")
                if kind == "hello":
                    await reply.send({"type": "ready", "session_id": "s_" + uuid.uuid4().hex[:16],
                                      "user_id": str(frame.get("user") or "plain"), "model": "plain-fanout",
                                      "active_turns": []})
                elif kind == "turn.start":
                    turn_id = "t_" + uuid.uuid4().hex
                    await reply.send({"type": "turn.accepted", "turn_id": turn_id,
                                      "client_turn_id": frame.get("client_turn_id"),
                                      "conversation_id": frame.get("conversation_id", "default"),
                                      "replayed": False})
                    engine.add(Stream(ws, binary, turn_id))
                elif kind == "ping":
                    await reply.send({"type": "pong", "t": frame.get("t")})
        except (WebSocketDisconnect, RuntimeError, OSError):
            return

    async def readyz(_request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(engine.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return Starlette(routes=[Route("/readyz", readyz), WebSocketRoute("/v1/ws", ws_endpoint)], lifespan=lifespan)


def main() -> None:
    p = argparse.ArgumentParser(description="A plain delta fan-out endpoint on Rapport's stack.")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ttft-ms", type=float, default=40.0)
    p.add_argument("--itl-ms", type=float, default=20.0)
    p.add_argument("--reply-tokens", type=int, default=40)
    args = p.parse_args()
    engine = Engine(args.ttft_ms, args.itl_ms, args.reply_tokens)
    started = time.monotonic()
    config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                            ws="websockets-sansio", ws_per_message_deflate=False, lifespan="on",
                            log_level="warning", backlog=2048)
    uvicorn.Server(config).run()
    print(f"plain fan-out served for {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
