"""A small OpenAI-compatible server that answers like vLLM's, with scripted failures.

It runs in the test's event loop (uvicorn on a loopback port picked by the
kernel) and serves the four routes the remote engine uses: ``GET /health``,
``GET /v1/models``, ``GET /metrics`` and a streamed ``POST
/v1/chat/completions`` whose server-sent events have vLLM's shape (a role
chunk, one chunk per token, the last with the finish reason, a usage chunk,
``[DONE]``). The reply is a fixed list of tokens. Attributes change what the
next request sees::

    async with running(FakeVllmServer(model="m", max_model_len=2048)) as [server]:
        server.health_status = 503       # /health fails
        server.completion_status = 500   # completions fail before any output
        server.cut_after_tokens = 2      # the stream ends after 2 tokens, no finish
        server.finish_reason = "abort"   # vLLM gave the request up
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route


class FakeVllmServer:
    def __init__(
        self,
        *,
        model: str = "fake-model",
        root: str | None = None,
        max_model_len: int = 2048,
        tokens: tuple[str, ...] = ("Hello", " there", "!"),
    ) -> None:
        self.model = model
        self.root = root
        self.max_model_len = max_model_len
        self.tokens = tokens
        self.health_status = 200
        self.completion_status = 200
        self.cut_after_tokens: int | None = None
        self.finish_reason = "stop"
        self.token_delay_s = 0.0
        self.prompt_tokens = 11
        self.cached_tokens = 0
        self.running = 0
        self.waiting = 0
        #: Bodies of the chat completion requests received, in order.
        self.requests: list[dict[str, Any]] = []
        self.open_streams = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = Starlette(routes=[
            Route("/health", self._health),
            Route("/v1/models", self._models),
            Route("/metrics", self._metrics),
            Route("/v1/chat/completions", self._completions, methods=["POST"]),
        ])
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(), name="fake-vllm-server")
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and close open connections (clients then see them refused or reset)."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        self._server.force_exit = True
        await self._task
        self._server = None
        self._task = None

    async def _health(self, request: Request) -> Response:
        return Response(status_code=self.health_status)

    async def _models(self, request: Request) -> Response:
        card = {"id": self.model, "object": "model", "root": self.root or self.model,
                "max_model_len": self.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    async def _metrics(self, request: Request) -> Response:
        return PlainTextResponse(
            f'vllm:num_requests_running{{engine="0",model_name="{self.model}"}} {float(self.running)}\n'
            f'vllm:num_requests_waiting{{engine="0",model_name="{self.model}"}} {float(self.waiting)}\n'
        )

    async def _completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        if self.completion_status != 200:
            return JSONResponse({"error": {"message": f"scripted failure {self.completion_status}"}},
                                status_code=self.completion_status)
        if body.get("model") != self.model:
            return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist."}},
                                status_code=404)
        return StreamingResponse(self._events(body), media_type="text/event-stream")

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[str]:
        self.open_streams += 1
        try:
            def event(choices: list[dict[str, Any]], **extra: Any) -> str:
                return "data: " + json.dumps({"object": "chat.completion.chunk", "model": self.model,
                                              "choices": choices, **extra}) + "\n\n"

            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
            tokens = self.tokens[: int(body.get("max_tokens") or len(self.tokens))] or ("",)
            for i, token in enumerate(tokens):
                if self.cut_after_tokens is not None and i >= self.cut_after_tokens:
                    return  # the body ends without a finish reason or [DONE]
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                # As vLLM does, the last token's chunk carries the finish reason.
                last = {"finish_reason": self.finish_reason} if i == len(tokens) - 1 else {}
                yield event([{"index": 0, "delta": {"content": token}, **last}])
            yield event([], usage={
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": self.prompt_tokens + len(tokens),
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            })
            yield "data: [DONE]\n\n"
        finally:
            self.open_streams -= 1


@contextlib.asynccontextmanager
async def running(*servers: FakeVllmServer) -> AsyncIterator[list[FakeVllmServer]]:
    """The servers, started; stopped on the way out (whichever of them had started)."""
    started: list[FakeVllmServer] = []
    try:
        for server in servers:
            await server.start()
            started.append(server)
        yield list(servers)
    finally:
        for server in started:
            await server.stop()
