"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Stateless: the whole chat comes in the request and nothing is read from or
written to conversation history. The request runs on the same engine, with
the same admission control (:meth:`Runtime.admit_turn`), sampling bounds and
first-token deadline as a WebSocket turn, and is counted in the same metrics
(``rapport_turns_total`` by finish reason, time to first token, gaps).

Authentication: always a Bearer JWT (``Authorization: Bearer <jwt>``), also
when the server runs with ``--auth dev``. The development mode trusts a user
name sent in the WebSocket ``hello``; plain HTTP has no such frame, and an
unauthenticated completion endpoint would hand the model to anyone who can
reach the port. ``rapport token USER`` prints a token to use as the API key.

Response shapes follow OpenAI's: ``chat.completion`` with ``usage``, or an SSE
stream of ``chat.completion.chunk`` objects (the first carries
``delta.role``, the last a ``finish_reason``; with
``stream_options.include_usage`` one more chunk with empty ``choices`` and the
``usage``), ending with ``data: [DONE]``. Errors are
``{"error": {"message", "type", "param", "code"}}`` where ``code`` is the
Rapport protocol's error code, or ``context_length_exceeded`` for a prompt the
context window cannot hold. The body is decoded by the WebSocket's JSON codec
(:mod:`protocol.codec`), so it meets the same refusals as a frame.

The response status is decided when the engine's first event arrives, so a
request that cannot start (engine failure, first-token deadline missed) gets a
real HTTP error rather than a stream that breaks. A client that goes away at
any point aborts the engine request at once: the response watches the
connection and cancels the generation, which closes the engine's iterator.

``model`` may name anything (clients and benchmark tools send whatever they
were configured with); the answer always names the model actually served, as
``GET /v1/models`` lists it. A ``model`` that names one of the engine's LoRA
adapters (listed there too, as vLLM's own server lists them) generates with
that adapter, and the answer names the adapter. ``n`` must be 1. ``user`` is accepted and ignored:
the user is the token's ``sub``.

vLLM extensions accepted for benchmark tools: ``ignore_eos`` and
``chat_template_kwargs.enable_thinking`` (off unless asked for).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from protocol import frames
from protocol.codec import JSON_SUBPROTOCOL, codec_for
from protocol.errors import HTTP_STATUS, BadRequest, EngineError, RapportError, TooLarge, Unauthorized
from sessions.turn import ENGINE_FINISH_REASONS, Turn, TurnEvent, Usage

from .auth import bearer_token
from .engines.base import (
    ChatMessage,
    EngineEvent,
    EngineFinish,
    EngineRequest,
    SamplingOptions,
)
from .request_body import BodyTooLarge, read_bounded

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("rapport.openai")

#: Largest request body read; bigger bodies answer 413 before any parsing.
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_MESSAGES = 4096
MAX_STOP_SEQUENCES = 16
ROLES = ("system", "developer", "user", "assistant")

_TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 retry_after_ms: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.retry_after_ms = retry_after_ms

    @classmethod
    def from_rapport(cls, exc: RapportError) -> ApiError:
        retry = exc.fields.get("retry_after_ms")
        return cls(HTTP_STATUS.get(exc.code, 500), exc.code, exc.message,
                   retry_after_ms=retry if isinstance(retry, (int, float)) else None)

    def body(self) -> dict[str, Any]:
        return {"error": {
            "message": self.message,
            "type": _TYPE_FOR_STATUS.get(self.status, "server_error"),
            "param": self.param,
            "code": self.code,
        }}

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.status == 401:
            out["WWW-Authenticate"] = 'Bearer realm="rapport"'
        if self.retry_after_ms is not None or self.status in (429, 503):
            seconds = max(1, math.ceil((self.retry_after_ms or 1000) / 1000.0))
            out["Retry-After"] = str(seconds)
        return out

    def response(self) -> Response:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "bad_request", message, param=param)


# ---------------------------------------------------------------- parsing


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    messages: tuple[ChatMessage, ...]
    sampling: SamplingOptions
    stream: bool
    include_usage: bool
    # The LoRA adapter ``model`` named (None: the base model).
    lora: str | None = None


