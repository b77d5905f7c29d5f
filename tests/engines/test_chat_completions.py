"""One streamed chat completion, against a local server that answers like vLLM's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from fake_vllm_server import FakeVllmServer, running

from server.engines.base import EngineRequest, SamplingOptions
from server.engines.chat_completions import (
    UpstreamFailed,
    chat_completion_body,
    error_message,
    stream_chat_completion,
)
from sessions.messages import ChatMessage

MODEL = "fake-model"


class Tokens:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def on_token(self, text: str) -> None:
        self.texts.append(text)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FakeVllmServer]:
    async with running(FakeVllmServer(model=MODEL, tokens=("Hi", "", " you", "!"))) as [fake]:
        yield fake


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0), trust_env=False) as c:
        yield c


def body(**sampling: object) -> dict[str, object]:
    request = EngineRequest("req-1", (ChatMessage("user", "hello"),),
                            SamplingOptions(**sampling))  # type: ignore[arg-type]
    return chat_completion_body(request, MODEL)


def test_the_body_asks_for_a_stream_with_usage_and_passes_only_set_options():
    plain = body()
    assert plain["model"] == MODEL and plain["stream"] is True
    assert plain["messages"] == [{"role": "user", "content": "hello"}]
    assert plain["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    assert plain["chat_template_kwargs"] == {"enable_thinking": False}
    assert not {"seed", "stop", "ignore_eos"} & set(plain)
    full = body(seed=3, stop=("\n",), ignore_eos=True, max_tokens=9, enable_thinking=True)
    assert (full["seed"], full["stop"], full["ignore_eos"], full["max_tokens"]) == (3, ["\n"], True, 9)
    assert full["chat_template_kwargs"] == {"enable_thinking": True}


async def test_tokens_and_usage_come_from_the_events(server: FakeVllmServer, client: httpx.AsyncClient):
    server.cached_tokens = 8
    tokens = Tokens()
    end = await stream_chat_completion(client, server.url, body(), tokens)
    # The opening role chunk is no token; a token without text yet still counts.
    assert tokens.texts == ["Hi", "", " you", "!"]
    assert (end.finish_reason, end.prompt_tokens, end.completion_tokens, end.cached_prompt_tokens) == (
        "stop", 11, 4, 8)
    assert not end.given_up and end.connection_error is None
    assert server.requests == [body()]


async def test_vllm_giving_the_request_up_is_reported_not_raised(server: FakeVllmServer,
                                                                 client: httpx.AsyncClient):
    server.finish_reason = "abort"
    end = await stream_chat_completion(client, server.url, body(), Tokens())
    assert end.finish_reason == "abort" and end.given_up


@pytest.mark.parametrize(("status", "down"), [(500, True), (503, True), (400, False)])
async def test_an_error_status_blames_the_server_only_when_it_is_5xx(
    server: FakeVllmServer, client: httpx.AsyncClient, status: int, down: bool
):
    server.completion_status = status
    tokens = Tokens()
    with pytest.raises(UpstreamFailed) as failed:
        await stream_chat_completion(client, server.url, body(), tokens)
    assert failed.value.down is down
    assert str(failed.value) == f"HTTP {status}: scripted failure {status}"
    assert tokens.texts == []


async def test_a_stream_cut_short_blames_the_server(server: FakeVllmServer, client: httpx.AsyncClient):
    server.cut_after_tokens = 2
    tokens = Tokens()
    with pytest.raises(UpstreamFailed, match="ended before the reply finished") as failed:
        await stream_chat_completion(client, server.url, body(), tokens)
    assert failed.value.down and tokens.texts == ["Hi", ""]


async def test_a_refused_connection_blames_the_server(server: FakeVllmServer, client: httpx.AsyncClient):
    url = server.url
    await server.stop()
    with pytest.raises(UpstreamFailed, match="ConnectError") as failed:
        await stream_chat_completion(client, url, body(), Tokens())
    assert failed.value.down


def test_error_messages_come_from_openai_error_bodies_or_the_raw_text():
    assert error_message(b'{"error": {"message": "bad model", "code": 404}}') == "bad model"
    assert error_message(b'{"error": "plain"}') == "plain"
    assert error_message(b'{"message": "top level"}') == "top level"
    assert error_message(b"<html>gateway</html>") == "<html>gateway</html>"
    assert error_message(b"x" * 500) == "x" * 300
