"""The OpenAI-compatible endpoint, driven by the official ``openai`` package against
a real server process (simulated engine) and real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import ServerProcess, clean_prefix, make_token
from openai import AsyncOpenAI

from testkit.metrics import scrape

# A slower decode step than the shared fixtures, so long generations stay
# running for many seconds; a high turn rate so the tests never hit the limit.
FLAGS = ["--engine", "simulated", "--sim-ttft-ms", "20", "--sim-itl-ms", "10",
         "--turns-per-minute", "100000", "--max-tokens-limit", "3000"]


@pytest.fixture(scope="module")
def oai_server(redis_url: str) -> Iterator[ServerProcess]:
    """Development auth mode on purpose: the endpoint still requires a JWT there."""
    prefix = f"rapport-test-oai:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=[*FLAGS, "--auth", "dev"]).start()
    yield server
    server.stop()
    clean_prefix(prefix)


def client_for(server: ServerProcess, user: str | None = None, *, api_key: str | None = None) -> AsyncOpenAI:
    key = api_key if api_key is not None else make_token(user or f"oai-{uuid.uuid4().hex[:8]}")
    return AsyncOpenAI(base_url=f"{server.base}/v1", api_key=key, max_retries=0, timeout=60.0)


def served_model(server: ServerProcess) -> str:
    r = httpx.get(f"{server.base}/v1/models", headers={"Authorization": f"Bearer {make_token('m')}"},
                  timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["id"]


def metric(server: ServerProcess, name: str, labels: str = "") -> float:
    return scrape(server.base, timeout=10).get(name + labels, 0.0)


async def wait_metric(server: ServerProcess, name: str, want: float, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(metric, server, name)
        if value == want:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} stayed {value}, wanted {want}")


MESSAGES = [
    {"role": "system", "content": "You are a kind companion."},
    {"role": "user", "content": "I had a long day at work."},
    {"role": "assistant", "content": "I'm sorry to hear that. What happened?"},
    {"role": "user", "content": "Mostly meetings. Tell me something nice."},
]


async def test_models_lists_the_served_model(oai_server):
    client = client_for(oai_server)
    models = await client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [served_model(oai_server)]
    assert ids[0].startswith("simulated:")
    await client.close()


async def test_non_streaming_completion(oai_server):
    client = client_for(oai_server)
    resp = await client.chat.completions.create(model="whatever-the-client-says", messages=MESSAGES,
                                                max_tokens=40, temperature=0.5, top_p=0.9, seed=7,
                                                user="end-user-1")
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == served_model(oai_server)
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    u = resp.usage
    assert u is not None and u.prompt_tokens > 0
    assert 0 < u.completion_tokens <= 40
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    await client.close()


async def test_streaming_with_usage_matches_the_non_streaming_reply(oai_server):
    client = client_for(oai_server)
    kw = {"model": served_model(oai_server), "messages": MESSAGES, "max_tokens": 30, "seed": 11}
    whole = await client.chat.completions.create(**kw)
    stream = await client.chat.completions.create(**kw, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert len(chunks) >= 4
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    # All but the last carry one choice; the last has none and carries the usage.
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    body = chunks[:-1]
    finishes = [c.choices[0].finish_reason for c in body]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in body)
    # The simulated engine is deterministic for the same messages, seed and max_tokens.
    assert text == whole.choices[0].message.content
    assert finishes[-1] == whole.choices[0].finish_reason
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage_chunk.usage.total_tokens == (usage_chunk.usage.prompt_tokens
                                              + usage_chunk.usage.completion_tokens)
    await client.close()


async def test_streaming_without_usage_and_content_parts(oai_server):
    client = client_for(oai_server)
    stream = await client.chat.completions.create(
        model="m", stream=True, max_completion_tokens=6, stop=["never-appears"],
        extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello"},
                                               {"type": "text", "text": "there"}]}])
    chunks = [chunk async for chunk in stream]
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    content = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert len(content) == 6 and all(content)
    await client.close()


async def test_max_tokens_is_clamped_not_refused(oai_server):
    client = client_for(oai_server)
    resp = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10**6)
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 3000
    await client.close()


async def test_prompt_longer_than_the_context_is_refused(oai_server):
    client = client_for(oai_server)
    huge = " ".join(["word"] * 5000)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": huge}])
    err = info.value
    assert err.status_code == 400
    assert err.code == "context_length_exceeded"
    assert "maximum context length" in err.body["message"]
    await client.close()


@pytest.mark.parametrize("api_key", [
    "not-a-jwt",
    pytest.param(make_token("eve", secret="some-other-secret-" + "y" * 32), id="wrong-secret"),
    pytest.param(make_token("eve", ttl=-60), id="expired"),
])
async def test_bad_credentials_are_an_openai_style_401(oai_server, api_key):
    client = client_for(oai_server, api_key=api_key)
    with pytest.raises(openai.AuthenticationError) as info:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    err = info.value
    assert err.status_code == 401
    assert set(err.body) == {"message", "type", "param", "code"}
    assert err.body["type"] == "authentication_error"
    assert err.body["code"] == "unauthorized"
    assert err.body["message"]
    with pytest.raises(openai.AuthenticationError):
        await client.models.list()
    await client.close()


async def test_a_token_is_required_even_in_development_mode(oai_server):
    async with httpx.AsyncClient(base_url=oai_server.base, timeout=30) as http:
        r = await http.post("/v1/chat/completions", json={"messages": MESSAGES})
        assert r.status_code == 401
        assert r.headers["www-authenticate"].lower().startswith("bearer")
        assert r.json()["error"]["type"] == "authentication_error"
        r = await http.post("/v1/chat/completions", json={"messages": MESSAGES, "user": "mallory"},
                            headers={"Authorization": "Basic bWFsbG9yeTp4"})
        assert r.status_code == 401


BAD_BODIES = [
    pytest.param(b"{not json", "not valid JSON", id="malformed-json"),
    pytest.param(b"", "empty", id="empty-body"),
    pytest.param(b"\xff\xfe{}", "UTF-8", id="not-utf8"),
    pytest.param(b"[1, 2]", "JSON object", id="array-body"),
    pytest.param(b'{"model": "m"}', "messages", id="missing-messages"),
    pytest.param(b'{"messages": []}', "at least one message", id="empty-messages"),
    pytest.param(b'{"messages": "hi"}', "must be an array", id="messages-not-array"),
    pytest.param(b'{"messages": ["hi"]}', "must be an object", id="message-not-object"),
    pytest.param(b'{"messages": [{"role": "wizard", "content": "hi"}]}', "role", id="unknown-role"),
    pytest.param(b'{"messages": [{"content": "hi"}]}', "role", id="missing-role"),
    pytest.param(b'{"messages": [{"role": "user"}]}', "content", id="missing-content"),
    pytest.param(b'{"messages": [{"role": "user", "content": 42}]}', "content", id="content-number"),
    pytest.param(b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
                 b'{"url": "http://x"}}]}]}', "only 'text'", id="image-part"),
    pytest.param(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
                 "temperature", id="temperature-string"),
    pytest.param(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 3}',
                 "temperature", id="temperature-range"),
    pytest.param(b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p",
                 id="top-p-zero"),
    pytest.param(b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens",
                 id="max-tokens-zero"),
    pytest.param(b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}', "max_tokens",
                 id="max-tokens-float"),
    pytest.param(b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "'n'", id="n-two"),
    pytest.param(b'{"messages": [{"role": "user", "content": "hi"}], "stop": [1]}', "stop",
                 id="stop-not-strings"),
    pytest.param(b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream",
                 id="stream-not-bool"),
    pytest.param(b'{"messages": [{"role": "user", "content": "hi"}], "model": 5}', "model",
                 id="model-not-string"),
]


@pytest.mark.parametrize(("body", "mentions"), BAD_BODIES)
async def test_bad_bodies_are_400_with_a_clear_message(oai_server, body, mentions):
    headers = {"Authorization": f"Bearer {make_token('bad-body')}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=oai_server.base, timeout=30) as http:
        r = await http.post("/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "bad_request"
    assert mentions in err["message"], err


# Bodies the WebSocket's JSON codec already refuses; they used to reach this
# endpoint's own parser and answer 500 with a traceback.
HOSTILE_BODIES = [
    pytest.param(b"[" * 100_000, "JSON object", id="deep-nesting-at-the-top"),
    pytest.param(b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply",
                 id="deep-nesting-inside"),
    pytest.param(b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate",
                 id="lone-surrogate-in-content"),
    pytest.param(b'{"messages": [{"role": "user", "content": "hi \\udfff there"}]}', "lone surrogate",
                 id="lone-low-surrogate-in-content"),
    pytest.param(b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud83d"]}', "lone surrogate",
                 id="lone-surrogate-in-stop"),
]


@pytest.mark.parametrize(("body", "mentions"), HOSTILE_BODIES)
async def test_bodies_the_websocket_codec_refuses_are_a_400_here_too(oai_server, body, mentions):
    headers = {"Authorization": f"Bearer {make_token('hostile-body')}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=oai_server.base, timeout=30) as http:
        r = await http.post("/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error"
        assert err["code"] == "bad_request"
        assert mentions in err["message"], err
        assert "Traceback" not in r.text
        # The server is unharmed: the next request is answered normally.
        ok = await http.post("/v1/chat/completions", headers=headers,
                             json={"messages": MESSAGES, "max_tokens": 3})
        assert ok.status_code == 200, ok.text


async def test_a_valid_surrogate_pair_escape_is_still_accepted(oai_server):
    headers = {"Authorization": f"Bearer {make_token('emoji-body')}", "Content-Type": "application/json"}
    body = b'{"messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}], "max_tokens": 3}'
    async with httpx.AsyncClient(base_url=oai_server.base, timeout=30) as http:
        r = await http.post("/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == 200, r.text


async def test_sdk_sees_bad_requests_as_bad_request_errors(oai_server):
    client = client_for(oai_server)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="m", messages=[])
    assert info.value.param == "messages"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="m", messages=MESSAGES, n=3)
    await client.close()


async def test_the_server_survives_bad_bodies_and_still_answers(oai_server):
    client = client_for(oai_server)
    resp = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5)
    assert resp.choices[0].message.content
    await client.close()


LONG = {"model": "m", "messages": MESSAGES, "max_tokens": 2500, "extra_body": {"ignore_eos": True}}


async def test_a_client_that_disconnects_mid_stream_aborts_the_engine_request(oai_server):
    """Two long generations (2500 tokens at 10 ms a step: 25 s or more each). The
    client of one goes away after a few chunks; the engine must drop that one at
    once while the other keeps running."""
    await wait_metric(oai_server, "rapport_engine_running_requests", 0)
    cancelled_before = metric(oai_server, "rapport_turns_total", '{finish_reason="cancelled"}')
    control_client, leaving_client = client_for(oai_server), client_for(oai_server)

    control = await control_client.chat.completions.create(**LONG, stream=True)
    control_chunks: list = []

    async def read_control() -> None:
        async for chunk in control:
            control_chunks.append(chunk)

    control_task = asyncio.create_task(read_control())
    leaving = await leaving_client.chat.completions.create(**LONG, stream=True)
    got = 0
    async for _chunk in leaving:
        got += 1
        if got == 4:
            break
    assert await wait_metric(oai_server, "rapport_engine_running_requests", 2) == 2

    await leaving.close()  # the socket goes away mid-stream
    started = time.monotonic()
    await wait_metric(oai_server, "rapport_engine_running_requests", 1, timeout=10)
    assert time.monotonic() - started < 10
    # The control request was not disconnected: it is still generating.
    seen = len(control_chunks)
    await asyncio.sleep(0.5)
    assert not control_task.done()
    assert len(control_chunks) > seen
    assert metric(oai_server, "rapport_engine_running_requests") == 1
    assert metric(oai_server, "rapport_turns_total", '{finish_reason="cancelled"}') == cancelled_before + 1

    await control.close()
    control_task.cancel()
    await asyncio.gather(control_task, return_exceptions=True)
    await wait_metric(oai_server, "rapport_engine_running_requests", 0, timeout=10)
    await control_client.close()
    await leaving_client.close()


async def test_a_client_that_gives_up_on_a_non_streaming_request_aborts_it(oai_server):
    await wait_metric(oai_server, "rapport_engine_running_requests", 0)
    headers = {"Authorization": f"Bearer {make_token('impatient')}"}
    body = {"messages": MESSAGES, "max_tokens": 2500, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=oai_server.base, timeout=httpx.Timeout(30, read=1.5)) as http:
        task = asyncio.create_task(http.post("/v1/chat/completions", json=body, headers=headers))
        await wait_metric(oai_server, "rapport_engine_running_requests", 1)
        with pytest.raises(httpx.ReadTimeout):
            await task
    # The client closed its connection on the timeout: the engine request goes too.
    await wait_metric(oai_server, "rapport_engine_running_requests", 0, timeout=10)


async def test_completions_are_counted_in_the_turn_metrics(oai_server):
    before = metric(oai_server, "rapport_turns_total", '{finish_reason="length"}')
    ttft_before = metric(oai_server, "rapport_time_to_first_token_seconds_count")
    client = client_for(oai_server)
    await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3,
                                         extra_body={"ignore_eos": True})
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3,
                                                  stream=True, extra_body={"ignore_eos": True})
    async for _ in stream:
        pass
    assert metric(oai_server, "rapport_turns_total", '{finish_reason="length"}') == before + 2
    assert metric(oai_server, "rapport_time_to_first_token_seconds_count") == ttft_before + 2
    await client.close()


async def test_over_the_rate_limit_is_429_with_retry_after(redis_url):
    prefix = f"rapport-test-oai-rl:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=["--engine", "simulated", "--sim-ttft-ms", "20",
                                                 "--sim-itl-ms", "5", "--turns-per-minute", "2"])
    await asyncio.to_thread(server.start)
    try:
        client = client_for(server, "limited-user")
        for _ in range(2):
            await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)
        err = info.value
        assert err.status_code == 429
        assert err.code == "rate_limited"
        assert int(err.response.headers["retry-after"]) >= 1
        # Another user is not affected.
        other = client_for(server, "unlimited-user")
        resp = await other.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)
        assert resp.choices[0].message.content
        await client.close()
        await other.close()
    finally:
        await asyncio.to_thread(server.stop)
        clean_prefix(prefix)


async def test_no_first_token_within_the_hard_deadline_is_a_503_counted_budget_exceeded(redis_url):
    """The status is decided at the engine's first event: a request that misses the
    hard deadline gets an HTTP error (streaming or not), and ends like a turn that
    missed it, with its engine request aborted."""
    prefix = f"rapport-test-oai-deadline:{uuid.uuid4().hex[:10]}:"
    server = ServerProcess(prefix=prefix, extra=["--engine", "simulated", "--sim-ttft-ms", "4000",
                                                 "--hard-deadline-ms", "300", "--ttft-budget-ms", "100000",
                                                 "--turns-per-minute", "100000"])
    await asyncio.to_thread(server.start)
    try:
        before = metric(server, "rapport_turns_total", '{finish_reason="budget_exceeded"}')
        headers = {"Authorization": f"Bearer {make_token('in-a-hurry')}"}
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as http:
            for stream in (False, True):
                started = time.monotonic()
                r = await http.post("/v1/chat/completions", headers=headers,
                                    json={"messages": MESSAGES, "max_tokens": 5, "stream": stream})
                assert r.status_code == 503, r.text
                assert time.monotonic() - started < 2.0  # not the engine's 4 s to a first token
                err = r.json()["error"]
                assert err["code"] == "budget_exceeded" and err["type"] == "server_error"
                assert int(r.headers["retry-after"]) >= 1
        assert metric(server, "rapport_turns_total", '{finish_reason="budget_exceeded"}') == before + 2
        # Both engine requests were aborted, not left to produce their first token.
        await wait_metric(server, "rapport_engine_unfinished_requests", 0, timeout=1.5)
    finally:
        await asyncio.to_thread(server.stop)
        clean_prefix(prefix)