def _opt_number(body: dict[str, Any], name: str, lo: float, hi: float, *,
                lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _bad(f"'{name}' must be a number", name)
    if not (lo < value if lo_open else lo <= value) or value > hi:
        bound = f"greater than {lo}" if lo_open else f"at least {lo}"
        raise _bad(f"'{name}' must be {bound} and at most {hi}", name)
    return float(value)


def _opt_int(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer", name)
    if not lo <= value <= hi:
        raise _bad(f"'{name}' must be between {lo} and {hi}", name)
    return value


def _opt_bool(body: dict[str, Any], name: str, param: str | None = None) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _bad(f"'{param or name}' must be a boolean", param or name)
    return value


def _opt_object(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"'{name}' must be an object", name)
    return value


def _content(raw: Any, where: str, role: str) -> str:
    if isinstance(raw, str):
        return raw
    if raw is None and role == "assistant":
        return ""
    if isinstance(raw, list):
        texts: list[str] = []
        for j, part in enumerate(raw):
            if not isinstance(part, dict):
                raise _bad(f"{where}.content[{j}] must be an object", f"{where}.content")
            kind = part.get("type")
            if kind != "text":
                raise _bad(f"{where}.content[{j}] has type {kind!r}; only 'text' parts are supported",
                           f"{where}.content")
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{where}.content[{j}].text must be a string", f"{where}.content")
            texts.append(text)
        return "\n".join(texts)
    raise _bad(f"{where}.content must be a string or an array of text parts", f"{where}.content")


def _messages(raw: Any) -> tuple[ChatMessage, ...]:
    if raw is None:
        raise _bad("missing required field 'messages'", "messages")
    if not isinstance(raw, list):
        raise _bad("'messages' must be an array", "messages")
    if not raw:
        raise _bad("'messages' must contain at least one message", "messages")
    if len(raw) > MAX_MESSAGES:
        raise _bad(f"'messages' holds more than {MAX_MESSAGES} messages", "messages")
    out: list[ChatMessage] = []
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an object", "messages")
        role = item.get("role")
        if not isinstance(role, str):
            raise _bad(f"{where}.role is missing or not a string", f"{where}.role")
        if role not in ROLES:
            raise _bad(f"{where}.role {role!r} is not supported; use one of system, user, assistant",
                       f"{where}.role")
        if "content" not in item and role != "assistant":
            raise _bad(f"{where}.content is missing", f"{where}.content")
        text = _content(item.get("content"), where, role)
        # OpenAI's "developer" role is the newer name for system instructions.
        out.append(ChatMessage("system" if role == "developer" else role, text))
    return tuple(out)


def _stop(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("'stop' must be a string or an array of strings", "stop")
    if len(items) > MAX_STOP_SEQUENCES:
        raise _bad(f"'stop' holds more than {MAX_STOP_SEQUENCES} sequences", "stop")
    return tuple(s for s in items if s)


def parse_request(body: Any, runtime: Runtime) -> CompletionRequest:
    """Validate a decoded body; raises ApiError (400) naming the offending field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", "model")
    messages = _messages(body.get("messages"))
    stream = _opt_bool(body, "stream") or False
    stream_options = _opt_object(body, "stream_options")
    include_usage = _opt_bool(stream_options, "include_usage", "stream_options.include_usage") or False
    n = _opt_int(body, "n", 1, 128)
    if n not in (None, 1):
        raise _bad("only 'n': 1 is supported", "n")
    temperature = _opt_number(body, "temperature", 0.0, 2.0)
    top_p = _opt_number(body, "top_p", 0.0, 1.0, lo_open=True)
    max_tokens = _opt_int(body, "max_tokens", 1, 2**31 - 1)
    max_completion = _opt_int(body, "max_completion_tokens", 1, 2**31 - 1)
    seed = _opt_int(body, "seed", -(2**63), 2**63 - 1)
    stop = _stop(body.get("stop"))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("'user' must be a string", "user")
    ignore_eos = _opt_bool(body, "ignore_eos") or False
    template = _opt_object(body, "chat_template_kwargs")
    thinking = _opt_bool(template, "enable_thinking", "chat_template_kwargs.enable_thinking")
    asked = max_completion if max_completion is not None else max_tokens
    # The WebSocket path's defaults and clamps, so both paths share one policy.
    base = runtime.manager.sampling_for(frames.TurnOptions(
        temperature=temperature, top_p=top_p, max_tokens=asked, enable_thinking=thinking))
    sampling = dataclasses.replace(base, seed=seed, stop=stop, ignore_eos=ignore_eos)
    lora = model if model is not None and model in runtime.engine.lora_adapters() else None
    return CompletionRequest(messages=messages, sampling=sampling, stream=stream,
                             include_usage=include_usage, lora=lora)


def check_context(req: CompletionRequest, runtime: Runtime) -> int:
    """Prompt tokens; ApiError ``context_length_exceeded`` when prompt + max_tokens do not fit."""
    engine = runtime.engine
    prompt = engine.count_tokens(req.messages)
    limit = engine.max_model_len
    if prompt + req.sampling.max_tokens > limit:
        raise ApiError(
            400, "context_length_exceeded",
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt + req.sampling.max_tokens} tokens ({prompt} in the messages, "
            f"{req.sampling.max_tokens} in the completion). Please reduce the length of the "
            "messages or the completion.", param="messages")
    return prompt


def check_input(req: CompletionRequest, runtime: Runtime, user_id: str) -> None:
    """ApiError 400 ``content_filter`` when the moderation policy refuses a user message.

    Every user message is checked, not only the last: the endpoint is stateless,
    so the whole conversation is the client's input.
    """
    for i, m in enumerate(req.messages):
        if m.role == "user" and runtime.moderation.input_blocked(m.content):
            runtime.moderation.record_block(user_id=user_id, turn_id=None, direction="input")
            raise ApiError(400, "content_filter", "the message was blocked by the content policy",
                           param=f"messages[{i}]")


async def _read_body(request: Request) -> bytes:
    try:
        return await read_bounded(request, MAX_BODY_BYTES)
    except BodyTooLarge as exc:
        # The same refusal, in the OpenAI error shape.
        raise ApiError(413, "too_large", exc.message) from None


#: The WebSocket's JSON decoding, so that a body meets the same refusals as a
#: frame: nesting deep enough to exhaust the parser, escaped lone surrogates (not
#: characters: they could not be stored or sent back as UTF-8), NaN and Infinity.
_JSON = codec_for(JSON_SUBPROTOCOL)


def _decode_json(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise _bad("the request body is empty; send a JSON object with 'messages'")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _bad("the request body is not valid UTF-8 JSON") from None
    if not text.lstrip().startswith("{"):
        # Only an object can be a request. Said before decoding and in this
        # endpoint's words: the codec's message for it speaks of frames.
        raise _bad("the request body must be a JSON object")
    try:
        return _JSON.decode(text)
    except BadRequest as exc:
        # The codec's reasons read "invalid JSON: ..."; say it once.
        reason = exc.message.removeprefix("invalid JSON: ")
        raise _bad(f"the request body is not valid JSON: {reason}") from None


# ---------------------------------------------------------------- auth


async def authenticate(request: Request, runtime: Runtime) -> str:
    """The user id of the request's Bearer JWT; ApiError 401 otherwise.

    Awaits the identity provider's key set when the token names a key not held
    yet (a rotation), as the WebSocket and REST endpoints do; refusals, missing
    credentials included, go to the audit log.
    """
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        missing = runtime.auth.missing(
            "missing credentials: send 'Authorization: Bearer <jwt>' (the JWT is the API key)")
        raise ApiError(401, "unauthorized", missing.message)
    try:
        return (await runtime.auth.authenticate(token)).user_id
    except Unauthorized as exc:
        raise ApiError(401, "unauthorized", exc.message) from None


# ---------------------------------------------------------------- the response


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _openai_usage(usage: Usage) -> dict[str, Any]:
    """The turn's usage in OpenAI's shape."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def _engine_usage(finish: EngineFinish) -> Usage:
    return Usage(prompt_tokens=finish.prompt_tokens, completion_tokens=finish.completion_tokens,
                 cached_prompt_tokens=finish.cached_prompt_tokens)


def _ms() -> float:
    return time.monotonic() * 1000.0


class _GenerationEnded(Exception):
    """The engine gave the request up: its stream stopped without a natural finish."""


class CompletionResponse:
    """An ASGI response that runs one completion while watching the connection.

    Two tasks: the producer (engine -> client) and a watcher that waits for the
    client's ``http.disconnect``. Whichever ends first decides: a disconnect
    cancels the producer, whose ``aclosing`` block closes the engine iterator
    and so aborts the request inside the engine. This works whatever ASGI
    version the server speaks and also while the engine has nothing to send.

    The completion is a turn like a WebSocket one, driven through the same pure
    :class:`~sessions.turn.Turn`: it numbers nothing that anybody resumes, but
    it decides the finish reason, the timings and the usage, which go to the
    client and to the same metrics. The client leaving is a cancel; the
    first-token deadline, an engine failure and an engine that gives up are the
    same events as on the WebSocket.
    """

    def __init__(self, runtime: Runtime, req: CompletionRequest, *, user_id: str, prompt_tokens: int,
                 received_ms: float) -> None:
        self.runtime = runtime
        self.req = req
        self.user_id = user_id
        self.prompt_tokens = prompt_tokens
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = req.lora or runtime.engine.model_name
        self.client_gone = False
        self.turn = Turn(turn_id=self.id, received_ms=received_ms)
        # The engine refused the prompt before running it: not a turn, not counted.
        self._refused = False
        self._recorded = False
        self._last_delta_ms: float | None = None
        # The same output filter as a WebSocket reply: only released text is sent.
        self._moderation = runtime.moderation
        self._filter = runtime.moderation.output_filter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        producer = loop.create_task(self._produce(send), name=f"completion {self.id}")
        watcher = loop.create_task(_wait_disconnect(receive), name=f"watch {self.id}")
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not producer.done():
                self.client_gone = True
        finally:
            for task in (producer, watcher):
                if not task.done():
                    task.cancel()
            await asyncio.gather(producer, watcher, return_exceptions=True)
            # The client leaving is a cancel; a producer that stopped without
            # ending the turn failed on the way, and the turn ends interrupted.
            # Either is a no-op for a turn that has already ended.
            self._interrupt(TurnEvent.CANCEL if self.client_gone else TurnEvent.ENGINE_FAILED)
            self._record()
        if not producer.cancelled() and producer.exception() is not None and not self.client_gone:
            raise producer.exception()  # type: ignore[misc]

    # -- the turn ---------------------------------------------------------

    def _partial_usage(self) -> Usage:
        """Usage of a turn the engine did not finish: the prompt as counted up front."""
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.turn.completion_tokens)

    def _interrupt(self, event: TurnEvent) -> None:
        self.turn.interrupt(event, _ms(), self._partial_usage())

    def _record(self) -> None:
        """Count the ended turn once in the turn metrics, if it reached the engine.

        Called before the last bytes go out, so a client that has its answer
        already finds it counted.
        """
        ending = self.turn.ending
        if self._recorded or ending is None or self.turn.submitted_ms is None or self._refused:
            return
        self._recorded = True
        self.runtime.metrics.turn_ended(ending.finish_reason, ending.timings, ending.usage.as_dict(),
                                        self.runtime.settings.ttft_budget_ms)

    def _delta_sent(self) -> None:
        now = _ms()
        if self._last_delta_ms is not None:
            self.runtime.metrics.delta_gap((now - self._last_delta_ms) / 1000.0)
        self._last_delta_ms = now

    # -- generation -------------------------------------------------------

    async def _produce(self, send: Send) -> None:
        rt = self.runtime
        request = EngineRequest(request_id=self.id, messages=self.req.messages,
                                sampling=self.req.sampling, user_id=self.user_id, lora=self.req.lora)
        self.turn.submitted(_ms())
        # Typed as an iterator, but every engine returns an async generator,
        # whose aclose() aborts the request (see server.engines.base).
        stream = cast(AsyncGenerator[EngineEvent, None], rt.engine.generate(request))
        async with contextlib.aclosing(stream):  # closing it aborts the engine request
            try:
                first = await self._first_event(stream)
            except ApiError as exc:
                self._record()
                await _send_json(send, exc.status, exc.body(), exc.headers())
                return
            if self.req.stream:
                await self._stream(send, first, stream)
            else:
                await self._collect(send, first, stream)

    async def _first_event(self, stream: AsyncIterator[EngineEvent]) -> EngineEvent:
        """The engine's first event within the first-token deadline, or an ApiError.

        The response status is decided here, so whatever ends the turn before
        its first event is answered as an HTTP error.
        """
        settings = self.runtime.settings
        left = settings.hard_deadline_ms - (_ms() - self.turn.received_ms)
        try:
            return await asyncio.wait_for(anext(stream), timeout=max(0.001, left / 1000.0))
        except TimeoutError:
            self._interrupt(TurnEvent.DEADLINE)
            raise ApiError(503, "budget_exceeded",
                           f"no first token within {settings.hard_deadline_ms} ms; retry shortly",
                           retry_after_ms=1000) from None
        except StopAsyncIteration:
            self.turn.engine_stopped(None, self._partial_usage(), _ms())
            raise ApiError(503, "unavailable", "the engine aborted the request; retry") from None
        except TooLarge as exc:
            self._refused = True
            raise ApiError(400, "context_length_exceeded", exc.message, param="messages") from None
        except EngineError as exc:
            self._interrupt(TurnEvent.ENGINE_FAILED)
            raise ApiError(503, "unavailable", f"the engine failed: {exc.message}",
                           retry_after_ms=1000) from None
        except RapportError as exc:
            self._interrupt(TurnEvent.INTERNAL_ERROR)
            raise ApiError.from_rapport(exc) from None

    async def _texts(self, first: EngineEvent, stream: AsyncIterator[EngineEvent]) -> AsyncIterator[str]:
        """The text of each delta the turn takes, starting with ``first``.

        When it is exhausted the turn has finished naturally; raises
        _GenerationEnded (or the engine's EngineError) otherwise.
        """
        event = first
        while True:
            if isinstance(event, EngineFinish):
                if event.finish_reason in ENGINE_FINISH_REASONS and self._filter is not None:
                    # A natural end: the held-back tail goes out if it is clean.
                    text, blocked = self._filter.finish()
                    if text:
                        yield self._released(text, 0)
                    if blocked:
                        self._blocked(_engine_usage(event))
                        return
                ending = self.turn.engine_stopped(event.finish_reason, _engine_usage(event), _ms())
                if ending.finish_reason not in ENGINE_FINISH_REASONS:
                    raise _GenerationEnded()
                return
            text, blocked = event.text, False
            if self._filter is not None:
                text, blocked = self._filter.feed(text)
            released = self._released(text, event.tokens)
            if released:
                yield released
            if blocked:
                self._blocked(self._partial_usage())
                # Abort the engine request now rather than after the last bytes.
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
                return
            try:
                event = await anext(stream)
            except StopAsyncIteration:
                self.turn.engine_stopped(None, self._partial_usage(), _ms())
                raise _GenerationEnded() from None

    def _released(self, text: str, tokens: int) -> str:
        """Text the filter released, through the turn; what to send (may be empty)."""
        out = self.turn.delta(text, tokens, _ms())
        if out is None:
            return ""
        self._delta_sent()
        return out.text

    def _blocked(self, usage: Usage) -> None:
        """The filter blocked the reply: it ends ``content_filter``, as OpenAI names it."""
        self.turn.content_filtered(_ms(), usage)
        self._moderation.record_block(user_id=self.user_id, turn_id=self.id, direction="output")

    def _stopped(self, exc: _GenerationEnded | EngineError, *, retry_after_ms: float | None = None) -> ApiError:
        """The error for a generation that stopped after the response status was decided."""
        self._interrupt(TurnEvent.ENGINE_FAILED)  # a no-op when the engine already ended the turn
        message = exc.message if isinstance(exc, EngineError) else "the engine aborted the request"
        return ApiError(503, "unavailable", f"generation stopped: {message}", retry_after_ms=retry_after_ms)

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.req.include_usage:
            chunk["usage"] = None
        return b"data: " + _dumps(chunk) + b"\n\n"

    async def _stream(self, send: Send, first: EngineEvent, stream: AsyncIterator[EngineEvent]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            (b"x-request-id", self.id.encode()),
        ]})

        async def body(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        await body(self._chunk({"role": "assistant", "content": ""}))
        try:
            async for text in self._texts(first, stream):
                await body(self._chunk({"content": text}))
        except (_GenerationEnded, EngineError) as exc:
            await body(b"data: " + _dumps(self._stopped(exc).body()) + b"\n\n")
        else:
            ending = self.turn.ending
            assert ending is not None
            await body(self._chunk({}, ending.finish_reason))
            if self.req.include_usage:
                usage_chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                               "model": self.model, "system_fingerprint": None, "choices": [],
                               "usage": _openai_usage(ending.usage)}
                await body(b"data: " + _dumps(usage_chunk) + b"\n\n")
        self._record()
        await body(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _collect(self, send: Send, first: EngineEvent, stream: AsyncIterator[EngineEvent]) -> None:
        try:
            async for _ in self._texts(first, stream):
                pass
        except (_GenerationEnded, EngineError) as exc:
            err = self._stopped(exc, retry_after_ms=1000)
            self._record()
            await _send_json(send, err.status, err.body(), err.headers())
            return
        ending = self.turn.ending
        assert ending is not None
        body = {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ending.text},
                         "logprobs": None, "finish_reason": ending.finish_reason}],
            "usage": _openai_usage(ending.usage),
        }
        self._record()
        await _send_json(send, 200, body, {"x-request-id": self.id})


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    data = _dumps(body)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class _AsgiResponse(Response):
    """Lets an endpoint return the ASGI callable above through Starlette's Route."""

    def __init__(self, app: CompletionResponse) -> None:
        self._app = app
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


# ---------------------------------------------------------------- endpoints


async def chat_completions(request: Request) -> Response:
    received = _ms()
    rt: Runtime = request.app.state.runtime
    try:
        user_id = await authenticate(request, rt)
        req = parse_request(_decode_json(await _read_body(request)), rt)
        check_input(req, rt, user_id)
        prompt_tokens = check_context(req, rt)
        await rt.admit_turn(user_id, prompt_tokens=prompt_tokens)
    except ApiError as exc:
        return exc.response()
    except RapportError as exc:
        return ApiError.from_rapport(exc).response()
    except ClientDisconnect:
        return Response(status_code=400)
    return _AsgiResponse(CompletionResponse(rt, req, user_id=user_id, prompt_tokens=prompt_tokens,
                                            received_ms=received))


async def list_models(request: Request) -> Response:
    rt: Runtime = request.app.state.runtime
    try:
        await authenticate(request, rt)
    except ApiError as exc:
        return exc.response()
    engine = rt.engine
    return JSONResponse({"object": "list", "data": [{
        "id": engine.model_name, "object": "model", "created": _STARTED, "owned_by": "rapport",
        "root": engine.model_name, "parent": None, "max_model_len": engine.max_model_len,
    }] + [{
        "id": name, "object": "model", "created": _STARTED, "owned_by": "rapport",
        "root": name, "parent": engine.model_name, "max_model_len": engine.max_model_len,
    } for name in engine.lora_adapters()]})


_STARTED = int(time.time())

routes: list[BaseRoute] = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
]
